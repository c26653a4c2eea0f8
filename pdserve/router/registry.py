"""The router's view of its instances: who they are, whether they answer, and what they said about themselves.

Static instances come from the command line and stay until the router stops;
registered ones join through POST /register (re-posting is the heartbeat) and
are dropped after missing `num_missed_heartbeats` intervals. One background
task checks every instance (GET /health, then GET /v1/pd/info) concurrently
with short timeouts; requests only read the state it keeps and never wait for
a check. An instance that refuses, answers non-200 or fails is unhealthy at
once; one that is only slow must time out twice in a row (a busy machine is
not a hung instance). This module knows nothing about request bodies or
routing policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from pdserve.config import KV_TRANSFER_MODES, ROLES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthSettings:
    interval_s: float = 2.0  # between checks of every instance; also the default heartbeat interval
    timeout_s: float = 2.0  # per check request (/health, /v1/pd/info)
    num_missed_heartbeats: int = 3  # a registered instance silent this many intervals is dropped

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"--health-interval must be > 0 seconds, got {self.interval_s}")
        if not self.timeout_s > 0:
            raise ValueError(f"the health check timeout must be > 0 seconds, got {self.timeout_s}")
        if self.num_missed_heartbeats < 1:
            raise ValueError(f"num_missed_heartbeats must be >= 1, got {self.num_missed_heartbeats}")


def normalize_url(url: str, what: str = "instance URL") -> str:
    """'http://host:port' without a trailing slash; ValueError naming `what` for anything else."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ValueError(f"{what} {url!r} is not an http(s) URL with a host and a port, like http://127.0.0.1:8001")
    if parts.query or parts.fragment or parts.path.strip("/"):
        raise ValueError(f"{what} {url!r} must be the server's root (no path), like http://127.0.0.1:8001")
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class InstanceInfo:
    """What an instance says about itself on GET /v1/pd/info."""

    role: str
    incarnation: str  # new on every start of the instance
    control_address: str  # tcp://host:port of its KV control plane
    fingerprint: str  # model weights, dtype, block size, layout: P and D of a pair must agree
    model: str
    tp_size: int
    kv_transfer: str  # direct | storage
    num_open_requests: int = 0
    num_blocks_free: int = 0
    num_blocks_total: int = 0

    @classmethod
    def from_json(cls, data: Any) -> InstanceInfo:
        """Parse the /v1/pd/info body; ValueError naming the first bad field."""
        if not isinstance(data, dict):
            raise ValueError("/v1/pd/info did not answer a JSON object")
        values: dict[str, Any] = {}
        for name, kind in (
            ("role", str),
            ("incarnation", str),
            ("control_address", str),
            ("fingerprint", str),
            ("model", str),
            ("tp_size", int),
            ("kv_transfer", str),
            ("num_open_requests", int),
            ("num_blocks_free", int),
            ("num_blocks_total", int),
        ):
            value = data.get(name)
            if value is None and name.startswith("num_"):
                continue
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"/v1/pd/info field {name!r} should be a {kind.__name__}, got {value!r}")
            values[name] = value
        info = cls(**values)
        if info.role not in ROLES:
            raise ValueError(f"/v1/pd/info role {info.role!r} is not one of {', '.join(ROLES)}")
        if info.kv_transfer not in KV_TRANSFER_MODES:
            raise ValueError(f"/v1/pd/info kv_transfer {info.kv_transfer!r} is not direct or storage")
        return info


