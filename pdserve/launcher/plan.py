"""What `pdserve launch` starts, as data: the LaunchConfig, its parts, their command lines and environment.

Nothing here starts a process (supervisor.py does) or knows what runs inside an instance.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pdserve.config import KV_TRANSFER_MODES, ROLES, DisaggConfig
from pdserve.config import TRANSFER_ENGINES as KV_TRANSFER_ENGINES
from pdserve.http.limits import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_STALL_TIMEOUT_S
from pdserve.procs import free_port

INSTANCE_ROLES = ROLES
ROUTER = "router"
CLUSTER_SECRET_VAR = "PDSERVE_CLUSTER_SECRET"  # how children get the cluster secret: never on a command line


@dataclass(frozen=True)
class LaunchConfig:
    """What to start. `engine_argv` goes to every instance as given; the launcher adds its own flags before it."""

    num_prefill: int = 1
    num_decode: int = 1
    num_mixed: int = 0
    tp: int = 1
    kv_transfer: str = "direct"
    kv_transfer_engine: str = "auto"
    policy: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    log_level: str = "INFO"
    engine_argv: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()  # CUDA devices the instances are spread over (empty: each instance's rank r on r)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # the router's and every instance's
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S  # the router's and every instance's
    cluster_secret: str | None = field(default=None, repr=False)  # every child's, through CLUSTER_SECRET_VAR

    def __post_init__(self) -> None:
        for flag, value in (
            ("--num-prefill", self.num_prefill),
            ("--num-decode", self.num_decode),
            ("--num-mixed", self.num_mixed),
        ):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if self.num_instances == 0:
            raise ValueError("nothing to launch: --num-prefill, --num-decode and --num-mixed are all 0")
        if self.num_mixed and (self.num_prefill or self.num_decode):
            raise ValueError(
                f"--num-mixed {self.num_mixed} runs replicas without PD disaggregation; it needs "
                f"--num-prefill 0 --num-decode 0 (got {self.num_prefill} and {self.num_decode})"
            )
        if not self.num_mixed and not (self.num_prefill and self.num_decode):
            raise ValueError(
                f"PD disaggregation needs at least one prefill and one decode instance (got "
                f"--num-prefill {self.num_prefill} --num-decode {self.num_decode}); for replicas that "
                "serve requests end to end use --num-prefill 0 --num-decode 0 --num-mixed N"
            )
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")
        if self.kv_transfer not in KV_TRANSFER_MODES:
            raise ValueError(f"--kv-transfer {self.kv_transfer!r} is not one of {', '.join(KV_TRANSFER_MODES)}")
        if self.kv_transfer_engine not in KV_TRANSFER_ENGINES:
            raise ValueError(
                f"--kv-transfer-engine {self.kv_transfer_engine!r} is not one of {', '.join(KV_TRANSFER_ENGINES)}"
            )
        if self.gpus and (len(set(self.gpus)) != len(self.gpus) or min(self.gpus) < 0 or len(self.gpus) < self.tp):
            raise ValueError(
                f"--gpus needs at least --tp {self.tp} distinct device indices >= 0, got "
                f"{','.join(map(str, self.gpus))}"
            )
        if "--gpu-ids" in self.engine_argv:
            raise ValueError(
                "pdserve launch places instances itself: give --gpus (the devices to spread them over), not --gpu-ids"
            )
        if self.kv_transfer == "storage" and {"--kv-store", "--kv-store-config"} & set(self.engine_argv):
            raise ValueError(
                "--kv-transfer storage starts its own Mooncake master and sets --kv-store and "
                "--kv-store-config for every instance; drop those flags"
            )

    @property
    def num_instances(self) -> int:
        return self.num_prefill + self.num_decode + self.num_mixed


@dataclass(frozen=True)
class Part:
    """One child process of the deployment: an instance (`role` prefill | decode | mixed) or the router."""

    name: str  # "prefill-0", "router": the log prefix and the log file's name
    role: str
    port: int
    control_port: int | None = None  # prefill and decode only
    host: str = "127.0.0.1"
    gpu_ids: tuple[int, ...] = ()  # instances placed by --gpus: the device of each rank

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def probe_host(self) -> str:
        """Where this host reaches it (a wildcard bind is reached through loopback)."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    @property
    def probe_url(self) -> str:
        return f"http://{_url_host(self.probe_host)}:{self.port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ---- parts, command lines, environment ---------------------------------------------------------------


