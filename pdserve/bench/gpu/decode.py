"""`pdserve bench gpu`'s decode part: the engine's decode-step latency with CUDA graphs and eager, beside HF
transformers `generate` on a model of the same shape and the weight-read roofline."""

from __future__ import annotations

import logging
import statistics
import time
import traceback
from typing import Any

from pdserve.bench.gpu.common import (
    greedy,
    make_engine,
    model_limit,
    num_blocks_for,
    random_prompts,
    ratio_of,
    rounded,
    weight_params,
)
from pdserve.bench.gpu.config import LEN_MARGIN, TARGET_BATCH1_OVER_ROOFLINE, GpuBenchConfig
from pdserve.bench.gpu.device import package_version, release, sync

logger = logging.getLogger(__name__)


def decode_max_model_len(config: GpuBenchConfig, arch: Any) -> tuple[int, str | None]:
    need = config.decode_context + decode_tokens(config, max(config.decode_batches), max(2048, config.decode_context))
    limit = model_limit(arch)
    used = min(config.decode_max_model_len, limit)
    if used < need:
        raise ValueError(
            f"a decode sequence may reach {need} tokens (--decode-context, the steps that compute the "
            f"largest batch's prompts, --decode-warmup, --decode-steps, {LEN_MARGIN} more), above the "
            f"decode engine's max_model_len {used} (--decode-max-model-len "
            f"{config.decode_max_model_len}, the model accepts {limit}); lower them"
        )
    note = (
        None
        if used == config.decode_max_model_len
        else (f"--decode-max-model-len {config.decode_max_model_len} lowered to {used}, what the model accepts")
    )
    return used, note


def decode_tokens(config: GpuBenchConfig, batch: int, token_budget: int) -> int:
    """Most tokens a sequence of `batch` generates: while the batch's prompts are being computed (the first
    ones decode meanwhile), then the warm-up and timed steps, and a margin."""
    prefill_steps = num_blocks_for(batch * config.decode_context, token_budget) + 2
    return prefill_steps + config.decode_warmup + config.decode_steps + LEN_MARGIN


def engine_decode(config: GpuBenchConfig, device: str, arch: Any, eager: bool) -> dict[str, Any]:
    """Decode-step latency of one engine (CUDA graphs or eager) at every batch size."""
    max_model_len, _ = decode_max_model_len(config, arch)
    max_batch = max(config.decode_batches)
    token_budget = max(2048, config.decode_context)
    # the first prompts computed decode while the later ones are prefilled: room for those tokens too
    per_seq = num_blocks_for(config.decode_context + decode_tokens(config, max_batch, token_budget), config.block_size)
    num_blocks = max(max_batch * per_seq + max_batch, num_blocks_for(max_model_len, config.block_size))
    started = time.perf_counter()
    core = make_engine(
        config,
        device,
        enforce_eager=eager,
        max_model_len=max_model_len,
        num_blocks=num_blocks,
        max_num_seqs=max_batch,
        max_num_batched_tokens=token_budget,
        enable_prefix_caching=False,
    )
    try:
        sync(device)  # the random weights are written by kernels still queued
        startup_s = time.perf_counter() - started
        runner = getattr(core.executor, "runner", None)
        graphs = getattr(runner, "graphs", None)
        out: dict[str, Any] = {
            "enforce_eager": eager,
            "cuda_graphs": graphs is not None,
            "graph_batch_sizes": list(graphs.sizes) if graphs is not None else None,
            "attention_backend": core.config.parallel.resolved_attention_backend(),
            "max_model_len": max_model_len,
            "num_blocks": num_blocks,
            "startup_s": rounded(startup_s, 2),
            "engine_weight_bytes": _engine_weight_bytes(core),
            "batches": {},
        }
        if not eager and graphs is None:
            logger.warning(
                "the engine captured no CUDA graphs (attention backend %s): the 'graphs' figures are eager steps",
                out["attention_backend"],
            )
        for batch in config.decode_batches:
            out["batches"][str(batch)] = _decode_batch(core, config, device, arch, batch)
            figures = out["batches"][str(batch)]
            print(
                f"[gpu] decode {'eager' if eager else 'graphs'} batch {batch}: {figures['ms_mean']:.2f} ms/step "
                f"(median {figures['ms_median']:.2f})",
                flush=True,
            )
        return out
    finally:
        core.shutdown()


