"""A whole `pdserve launch` deployment run inside a benchmark process (bench pd, bench transfer, bench storage)."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from pdserve.bench.launch import BenchServerError
from pdserve.launcher import (
    ROUTER,
    LaunchConfig,
    Launcher,
    Part,
    build_instance_argv,
    build_router_argv,
    child_env,
    omp_num_threads,
    plan_parts,
    usable_cpus,
)
from pdserve.procs import port_allocator
from pdserve.store.master import MasterProcess


class Deployment:
    """`pdserve launch` run by this process: the launcher's parts under a Launcher in a thread, until stop().

    Logs go to `log_dir` (<part>.log, and launch.log with the launcher's own output). start() blocks until
    the router answers /health and raises BenchServerError (with the launcher's report) if a part fails.
    With `config.kv_transfer == "storage"` it also runs a Mooncake master on free ports, as `pdserve launch`
    does, started before the instances and stopped after them; `store_options` (e.g. global_segment_size) go
    into every instance's --kv-store-config beside the master's address.
    NOTE: the parts (and the master) get SIGTERM when the launcher thread ends (PR_SET_PDEATHSIG), which is
    only in stop().
    """

    def __init__(
        self,
        name: str,
        config: LaunchConfig,
        log_dir: Path,
        startup_timeout_s: float,
        store_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.log_dir = log_dir
        self.startup_timeout_s = startup_timeout_s
        allocate = port_allocator()
        self.config = replace(config, port=allocate())
        self.parts = plan_parts(self.config, allocate)
        self.master: MasterProcess | None = None
        self.store_config: dict[str, Any] | None = None
        if self.config.kv_transfer == "storage":
            self.master = MasterProcess(port=allocate(), metadata_port=allocate())
            self.store_config = self.master.store_config() | dict(store_options or {})
        elif store_options:
            raise ValueError("store options apply to a --kv-transfer storage deployment only")
        instances = [p for p in self.parts if p.role != ROUTER]
        self.argv = {
            p.name: build_router_argv(self.config, instances)
            if p.role == ROUTER
            else build_instance_argv(self.config, p, self.store_config)
            for p in self.parts
        }
        self.env = child_env(os.environ, omp_num_threads(self.config.num_instances, self.config.tp, usable_cpus()))
        self._stop = threading.Event()
        self._err = io.StringIO()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.parts[-1].probe_url

    def instances(self, role: str | None = None) -> list[Part]:
        return [p for p in self.parts if p.role != ROUTER and role in (None, p.role)]

    @property
    def launch_argv(self) -> list[str]:
        """The `pdserve launch` command line that starts the same deployment."""
        c = self.config
        mode = ["--kv-transfer", c.kv_transfer] if c.kv_transfer != "direct" else []
        gpus = ["--gpus", ",".join(map(str, c.gpus))] if c.gpus else []
        return [
            "pdserve",
            "launch",
            "--num-prefill",
            str(c.num_prefill),
            "--num-decode",
            str(c.num_decode),
            "--num-mixed",
            str(c.num_mixed),
            *mode,
            *gpus,
            "--kv-transfer-engine",
            c.kv_transfer_engine,
            *c.engine_argv,
        ]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "launch_argv": self.launch_argv,
            "omp_num_threads": self.env.get("OMP_NUM_THREADS"),
            "parts": [
                {"name": p.name, "role": p.role, "url": p.url, "argv": self.argv[p.name][1:]} for p in self.parts
            ],
        }
        if self.master is not None:
            out["mooncake_master"] = {"argv": self.master.command(), "store_config": self.store_config}
        return out

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / "launch.log", "w")  # noqa: SIM115 - closed when the thread ends
        launcher = Launcher(
            self.parts,
            lambda part: self.argv[part.name],
            self.log_dir,
            self.env,
            self.startup_timeout_s,
            master=self.master,
            out=out,
            err=self._err,
        )

        def run() -> None:
            try:
                launcher.run(self._stop)
            finally:
                out.close()

        self._thread = threading.Thread(target=run, name=f"pdserve-launch-{self.name}", daemon=True)
        self._thread.start()
        while not launcher.ready.wait(0.25):
            if not self._thread.is_alive():
                raise BenchServerError(f"the {self.name!r} deployment did not start:\n{self._err.getvalue()}")

    def check_alive(self) -> None:
        """Raise BenchServerError if a part has exited since start() (the launcher then stopped them all)."""
        if self._thread is not None and not self._thread.is_alive():
            raise BenchServerError(
                f"a part of the {self.name!r} deployment failed during the run:\n{self._err.getvalue()}"
            )

    def stop(self) -> None:
        """Stop every part (router, instances) and wait for them; safe twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Deployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
