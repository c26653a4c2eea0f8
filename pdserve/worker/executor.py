"""Executors run a step plan on all ranks and return rank 0's output.

UniProcExecutor: tensor_parallel_size 1, the model runs in the engine core's
process. MultiProcExecutor: one worker process per rank; every rank receives
the same plan (ZMQ, msgspec) and the engine waits for rank 0's result, while
watching that every worker is alive so nothing hangs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

import msgspec
import zmq

from pdserve.config import EngineConfig
from pdserve.kvcache.manager import PoolLoad
from pdserve.messages import (
    ForwardOutput,
    KVRegion,
    KVSendReport,
    LoadFromPool,
    PoolLoaded,
    RankReport,
    Shutdown,
    StepPlan,
    StoreCounters,
    WorkerError,
    WorkerReady,
    decode_from_worker,
    encode,
)
from pdserve.models.arch import ModelArch
from pdserve.models.loader import ModelSource


class Executor(ABC):
    regions: list[list[KVRegion]]  # per rank: how a peer writes into that rank's KV cache

    @abstractmethod
    def execute(self, plan: StepPlan) -> ForwardOutput:
        """Run `plan` on every rank; blocks until rank 0's output is back (with every rank's send reports
        and, per pool read, the least any rank found). Raises if a rank failed."""

    @abstractmethod
    def load_from_pool(self, loads: list[PoolLoad]) -> tuple[list[int], StoreCounters]:
        """Read each load's blocks from the pool into host blocks on every rank; blocks until done.

        Returns, per load, how many leading blocks every rank read, and rank 0's store counters.
        """

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers and memory; safe to call twice."""


class UniProcExecutor(Executor):
    def __init__(
        self,
        config: EngineConfig,
        source: ModelSource,
        arch: ModelArch,
        num_blocks: int,
        num_host_blocks: int,
        max_model_len: int,
    ) -> None:
        from pdserve.worker.model_runner import ModelRunner

        self.runner = ModelRunner(config, source, arch, num_blocks, num_host_blocks, max_model_len)
        self.regions = [self.runner.regions()]

    def execute(self, plan: StepPlan) -> ForwardOutput:
        return self.runner.execute(plan)

    def load_from_pool(self, loads: list[PoolLoad]) -> tuple[list[int], StoreCounters]:
        num_loaded = [self.runner.load_from_pool(_names(load.keys), load.host_block_ids) for load in loads]
        return num_loaded, self.runner.store_counters()

    def shutdown(self) -> None:
        self.runner.close()


def _names(keys: Sequence[bytes | str]) -> list[str]:
    """Pool names of block keys (bytes: a chained key; str: already a name, e.g. a `:partial:N` one)."""
    return [k.hex() if isinstance(k, bytes) else k for k in keys]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerFailed(RuntimeError):
    pass


class MultiProcExecutor(Executor):
    def __init__(
        self,
        config: EngineConfig,
        num_blocks: int,
        num_host_blocks: int,
        max_model_len: int,
        start_timeout: float = 600,
    ) -> None:
        from pdserve.worker.worker import WorkerSpec, worker_main

        self.tp_size = config.parallel.tensor_parallel_size
        self._dir = tempfile.mkdtemp(prefix="pdserve-")
        self._ctx = zmq.Context()
        self._results = self._ctx.socket(zmq.PULL)
        self._results.bind(f"ipc://{self._dir}/results")
        self._plans = []
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        threads = max(1, (os.cpu_count() or 1) // self.tp_size)
        mp_ctx = mp.get_context("spawn")
        self._procs = []
        for rank in range(self.tp_size):
            sock = self._ctx.socket(zmq.PUSH)
            sock.bind(f"ipc://{self._dir}/plan-{rank}")
            self._plans.append(sock)
            spec = WorkerSpec(
                config,
                rank,
                num_blocks,
                num_host_blocks,
                max_model_len,
                init_method,
                f"ipc://{self._dir}/plan-{rank}",
                f"ipc://{self._dir}/results",
                threads,
                os.getpid(),
            )
            proc = mp_ctx.Process(
                target=worker_main, args=(msgspec.json.encode(spec),), name=f"pdserve-worker-{rank}", daemon=True
            )
            proc.start()
            self._procs.append(proc)
        self._closed = False
        self._load_id = 0
        self.regions = [[] for _ in range(self.tp_size)]
        try:
            ready: set[int] = set()
            while len(ready) < self.tp_size:
                message = self._recv(start_timeout)
                if isinstance(message, WorkerReady):
                    ready.add(message.rank)
                    self.regions[message.rank] = message.regions
        except BaseException:
            self.shutdown()
            raise

    def _recv(self, timeout: float) -> ForwardOutput | PoolLoaded | RankReport | WorkerReady:
        deadline = time.monotonic() + timeout
        while not self._results.poll(200):
            for rank, proc in enumerate(self._procs):
                if not proc.is_alive():
                    raise WorkerFailed(f"worker rank {rank} exited with code {proc.exitcode}")
            if time.monotonic() > deadline:
                raise WorkerFailed(f"no answer from the workers in {timeout:.0f}s")
        message = decode_from_worker(self._results.recv())
        if isinstance(message, WorkerError):
            raise WorkerFailed(f"worker rank {message.rank} failed:\n{message.error}")
        return message

    def execute(self, plan: StepPlan) -> ForwardOutput:
        data = encode(plan)
        for sock in self._plans:
            sock.send(data)
        output: ForwardOutput | None = None
        reports: dict[int, KVSendReport] = {}
        pool_read: dict[int, list[int]] = {}
        has_sends = bool(plan.kv_sends or plan.pool_sends)  # every rank confirms its sends
        num_answers = self.tp_size if has_sends or plan.pool_reads else 1
        while output is None or len(pool_read) < num_answers:
            message = self._recv(timeout=3600)
            if isinstance(message, ForwardOutput) and message.step_id == plan.step_id:
                output = message
                reports.update((r.rank, r) for r in message.kv_sent)
                pool_read[0] = message.pool_read
            elif isinstance(message, RankReport) and message.step_id == plan.step_id:
                if message.report is not None:
                    reports[message.rank] = message.report
                pool_read[message.rank] = message.pool_read
        output.kv_sent = [reports[r] for r in sorted(reports)] if has_sends else []
        # a block counts only if every rank has its shard
        output.pool_read = [min(found) for found in zip(*pool_read.values())] if plan.pool_reads else []
        return output

    def load_from_pool(self, loads: list[PoolLoad]) -> tuple[list[int], StoreCounters]:
        num_loaded = []
        counters = StoreCounters()
        for load in loads:
            n, counters = self._pool_call(_names(load.keys), load.host_block_ids)
            num_loaded.append(n)
        return num_loaded, counters

    def _pool_call(self, keys: list[str], host_block_ids: list[int]) -> tuple[int, StoreCounters]:
        """LoadFromPool on every rank; the least any rank answered."""
        self._load_id += 1
        data = encode(LoadFromPool(load_id=self._load_id, keys=keys, host_block_ids=host_block_ids))
        for sock in self._plans:
            sock.send(data)
        answers: dict[int, int] = {}
        counters = StoreCounters()
        while len(answers) < self.tp_size:
            message = self._recv(timeout=600)
            if isinstance(message, PoolLoaded) and message.load_id == self._load_id:
                answers[message.rank] = message.num_loaded
                if message.rank == 0:
                    counters = message.store
        return min(answers.values()), counters  # a block counts only if every rank has its shard

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        data = encode(Shutdown())
        for sock in self._plans:
            sock.send(data, zmq.NOBLOCK)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for sock in [*self._plans, self._results]:
            sock.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