def _decode_batch(core: Any, config: GpuBenchConfig, device: str, arch: Any, batch: int) -> dict[str, Any]:
    prompts = random_prompts(batch, config.decode_context, arch.vocab_size, seed=config.seed * 1000 + batch)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    sampling = greedy(decode_tokens(config, batch, core.config.scheduler.max_num_batched_tokens))
    for req_id, prompt in zip(ids, prompts):
        core.add_request(req_id, prompt, sampling)
    preemptions = core.stats().num_preemptions
    prefill_steps = 0
    scheduler = core.scheduler
    while scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        core.step()
        prefill_steps += 1
        if prefill_steps > batch * config.decode_context + 16:
            raise RuntimeError(f"the prompts of batch {batch} were not computed after {prefill_steps} steps")

    def decode_step() -> float:
        sync(device)
        start = time.perf_counter()
        updates = core.step()
        sync(device)
        elapsed = time.perf_counter() - start
        decoded = sum(1 for u in updates if u.new_token_ids)
        if decoded != batch:
            raise RuntimeError(
                f"a decode step of batch {batch} gave {decoded} tokens; every sequence should "
                "decode one (a request finished or was preempted)"
            )
        return elapsed

    for _ in range(config.decode_warmup):
        decode_step()
    seconds = [decode_step() for _ in range(config.decode_steps)]
    if core.stats().num_preemptions != preemptions:
        raise RuntimeError(f"requests were preempted during batch {batch}: the KV cache is too small")
    for req_id in ids:
        core.abort(req_id)
    core.step()  # lets the workers forget the aborted requests
    return {
        "batch": batch,
        "prefill_steps": prefill_steps,
        "ms_mean": rounded(statistics.fmean(seconds) * 1e3),
        "ms_median": rounded(statistics.median(seconds) * 1e3),
        "ms_min": rounded(min(seconds) * 1e3),
        "ms_max": rounded(max(seconds) * 1e3),
        "steps": len(seconds),
    }


def build_hf_model(arch: Any, dtype: str, device: str, seed: int) -> Any:
    """HF transformers' model class for this shape (LlamaForCausalLM for Llama), random weights, no EOS."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pdserve.models.arch import arch_to_hf_config
    from pdserve.worker.model_runner import TORCH_DTYPES

    fields = arch_to_hf_config(arch)
    fields["eos_token_id"] = None  # generate runs every requested token
    fields["pad_token_id"] = 0
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=TORCH_DTYPES[dtype])
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_decode(config: GpuBenchConfig, device: str, arch: Any) -> dict[str, Any]:
    """HF generate's per-token decode latency at every batch size (prefill cancelled out)."""
    import torch

    started = time.perf_counter()
    model = build_hf_model(arch, config.dtype, device, config.seed)
    sync(device)
    out: dict[str, Any] = {
        "class": type(model).__name__,
        "attn_implementation": model.config._attn_implementation,
        "transformers": package_version("transformers"),
        "startup_s": rounded(time.perf_counter() - started, 2),
        "num_params": sum(p.numel() for p in model.parameters()),
        "batches": {},
    }
    steps = config.decode_steps

    def generate_s(ids: Any, new_tokens: int) -> float:
        mask = torch.ones_like(ids)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            result = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
        sync(device)
        elapsed = time.perf_counter() - start
        if result.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"HF generate made {result.shape[1] - ids.shape[1]} tokens, asked for {new_tokens}")
        return elapsed

    for batch in config.decode_batches:
        prompts = random_prompts(batch, config.decode_context, arch.vocab_size, seed=config.seed * 1000 + batch)
        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        oom = None
        try:
            generate_s(ids, 2)  # warm-up at this shape
            one = min(generate_s(ids, 1) for _ in range(config.hf_repeats))
            many = min(generate_s(ids, steps + 1) for _ in range(config.hf_repeats))
        except torch.cuda.OutOfMemoryError as e:
            oom = f"out of memory: {str(e)[:200]}"
        if oom is not None:  # outside the except clause: its traceback holds the activations
            out["batches"][str(batch)] = {"batch": batch, "error": oom}
            print(f"[gpu] HF generate batch {batch}: out of memory", flush=True)
            release(device)
            continue
        ms = (many - one) / steps * 1e3
        out["batches"][str(batch)] = {
            "batch": batch,
            "ms_per_token": rounded(ms),
            "generate_1_s": rounded(one, 5),
            f"generate_{steps + 1}_s": rounded(many, 5),
            "new_tokens": steps,
        }
        print(f"[gpu] HF generate batch {batch}: {ms:.2f} ms/token", flush=True)
    return out


