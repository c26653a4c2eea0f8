"""`pdserve launch`: its flags, the LaunchConfig they give, and the command that plans, starts and supervises."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from pdserve.config import parse_gpu_ids
from pdserve.launcher.engine_args import add_engine_args, engine_argv
from pdserve.launcher.plan import (
    CLUSTER_SECRET_VAR,
    KV_TRANSFER_ENGINES,
    KV_TRANSFER_MODES,
    ROUTER,
    LaunchConfig,
    Part,
    build_instance_argv,
    build_router_argv,
    child_env,
    cluster_secret_for,
    omp_num_threads,
    plan_parts,
    usable_cpus,
)
from pdserve.launcher.supervisor import Launcher, run_until_signal
from pdserve.procs import port_allocator
from pdserve.store.master import MasterProcess, is_port_open


def launch_config_from_args(
    args: argparse.Namespace, env_api_key: str | None = None, env_cluster_secret: str | None = None
) -> LaunchConfig:
    """The LaunchConfig of `pdserve launch` flags; `env_api_key` (PDSERVE_API_KEY) applies when --api-key is unset.
    The cluster secret is `env_cluster_secret` (PDSERVE_CLUSTER_SECRET), or a new one when --host is beyond
    loopback (cluster_secret_for)."""
    tp = args.tp if args.tp is not None else args.tensor_parallel_size
    if args.tp is not None and args.tensor_parallel_size not in (1, args.tp):
        raise ValueError(f"--tp {args.tp} and --tensor-parallel-size {args.tensor_parallel_size} disagree; give one")
    return LaunchConfig(
        num_prefill=args.num_prefill, num_decode=args.num_decode, num_mixed=args.num_mixed, tp=tp,
        kv_transfer=args.kv_transfer, kv_transfer_engine=args.kv_transfer_engine, policy=args.policy,
        host=args.host, port=args.port, api_key=args.api_key or env_api_key or None,
        log_level=getattr(args, "log_level", "INFO"), engine_argv=tuple(engine_argv(args)),
        gpus=getattr(args, "gpus", ()), max_request_bytes=args.max_request_bytes, stall_timeout=args.stall_timeout,
        cluster_secret=cluster_secret_for(args.host, env_cluster_secret),
    )  # fmt: skip


def add_launch_parser(
    subparsers: argparse._SubParsersAction,
    common_parent: argparse.ArgumentParser,  # type: ignore[type-arg]
) -> argparse.ArgumentParser:
    launch = subparsers.add_parser(
        "launch",
        parents=[common_parent],
        help="a whole PD deployment on this host: instances and router (Ctrl-C stops it)",
    )
    g = launch.add_argument_group("deployment")
    g.add_argument("--num-prefill", type=int, default=1, help="prefill instances")
    g.add_argument("--num-decode", type=int, default=1, help="decode instances")
    g.add_argument(
        "--num-mixed",
        type=int,
        default=0,
        help="mixed replicas behind the router, for comparisons (needs --num-prefill 0 --num-decode 0)",
    )
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks per instance (default: 1)")
    g.add_argument(
        "--kv-transfer",
        choices=KV_TRANSFER_MODES,
        default="direct",
        help="P->D KV path; 'storage' also starts a Mooncake master for the pool",
    )
    g.add_argument(
        "--gpus",
        type=parse_gpu_ids,
        default=(),
        metavar="I,J,...",
        help="CUDA devices to spread the instances over: instance k's ranks take the next --tp of them "
        "(default: every instance on devices 0..tp-1)",
    )
    g.add_argument(
        "--kv-transfer-engine",
        choices=KV_TRANSFER_ENGINES,
        default="auto",
        help="the data plane of --kv-transfer direct",
    )
    g.add_argument("--policy", default=None, help="the router's (P, D) selection policy (default: the router's)")
    g.add_argument("--host", default="127.0.0.1", help="the router's bind address (default: loopback only)")
    g.add_argument("--port", type=int, default=8000, help="the router's port")
    g.add_argument(
        "--api-key", default=None, help="the router requires 'Authorization: Bearer KEY' (or PDSERVE_API_KEY)"
    )
    g.add_argument("--log-dir", default=None, help="where <part>.log files go (default: a new temporary directory)")
    g.add_argument(
        "--startup-timeout",
        type=float,
        default=900.0,
        help="seconds for every part to answer /health before the launch is abandoned",
    )
    from pdserve.http.limits import add_robustness_args

    add_robustness_args(g)
    add_engine_args(launch)
    launch.set_defaults(func=cmd_launch)
    return launch


def cmd_launch(args: argparse.Namespace) -> int:
    config = launch_config_from_args(args, os.environ.get("PDSERVE_API_KEY"), os.environ.get(CLUSTER_SECRET_VAR))
    if args.startup_timeout <= 0:
        raise ValueError(f"--startup-timeout must be > 0, got {args.startup_timeout:g}")
    parts = plan_parts(config, allocate := port_allocator())
    router = parts[-1]
    if is_port_open(router.probe_host, router.port):
        raise ValueError(f"{router.host}:{router.port} is already in use; pick another --port")
    master = MasterProcess(port=allocate(), metadata_port=allocate()) if config.kv_transfer == "storage" else None
    store_config = master.store_config() if master is not None else None
    instances = parts[:-1]

    def argv_for(part: Part) -> list[str]:
        if part.role == ROUTER:
            return build_router_argv(config, instances)
        return build_instance_argv(config, part, store_config)

    env = child_env(os.environ, omp_num_threads(config.num_instances, config.tp, usable_cpus()), config.cluster_secret)
    if config.cluster_secret and not os.environ.get(CLUSTER_SECRET_VAR):
        print(
            f"pdserve launch: the router binds {config.host}, beyond loopback: its parts share a new random "
            f"cluster secret; set {CLUSTER_SECRET_VAR} to choose it (instances on other hosts need it to "
            "join with --register-with)",
            flush=True,
        )
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="pdserve-launch-"))
    return run_until_signal(Launcher(parts, argv_for, log_dir, env, args.startup_timeout, master=master))
