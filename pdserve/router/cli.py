"""`pdserve router`: the command line of the router (wired into pdserve/cli.py by `add_router_parser`)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdserve.http.limits import add_robustness_args
from pdserve.router.policies import POLICIES, RouterPolicy, make_policy
from pdserve.router.registry import HealthSettings, Registry

if TYPE_CHECKING:
    from pdserve.router.app import RouterSettings

logger = logging.getLogger(__name__)

POLICY_HELP = (
    "how a request picks its instances: least_loaded (default: fewest requests the router has open on an "
    "instance, ties round robin; it assumes nothing about the workload and never piles requests on a slow "
    "instance), round_robin, or cache_aware (the same prompt prefix goes to the same P, or mixed "
    "instance, for prefix-cache hits unless it is busier than the least loaded by more than 4 requests; "
    "D is least_loaded; worth it when prompts share long prefixes)"
)


def add_router_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add `router` to an argparse subparsers object; `parents` may bring shared flags such as --log-level."""
    p = subparsers.add_parser(
        "router",
        parents=list(parents),
        help="OpenAI-compatible front door over prefill/decode (or mixed) instances",
        description="Route OpenAI requests to P/D pairs (both at once, KV moving P -> D) or to "
        "mixed instances. Instances listed here are static; others may join "
        "with `pdserve serve --register-with URL`.",
    )
    p.add_argument(
        "--prefill",
        nargs="+",
        action="extend",
        default=[],
        metavar="URL",
        help="prefill instance URLs, e.g. http://127.0.0.1:8001 (repeatable)",
    )
    p.add_argument(
        "--decode", nargs="+", action="extend", default=[], metavar="URL", help="decode instance URLs (repeatable)"
    )
    p.add_argument(
        "--mixed",
        nargs="+",
        action="extend",
        default=[],
        metavar="URL",
        help="mixed instance URLs: used when no healthy P/D pair exists (repeatable)",
    )
    p.add_argument("--policy", choices=tuple(POLICIES), default="least_loaded", help=POLICY_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--health-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="between health checks of every instance; registered instances are dropped after 3 missed heartbeats",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="a request's arrival to its last byte; past it the client gets 504 (or an SSE error event)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' from clients and send it to instances (or PDSERVE_API_KEY)",
    )
    add_robustness_args(p)
    p.add_argument(
        "--max-migrations",
        type=int,
        default=2,
        help="times one request may move to another instance when its instance dies or stalls mid-request "
        "(0: never; the client then gets an error event within the stall timeout)",
    )
    p.add_argument(
        "--cluster-secret",
        default=None,
        help="a shared secret the deployment's control messages carry (instance registration, KV control); "
        "required when anything binds beyond loopback (or PDSERVE_CLUSTER_SECRET; docs/security.md)",
    )
    if not any(a.dest == "log_level" for parent in parents for a in parent._actions):
        p.add_argument(
            "--log-level",
            default=os.environ.get("PDSERVE_LOG_LEVEL", "INFO"),
            help="DEBUG, INFO, WARNING or ERROR (PDSERVE_LOG_LEVEL)",
        )
    p.set_defaults(func=cmd_router)
    return p


def build_from_args(args: argparse.Namespace) -> tuple[Registry, RouterPolicy, RouterSettings]:
    """(registry, policy, settings) from parsed flags; ValueError with the flag's name for bad values."""
    from pdserve.router.app import RouterSettings

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1..65535, got {args.port}")
    api_key = args.api_key or os.environ.get("PDSERVE_API_KEY") or None
    settings = RouterSettings(
        request_timeout_s=args.request_timeout,
        api_key=api_key,
        max_request_bytes=args.max_request_bytes,
        stall_timeout_s=args.stall_timeout,
        max_migrations=args.max_migrations,
        cluster_secret=args.cluster_secret or os.environ.get("PDSERVE_CLUSTER_SECRET") or None,
    )
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    registry = Registry(HealthSettings(interval_s=args.health_interval), headers)
    for role in ("prefill", "decode", "mixed"):
        for url in getattr(args, role):
            registry.add(url, role)
    return registry, make_policy(args.policy), settings


def cmd_router(args: argparse.Namespace) -> int:
    import uvicorn

    from pdserve.router.app import build_router_app

    registry, policy, settings = build_from_args(args)
    if not registry.instances():
        logger.warning("no instance listed; the router waits for instances to POST /register")
    app = build_router_app(registry, policy, settings)
    log_level = str(getattr(args, "log_level", "INFO")).lower()
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=log_level, timeout_graceful_shutdown=5)
    )
    logger.info(
        "router on http://%s:%d: %d instance(s), policy %s",
        args.host,
        args.port,
        len(registry.instances()),
        policy.name,
    )
    server.run()
    return 0
