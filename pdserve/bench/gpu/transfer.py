"""`pdserve bench gpu`'s transfer part: the raw cuda_ipc figures (transfer_raw.py), then a prefill and a decode
EngineCore in this process, P on one GPU and D on another: a PD request's TTFT against P's prefill alone, and
how much of it the KV transfer took."""

from __future__ import annotations

import statistics
import time
import traceback
from typing import Any

from pdserve.bench.gpu.common import (
    clamp_lens,
    greedy,
    make_engine,
    model_limit,
    num_blocks_for,
    random_prompts,
    ratio_of,
    rounded,
)
from pdserve.bench.gpu.config import LEN_MARGIN, OVERLAP_EXPOSED_SHARE, PD_MAX_TOKENS, PD_TIMEOUT_S, GpuBenchConfig
from pdserve.bench.gpu.device import release, sync, transfer_gpus
from pdserve.bench.gpu.transfer_raw import run_transfer_raw


def run_transfer(config: GpuBenchConfig, device: str, arch: Any) -> dict[str, Any]:
    lens, note = clamp_lens(config.transfer_lens, model_limit(arch), "--transfer-lens")
    result: dict[str, Any] = {
        "lens_requested": list(config.transfer_lens),
        "lens": lens,
        "notes": [note] if note else [],
    }
    errors = []
    gpus = transfer_gpus(config) if device == "cuda" else None
    if gpus is not None:
        try:
            result["raw"] = {
                "engine": "cuda_ipc",
                "repeats": config.raw_repeats,
                "p_gpu": gpus[0],
                "d_gpu": gpus[1],
                "rows": run_transfer_raw(config, arch, lens, gpus),
            }
        except Exception as e:  # noqa: BLE001 - recorded; the in-engine half still runs
            traceback.print_exc()
            result["raw"] = {"error": f"{type(e).__name__}: {e}"}
            errors.append("raw")
        release(device)
    else:
        result["raw"] = {"skipped": "cuda_ipc needs a CUDA device"}
    result["pd"] = run_transfer_pd(config, device, arch, lens, gpus)
    if errors:
        result["error"] = f"transfer {', '.join(errors)} failed (see its record)"
    return result


# ---- P and D engine cores in one process -----------------------------------------------------------------------------


def run_transfer_pd(
    config: GpuBenchConfig, device: str, arch: Any, lens: list[int], gpus: tuple[int, int] | None
) -> dict[str, Any]:
    """P on gpus[0] and D on gpus[1] (None: the CPU)."""
    from pdserve.config import DisaggConfig

    engine_name = "cuda_ipc" if device == "cuda" else "shm"
    max_model_len = max(lens) + LEN_MARGIN
    # a request at a time: P holds one prompt's blocks until sent, D one sequence; room for four
    num_blocks = 4 * num_blocks_for(max_model_len, config.block_size) + 16
    common = dict(
        max_model_len=max_model_len, num_blocks=num_blocks, max_num_batched_tokens=max_model_len, max_num_seqs=8
    )
    p_gpu, d_gpu = gpus if gpus is not None else (None, None)
    out: dict[str, Any] = {
        "engine": engine_name,
        "max_model_len": max_model_len,
        "num_blocks_per_core": num_blocks,
        "kv_dest_wait_s": 1.0,
        "max_tokens": PD_MAX_TOKENS,
        "repeats": config.transfer_repeats,
        "same_process": True,
        "p_gpu": p_gpu,
        "d_gpu": d_gpu,
        "same_gpu": device == "cuda" and p_gpu == d_gpu,
    }
    p = make_engine(
        config,
        device,
        **common,
        gpu_ids=() if p_gpu is None else (p_gpu,),
        disagg=DisaggConfig(role="prefill", transfer_engine=engine_name, kv_dest_wait=1.0),
    )
    try:
        d = make_engine(
            config,
            device,
            **common,
            gpu_ids=() if d_gpu is None else (d_gpu,),
            disagg=DisaggConfig(role="decode", transfer_engine=engine_name),
        )
        try:
            log = _SendLog(p)
            out["rows"] = [_pd_length(config, p, d, device, arch, i, tokens, log) for i, tokens in enumerate(lens)]
        finally:
            d.shutdown()
    finally:
        p.shutdown()
    return out


def _pd_length(
    config: GpuBenchConfig, p: Any, d: Any, device: str, arch: Any, i: int, tokens: int, log: _SendLog
) -> dict[str, Any]:
    """The row of the `i`th length: after one warm-up, --transfer-repeats PD requests, each followed by a plain
    request of the same length on P alone."""
    prompts = random_prompts(
        2 * (1 + config.transfer_repeats), tokens, arch.vocab_size, seed=config.seed * 1000 + 700 + i
    )
    records = []
    for j in range(1 + config.transfer_repeats):
        pd = _pd_request(p, d, device, f"{tokens}-{j}", prompts[2 * j], log)
        alone = _plain_request(p, device, f"plain-{tokens}-{j}", prompts[2 * j + 1])
        if j:  # the first of each length warms up
            records.append(pd | {"prefill_alone_s": alone})
    row = _pd_row(tokens, records, config.block_size)
    print(
        f"[gpu] PD {tokens} tokens: TTFT {row['ttft_ms_median']:.1f} ms, P prefill alone "
        f"{row['prefill_alone_ms_median']:.1f} ms, exposed {row['exposed_ms_median']:.2f} ms "
        f"({100 * (row['exposed_share_of_ttft'] or 0):.2f}% of TTFT)",
        flush=True,
    )
    return row