def run_decode(
    config: GpuBenchConfig, device: str, arch: Any, shape: dict[str, Any], copy: dict[str, Any] | None
) -> dict[str, Any]:
    max_model_len, note = decode_max_model_len(config, arch)
    result: dict[str, Any] = {
        "context_tokens": config.decode_context,
        "steps": config.decode_steps,
        "warmup_steps": config.decode_warmup,
        "batches": list(config.decode_batches),
        "max_model_len": max_model_len,
        "notes": [note] if note else [],
    }
    for name, eager in (("graphs", False), ("eager", True), ("hf", None)):
        if name == "graphs" and device != "cuda":
            result[name] = {"skipped": "CUDA graphs need a CUDA device"}
            continue
        if name == "hf" and config.skip_hf:
            result[name] = {"skipped": "--skip-hf"}
            continue
        try:
            result[name] = (
                hf_decode(config, device, arch) if eager is None else engine_decode(config, device, arch, eager)
            )
        except Exception as e:  # noqa: BLE001 - recorded; the other systems still run
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            result["error"] = f"decode {name} failed (see its record)"
        release(device)
    params = weight_params(arch)
    weight_bytes = params["total"] * shape["dtype_bytes"]
    # a step reads one embedding row per sequence; a tied table is read whole as the LM head anyway
    embed_bytes = 0 if arch.tie_word_embeddings else params["embedding"] * shape["dtype_bytes"]
    bandwidth = copy["gb_per_s_best"] * 1e9 if copy else None
    roofline_ms = weight_bytes / bandwidth * 1e3 if bandwidth else None
    read_ms = (weight_bytes - embed_bytes) / bandwidth * 1e3 if bandwidth else None
    result |= {
        "num_params": params["total"],
        "params": params,
        "weight_bytes": weight_bytes,
        "weight_bytes_read_per_step": weight_bytes - embed_bytes,
        "hbm_gb_per_s": copy["gb_per_s_best"] if copy else None,
        "roofline_ms": rounded(roofline_ms),
        "roofline_read_ms": rounded(read_ms),
    }
    result["rows"] = _decode_rows(config, result, shape, weight_bytes - embed_bytes, bandwidth, roofline_ms)
    first = result["rows"][0] if result["rows"] and result["rows"][0]["batch"] == 1 else None
    ratio = first["graphs_over_roofline"] if first else None
    result["target"] = {
        "what": "batch-1 decode step with CUDA graphs / roofline_ms",
        "max_ratio": TARGET_BATCH1_OVER_ROOFLINE,
        "ratio": ratio,
        "met": None if ratio is None else ratio <= TARGET_BATCH1_OVER_ROOFLINE,
    }
    return result


def _decode_rows(
    config: GpuBenchConfig,
    result: dict[str, Any],
    shape: dict[str, Any],
    read_bytes: int,
    bandwidth: float | None,
    roofline_ms: float | None,
) -> list[dict[str, Any]]:
    """One row per batch: the three systems' ms side by side, over the roofline and over each other.
    `read_bytes`: the weight bytes a step reads; `bandwidth`: bytes/s of the copy baseline."""
    mean_context = config.decode_context + config.decode_warmup + (config.decode_steps + 1) / 2
    rows = []
    for batch in config.decode_batches:
        key = str(batch)
        graphs = (result["graphs"].get("batches") or {}).get(key, {}).get("ms_mean")
        eager_ms = (result["eager"].get("batches") or {}).get(key, {}).get("ms_mean")
        hf_ms = (result["hf"].get("batches") or {}).get(key, {}).get("ms_per_token")
        kv_bytes = batch * mean_context * shape["kv_bytes_per_token"]
        with_kv = (read_bytes + kv_bytes) / bandwidth * 1e3 if bandwidth else None
        rows.append(
            {
                "batch": batch,
                "graphs_ms": graphs,
                "eager_ms": eager_ms,
                "hf_ms": hf_ms,
                "kv_bytes_read": int(kv_bytes),
                "roofline_weights_kv_ms": rounded(with_kv),
                "graphs_over_roofline": ratio_of(graphs, roofline_ms),
                "eager_over_roofline": ratio_of(eager_ms, roofline_ms),
                "graphs_over_roofline_weights_kv": ratio_of(graphs, with_kv),
                "eager_over_graphs": ratio_of(eager_ms, graphs),
                "hf_over_graphs": ratio_of(hf_ms, graphs),
                "hf_over_eager": ratio_of(hf_ms, eager_ms),
            }
        )
    return rows


def _engine_weight_bytes(core: Any) -> int | None:
    """Bytes of the engine's model tensors (parameters, and the CPU's prepacked linear weights), rank 0."""
    runner = getattr(core.executor, "runner", None)
    if runner is None:
        return None
    total = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    for module in runner.model.modules():
        packed = getattr(module, "packed_weight", None)
        if packed is not None:
            total += packed.numel() * packed.element_size()
    return int(total)
