"""`pdserve launch`: a whole PD deployment on this host, started and stopped as one command.

The launcher starts a Mooncake master (storage mode only), the instances, and
then the router, each a child process in its own process group; it echoes
their logs, watches them, and stops them all together. It knows its children
only by their command lines, GET /health and their exit codes: nothing here
knows what runs inside an instance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

from pdserve.bench.launch import _sigterm_on_parent_death, free_port
from pdserve.config import parse_gpu_ids
from pdserve.store.base import StoreError
from pdserve.store.master import MasterProcess, is_port_open

KV_TRANSFER_MODES = ("direct", "storage")
KV_TRANSFER_ENGINES = ("auto", "shm", "cuda_ipc", "mooncake")
INSTANCE_ROLES = ("prefill", "decode", "mixed")
ROUTER = "router"
HEALTH_POLL_S = (0.1, 2.0)  # first and longest pause between /health polls (each probe is an access-log line)
STOP_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 20


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


# ---- pure pieces: flags, parts, command lines, environment ------------------------------------------


def engine_argv(args: argparse.Namespace, skip: Sequence[str] = ("tensor_parallel_size",)) -> list[str]:
    """The engine flags (add_engine_args) whose values differ from their defaults, as command-line tokens."""
    from pdserve.cli import add_engine_args  # here: cli imports this module

    reference = argparse.ArgumentParser(add_help=False)
    add_engine_args(reference)
    argv: list[str] = []
    for action in reference._actions:
        if not action.option_strings or action.dest in skip:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        option = next(s for s in action.option_strings if s.startswith("--"))
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)  # tuples: --gpu-ids 2,3
        argv += [option] if action.nargs == 0 else [option, text]  # nargs 0: store_true / store_false
    return argv


def launch_config_from_args(args: argparse.Namespace, env_api_key: str | None = None) -> LaunchConfig:
    """The LaunchConfig of `pdserve launch` flags; `env_api_key` (PDSERVE_API_KEY) applies when --api-key is unset."""
    tp = args.tp if args.tp is not None else args.tensor_parallel_size
    if args.tp is not None and args.tensor_parallel_size not in (1, args.tp):
        raise ValueError(f"--tp {args.tp} and --tensor-parallel-size {args.tensor_parallel_size} disagree; give one")
    return LaunchConfig(
        num_prefill=args.num_prefill, num_decode=args.num_decode, num_mixed=args.num_mixed, tp=tp,
        kv_transfer=args.kv_transfer, kv_transfer_engine=args.kv_transfer_engine, policy=args.policy,
        host=args.host, port=args.port, api_key=args.api_key or env_api_key or None,
        log_level=getattr(args, "log_level", "INFO"), engine_argv=tuple(engine_argv(args)),
        gpus=getattr(args, "gpus", ()),
    )  # fmt: skip


def port_allocator() -> Callable[[], int]:
    """free_port(), never the same port twice."""
    taken: set[int] = set()

    def allocate() -> int:
        while (port := free_port()) in taken:
            pass
        taken.add(port)
        return port

    return allocate


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
    return argv + ["--log-level", config.log_level]


def usable_cpus() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def omp_num_threads(num_instances: int, tp: int, num_cpus: int) -> int:
    """CPU threads per rank so that every instance process together uses the cores once."""
    return max(1, num_cpus // (num_instances * tp))


def child_env(base: Mapping[str, str], num_threads: int) -> dict[str, str]:
    """The children's environment: the user's OMP_NUM_THREADS wins; no API key (only the router checks one)."""
    env = {k: v for k, v in base.items() if k != "PDSERVE_API_KEY"}
    env.setdefault("OMP_NUM_THREADS", str(num_threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"  # their stdout is a pipe: lines must reach the log as they are written
    return env


def _mask_secrets(argv: Sequence[str]) -> list[str]:
    return ["***" if i > 0 and argv[i - 1] == "--api-key" else a for i, a in enumerate(argv)]


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


# ---- the child processes -----------------------------------------------------------------------------


class Child:
    """One started part: the leader of its own process group, its log file, and the thread that fills and echoes it."""

    def __init__(
        self, part: Part, argv: list[str], env: Mapping[str, str], log_path: Path, echo: Callable[[str], None]
    ) -> None:
        self.part = part
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")
        self._log.write(f"$ {shlex.join(_mask_secrets(argv))}\n".encode())
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
                preexec_fn=_sigterm_on_parent_death(),
            )
        except OSError:
            self._log.close()
            raise
        self._reader = threading.Thread(target=self._pump, args=(echo,), name=f"log-{part.name}", daemon=True)
        self._reader.start()

    def _pump(self, echo: Callable[[str], None]) -> None:
        assert self.proc.stdout is not None
        prefix = f"[{self.part.name}] "
        for line in iter(self.proc.stdout.readline, b""):
            self._log.write(line)
            self._log.flush()
            echo(prefix + line.decode(errors="replace").rstrip("\r\n"))
        self._log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, num_lines: int = LOG_TAIL_LINES) -> str:
        if self.proc.poll() is not None:
            self._reader.join(1.0)  # the last lines of a process that just exited
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-num_lines:])

    def terminate(self) -> None:
        """SIGTERM the leader (it stops its own children); a group whose leader is gone gets it directly."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        elif _live_group_members(self.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)

    def is_gone(self) -> bool:
        return self.proc.poll() is not None and not _live_group_members(self.pid)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def close(self) -> None:
        self._reader.join(2.0)