class _SendLog:
    """Reads the KV sends of every step plan P executes (rooms, block counts, copy runs); changes nothing."""

    def __init__(self, core: Any) -> None:
        from pdserve.disagg.transfer.base import block_runs

        self.sends: list[dict[str, Any]] = []
        execute = core.executor.execute

        def logged(plan: Any) -> Any:
            for send in plan.kv_sends:
                self.sends.append(
                    {
                        "room": send.room,
                        "layerwise": send.layerwise,
                        "num_blocks": len(send.src_block_ids),
                        "runs": len(block_runs(send.src_block_ids, send.dst_block_ids)),
                    }
                )
            return execute(plan)

        core.executor.execute = logged

    def of(self, room: str) -> dict[str, int]:
        """For one room: blocks sent layer by layer and as a catch-up, and (src, dst) runs: copies per (layer, K|V)."""
        sends = [x for x in self.sends if x["room"] == room]
        return {
            "layerwise_blocks": sum(x["num_blocks"] for x in sends if x["layerwise"]),
            "catchup_blocks": sum(x["num_blocks"] for x in sends if not x["layerwise"]),
            "copy_runs": sum(x["runs"] for x in sends),
        }


def _pd_request(p: Any, d: Any, device: str, key: str, prompt: list[int], log: _SendLog) -> dict[str, Any]:
    """One PD request: seconds to D's first token and what P's transfer counters grew by."""
    from pdserve.messages import TransferHandle

    before = p.stats().kv_transfer
    d_id, room = f"d-{key}", f"room-{key}"
    sync(device)
    start = time.perf_counter()
    d.add_request(d_id, prompt, greedy(PD_MAX_TOKENS), TransferHandle(room=room, peer=p.control_address))
    p.add_request(f"p-{key}", prompt, greedy(PD_MAX_TOKENS), TransferHandle(room=room, peer=d.control_address))
    ttft: float | None = None
    d_blocks: list[int] = []
    finished = False
    deadline = time.monotonic() + PD_TIMEOUT_S
    while not finished or p.is_waiting_on_peers or d.is_waiting_on_peers or p.has_work:
        for core in (d, p):
            for u in core.step():
                if u.error is not None:
                    raise RuntimeError(f"PD request {u.request.req_id} failed: {u.error.message}")
                if u.request.req_id == d_id:
                    if u.new_token_ids and ttft is None:
                        ttft = time.perf_counter() - start
                        d_blocks = d.kv.block_ids(d_id)[: num_blocks_for(len(prompt), d.kv.block_size)]
                    finished = finished or u.finished
        if time.monotonic() > deadline:
            raise RuntimeError(f"a PD request of {len(prompt)} tokens did not finish within {PD_TIMEOUT_S:.0f} s")
    after = p.stats().kv_transfer
    if after.failures != before.failures:
        raise RuntimeError(f"P counted KV transfer failures: {after.failures}")
    assert ttft is not None
    return {
        "ttft_s": ttft,
        "kv_bytes": after.bytes_sent - before.bytes_sent,
        "busy_s": after.send_seconds_busy - before.send_seconds_busy,
        "exposed_s": after.send_seconds_exposed - before.send_seconds_exposed,
        "transfer_window_s": after.seconds_sum - before.seconds_sum,
        # runs of consecutive block ids in D's blocks for the prompt (P's must run alongside for one copy)
        "d_block_runs": 1 + sum(1 for a, b in zip(d_blocks, d_blocks[1:]) if b != a + 1),
        **log.of(room),
    }


def _plain_request(p: Any, device: str, req_id: str, prompt: list[int]) -> float:
    """Seconds from adding a plain request (no transfer) to P until its token."""
    sync(device)
    start = time.perf_counter()
    p.add_request(req_id, prompt, greedy(1))
    deadline = time.monotonic() + PD_TIMEOUT_S
    while True:
        for u in p.step():
            if u.request.req_id == req_id and u.error is not None:
                raise RuntimeError(f"plain request on P failed: {u.error.message}")
            if u.request.req_id == req_id and u.new_token_ids:
                return time.perf_counter() - start
        if time.monotonic() > deadline:
            raise RuntimeError(f"a plain {len(prompt)}-token request on P did not finish in {PD_TIMEOUT_S:.0f} s")


def _pd_row(tokens: int, records: list[dict[str, Any]], block_size: int) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in records)

    ttft, alone, busy, exposed = median("ttft_s"), median("prefill_alone_s"), median("busy_s"), median("exposed_s")
    kv_bytes = int(median("kv_bytes"))
    return {
        "tokens": tokens,
        "kv_bytes": kv_bytes,
        "requests": len(records),
        "ttft_ms": [rounded(r["ttft_s"] * 1e3, 3) for r in records],
        "ttft_ms_median": rounded(ttft * 1e3, 3),
        "prefill_alone_ms": [rounded(r["prefill_alone_s"] * 1e3, 3) for r in records],
        "prefill_alone_ms_median": rounded(alone * 1e3, 3),
        "ttft_over_prefill_alone": ratio_of(ttft, alone),
        "pd_overhead_ms": rounded((ttft - alone) * 1e3, 3),
        "busy_ms_median": rounded(busy * 1e3, 4),
        "exposed_ms_median": rounded(exposed * 1e3, 4),
        "transfer_window_ms_median": rounded(median("transfer_window_s") * 1e3, 3),
        "exposed_share_of_ttft": ratio_of(exposed, ttft, 6),
        "busy_share_of_ttft": ratio_of(busy, ttft, 6),
        "num_overlapped": sum(r["exposed_s"] < OVERLAP_EXPOSED_SHARE * r["busy_s"] for r in records),
        "num_blocks": num_blocks_for(tokens, block_size),
        "d_block_runs": [r["d_block_runs"] for r in records],
        "copy_runs": [r["copy_runs"] for r in records],
        "layerwise_blocks": [r["layerwise_blocks"] for r in records],
        "catchup_blocks": [r["catchup_blocks"] for r in records],
    }