def plan_parts(config: LaunchConfig, allocate_port: Callable[[], int] = free_port) -> list[Part]:
    """Instances in start order (prefill, decode, mixed), then the router. With --gpus, instance k's ranks get
    the next --tp devices of the list, from k * tp on, wrapping round (more instances than GPUs share them)."""
    parts: list[Part] = []
    for role, count in (("prefill", config.num_prefill), ("decode", config.num_decode), ("mixed", config.num_mixed)):
        for i in range(count):
            control_port = allocate_port() if role != "mixed" else None
            first = len(parts) * config.tp
            gpu_ids = (
                tuple(config.gpus[(first + r) % len(config.gpus)] for r in range(config.tp)) if config.gpus else ()
            )
            parts.append(Part(f"{role}-{i}", role, allocate_port(), control_port, gpu_ids=gpu_ids))
    parts.append(Part(ROUTER, ROUTER, config.port, host=config.host))
    return parts


def build_instance_argv(
    config: LaunchConfig, part: Part, store_config: Mapping[str, object] | None = None, python: str = sys.executable
) -> list[str]:
    argv = [python, "-m", "pdserve.cli", "serve", "--role", part.role, "--port", str(part.port)]
    if part.role != "mixed":
        argv += [
            "--control-port",
            str(part.control_port),
            "--kv-transfer",
            config.kv_transfer,
            "--kv-transfer-engine",
            config.kv_transfer_engine,
        ]
    argv += ["--tensor-parallel-size", str(config.tp), "--log-level", config.log_level]
    argv += _robustness_argv(config)
    if part.gpu_ids:
        argv += ["--gpu-ids", ",".join(map(str, part.gpu_ids))]
    if store_config is not None:
        argv += ["--kv-store", "mooncake", "--kv-store-config", json.dumps(store_config)]
    return argv + list(config.engine_argv)


def build_router_argv(config: LaunchConfig, instances: Sequence[Part], python: str = sys.executable) -> list[str]:
    argv = [python, "-m", "pdserve.cli", "router"]
    for role in INSTANCE_ROLES:
        urls = [p.url for p in instances if p.role == role]
        if urls:
            argv += [f"--{role}", *urls]
    argv += ["--port", str(config.port), "--host", config.host]
    if config.policy is not None:
        argv += ["--policy", config.policy]
    if config.api_key:
        argv += ["--api-key", config.api_key]
    argv += _robustness_argv(config)
    return argv + ["--log-level", config.log_level]


def _robustness_argv(config: LaunchConfig) -> list[str]:
    """--max-request-bytes and --stall-timeout where they differ from the defaults (router and instances alike)."""
    argv = []
    if config.max_request_bytes != DEFAULT_MAX_REQUEST_BYTES:
        argv += ["--max-request-bytes", str(config.max_request_bytes)]
    if config.stall_timeout != DEFAULT_STALL_TIMEOUT_S:
        argv += ["--stall-timeout", f"{config.stall_timeout:g}"]
    return argv


def usable_cpus() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def omp_num_threads(num_instances: int, tp: int, num_cpus: int) -> int:
    """CPU threads per rank so that every instance process together uses the cores once."""
    return max(1, num_cpus // (num_instances * tp))


def cluster_secret_for(host: str, given: str | None) -> str | None:
    """The deployment's cluster secret: `given` (PDSERVE_CLUSTER_SECRET) when set; else a new random one when
    the router binds `host` beyond loopback; else None (every listener is on loopback)."""
    if given:
        return given
    return None if DisaggConfig.is_loopback(host) else secrets.token_hex(32)


def child_env(base: Mapping[str, str], num_threads: int, cluster_secret: str | None = None) -> dict[str, str]:
    """The children's environment: the user's OMP_NUM_THREADS wins; no API key (only the router checks one);
    the cluster secret, when there is one, in CLUSTER_SECRET_VAR (an environment is private to its process and
    user, a command line is not)."""
    env = {k: v for k, v in base.items() if k != "PDSERVE_API_KEY"}
    if cluster_secret:
        env[CLUSTER_SECRET_VAR] = cluster_secret
    env.setdefault("OMP_NUM_THREADS", str(num_threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"  # their stdout is a pipe: lines must reach the log as they are written
    return env
