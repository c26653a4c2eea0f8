"""`pdserve launch`: a whole PD deployment on this host, started and stopped as one command.

The launcher starts a Mooncake master (storage mode only), the instances, and
then the router, each a child process in its own process group; it echoes
their logs, watches them, and stops them all together. It knows its children
only by their command lines, GET /health and their exit codes: nothing here
knows what runs inside an instance.

plan.py says what to start (LaunchConfig, the parts, their argv and
environment), supervisor.py starts and watches them (Child, Launcher), cli.py
is the command (its flags, cmd_launch); engine_args.py holds the engine flags
every command shares and renders them back into an instance's argv.
"""

from __future__ import annotations

from pdserve.launcher.cli import add_launch_parser, cmd_launch, launch_config_from_args
from pdserve.launcher.plan import (
    INSTANCE_ROLES,
    KV_TRANSFER_ENGINES,
    KV_TRANSFER_MODES,
    ROUTER,
    LaunchConfig,
    Part,
    build_instance_argv,
    build_router_argv,
    child_env,
    omp_num_threads,
    plan_parts,
    usable_cpus,
)
from pdserve.launcher.supervisor import Child, Launcher, describe_exit, run_until_signal

__all__ = [
    "INSTANCE_ROLES",
    "KV_TRANSFER_ENGINES",
    "KV_TRANSFER_MODES",
    "ROUTER",
    "Child",
    "LaunchConfig",
    "Launcher",
    "Part",
    "add_launch_parser",
    "build_instance_argv",
    "build_router_argv",
    "child_env",
    "cmd_launch",
    "describe_exit",
    "launch_config_from_args",
    "omp_num_threads",
    "plan_parts",
    "run_until_signal",
    "usable_cpus",
]
