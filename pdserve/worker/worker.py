"""The process of one tensor-parallel rank: joins the TP group, loads its shard,
then executes every step plan the engine core broadcasts. Rank 0 returns the
sampled tokens; any rank reports its own failure."""

from __future__ import annotations

import os
import traceback

import msgspec
import torch
import zmq

from pdserve.config import EngineConfig
from pdserve.layers.parallel import init_tp_group
from pdserve.messages import (
    LoadFromPool,
    Message,
    PoolLoaded,
    RankReport,
    Shutdown,
    StepPlan,
    WorkerError,
    WorkerReady,
    decode_from_engine,
    encode,
)
from pdserve.models.loader import load_arch, resolve_model
from pdserve.worker.model_runner import ModelRunner


class WorkerSpec(msgspec.Struct, frozen=True):
    config: EngineConfig
    rank: int
    num_blocks: int
    num_host_blocks: int
    max_model_len: int
    dist_init_method: str
    plan_address: str
    result_address: str
    num_threads: int
    parent_pid: int


def worker_main(spec_json: bytes) -> None:
    spec = msgspec.json.decode(spec_json, type=WorkerSpec)
    torch.set_num_threads(spec.num_threads)
    ctx = zmq.Context()
    plans = ctx.socket(zmq.PULL)
    plans.connect(spec.plan_address)
    results = ctx.socket(zmq.PUSH)
    results.connect(spec.result_address)
    try:
        config = spec.config
        device = config.parallel.resolved_device()
        if device == "cuda":
            torch.cuda.set_device(config.parallel.gpu_id(spec.rank))
        init_tp_group(
            spec.rank,
            config.parallel.tensor_parallel_size,
            "nccl" if device == "cuda" else "gloo",
            spec.dist_init_method,
        )
        source = resolve_model(config.model)
        runner = ModelRunner(
            config, source, load_arch(source), spec.num_blocks, spec.num_host_blocks, spec.max_model_len
        )
        results.send(encode(WorkerReady(rank=spec.rank, regions=runner.regions())))
        while True:
            if not plans.poll(1000):
                if os.getppid() != spec.parent_pid:
                    return  # the engine core is gone
                continue
            message = decode_from_engine(plans.recv())
            if isinstance(message, Shutdown):
                runner.close()
                return
            answer = _run(runner, message, spec.rank)
            if answer is not None:
                results.send(encode(answer))
    except Exception:  # noqa: BLE001 - reported to the engine core, which fails loudly
        results.send(encode(WorkerError(rank=spec.rank, error=traceback.format_exc())))
    finally:
        results.close(linger=1000)
        plans.close(linger=0)
        ctx.term()


def _run(runner: ModelRunner, message: StepPlan | LoadFromPool, rank: int) -> Message | None:
    """Run one plan or pool load on this rank; what to tell the engine core (None: nothing)."""
    if isinstance(message, LoadFromPool):
        num_loaded = runner.load_from_pool(message.keys, message.host_block_ids)
        return PoolLoaded(load_id=message.load_id, rank=rank, num_loaded=num_loaded, store=runner.store_counters())
    output = runner.execute(message)
    if rank == 0:
        return output
    if output.kv_sent or message.pool_reads:  # every rank confirms its sends and answers the pool reads
        report = output.kv_sent[0] if output.kv_sent else None
        return RankReport(step_id=message.step_id, rank=rank, report=report, pool_read=output.pool_read)
    return None