def _live_group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies (an orphaned zombie may never be reaped in a container)."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs: a signal probe, which counts zombies too
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


# ---- the supervisor ----------------------------------------------------------------------------------


class Launcher:
    """Starts the parts in order, waits for their /health, watches them, and stops them all.

    `argv_for(part)` gives each part's command line (injectable for tests).
    Instances start together; the router starts once every instance answers
    /health with 200. `run(stop)` blocks until `stop` is set (returns 0) or a
    part fails: an exit, a failed /health, the start-up deadline (returns 1).
    Whatever happens, everything started is stopped before it returns: the
    router, then the instances (SIGTERM, SIGKILL to the group after
    `stop_timeout_s`), then the master. `ready` is set once all parts are up.
    NOTE: children get SIGTERM when the thread that started them ends (Linux
    PR_SET_PDEATHSIG): call `run` from a thread that outlives it, normally the main one.
    """

    def __init__(
        self,
        parts: Sequence[Part],
        argv_for: Callable[[Part], list[str]],
        log_dir: Path,
        env: Mapping[str, str],
        startup_timeout_s: float = 900.0,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        master: MasterProcess | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.parts = list(parts)
        self.argv_for = argv_for
        self.log_dir = Path(log_dir)
        self.env = dict(env)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.master = master
        self.children: list[Child] = []
        self.ready = threading.Event()
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self._write_lock = threading.Lock()

    def run(self, stop: threading.Event) -> int:
        try:
            if not self._start(stop):
                if stop.is_set():
                    self._say("stopped during start-up")
                    return 0
                return 1
            self._print_table()
            self.ready.set()
            while not stop.wait(0.5):
                if self._report_exits():
                    return 1
            self._say("stopping everything")
            return 0
        finally:
            self.shutdown()

    def _start(self, stop: threading.Event) -> bool:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._say(f"logs in {self.log_dir}")
        if self.master is not None:
            try:
                self.master.start()
            except StoreError as e:
                self._error(f"the Mooncake master did not start: {e}")
                return False
            if stop.is_set():
                return False
        deadline = time.monotonic() + self.startup_timeout_s
        instances = [p for p in self.parts if p.role != ROUTER]
        routers = [p for p in self.parts if p.role == ROUTER]
        for group in (instances, routers):
            for part in group:
                self.children.append(
                    Child(part, self.argv_for(part), self.env, self.log_dir / f"{part.name}.log", self._echo)
                )
            if not self._wait_healthy(group, deadline, stop):
                return False
        return True

    def _wait_healthy(self, parts: Sequence[Part], deadline: float, stop: threading.Event) -> bool:
        pending = list(parts)
        pause = HEALTH_POLL_S[0]
        while pending:
            if self._report_exits():
                return False
            for part in list(pending):
                status, body = _probe_health(part)
                if status == 200:
                    pending.remove(part)
                elif '"failed' in body:  # {"status": "failed: ..."}: the engine died, the API server stays up
                    self._error(
                        f"{part.name} ({part.role}) failed to start: {body.strip()[:500]}\n{self._tail_of(part)}"
                    )
                    return False
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                tails = "\n".join(self._tail_of(p) for p in pending)
                self._error(
                    f"{names} did not answer /health with 200 within {self.startup_timeout_s:g} s "
                    f"(--startup-timeout)\n{tails}"
                )
                return False
            if pending and stop.wait(pause):
                return False
            pause = min(pause * 1.5, HEALTH_POLL_S[1])
        return True

    def _report_exits(self) -> bool:
        """Report the first part (or the master) that has exited; whether one has."""
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                self._error(f"{child.part.name} ({child.part.role}) {describe_exit(code)}\n{self._tail_of(child.part)}")
                return True
        if self.master is not None and not self.master.is_running:
            tail = self.master.log_tail()
            self._error(f"the Mooncake master {describe_exit(self.master.stop() or 0)}; its last log lines:\n{tail}")
            return True
        return False

    def _tail_of(self, part: Part) -> str:
        child = next(c for c in self.children if c.part == part)
        return f"the last {LOG_TAIL_LINES} lines of {child.log_path}:\n{child.log_tail()}"

    def shutdown(self) -> None:
        """Stop everything started (idempotent): the router, then the instances together, then the master."""
        routers = [c for c in self.children if c.part.role == ROUTER]
        instances = [c for c in self.children if c.part.role != ROUTER]
        for group in (routers, instances):
            self._stop_children(group)
        if self.master is not None:
            self.master.stop()
        for child in self.children:
            child.close()

    def _stop_children(self, children: Sequence[Child]) -> None:
        for child in children:
            child.terminate()
        deadline = time.monotonic() + self.stop_timeout_s
        while any(not c.is_gone() for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        for child in children:
            if not child.is_gone():
                self._say(f"{child.part.name} did not stop within {self.stop_timeout_s:g} s of SIGTERM; killing it")
                child.kill()

    def _print_table(self) -> None:
        rows = [("PART", "ROLE", "URL", "PID", "LOG")]
        if self.master is not None:
            config = self.master.store_config()
            rows.append(
                (
                    "mooncake-master",
                    "kv store",
                    f"{config['master']} (metadata {config['metadata']})",
                    str(self.master.pid),
                    "(shown if it fails)",
                )
            )
        rows += [(c.part.name, c.part.role, c.part.url, str(c.pid), str(c.log_path)) for c in self.children]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        router = next((c.part for c in self.children if c.part.role == ROUTER), None)
        if router is not None:
            lines.append(f"OpenAI API: {router.url}/v1")
        lines.append("Ctrl-C or SIGTERM stops everything.")
        self._write(self._out, "\n".join(lines))

    def _echo(self, line: str) -> None:
        self._write(self._out, line)

    def _say(self, message: str) -> None:
        self._write(self._out, f"pdserve launch: {message}")

    def _error(self, message: str) -> None:
        self._write(self._err, f"pdserve launch: error: {message}")

    def _write(self, stream: TextIO, text: str) -> None:
        with self._write_lock, contextlib.suppress(OSError, ValueError):  # a closed stdout must not stop the logs
            stream.write(text + "\n")
            stream.flush()


def _probe_health(part: Part) -> tuple[int, str]:
    """(HTTP status, body) of GET /health; (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(f"{part.probe_url}/health", timeout=2) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def run_until_signal(launcher: Launcher) -> int:
    """Run the launcher in the main thread until SIGINT or SIGTERM (then 0) or a failure (then 1)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return launcher.run(stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- the command -------------------------------------------------------------------------------------


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
    from pdserve.cli import add_engine_args  # here: cli imports this module

    add_engine_args(launch)
    launch.set_defaults(func=cmd_launch)
    return launch


def cmd_launch(args: argparse.Namespace) -> int:
    config = launch_config_from_args(args, os.environ.get("PDSERVE_API_KEY"))
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

    env = child_env(os.environ, omp_num_threads(config.num_instances, config.tp, usable_cpus()))
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="pdserve-launch-"))
    return run_until_signal(Launcher(parts, argv_for, log_dir, env, args.startup_timeout, master=master))
