"""One `pdserve serve` subprocess for benchmarks: start, wait for /health, scrape /metrics, stop.

The benchmark knows the server only by its command line, /health and /metrics.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.procs import free_port, sigterm_on_parent_death

HEALTH_POLL_S = 0.25
EXIT_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 40


class BenchServerError(RuntimeError):
    """A server of the benchmark did not start, did not settle, or could not be scraped."""


@dataclass(eq=False)
class ServerProcess:
    """`pdserve serve` in its own session (Ctrl-C reaches only the benchmark, which stops it); logs to a file."""

    name: str
    flags: list[str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "pdserve.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]

    def env(self) -> dict[str, str] | None:
        """The child's environment (None: this process's)."""
        env = {k: v for k, v in os.environ.items() if k != "PDSERVE_API_KEY"}  # the client sends no key
        env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        return env

    def start(self) -> None:
        args = [*self.argv(), *self.flags]
        env = self.env()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(f"$ {shlex.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=sigterm_on_parent_death(),  # SIGTERM if the benchmark dies unstopped
            )

    def log_tail(self, num_lines: int = LOG_TAIL_LINES) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-num_lines:])

    def wait_ready(self, timeout_s: float) -> None:
        """Block until GET /health answers 200; raise BenchServerError with the log tail if it exits or times out."""
        assert self.proc is not None, "call start() first"
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchServerError(
                    f"the {self.name!r} server exited with code {self.proc.returncode} before "
                    f"/health answered; the last lines of its log:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read().decode(errors='replace')[:300]}"
                if '"failed' in last:  # {"status": "failed: ..."}: the engine died, the API server stays up
                    raise BenchServerError(
                        f"the {self.name!r} server's engine failed to start ({last}); the last "
                        f"lines of its log:\n{self.log_tail()}"
                    ) from None
            except (urllib.error.URLError, OSError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(HEALTH_POLL_S)
        raise BenchServerError(
            f"the {self.name!r} server did not answer /health within {timeout_s:.0f} s (last: "
            f"{last}); raise --server-timeout if it is still loading. Its log:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM the server, then SIGKILL whatever of its process group outlives EXIT_TIMEOUT_S."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while _group_alive(proc.pid) and time.monotonic() < deadline:  # the engine core exits after its parent
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def scrape(url: str) -> dict[str, float]:
    """Prometheus samples of GET /metrics by name, labels kept ('x_total{tier="host"}')."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError) as e:
        raise BenchServerError(f"cannot read {url}/metrics ({type(e).__name__}: {e})") from e
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt like Ctrl-C does, so servers and the master are stopped either way."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
