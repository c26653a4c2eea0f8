"""An instance's side of router membership: `pdserve serve --register-with ROUTER_URL` runs `heartbeat()`.

It POSTs /register {"url", "role", "interval"} every interval and POST
/unregister {"url"} on stop. A router that is down or refuses is logged, never
fatal: the instance keeps serving and keeps trying. The interval in the body
tells the router when heartbeats stopped (after `num_missed_heartbeats`). The
router's side is pdserve/router/membership.py; this module knows only the
router's URL and those two endpoints. With a cluster secret, every POST carries
it in the X-PDServe-Cluster-Secret header (a router with a secret refuses
membership changes without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from pdserve.http.auth import SECRET_HEADER

logger = logging.getLogger(__name__)

UNREGISTER_TIMEOUT_S = 2.0


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], headers: dict[str, str], timeout_s: float
) -> str | None:
    """None on a 2xx answer, else what went wrong."""
    try:
        async with session.post(
            url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            text = await resp.text()
            return None if resp.status < 300 else f"HTTP {resp.status}: {text[:300]}"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _headers(api_key: str | None, cluster_secret: str | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if cluster_secret:
        headers[SECRET_HEADER] = cluster_secret
    return headers


async def heartbeat(
    router_url: str,
    self_url: str,
    role: str,
    interval: float,
    stop: asyncio.Event,
    api_key: str | None = None,
    cluster_secret: str | None = None,
) -> None:
    """Register `self_url` as `role` with the router every `interval` seconds until `stop` is set, then unregister.

    Never raises for network or router errors (they are logged: the first of a run of failures at WARNING, the
    rest at DEBUG). Returns after the unregister attempt (at most UNREGISTER_TIMEOUT_S).
    """
    if not interval > 0:
        raise ValueError(f"the heartbeat interval must be > 0 seconds, got {interval}")
    router_url = router_url.rstrip("/")
    headers = _headers(api_key, cluster_secret)
    body: dict[str, object] = {"url": self_url, "role": role, "interval": interval}
    is_failing, is_registered = False, False
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            error = await _post(session, f"{router_url}/register", body, headers, timeout_s=max(interval, 1.0))
            if error is not None:
                logger.log(
                    logging.DEBUG if is_failing else logging.WARNING,
                    "cannot register %s with the router %s (%s); retrying every %g s",
                    self_url,
                    router_url,
                    error,
                    interval,
                )
            else:
                logger.log(
                    logging.DEBUG if is_registered and not is_failing else logging.INFO,
                    "registered %s as %s with the router %s",
                    self_url,
                    role,
                    router_url,
                )
                is_registered = True
            is_failing = error is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        error = await _post(session, f"{router_url}/unregister", {"url": self_url}, headers, UNREGISTER_TIMEOUT_S)
        if error is not None:
            logger.warning(
                "cannot unregister %s from the router %s (%s); it drops it after missed heartbeats",
                self_url,
                router_url,
                error,
            )
        else:
            logger.info("unregistered %s from %s", self_url, router_url)
