"""`pdserve launch` without a model: the command lines of every child, flag validation, and the supervisor
driven with tiny fake children (a Python HTTP server answering /health)."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import require_module

from pdserve.launcher import (
    LaunchConfig,
    Launcher,
    Part,
    add_launch_parser,
    build_instance_argv,
    build_router_argv,
    child_env,
    launch_config_from_args,
    omp_num_threads,
    plan_parts,
)
from pdserve.procs import free_port
from pdserve.store.master import MasterProcess

PY = "/py"
STORE = {"master": "127.0.0.1:7001", "metadata": "http://127.0.0.1:7002/metadata"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pdserve")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO")
    add_launch_parser(parser.add_subparsers(dest="command", required=True), common)
    return parser.parse_args(["launch", *argv])


def config(*argv: str) -> LaunchConfig:
    return launch_config_from_args(parse(*argv))


def ports(start: int = 9000):
    it = iter(range(start, start + 1000))
    return lambda: next(it)


# ---- command lines -------------------------------------------------------------------------------------


def test_plan_direct_default() -> None:
    cfg = config()
    parts = plan_parts(cfg, ports())
    assert parts == [
        Part("prefill-0", "prefill", 9001, 9000),
        Part("decode-0", "decode", 9003, 9002),
        Part("router", "router", 8000, None, "127.0.0.1"),
    ]
    assert build_instance_argv(cfg, parts[0], python=PY) == [
        PY,
        "-m",
        "pdserve.cli",
        "serve",
        "--role",
        "prefill",
        "--port",
        "9001",
        "--control-port",
        "9000",
        "--kv-transfer",
        "direct",
        "--kv-transfer-engine",
        "auto",
        "--tensor-parallel-size",
        "1",
        "--log-level",
        "INFO",
    ]
    assert build_instance_argv(cfg, parts[1], python=PY) == [
        PY,
        "-m",
        "pdserve.cli",
        "serve",
        "--role",
        "decode",
        "--port",
        "9003",
        "--control-port",
        "9002",
        "--kv-transfer",
        "direct",
        "--kv-transfer-engine",
        "auto",
        "--tensor-parallel-size",
        "1",
        "--log-level",
        "INFO",
    ]
    assert build_router_argv(cfg, parts[:-1], python=PY) == [
        PY,
        "-m",
        "pdserve.cli",
        "router",
        "--prefill",
        "http://127.0.0.1:9001",
        "--decode",
        "http://127.0.0.1:9003",
        "--port",
        "8000",
        "--host",
        "127.0.0.1",
        "--log-level",
        "INFO",
    ]


def test_storage_tp_engine_args_policy_and_key() -> None:
    cfg = config(
        "--num-prefill",
        "2",
        "--num-decode",
        "1",
        "--kv-transfer",
        "storage",
        "--kv-transfer-engine",
        "mooncake",
        "--tp",
        "2",
        "--policy",
        "round_robin",
        "--host",
        "0.0.0.0",
        "--port",
        "8100",
        "--api-key",
        "k",
        "--log-level",
        "DEBUG",
        "--max-model-len",
        "512",
        "--num-blocks",
        "128",
        "--dtype",
        "bfloat16",
        "--no-prefix-caching",
        "--cache-output",
        "--kv-cache-memory",
        "1MiB",
    )
    parts = plan_parts(cfg, ports())
    assert [p.name for p in parts] == ["prefill-0", "prefill-1", "decode-0", "router"]
    assert build_instance_argv(cfg, parts[1], STORE, python=PY) == [
        PY,
        "-m",
        "pdserve.cli",
        "serve",
        "--role",
        "prefill",
        "--port",
        "9003",
        "--control-port",
        "9002",
        "--kv-transfer",
        "storage",
        "--kv-transfer-engine",
        "mooncake",
        "--tensor-parallel-size",
        "2",
        "--log-level",
        "DEBUG",
        "--kv-store",
        "mooncake",
        "--kv-store-config",
        json.dumps(STORE),
        # engine flags in add_engine_args order, only those set, sizes in bytes
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "512",
        "--num-blocks",
        "128",
        "--kv-cache-memory",
        "1048576",
        "--no-prefix-caching",
        "--cache-output",
    ]
    assert build_router_argv(cfg, parts[:-1], python=PY) == [
        PY,
        "-m",
        "pdserve.cli",
        "router",
        "--prefill",
        "http://127.0.0.1:9001",
        "http://127.0.0.1:9003",
        "--decode",
        "http://127.0.0.1:9005",
        "--port",
        "8100",
        "--host",
        "0.0.0.0",
        "--policy",
        "round_robin",
        "--api-key",
        "k",
        "--log-level",
        "DEBUG",
    ]
    assert parts[-1].probe_url == "http://127.0.0.1:8100"


def test_mixed_replicas() -> None:
    cfg = config("--num-prefill", "0", "--num-decode", "0", "--num-mixed", "2", "-tp", "2", "--seed", "3")
    parts = plan_parts(cfg, ports())
    assert parts[:2] == [Part("mixed-0", "mixed", 9000), Part("mixed-1", "mixed", 9001)]
    assert build_instance_argv(cfg, parts[0], python=PY) == [
        PY,
        "-m",
        "pdserve.cli",
        "serve",
        "--role",
        "mixed",
        "--port",
        "9000",
        "--tensor-parallel-size",
        "2",
        "--log-level",
        "INFO",
        "--seed",
        "3",
    ]
    assert build_router_argv(cfg, parts[:-1], python=PY) == [
        PY,
        "-m",
        "pdserve.cli",
        "router",
        "--mixed",
        "http://127.0.0.1:9000",
        "http://127.0.0.1:9001",
        "--port",
        "8000",
        "--host",
        "127.0.0.1",
        "--log-level",
        "INFO",
    ]


def test_gpus_spread_instances_over_devices() -> None:
    """Instance k's ranks take the next --tp devices of --gpus, wrapping round; none without --gpus."""
    cfg = config("--gpus", "0,1")
    parts = plan_parts(cfg, ports())
    assert [p.gpu_ids for p in parts] == [(0,), (1,), ()]
    assert build_instance_argv(cfg, parts[1], python=PY)[-2:] == ["--gpu-ids", "1"]
    cfg = config("--num-prefill", "2", "--num-decode", "1", "--tp", "2", "--gpus", "4,5,6")
    assert [p.gpu_ids for p in plan_parts(cfg, ports())][:3] == [(4, 5), (6, 4), (5, 6)]
    assert all("--gpu-ids" not in build_instance_argv(config(), p, python=PY) for p in plan_parts(config(), ports()))


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--gpus", "0", "--tp", "2"), "--gpus needs at least --tp 2 distinct device indices"),
        (("--gpus", "1,1"), "--gpus needs at least --tp 1 distinct"),
        (("--gpu-ids", "1"), "pdserve launch places instances itself: give --gpus"),
        (("--num-mixed", "1"), "--num-mixed 1 runs replicas without PD disaggregation; it needs --num-prefill 0"),
        (("--num-prefill", "0", "--num-decode", "0"), "nothing to launch"),
        (("--num-decode", "0"), "needs at least one prefill and one decode instance"),
        (("--num-prefill", "-1"), "--num-prefill must be >= 0, got -1"),
        (("--tp", "0"), "--tp must be >= 1, got 0"),
        (("--tp", "2", "--tensor-parallel-size", "4"), "--tp 2 and --tensor-parallel-size 4 disagree"),
        (("--kv-transfer", "storage", "--kv-store", "file"), "--kv-transfer storage starts its own Mooncake master"),
    ],
)
def test_invalid_flags_are_clear_value_errors(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        config(*argv)


def test_api_key_flag_wins_over_the_environment() -> None:
    assert launch_config_from_args(parse(), "env-key").api_key == "env-key"
    assert launch_config_from_args(parse("--api-key", "flag-key"), "env-key").api_key == "flag-key"
    assert launch_config_from_args(parse(), "").api_key is None


def test_omp_split_and_env() -> None:
    assert omp_num_threads(2, 1, 16) == 8
    assert omp_num_threads(2, 2, 16) == 4
    assert omp_num_threads(3, 1, 2) == 1
    env = child_env({"PATH": "/bin", "PDSERVE_API_KEY": "secret"}, 4)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    assert child_env({"OMP_NUM_THREADS": "7"}, 4)["OMP_NUM_THREADS"] == "7"


# ---- the supervisor, with fake children ----------------------------------------------------------------

# argv: name port pid_dir mode [instance ports for the router]. Modes: ok | slow (listens after 0.5 s) |
# die (exits 3 after 1 s) | never (never listens) | failed (/health 503 failed) | stubborn (ignores SIGTERM,
# has a grandchild that ignores it too). The router fake exits 4 unless every instance answers /health.
FAKE = r"""
import http.server, os, signal, subprocess, sys, time, urllib.request
name, port, pid_dir, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
open(os.path.join(pid_dir, name + ".pid"), "w").write(str(os.getpid()))
print("hello from", name, flush=True)
print("to stderr", name, file=sys.stderr, flush=True)
for p in sys.argv[5:]:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{p}/health", timeout=2)
    except Exception as e:
        print("instance", p, "not ready:", e, flush=True)
        sys.exit(4)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    g = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    open(os.path.join(pid_dir, name + ".grandchild.pid"), "w").write(str(g.pid))
if mode == "never":
    time.sleep(600)
if mode == "slow":
    time.sleep(0.5)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = mode != "failed"
        body = b'{"status": "ok"}' if ok else b'{"status": "failed: boom"}'
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
if mode == "die":
    import threading
    threading.Timer(1.0, lambda: os._exit(3)).start()
server.serve_forever()
"""


def fake_parts() -> list[Part]:
    return [
        Part("prefill-0", "prefill", free_port(), free_port()),
        Part("decode-0", "decode", free_port(), free_port()),
        Part("router", "router", free_port()),
    ]


def fake_argv(parts: list[Part], pid_dir: Path, modes: dict[str, str]) -> dict[str, list[str]]:
    instance_ports = [str(p.port) for p in parts if p.role != "router"]
    return {
        p.name: [
            sys.executable,
            "-c",
            FAKE,
            p.name,
            str(p.port),
            str(pid_dir),
            modes.get(p.name, "ok"),
            *(instance_ports if p.role == "router" else []),
        ]
        for p in parts
    }


def is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pids(pid_dir: Path) -> dict[str, int]:
    return {f.name.removesuffix(".pid"): int(f.read_text()) for f in pid_dir.glob("*.pid")}


def assert_all_gone(pid_dir: Path) -> None:
    deadline = time.monotonic() + 5  # an orphaned grandchild is reaped by whoever adopts it
    while (alive := [n for n, pid in pids(pid_dir).items() if is_alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"left running: {alive}"


class Run:
    """A Launcher over fake children, run in a thread of this process."""

    def __init__(self, tmp_path: Path, modes: dict[str, str], **kwargs: object) -> None:
        self.pid_dir = tmp_path / "pids"
        self.pid_dir.mkdir()
        self.log_dir = tmp_path / "logs"
        self.parts = fake_parts()
        argv = fake_argv(self.parts, self.pid_dir, modes)
        self.out, self.err = io.StringIO(), io.StringIO()
        self.launcher = Launcher(
            self.parts, lambda p: argv[p.name], self.log_dir, dict(os.environ), out=self.out, err=self.err, **kwargs
        )  # type: ignore[arg-type]
        self.stop = threading.Event()
        self.code: int | None = None

    def run(self) -> int:
        self.code = self.launcher.run(self.stop)
        return self.code


def test_starts_instances_then_router_echoes_logs_and_stops_on_request(tmp_path: Path) -> None:
    run = Run(tmp_path, {"prefill-0": "slow", "decode-0": "slow"}, startup_timeout_s=20, stop_timeout_s=5)
    thread = threading.Thread(target=run.run)
    thread.start()
    assert run.launcher.ready.wait(20), run.err.getvalue()
    started = pids(run.pid_dir)
    assert set(started) == {"prefill-0", "decode-0", "router"}  # the router's own check passed: instances were up
    assert all(is_alive(pid) for pid in started.values())
    for child in run.launcher.children:  # each in a process group of its own
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
    run.stop.set()
    thread.join(20)
    assert run.code == 0, run.err.getvalue()
    assert_all_gone(run.pid_dir)
    out = run.out.getvalue()
    assert "[prefill-0] hello from prefill-0" in out and "[router] to stderr router" in out
    assert f"OpenAI API: {run.parts[-1].url}/v1" in out
    table = out[out.index("PART") :].splitlines()
    assert [line.split()[:2] for line in table[1:4]] == [
        ["prefill-0", "prefill"],
        ["decode-0", "decode"],
        ["router", "router"],
    ]
    assert str(started["router"]) in table[3] and str(run.log_dir / "router.log") in table[3]
    log = (run.log_dir / "decode-0.log").read_text().splitlines()
    assert log[0].startswith(f"$ {sys.executable} -c ") and log[-2:] == ["hello from decode-0", "to stderr decode-0"]


def test_a_child_that_dies_stops_the_rest_and_fails(tmp_path: Path) -> None:
    run = Run(tmp_path, {"decode-0": "die"}, startup_timeout_s=20, stop_timeout_s=5)
    assert run.run() == 1
    err = run.err.getvalue()
    assert "decode-0 (decode) exited with code 3" in err and "hello from decode-0" in err
    assert f"{run.log_dir / 'decode-0.log'}" in err
    assert_all_gone(run.pid_dir)


def test_startup_timeout_fails_and_stops_everything(tmp_path: Path) -> None:
    run = Run(tmp_path, {"prefill-0": "never"}, startup_timeout_s=1.5, stop_timeout_s=5)
    assert run.run() == 1
    assert "prefill-0 did not answer /health with 200 within 1.5 s (--startup-timeout)" in run.err.getvalue()
    assert "router" not in pids(run.pid_dir)  # never started
    assert_all_gone(run.pid_dir)


def test_failed_engine_health_fails_fast(tmp_path: Path) -> None:
    run = Run(tmp_path, {"decode-0": "failed"}, startup_timeout_s=20, stop_timeout_s=5)
    assert run.run() == 1
    assert 'decode-0 (decode) failed to start: {"status": "failed: boom"}' in run.err.getvalue()
    assert_all_gone(run.pid_dir)


def test_stubborn_child_and_its_group_are_killed(tmp_path: Path) -> None:
    run = Run(tmp_path, {"prefill-0": "stubborn"}, startup_timeout_s=20, stop_timeout_s=1)
    thread = threading.Thread(target=run.run)
    thread.start()
    assert run.launcher.ready.wait(20), run.err.getvalue()
    assert is_alive(pids(run.pid_dir)["prefill-0.grandchild"])
    run.stop.set()
    thread.join(20)
    assert run.code == 0
    assert "prefill-0 did not stop within 1 s of SIGTERM; killing it" in run.out.getvalue()
    assert_all_gone(run.pid_dir)


def test_storage_mode_master_runs_while_instances_do(tmp_path: Path) -> None:
    require_module("mooncake")
    master = MasterProcess(port=free_port(), metadata_port=free_port())
    run = Run(tmp_path, {}, startup_timeout_s=20, stop_timeout_s=5, master=master)
    thread = threading.Thread(target=run.run)
    thread.start()
    assert run.launcher.ready.wait(20), run.err.getvalue()
    assert master.is_running and f"mooncake-master  kv store  127.0.0.1:{master.port}" in run.out.getvalue()
    os.kill(pids(run.pid_dir)["router"], signal.SIGKILL)  # a child that dies after start-up
    thread.join(20)
    assert run.code == 1
    assert "router (router) was killed by SIGKILL" in run.err.getvalue()
    assert not master.is_running and master.pid is not None and not is_alive(master.pid)
    assert_all_gone(run.pid_dir)


def test_an_exception_in_the_launcher_stops_what_it_started(tmp_path: Path) -> None:
    run = Run(tmp_path, {}, startup_timeout_s=20, stop_timeout_s=5)
    argv_for = run.launcher.argv_for

    def broken(part: Part) -> list[str]:
        if part.role == "router":
            raise RuntimeError("no router today")
        return argv_for(part)

    run.launcher.argv_for = broken
    with pytest.raises(RuntimeError, match="no router today"):
        run.run()
    assert set(pids(run.pid_dir)) == {"prefill-0", "decode-0"}
    assert_all_gone(run.pid_dir)


RUNNER = r"""
import json, os, sys
from pathlib import Path
from pdserve.launcher import Launcher, Part, run_until_signal
spec = json.loads(sys.argv[1])
parts = [Part(**p) for p in spec["parts"]]
launcher = Launcher(parts, lambda p: spec["argv"][p.name], Path(spec["log_dir"]), dict(os.environ),
                    startup_timeout_s=20, stop_timeout_s=5)
sys.exit(run_until_signal(launcher))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_process_stops_all_children(tmp_path: Path, signum: int) -> None:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    parts = fake_parts()
    spec = {"parts": [vars(p) for p in parts], "argv": fake_argv(parts, pid_dir, {}), "log_dir": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("OpenAI API:"):
                break
        assert set(pids(pid_dir)) == {"prefill-0", "decode-0", "router"}, "".join(lines)
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "pdserve launch: stopping everything" in rest
    assert_all_gone(pid_dir)
