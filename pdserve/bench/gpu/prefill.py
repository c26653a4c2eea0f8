"""`pdserve bench gpu`'s prefill part: one request's prompt computed in one engine step, its tokens/s and achieved
TFLOP/s beside the matmul peak measured in the same run."""

from __future__ import annotations

import statistics
import time
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
from pdserve.bench.gpu.config import LEN_MARGIN, GpuBenchConfig
from pdserve.bench.gpu.device import sync


def prefill_flops(arch: Any, tokens: int) -> dict[str, int]:
    """FLOPs to compute a prompt of `tokens` and sample one token (see NOTES['prefill'])."""
    h, hd, heads, kv_heads = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads
    linear = h * heads * hd + 2 * h * kv_heads * hd + heads * hd * h + 3 * h * arch.intermediate_size
    matmul = 2 * tokens * arch.num_layers * linear
    attention = 4 * arch.num_layers * heads * hd * tokens * (tokens + 1) // 2
    logits = 2 * h * arch.vocab_size
    return {"linear": matmul, "attention": attention, "logits": logits, "total": matmul + attention + logits}


def run_prefill(config: GpuBenchConfig, device: str, arch: Any, matmul: dict[str, Any] | None) -> dict[str, Any]:
    lens, note = clamp_lens(config.prefill_lens, model_limit(arch), "--prefill-lens")
    max_model_len = max(lens) + LEN_MARGIN
    num_blocks = 2 * num_blocks_for(max_model_len, config.block_size) + 8
    result: dict[str, Any] = {
        "lens_requested": list(config.prefill_lens),
        "lens": lens,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max_model_len,
        "repeats": config.prefill_repeats,
        "notes": [note] if note else [],
    }
    core = make_engine(
        config,
        device,
        enforce_eager=True,
        max_model_len=max_model_len,
        num_blocks=num_blocks,
        max_num_batched_tokens=max_model_len,
        max_num_seqs=1,
        enable_prefix_caching=False,
    )
    try:
        result["attention_backend"] = core.config.parallel.resolved_attention_backend()
        peak = matmul["tflops_best"] if matmul else None
        rows = []
        for i, tokens in enumerate(lens):
            prompts = random_prompts(
                1 + config.prefill_repeats, tokens, arch.vocab_size, seed=config.seed * 1000 + 500 + i
            )
            runs = [_prefill_once(core, device, f"prefill-{tokens}-{j}", p) for j, p in enumerate(prompts)][1:]
            seconds = statistics.median(s for s, _ in runs)
            flops = prefill_flops(arch, tokens)
            tflops = flops["total"] / seconds / 1e12
            rows.append(
                {
                    "tokens": tokens,
                    "steps": max(n for _, n in runs),
                    "seconds": [rounded(s, 6) for s, _ in runs],
                    "seconds_median": rounded(seconds, 6),
                    "tokens_per_s": rounded(tokens / seconds, 1),
                    "flops": flops,
                    "tflops": rounded(tflops, 6),
                    "matmul_peak_tflops": peak,
                    "over_matmul_peak": ratio_of(tflops, peak),
                }
            )
            print(
                f"[gpu] prefill {tokens} tokens: {seconds * 1e3:.1f} ms, {tokens / seconds:.0f} tok/s, "
                f"{tflops:.1f} TFLOP/s",
                flush=True,
            )
        result["rows"] = rows
    finally:
        core.shutdown()
    return result


def _prefill_once(core: Any, device: str, req_id: str, prompt: list[int]) -> tuple[float, int]:
    """(seconds of the engine steps until the request's token, how many steps)."""
    core.add_request(req_id, prompt, greedy(1))
    seconds, steps = 0.0, 0
    while True:
        sync(device)
        start = time.perf_counter()
        updates = core.step()
        sync(device)
        seconds += time.perf_counter() - start
        steps += 1
        for u in updates:
            if u.request.req_id == req_id and u.error is not None:
                raise RuntimeError(f"prefill request failed: {u.error.message}")
        if any(u.request.req_id == req_id and u.finished for u in updates):
            return seconds, steps
        if steps > len(prompt) + 8:
            raise RuntimeError(f"a {len(prompt)}-token prefill did not finish in {steps} steps")