@dataclass(eq=False)
class Instance:
    """One instance as the router knows it. Mutated only by the registry (health) and the app (in-flight)."""

    url: str
    role: str
    is_static: bool  # from the command line; otherwise registered through POST /register
    is_healthy: bool = False
    info: InstanceInfo | None = None  # None until the first good check (and for a mixed one without /v1/pd/info)
    last_error: str | None = None
    num_in_flight: int = 0  # requests the router has open on it now
    num_requests: int = 0  # requests the router has sent it
    num_failures: int = 0  # failed checks and failed requests since it was last healthy
    heartbeat_interval_s: float = 0.0  # registered only
    last_heartbeat: float = field(default_factory=time.monotonic)
    unhealthy_since: float | None = None  # monotonic time it last went from healthy (or unknown) to unhealthy
    num_slow_checks: int = 0  # health checks in a row that timed out while it was healthy (one is forgiven)

    def unhealthy_for(self, now: float) -> float:
        """Seconds it has been unhealthy without a break (0 while healthy)."""
        return 0.0 if self.is_healthy or self.unhealthy_since is None else now - self.unhealthy_since

    @property
    def incarnation(self) -> str | None:
        return self.info.incarnation if self.info else None

    @property
    def control_address(self) -> str | None:
        return self.info.control_address if self.info else None

    @property
    def fingerprint(self) -> str | None:
        return self.info.fingerprint if self.info else None

    @property
    def tp_size(self) -> int | None:
        return self.info.tp_size if self.info else None

    def describe(self) -> dict[str, Any]:
        """The JSON the router's /health lists."""
        return {
            "url": self.url,
            "role": self.role,
            "source": "static" if self.is_static else "registered",
            "healthy": self.is_healthy,
            "in_flight": self.num_in_flight,
            "requests": self.num_requests,
            "incarnation": self.incarnation,
            "control_address": self.control_address,
            "fingerprint": self.fingerprint,
            "tp_size": self.tp_size,
            "kv_transfer": self.info.kv_transfer if self.info else None,
            "last_error": self.last_error,
        }


class Registry:
    """Instances by URL, and the loop that keeps their health current.

    Runs on one event loop; no locks. `start()` needs the router's shared HTTP session.
    """

    def __init__(self, health: HealthSettings | None = None, headers: dict[str, str] | None = None) -> None:
        self.health = health or HealthSettings()
        self._headers = dict(headers or {})
        self._instances: dict[str, Instance] = {}
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    # -- membership ---------------------------------------------------------------------------------------------

    def add(self, url: str, role: str) -> Instance:
        """A static instance (command line). ValueError for a bad URL or role, or a URL listed twice."""
        url = normalize_url(url, f"--{role} URL")
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if url in self._instances:
            raise ValueError(f"{url} is listed twice (as {self._instances[url].role} and {role}); list it once")
        inst = self._instances[url] = Instance(url, role, is_static=True)
        return inst

    def register(self, url: str, role: str, interval_s: float | None = None) -> tuple[Instance, bool]:
        """Join or heartbeat; returns (instance, is_new). ValueError for a bad URL or role."""
        url = normalize_url(url, "the registered url")
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if interval_s is not None and not interval_s > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval_s}")
        inst = self._instances.get(url)
        is_new = inst is None or inst.role != role
        if inst is not None and inst.is_static and inst.role != role:
            raise ValueError(
                f"{url} is a {inst.role} instance on the router's command line; it cannot register as {role}"
            )
        if inst is not None and inst.role != role:
            logger.warning("instance %s registered as %s; it was %s", url, role, inst.role)
            inst = self._instances[url] = Instance(url, role, is_static=False)
        elif inst is None:
            inst = self._instances[url] = Instance(url, role, is_static=False)
            logger.info("instance %s registered as %s", url, role)
        inst.heartbeat_interval_s = interval_s or self.health.interval_s
        inst.last_heartbeat = time.monotonic()
        if is_new:
            self.request_check()
        return inst, is_new

    def unregister(self, url: str) -> Instance | None:
        """Drop a registered instance; a static one only goes unhealthy until a check finds it up again."""
        url = normalize_url(url, "the unregistered url")
        inst = self._instances.get(url)
        if inst is None:
            return None
        if inst.is_static:
            self._set_unhealthy(inst, "it unregistered")
        else:
            del self._instances[url]
            logger.info("instance %s (%s) unregistered", url, inst.role)
        return inst

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def get(self, url: str) -> Instance | None:
        return self._instances.get(url)

    def healthy(self, role: str) -> list[Instance]:
        return [i for i in self._instances.values() if i.is_healthy and i.role == role]

    def mark_failed(self, inst: Instance, reason: str) -> None:
        """A request could not reach `inst`: unhealthy now, and an early check to find out whether it is back."""
        self._set_unhealthy(inst, reason)
        self.request_check()

    def request_check(self) -> None:
        self._wake.set()

    # -- the health loop ----------------------------------------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Check every instance once (so the first request sees known health), then keep checking in the background."""
        self._session = session
        await self.check_all()
        self._task = asyncio.create_task(self._run(), name="pdserve-router-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check_all(self) -> None:
        """Check every instance once, concurrently; never raises."""
        await asyncio.gather(*(self._check(inst) for inst in self.instances()))

    def expire(self, now: float | None = None) -> list[Instance]:
        """Drop registered instances whose heartbeats stopped; returns the dropped."""
        now = time.monotonic() if now is None else now
        limit = self.health.num_missed_heartbeats
        dropped = [
            i
            for i in self._instances.values()
            if not i.is_static and now - i.last_heartbeat > limit * i.heartbeat_interval_s
        ]
        for inst in dropped:
            del self._instances[inst.url]
            logger.warning(
                "instance %s (%s) missed %d heartbeats (%.1f s); dropped",
                inst.url,
                inst.role,
                limit,
                now - inst.last_heartbeat,
            )
        return dropped

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.health.interval_s)
            self._wake.clear()
            self.expire()
            await self.check_all()

    async def _check(self, inst: Instance) -> None:
        assert self._session is not None, "Registry.start() first"
        timeout = aiohttp.ClientTimeout(total=self.health.timeout_s)
        try:
            async with self._session.get(f"{inst.url}/health", headers=self._headers, timeout=timeout) as r:
                await r.read()
                if r.status != 200:
                    self._set_unhealthy(inst, f"/health answered HTTP {r.status}")
                    return
            async with self._session.get(f"{inst.url}/v1/pd/info", headers=self._headers, timeout=timeout) as r:
                if r.status == 404 and inst.role == "mixed":  # a plain OpenAI server can be a mixed instance
                    self._set_healthy(inst, None)
                    return
                if r.status != 200:
                    self._set_unhealthy(inst, f"/v1/pd/info answered HTTP {r.status}")
                    return
                info = InstanceInfo.from_json(await r.json(content_type=None))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if isinstance(e, asyncio.TimeoutError) and inst.is_healthy and inst.num_slow_checks == 0:
                inst.num_slow_checks = 1  # one slow answer is a busy machine, not a hung instance: check again
                logger.debug("instance %s was slow to answer its health check (%s)", inst.url, reason)
                return
            self._set_unhealthy(inst, reason)
            return
        if info.role != inst.role:
            self._set_unhealthy(inst, f"it reports role {info.role} but was added as {inst.role}")
            return
        self._set_healthy(inst, info)

    def _set_healthy(self, inst: Instance, info: InstanceInfo | None) -> None:
        old = inst.incarnation
        if old is not None and info is not None and info.incarnation != old:
            logger.warning("instance %s restarted (incarnation %s -> %s)", inst.url, old, info.incarnation)
        if not inst.is_healthy:
            logger.info(
                "instance %s (%s) is healthy (incarnation %s)",
                inst.url,
                inst.role,
                info.incarnation if info else "unknown",
            )
        inst.info = info
        inst.is_healthy = True
        inst.last_error = None
        inst.num_failures = 0
        inst.num_slow_checks = 0
        inst.unhealthy_since = None

    def _set_unhealthy(self, inst: Instance, reason: str) -> None:
        inst.num_failures += 1
        if inst.is_healthy or inst.last_error is None:
            logger.warning("instance %s (%s) is unhealthy: %s", inst.url, inst.role, reason)
        if inst.is_healthy or inst.unhealthy_since is None:
            inst.unhealthy_since = time.monotonic()
        inst.is_healthy = False
        inst.last_error = reason
