"""`pdserve bench gpu`: the engine on a GPU (the transfer part on two when there are two), each figure beside
a baseline measured in the same run.

Three parts (--parts), each in its own engine(s), freed before the next:

- decode: the engine's decode-step latency (ms per step: core.step() with every sequence decoding, timed
  over --decode-steps steps after --decode-warmup) at each --decode-batches size, prompts of
  --decode-context tokens, with CUDA graphs and eager (enforce_eager). Baselines: the weight-read roofline
  (the model's weight bytes / the HBM bandwidth a large device-to-device copy reached in this run) and HF
  transformers `generate` on a model of the same shape (random weights): its per-token latency is
  (time of generate(steps + 1 new tokens) - time of generate(1 new token)) / steps, the best of
  --hf-repeats each, so the prompt's prefill cancels out.
- prefill: one request's prompt computed in one engine step (max_num_batched_tokens >= the prompt) at
  each --prefill-lens length: tokens/s and achieved TFLOP/s (the model's matmul FLOPs plus causal
  attention FLOPs) against the TFLOP/s of a --matmul-size cubed matmul in the same dtype.
- transfer, P on one GPU and D on another (--transfer-gpus; default 0,1 with two GPUs, else both on 0):
  (raw) the cuda_ipc engine writing one prompt's KV blocks from this process into a cache that a
  spawned child process exported on D's GPU, all layers in one write, layer by layer, and into scattered
  blocks, against one contiguous copy of the same bytes from P's GPU to D's (a peer copy); (pd) a prefill
  and a decode EngineCore in this process (transfer engine cuda_ipc): a PD request's TTFT (D's first
  token) against the prefill alone of a same-length plain request on P, and P's sender busy and exposed
  seconds (the share of TTFT spent on the transfer).

Writes gpu-<gpu>-<label or timestamp>.json and .png under --result-dir and prints a table. Needs a CUDA
GPU (exit 2 without one); the hidden --allow-cpu runs what can run on the CPU (for the smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pdserve.bench.common import (
    LABEL_RE,
    MIN_RANDOM_TOKEN_ID,
    code_version,
    fmt,
    machine_info,
    now_iso,
    random_requests,
    write_json,
)
from pdserve.bench.plot import finish_figure, pyplot
from pdserve.config import DTYPES, LOAD_FORMATS, parse_size
from pdserve.piped_child import PipedChild

PARTS = ("decode", "prefill", "transfer")
TARGET_BATCH1_OVER_ROOFLINE = 1.3  # decode at batch 1 with CUDA graphs, over the weight-read roofline
LEN_MARGIN = 16  # max_model_len = the longest prompt + this (room for the generated tokens)
PD_MAX_TOKENS = 2  # a PD request: P samples the first token, D decodes one more
CHILD_START_TIMEOUT_S = 180.0  # a spawned child imports torch and pdserve and creates a CUDA context
CHILD_REPLY_TIMEOUT_S = 60.0
PD_TIMEOUT_S = 300.0
OVERLAP_EXPOSED_SHARE = 0.5  # as in bench transfer: exposed below this share of busy = sends ran during the forward
NOTES = {
    "decode_ms": "engine.step() wall time per decode step (every running sequence decodes one token; host "
    "scheduling, the forward, logits and sampling; torch.cuda.synchronize() around each step), "
    "mean over the timed steps; each batch's prompts have decode_context tokens, so the context "
    "grows from context + warm-up steps during the timed steps",
    "roofline_ms": "weight_bytes (every parameter of the engine's model) / copy.gb_per_s_best: the least time a "
    "step can take if it reads every weight once from HBM at the bandwidth a device-to-device "
    "copy reached in this run. roofline_read_ms counts only the weights a step reads (not the "
    "input embedding table, of which a step reads one row per sequence); "
    "roofline_weights_kv_ms adds the KV cache bytes the batch reads (mean context)",
    "hf_ms": "HF transformers generate (DynamicCache, the model's default attention, greedy, no EOS) on a model "
    "built from the same shape with random weights, same dtype and device: (best time of "
    "generate(steps + 1 new tokens) - best time of generate(1 new token)) / steps, the same prompts' "
    "shape (batch x decode_context, no padding)",
    "copy": "a contiguous device-to-device copy of copy_bytes, best and median of the timed repeats after "
    "warm-up; gb_per_s counts bytes read + bytes written (HBM traffic), GB = 1e9 bytes",
    "matmul": "torch.matmul of two matmul_size x matmul_size matrices in the model dtype: 2 n^3 FLOPs per "
    "product, best and median of the timed repeats after warm-up",
    "prefill": "one request's prompt computed in one engine step (max_num_batched_tokens >= the prompt, "
    "max_tokens 1, a fresh random prompt per run, prefix caching off); seconds = the wall time of "
    "the engine step(s) that computed it, median of the repeats after one warm-up. FLOPs: "
    "2 x tokens x the linear layers' weights (q, k, v, o, gate, up, down of every layer) + causal "
    "attention 4 x layers x heads x head_dim x tokens (tokens + 1) / 2 (QK^T and PV over the "
    "keys each query sees) + 2 x hidden x vocab for the one sampled row's logits",
    "transfer_raw": "the cuda_ipc engine (CudaIpcEngine.write + flush) copying one prompt's KV blocks (every "
    "layer, K and V, contiguous block ids) from a cache in this process on P's GPU into a cache a "
    "spawned child process exported on D's GPU: all layers in one write, one write per layer as "
    "P's sender does, or all layers into every other block of D's (scattered: gather, peer copy, "
    "scatter); wall time from a synchronized start to flush(), median and best of the "
    "repeats after one untimed write whose copy is checked. device_copy: one contiguous "
    "copy of the same bytes from P's GPU to D's in this process (the peer copy); local_slices: "
    "the engine's pattern of copies, one per (layer, K|V) slice of the blocks, into a cache of this "
    "process (what the launches cost without IPC and without the engine's Python). GB/s here "
    "counts the bytes moved (once), not read + written",
    "transfer_pd": "P (role prefill) and D (role decode) are two EngineCores in ONE process, P on p_gpu and D on "
    "d_gpu, paired through their real control sockets; the KV goes through the cuda_ipc engine "
    "(in one process it copies into D's tensor directly, as it does into a mapped peer cache). "
    "ttft: from adding the request to D (then to P) until D emits its first token (P's prefill, "
    "layer-by-layer sends, KVDone), both cores stepped in turn, no HTTP; prefill_alone: a plain "
    "request of the same length on P (max_tokens 1) from add to its token. busy: P rank 0's "
    "sender thread time in write() (with cuda_ipc it queues the copies on a side stream, so "
    "this is host time, not copy time); exposed: time P's step waited for the sends after its "
    "forward (the copies left to finish): the transfer's share of TTFT is exposed / ttft. "
    "kv_dest_wait is 1 s so P prefills only once D's block ids came, sending layer by layer",
}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuBenchConfig:
    parts: tuple[str, ...] = PARTS
    model: str = "llama3-8b"
    load_format: str = "dummy"
    dtype: str = "bfloat16"
    block_size: int = 16
    seed: int = 0
    decode_batches: tuple[int, ...] = (1, 8, 32, 64)
    decode_context: int = 512
    decode_steps: int = 32
    decode_warmup: int = 3
    decode_max_model_len: int = 4096
    skip_hf: bool = False
    hf_repeats: int = 2
    prefill_lens: tuple[int, ...] = (2048, 8192)
    prefill_repeats: int = 5
    transfer_lens: tuple[int, ...] = (1024, 4096, 16384)
    transfer_gpus: tuple[int, ...] | None = None  # (P's, D's) CUDA devices; None: (0, 1) with two GPUs, else (0, 0)
    transfer_repeats: int = 5
    raw_repeats: int = 20
    copy_bytes: int = 4 << 30
    copy_repeats: int = 10
    matmul_size: int = 8192
    matmul_repeats: int = 20
    result_dir: Path = Path("bench/results")
    label: str | None = None
    allow_cpu: bool = False

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(
                f"--parts takes a comma-separated subset of {','.join(PARTS)}, got {','.join(self.parts)!r}"
            )
        for name in ("decode_batches", "prefill_lens", "transfer_lens"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"--{name.replace('_', '-')} takes positive integers, got {values}")
        for name in (
            "decode_context",
            "decode_steps",
            "hf_repeats",
            "prefill_repeats",
            "transfer_repeats",
            "raw_repeats",
            "copy_bytes",
            "copy_repeats",
            "matmul_size",
            "matmul_repeats",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.transfer_gpus is not None and (len(self.transfer_gpus) != 2 or min(self.transfer_gpus) < 0):
            raise ValueError(f"--transfer-gpus takes two device indices P,D (e.g. 0,1), got {self.transfer_gpus}")
        if self.decode_warmup < 0:
            raise ValueError(f"--decode-warmup must be 0 or more, got {self.decode_warmup}")
        if self.label is not None and not LABEL_RE.match(self.label):
            raise ValueError(f"--label {self.label!r} may hold only letters, digits, '.', '_' and '-'")


# ---- small helpers -------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def transfer_gpus(config: GpuBenchConfig) -> tuple[int, int]:
    """(P's device, D's device) of the transfer part."""
    import torch

    if config.transfer_gpus is not None:
        p, d = config.transfer_gpus
        if max(p, d) >= torch.cuda.device_count():
            raise ValueError(f"--transfer-gpus {p},{d}: torch sees {torch.cuda.device_count()} GPU(s)")
        return p, d
    return (0, 1) if torch.cuda.device_count() >= 2 else (0, 0)


def _release(device: str) -> None:
    """Give back what freed engines and tensors held (call once their last reference is gone)."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _ratio(a: float | None, b: float | None, digits: int = 4) -> float | None:
    return None if a is None or not b else round(a / b, digits)


def _timing(seconds: Sequence[float]) -> dict[str, Any]:
    return {
        "seconds_best": _r(min(seconds), 7),
        "seconds_median": _r(statistics.median(seconds), 7),
        "seconds_mean": _r(statistics.fmean(seconds), 7),
        "repeats": len(seconds),
    }


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3': the GPU's part of the result file names."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", text) or "gpu"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi(fields: str) -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def gpu_info(device: str) -> dict[str, Any]:
    """The accelerator and the software that drives it."""
    import torch

    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
    }
    if device != "cuda":
        return info | {"name": "cpu", "slug": "cpu"}
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    smi = _nvidia_smi("driver_version,clocks.max.sm,clocks.max.memory,power.limit")
    parts = [p.strip() for p in smi.split(",")] if smi else []
    return info | {
        "name": name,
        "slug": slug(name),
        "memory_gib": round(props.total_memory / 2**30, 2),
        "multiprocessors": props.multi_processor_count,
        "compute_capability": f"{props.major}.{props.minor}",
        "device_count": torch.cuda.device_count(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "driver": parts[0] if parts else None,
        "max_sm_clock": parts[1] if len(parts) > 1 else None,
        "max_memory_clock": parts[2] if len(parts) > 2 else None,
        "power_limit": parts[3] if len(parts) > 3 else None,
    }


def resolve_device(allow_cpu: bool) -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if allow_cpu:
        return "cpu"
    raise ValueError(
        f"pdserve bench gpu needs a CUDA GPU, and torch sees none (torch {torch.__version__}, CUDA "
        f"build {torch.version.cuda or 'none'}); run it on a machine with an NVIDIA GPU and a CUDA "
        "build of torch"
    )


def model_limit(arch: Any) -> int:
    """The longest sequence the engine accepts for this shape (as resolve_max_model_len)."""
    limit = int(arch.max_position_embeddings)
    return min(limit, arch.sliding_window) if arch.sliding_window else limit


def clamp_lens(lens: Sequence[int], limit: int, what: str) -> tuple[list[int], str | None]:
    """Each length at most `limit` - LEN_MARGIN, duplicates dropped; a note when any was clamped."""
    top = limit - LEN_MARGIN
    if top < 1:
        raise ValueError(f"the model accepts {limit} tokens, too few for {what}")
    used = list(dict.fromkeys(min(n, top) for n in lens))
    note = (
        None
        if used == list(lens)
        else (
            f"{what} {list(lens)} clamped to {used}: the model accepts {limit} "
            f"tokens and {LEN_MARGIN} are kept for generated tokens"
        )
    )
    return used, note


def model_facts(config: GpuBenchConfig) -> tuple[Any, dict[str, Any]]:
    """(arch, the model's shape for the JSON)."""
    from pdserve.config import ModelConfig
    from pdserve.engine.core import DTYPE_SIZES
    from pdserve.models.loader import load_arch, resolve_model

    source = resolve_model(ModelConfig(model=config.model, load_format=config.load_format, dtype=config.dtype))
    arch = load_arch(source)
    dtype_size = DTYPE_SIZES[config.dtype]
    shape = {k: v for k, v in asdict(arch).items() if k not in ("eos_token_ids", "bos_token_id")}
    return arch, {
        "name": source.name,
        "load_format": config.load_format,
        "dtype": config.dtype,
        "dtype_bytes": dtype_size,
        "arch": shape,
        "kv_bytes_per_token": arch.kv_bytes_per_token(dtype_size),
        "kv_bytes_per_block": arch.kv_bytes_per_token(dtype_size) * config.block_size,
        "block_size": config.block_size,
        "max_len": model_limit(arch),
    }


def _engine(config: GpuBenchConfig, device: str, **kwargs: Any) -> Any:
    from pdserve.config import make_engine_config
    from pdserve.engine.core import EngineCore

    return EngineCore(
        make_engine_config(
            config.model,
            dtype=config.dtype,
            load_format=config.load_format,
            device=device,
            block_size=config.block_size,
            seed=config.seed,
            **kwargs,
        )
    )


def _prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`count` seeded random prompts of `length` token ids (no shared prefix between them)."""
    requests = random_requests(
        count, (length, length), (1, 1), vocab_size, seed, min_token_id=min(MIN_RANDOM_TOKEN_ID, vocab_size // 2)
    )
    return [r.prompt_token_ids for r in requests]


def _greedy(max_tokens: int) -> Any:
    from pdserve.request import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def weight_params(arch: Any) -> dict[str, int]:
    """Parameters of the shape, by where they are read: every layer's, the input embedding table, the LM
    head (none when tied to the embedding), the final norm."""
    h, hd, heads, kv_heads, inter = (
        arch.hidden_size,
        arch.head_dim,
        arch.num_heads,
        arch.num_kv_heads,
        arch.intermediate_size,
    )
    attention = h * heads * hd + 2 * h * kv_heads * hd + heads * hd * h
    attention += (heads * hd + 2 * kv_heads * hd if arch.qkv_bias else 0) + (h if arch.o_bias else 0)
    mlp = 3 * h * inter + (2 * inter + h if arch.mlp_bias else 0)
    layers = arch.num_layers * (attention + mlp + 2 * h)
    embedding = arch.vocab_size * h
    head = 0 if arch.tie_word_embeddings else arch.vocab_size * h
    return {
        "layers": layers,
        "embedding": embedding,
        "lm_head": head,
        "final_norm": h,
        "total": layers + embedding + head + h,
    }


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


# ---- device baselines ------------------------------------------------------------------------------------------


def measure_copy(device: str, nbytes: int, repeats: int, warmup: int = 3) -> dict[str, Any]:
    """HBM bandwidth: a contiguous copy of `nbytes`; GB/s counts bytes read + written."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(7)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    del src, dst
    _release(device)
    t = _timing(seconds)
    return {
        "nbytes": nbytes,
        **t,
        "gb_per_s_best": _r(2 * nbytes / t["seconds_best"] / 1e9, 2),
        "gb_per_s_median": _r(2 * nbytes / t["seconds_median"] / 1e9, 2),
    }


def measure_matmul(device: str, dtype: str, n: int, repeats: int, warmup: int = 3) -> dict[str, Any]:
    """Dense matmul peak in `dtype`: n x n @ n x n, 2 n^3 FLOPs."""
    import torch

    from pdserve.worker.model_runner import TORCH_DTYPES

    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(TORCH_DTYPES[dtype])
    b = torch.randn(n, n, device=device, generator=generator).to(TORCH_DTYPES[dtype])
    out = torch.empty_like(a)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    del a, b, out
    _release(device)
    t = _timing(seconds)
    flops = 2 * n**3
    return {
        "n": n,
        "dtype": dtype,
        "flops": flops,
        **t,
        "tflops_best": _r(flops / t["seconds_best"] / 1e12, 6),
        "tflops_median": _r(flops / t["seconds_median"] / 1e12, 6),
    }


# ---- decode ----------------------------------------------------------------------------------------------------


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
    prefill_steps = _blocks(batch * config.decode_context, token_budget) + 2
    return prefill_steps + config.decode_warmup + config.decode_steps + LEN_MARGIN


def engine_decode(config: GpuBenchConfig, device: str, arch: Any, eager: bool) -> dict[str, Any]:
    """Decode-step latency of one engine (CUDA graphs or eager) at every batch size."""
    max_model_len, _ = decode_max_model_len(config, arch)
    max_batch = max(config.decode_batches)
    token_budget = max(2048, config.decode_context)
    # the first prompts computed decode while the later ones are prefilled: room for those tokens too
    per_seq = _blocks(config.decode_context + decode_tokens(config, max_batch, token_budget), config.block_size)
    num_blocks = max(max_batch * per_seq + max_batch, _blocks(max_model_len, config.block_size))
    started = time.perf_counter()
    core = _engine(
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
        _sync(device)  # the random weights are written by kernels still queued
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
            "startup_s": _r(startup_s, 2),
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
    prompts = _prompts(batch, config.decode_context, arch.vocab_size, seed=config.seed * 1000 + batch)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    sampling = _greedy(decode_tokens(config, batch, core.config.scheduler.max_num_batched_tokens))
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
        _sync(device)
        start = time.perf_counter()
        updates = core.step()
        _sync(device)
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
        "ms_mean": _r(statistics.fmean(seconds) * 1e3),
        "ms_median": _r(statistics.median(seconds) * 1e3),
        "ms_min": _r(min(seconds) * 1e3),
        "ms_max": _r(max(seconds) * 1e3),
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
    _sync(device)
    out: dict[str, Any] = {
        "class": type(model).__name__,
        "attn_implementation": model.config._attn_implementation,
        "transformers": _version("transformers"),
        "startup_s": _r(time.perf_counter() - started, 2),
        "num_params": sum(p.numel() for p in model.parameters()),
        "batches": {},
    }
    steps = config.decode_steps

    def generate_s(ids: Any, new_tokens: int) -> float:
        mask = torch.ones_like(ids)
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            result = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
        _sync(device)
        elapsed = time.perf_counter() - start
        if result.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"HF generate made {result.shape[1] - ids.shape[1]} tokens, asked for {new_tokens}")
        return elapsed

    for batch in config.decode_batches:
        prompts = _prompts(batch, config.decode_context, arch.vocab_size, seed=config.seed * 1000 + batch)
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
            _release(device)
            continue
        ms = (many - one) / steps * 1e3
        out["batches"][str(batch)] = {
            "batch": batch,
            "ms_per_token": _r(ms),
            "generate_1_s": _r(one, 5),
            f"generate_{steps + 1}_s": _r(many, 5),
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
        _release(device)
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
        "roofline_ms": _r(roofline_ms),
        "roofline_read_ms": _r(read_ms),
    }
    mean_context = config.decode_context + config.decode_warmup + (config.decode_steps + 1) / 2
    rows = []
    for batch in config.decode_batches:
        key = str(batch)
        graphs = (result["graphs"].get("batches") or {}).get(key, {}).get("ms_mean")
        eager_ms = (result["eager"].get("batches") or {}).get(key, {}).get("ms_mean")
        hf_ms = (result["hf"].get("batches") or {}).get(key, {}).get("ms_per_token")
        kv_bytes = batch * mean_context * shape["kv_bytes_per_token"]
        with_kv = (weight_bytes - embed_bytes + kv_bytes) / bandwidth * 1e3 if bandwidth else None
        rows.append(
            {
                "batch": batch,
                "graphs_ms": graphs,
                "eager_ms": eager_ms,
                "hf_ms": hf_ms,
                "kv_bytes_read": int(kv_bytes),
                "roofline_weights_kv_ms": _r(with_kv),
                "graphs_over_roofline": _ratio(graphs, roofline_ms),
                "eager_over_roofline": _ratio(eager_ms, roofline_ms),
                "graphs_over_roofline_weights_kv": _ratio(graphs, with_kv),
                "eager_over_graphs": _ratio(eager_ms, graphs),
                "hf_over_graphs": _ratio(hf_ms, graphs),
                "hf_over_eager": _ratio(hf_ms, eager_ms),
            }
        )
    result["rows"] = rows
    first = rows[0] if rows and rows[0]["batch"] == 1 else None
    ratio = first["graphs_over_roofline"] if first else None
    result["target"] = {
        "what": "batch-1 decode step with CUDA graphs / roofline_ms",
        "max_ratio": TARGET_BATCH1_OVER_ROOFLINE,
        "ratio": ratio,
        "met": None if ratio is None else ratio <= TARGET_BATCH1_OVER_ROOFLINE,
    }
    return result


# ---- prefill ---------------------------------------------------------------------------------------------------


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
    num_blocks = 2 * _blocks(max_model_len, config.block_size) + 8
    result: dict[str, Any] = {
        "lens_requested": list(config.prefill_lens),
        "lens": lens,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max_model_len,
        "repeats": config.prefill_repeats,
        "notes": [note] if note else [],
    }
    core = _engine(
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
            prompts = _prompts(1 + config.prefill_repeats, tokens, arch.vocab_size, seed=config.seed * 1000 + 500 + i)
            runs = [_prefill_once(core, device, f"prefill-{tokens}-{j}", p) for j, p in enumerate(prompts)][1:]
            seconds = statistics.median(s for s, _ in runs)
            flops = prefill_flops(arch, tokens)
            tflops = flops["total"] / seconds / 1e12
            rows.append(
                {
                    "tokens": tokens,
                    "steps": max(n for _, n in runs),
                    "seconds": [_r(s, 6) for s, _ in runs],
                    "seconds_median": _r(seconds, 6),
                    "tokens_per_s": _r(tokens / seconds, 1),
                    "flops": flops,
                    "tflops": _r(tflops, 6),
                    "matmul_peak_tflops": peak,
                    "over_matmul_peak": _ratio(tflops, peak),
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
    core.add_request(req_id, prompt, _greedy(1))
    seconds, steps = 0.0, 0
    while True:
        _sync(device)
        start = time.perf_counter()
        updates = core.step()
        _sync(device)
        seconds += time.perf_counter() - start
        steps += 1
        for u in updates:
            if u.request.req_id == req_id and u.error is not None:
                raise RuntimeError(f"prefill request failed: {u.error.message}")
        if any(u.request.req_id == req_id and u.finished for u in updates):
            return seconds, steps
        if steps > len(prompt) + 8:
            raise RuntimeError(f"a {len(prompt)}-token prefill did not finish in {steps} steps")


# ---- transfer: raw cuda_ipc between two processes ----------------------------------------------------------------


def _ipc_receiver(conn: Connection, shape: tuple[int, ...], dtype_name: str, device: str) -> None:
    """Child process: a zeroed cache of `shape` on the GPU, exported through cuda_ipc; answers JSON commands
    {"cmd": "zero"}, {"cmd": "checksum", "num_blocks": n} (sum of the bytes of blocks [0, n) of every layer),
    {"cmd": "stop"}."""
    engine = None
    try:
        import torch

        from pdserve.disagg.transfer.cuda_ipc import CudaIpcEngine

        torch.cuda.set_device(device)
        cache = torch.zeros(shape, dtype=getattr(torch, dtype_name), device=device)
        engine = CudaIpcEngine(cache, receive=True)
        region = engine.region()
        assert region is not None
        conn.send_bytes(json.dumps({"address": region.address}).encode())
        while True:
            message = json.loads(conn.recv_bytes())
            if message["cmd"] == "stop":
                break
            if message["cmd"] == "zero":
                cache.zero_()
                torch.cuda.synchronize()
                conn.send_bytes(b"{}")
            elif message["cmd"] == "checksum":
                total = cache[:, :, : message["num_blocks"]].view(torch.uint8).sum(dtype=torch.int64)
                conn.send_bytes(json.dumps({"checksum": int(total)}).encode())
    except (EOFError, OSError):
        pass  # the parent went away
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        try:
            conn.send_bytes(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        except OSError:
            pass
    finally:
        if engine is not None:
            engine.close()


class _Child:
    """The spawned receiver process and its pipe (JSON messages)."""

    def __init__(self, shape: tuple[int, ...], dtype_name: str, device: str) -> None:
        self.child = PipedChild(
            _ipc_receiver, (shape, dtype_name, device), "pdserve-bench-gpu-receiver", "the receiver process"
        )

    def recv(self, timeout: float) -> dict[str, Any]:
        reply = json.loads(self.child.recv(timeout))
        if "error" in reply:
            raise RuntimeError(f"the receiver process failed: {reply['error']}")
        return reply

    def ask(self, **message: Any) -> dict[str, Any]:
        self.child.send(json.dumps(message).encode())
        return self.recv(CHILD_REPLY_TIMEOUT_S)

    def close(self) -> None:
        self.child.close(json.dumps({"cmd": "stop"}).encode(), 15.0)


def _timed(fn: Callable[[], None], device: str, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def run_transfer_raw(config: GpuBenchConfig, arch: Any, lens: list[int], gpus: tuple[int, int]) -> list[dict[str, Any]]:
    """cuda_ipc into another process (on D's GPU) vs a contiguous copy of the same bytes from P's GPU to D's
    (a peer copy between two GPUs), per prompt length."""
    import torch

    from pdserve.disagg.transfer.base import hostname
    from pdserve.disagg.transfer.cuda_ipc import CudaIpcEngine
    from pdserve.messages import KVRegion
    from pdserve.worker.model_runner import TORCH_DTYPES

    bs = config.block_size
    max_blocks = _blocks(max(lens), bs)
    shape = (arch.num_layers, 2, max_blocks, bs, arch.num_kv_heads, arch.head_dim)
    d_shape = (arch.num_layers, 2, 2 * max_blocks, *shape[3:])  # room for every other block (the scattered case)
    p_gpu, d_gpu = gpus
    child = _Child(d_shape, config.dtype, f"cuda:{d_gpu}")
    rows = []
    try:
        address = child.recv(CHILD_START_TIMEOUT_S)["address"]
        generator = torch.Generator(device=f"cuda:{p_gpu}").manual_seed(config.seed)
        src = torch.randn(shape, device=f"cuda:{p_gpu}", generator=generator).to(TORCH_DTYPES[config.dtype])
        engine = CudaIpcEngine(src, receive=False)
        peer = KVRegion(
            engine="cuda_ipc",
            hostname=hostname(),
            address=address,
            base=0,
            num_layers=arch.num_layers,
            num_blocks=2 * max_blocks,
            chunk_nbytes=engine.chunk_nbytes,
        )
        layers = list(range(arch.num_layers))
        try:
            for tokens in lens:
                rows.append(_raw_length(engine, peer, child, src, layers, tokens, config))
                row = rows[-1]
                print(
                    f"[gpu] raw cuda_ipc {tokens} tokens ({row['nbytes'] / 2**20:.0f} MiB): all layers "
                    f"{row['ipc_all_layers']['gb_per_s_median']:.0f} GB/s, layer by layer "
                    f"{row['ipc_layer_by_layer']['gb_per_s_median']:.0f} GB/s, device copy "
                    f"{row['device_copy']['gb_per_s_median']:.0f} GB/s (GPU {p_gpu} -> {d_gpu})",
                    flush=True,
                )
        finally:
            engine.close()
    finally:
        child.close()
    return rows


def _raw_length(
    engine: Any, peer: Any, child: _Child, src: Any, layers: list[int], tokens: int, config: GpuBenchConfig
) -> dict[str, Any]:
    """One prompt length's raw figures: its blocks through cuda_ipc (all layers, layer by layer) and a
    contiguous device copy of the same bytes."""
    import torch

    num_blocks = _blocks(tokens, config.block_size)
    ids = list(range(num_blocks))
    scattered_ids = [2 * i for i in range(num_blocks)] if 2 * num_blocks <= peer.num_blocks else ids
    child.ask(cmd="zero")
    nbytes = engine.write(peer, layers, ids, ids)  # maps the peer's memory; checked, not timed
    engine.flush()
    want = int(src[:, :, :num_blocks].view(torch.uint8).sum(dtype=torch.int64))
    got = child.ask(cmd="checksum", num_blocks=num_blocks)["checksum"]
    if got != want:
        raise RuntimeError(
            f"the cuda_ipc copy of {tokens} tokens' KV did not land: the receiver's checksum is "
            f"{got}, the sender's {want}"
        )

    def all_layers() -> None:
        engine.write(peer, layers, ids, ids)
        engine.flush()

    def scattered() -> None:  # every other block of D's: the gather / (peer copy) / scatter path
        engine.write(peer, layers, ids, scattered_ids)
        engine.flush()

    def layer_by_layer() -> None:
        for layer in layers:
            engine.write(peer, [layer], ids, ids)
        engine.flush()

    dst_device = engine.peer_device(peer)
    flat_src = torch.empty(nbytes, dtype=torch.uint8, device=src.device).fill_(3)
    flat_dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_device)
    local = torch.empty(src.shape, dtype=src.dtype, device=dst_device)

    def device_copy() -> None:  # one contiguous copy of the same bytes, P's GPU -> D's GPU
        flat_dst.copy_(flat_src)
        _sync("cuda")

    def local_slices() -> None:  # the (layer, K|V) slice copies, into this process's own memory on D's GPU
        for layer in layers:
            for kv in (0, 1):
                local[layer, kv, :num_blocks].copy_(src[layer, kv, :num_blocks])
        _sync("cuda")

    row: dict[str, Any] = {
        "tokens": tokens,
        "num_blocks": num_blocks,
        "nbytes": nbytes,
        "copies_per_write": 2 * len(layers),
    }
    for name, fn in (
        ("ipc_all_layers", all_layers),
        ("ipc_layer_by_layer", layer_by_layer),
        ("ipc_scattered", scattered),
        ("device_copy", device_copy),
        ("local_slices", local_slices),
    ):
        fn()  # warm-up
        t = _timing(_timed(fn, "cuda", config.raw_repeats))
        row[name] = t | {
            "gb_per_s_best": _r(nbytes / t["seconds_best"] / 1e9, 2),
            "gb_per_s_median": _r(nbytes / t["seconds_median"] / 1e9, 2),
        }
    copy = row["device_copy"]["gb_per_s_median"]
    row["all_layers_over_copy"] = _ratio(row["ipc_all_layers"]["gb_per_s_median"], copy)
    row["layer_by_layer_over_copy"] = _ratio(row["ipc_layer_by_layer"]["gb_per_s_median"], copy)
    row["scattered_over_copy"] = _ratio(row["ipc_scattered"]["gb_per_s_median"], copy)
    return row


# ---- transfer: P and D engine cores in one process ---------------------------------------------------------------


def run_transfer_pd(
    config: GpuBenchConfig, device: str, arch: Any, lens: list[int], gpus: tuple[int, int] | None
) -> dict[str, Any]:
    """P on gpus[0] and D on gpus[1] (None: the CPU)."""
    from pdserve.config import DisaggConfig

    engine_name = "cuda_ipc" if device == "cuda" else "shm"
    max_model_len = max(lens) + LEN_MARGIN
    # a request at a time: P holds one prompt's blocks until sent, D one sequence; room for four
    num_blocks = 4 * _blocks(max_model_len, config.block_size) + 16
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
    p = _engine(
        config,
        device,
        **common,
        gpu_ids=() if p_gpu is None else (p_gpu,),
        disagg=DisaggConfig(role="prefill", transfer_engine=engine_name, kv_dest_wait=1.0),
    )
    try:
        d = _engine(
            config,
            device,
            **common,
            gpu_ids=() if d_gpu is None else (d_gpu,),
            disagg=DisaggConfig(role="decode", transfer_engine=engine_name),
        )
        try:
            log = _SendLog(p)
            rows = []
            for i, tokens in enumerate(lens):
                prompts = _prompts(
                    2 * (1 + config.transfer_repeats), tokens, arch.vocab_size, seed=config.seed * 1000 + 700 + i
                )
                records = []
                for j in range(1 + config.transfer_repeats):
                    pd = _pd_request(p, d, device, f"{tokens}-{j}", prompts[2 * j], log)
                    alone = _plain_request(p, device, f"plain-{tokens}-{j}", prompts[2 * j + 1])
                    if j:  # the first of each length warms up
                        records.append(pd | {"prefill_alone_s": alone})
                rows.append(_pd_row(tokens, records, config.block_size))
                row = rows[-1]
                print(
                    f"[gpu] PD {tokens} tokens: TTFT {row['ttft_ms_median']:.1f} ms, P prefill alone "
                    f"{row['prefill_alone_ms_median']:.1f} ms, exposed {row['exposed_ms_median']:.2f} ms "
                    f"({100 * (row['exposed_share_of_ttft'] or 0):.2f}% of TTFT)",
                    flush=True,
                )
            out["rows"] = rows
        finally:
            d.shutdown()
    finally:
        p.shutdown()
    return out


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
    _sync(device)
    start = time.perf_counter()
    d.add_request(d_id, prompt, _greedy(PD_MAX_TOKENS), TransferHandle(room=room, peer=p.control_address))
    p.add_request(f"p-{key}", prompt, _greedy(PD_MAX_TOKENS), TransferHandle(room=room, peer=d.control_address))
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
                        d_blocks = d.kv.block_ids(d_id)[: _blocks(len(prompt), d.kv.block_size)]
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
    _sync(device)
    start = time.perf_counter()
    p.add_request(req_id, prompt, _greedy(1))
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
        "ttft_ms": [_r(r["ttft_s"] * 1e3, 3) for r in records],
        "ttft_ms_median": _r(ttft * 1e3, 3),
        "prefill_alone_ms": [_r(r["prefill_alone_s"] * 1e3, 3) for r in records],
        "prefill_alone_ms_median": _r(alone * 1e3, 3),
        "ttft_over_prefill_alone": _ratio(ttft, alone),
        "pd_overhead_ms": _r((ttft - alone) * 1e3, 3),
        "busy_ms_median": _r(busy * 1e3, 4),
        "exposed_ms_median": _r(exposed * 1e3, 4),
        "transfer_window_ms_median": _r(median("transfer_window_s") * 1e3, 3),
        "exposed_share_of_ttft": _ratio(exposed, ttft, 6),
        "busy_share_of_ttft": _ratio(busy, ttft, 6),
        "num_overlapped": sum(r["exposed_s"] < OVERLAP_EXPOSED_SHARE * r["busy_s"] for r in records),
        "num_blocks": _blocks(tokens, block_size),
        "d_block_runs": [r["d_block_runs"] for r in records],
        "copy_runs": [r["copy_runs"] for r in records],
        "layerwise_blocks": [r["layerwise_blocks"] for r in records],
        "catchup_blocks": [r["catchup_blocks"] for r in records],
    }


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
        _release(device)
    else:
        result["raw"] = {"skipped": "cuda_ipc needs a CUDA device"}
    result["pd"] = run_transfer_pd(config, device, arch, lens, gpus)
    if errors:
        result["error"] = f"transfer {', '.join(errors)} failed (see its record)"
    return result


# ---- the run ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_engine_logs() -> Iterator[None]:
    """The engines log every request at INFO; keep the bench's own lines readable (DEBUG shows them all)."""
    loggers = [logging.getLogger(name) for name in ("pdserve.engine.core", "pdserve.disagg")]
    levels = [lg.level for lg in loggers]
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_bench(config: GpuBenchConfig) -> dict[str, Any]:
    """Run every requested part, write the JSON and PNG, return the result (with "files")."""
    device = resolve_device(config.allow_cpu)
    with _quiet_engine_logs():
        return _run_parts(config, device)


def _run_parts(config: GpuBenchConfig, device: str) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    arch, shape = model_facts(config)
    gpu = gpu_info(device)
    print(
        f"[gpu] {gpu['name']} ({device}), model {shape['name']} {config.dtype}, parts {','.join(config.parts)}",
        flush=True,
    )
    baselines: dict[str, Any] = {}
    parts: dict[str, Any] = {name: {"skipped": "not in --parts"} for name in PARTS}
    seconds: dict[str, float] = {}
    with torch.inference_mode():
        step = time.perf_counter()
        baselines["copy"] = measure_copy(device, config.copy_bytes, config.copy_repeats)
        print(
            f"[gpu] device copy of {config.copy_bytes / 2**30:.2f} GiB: {baselines['copy']['gb_per_s_best']:.0f} "
            "GB/s (read + written, best)",
            flush=True,
        )
        baselines["matmul"] = measure_matmul(device, config.dtype, config.matmul_size, config.matmul_repeats)
        print(
            f"[gpu] {config.matmul_size}^3 {config.dtype} matmul: {baselines['matmul']['tflops_best']:.1f} TFLOP/s "
            "(best)",
            flush=True,
        )
        seconds["baselines"] = time.perf_counter() - step
    for name in config.parts:
        step = time.perf_counter()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            if name == "decode":
                parts[name] = run_decode(config, device, arch, shape, baselines["copy"])
            elif name == "prefill":
                parts[name] = run_prefill(config, device, arch, baselines["matmul"])
            else:
                parts[name] = run_transfer(config, device, arch)
        except Exception as e:  # noqa: BLE001 - one part's failure is recorded; the others still run
            traceback.print_exc()
            parts[name] = {"error": f"{type(e).__name__}: {e}"}
        _release(device)
        seconds[name] = time.perf_counter() - step
        if device == "cuda":
            parts[name]["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        parts[name]["seconds"] = round(seconds[name], 1)
    settings = asdict(config) | {"result_dir": str(config.result_dir)}
    result = {
        "benchmark": "gpu",
        "date": now_iso(),
        "label": config.label,
        "pdserve_version": code_version(),
        "machine": machine_info(),
        "gpu": gpu,
        "device": device,
        "model": shape,
        "config": settings,
        "notes": NOTES,
        "baselines": baselines,
        "parts": parts,
        "seconds": {k: round(v, 1) for k, v in seconds.items()} | {"total": round(time.perf_counter() - started, 1)},
    }
    write_outputs(result, config)
    return result


# ---- output ----------------------------------------------------------------------------------------------------


def write_outputs(result: dict[str, Any], config: GpuBenchConfig) -> None:
    stem = f"gpu-{result['gpu']['slug']}-{config.label or time.strftime('%Y%m%d-%H%M%S')}"
    json_path, png_path = config.result_dir / f"{stem}.json", config.result_dir / f"{stem}.png"
    result["files"] = {"json": str(json_path), "png": str(png_path)}
    write_json(json_path, result)
    plot(png_path, result)


def _panels(result: dict[str, Any]) -> list[str]:
    parts = result["parts"]
    names = [n for n in ("decode", "prefill") if parts[n].get("rows")]
    transfer = parts["transfer"]
    if (transfer.get("raw") or {}).get("rows"):
        names.append("raw")
    if (transfer.get("pd") or {}).get("rows"):
        names.append("pd")
    return names


def _bars(ax: Any, groups: list[str], series: list[tuple[str, list[float | None], str]], fmt_: str = "{:.1f}") -> None:
    """Grouped bars: one group per x label, one bar per series (None: no bar)."""
    width = 0.8 / max(1, len(series))
    for k, (label, values, color) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        points = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not points:
            continue
        bars = ax.bar([x for x, _ in points], [v for _, v in points], width=width, color=color, label=label)
        ax.bar_label(bars, labels=[fmt_.format(v) for _, v in points], fontsize=6)
    ax.set_xticks(range(len(groups)), groups)


def plot(path: Path, result: dict[str, Any]) -> Path:
    """One panel per part (the transfer part has two: raw engine and in-engine PD)."""
    parts = result["parts"]
    names = _panels(result) or ["none"]
    fig, axes = pyplot().subplots(1, len(names), figsize=(5.2 * len(names), 4.6), dpi=110, squeeze=False)
    axes = list(axes[0])
    try:
        for ax, name in zip(axes, names):
            if name == "decode":
                d = parts["decode"]
                groups = [str(r["batch"]) for r in d["rows"]]
                _bars(
                    ax,
                    groups,
                    [
                        ("pdserve, CUDA graphs", [r["graphs_ms"] for r in d["rows"]], "#1f77b4"),
                        ("pdserve, eager", [r["eager_ms"] for r in d["rows"]], "#ff7f0e"),
                        ("HF generate", [r["hf_ms"] for r in d["rows"]], "#7f7f7f"),
                    ],
                )
                if d.get("roofline_ms"):
                    ax.axhline(
                        d["roofline_ms"],
                        color="#d62728",
                        ls="--",
                        lw=1,
                        label=f"weight-read roofline {d['roofline_ms']:.2f} ms",
                    )
                ax.set_xlabel("batch (sequences decoding)")
                ax.set_ylabel("ms per decode step / token")
                ratio = d["target"]["ratio"]
                ax.set_title(
                    f"decode, context {d['context_tokens']}"
                    + (
                        f"\nbatch 1 graphs / roofline = {ratio:.2f}x (target {TARGET_BATCH1_OVER_ROOFLINE}x)"
                        if ratio is not None
                        else ""
                    ),
                    fontsize=9,
                )
            elif name == "prefill":
                p = parts["prefill"]
                groups = [str(r["tokens"]) for r in p["rows"]]
                _bars(ax, groups, [("pdserve prefill", [r["tflops"] for r in p["rows"]], "#1f77b4")])
                peak = result["baselines"]["matmul"]["tflops_best"]
                ax.axhline(
                    peak,
                    color="#d62728",
                    ls="--",
                    lw=1,
                    label=f"{result['baselines']['matmul']['n']}^3 matmul {peak:.0f} TFLOP/s",
                )
                ax.set_xlabel("prompt tokens (one request, one step)")
                ax.set_ylabel("TFLOP/s")
                ax.set_title(
                    "prefill: achieved FLOP rate vs matmul peak\n"
                    + ", ".join(f"{r['tokens']}: {r['over_matmul_peak'] or 0:.0%}" for r in p["rows"]),
                    fontsize=9,
                )
            elif name == "raw":
                rows = parts["transfer"]["raw"]["rows"]
                groups = [f"{r['tokens']}\n{r['nbytes'] / 2**20:.0f} MiB" for r in rows]
                _bars(
                    ax,
                    groups,
                    [
                        ("cuda_ipc, all layers", [r["ipc_all_layers"]["gb_per_s_median"] for r in rows], "#1f77b4"),
                        (
                            "cuda_ipc, layer by layer",
                            [r["ipc_layer_by_layer"]["gb_per_s_median"] for r in rows],
                            "#ff7f0e",
                        ),
                        ("device copy (contiguous)", [r["device_copy"]["gb_per_s_median"] for r in rows], "#2ca02c"),
                        (
                            "same slice copies, in-process",
                            [r["local_slices"]["gb_per_s_median"] for r in rows],
                            "#9467bd",
                        ),
                    ],
                    "{:.0f}",
                )
                ax.set_xlabel("prompt tokens (KV bytes)")
                ax.set_ylabel("GB/s moved (median)")
                ax.set_title("KV transfer: cuda_ipc into another process", fontsize=9)
            elif name == "pd":
                pd = parts["transfer"]["pd"]
                rows = pd["rows"]
                groups = [f"{r['tokens']}\nexposed {100 * (r['exposed_share_of_ttft'] or 0):.2f}%" for r in rows]
                _bars(
                    ax,
                    groups,
                    [
                        ("PD TTFT (D's first token)", [r["ttft_ms_median"] for r in rows], "#1f77b4"),
                        ("P prefill alone", [r["prefill_alone_ms_median"] for r in rows], "#7f7f7f"),
                    ],
                )
                ax.set_xlabel("prompt tokens (exposed transfer / TTFT)")
                ax.set_ylabel("ms (median)")
                ax.set_title(f"in-engine PD over {pd['engine']} (P and D in one process)", fontsize=9)
            else:
                ax.text(0.5, 0.5, "no part produced figures", ha="center", va="center", transform=ax.transAxes)
            if name != "none":
                ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
                ax.legend(fontsize=7, frameon=False, loc="upper left", ncol=2)
        model = result["model"]
        title = (
            f"pdserve bench gpu: {result['gpu']['name']}, {model['name']} {model['dtype']} "
            f"({model['load_format']} weights), torch {result['gpu']['torch']}"
        )
        return finish_figure(fig, axes, title, path)
    except BaseException:
        pyplot().close(fig)
        raise


def _table(header: Sequence[tuple[str, int]], rows: list[list[Any]]) -> list[str]:
    head = "".join(f"{n:>{w}}" for n, w in header)
    return [head, "-" * len(head)] + ["".join(f"{c!s:>{w}}" for c, (_, w) in zip(row, header)) for row in rows]


def format_report(result: dict[str, Any]) -> str:
    parts, base = result["parts"], result["baselines"]
    lines = [
        f"pdserve bench gpu: {result['gpu']['name']} ({result['device']}), {result['model']['name']} "
        f"{result['model']['dtype']}; device copy {fmt(base['copy']['gb_per_s_best'], '{:.0f}')} GB/s "
        f"(read + written), {base['matmul']['n']}^3 matmul {fmt(base['matmul']['tflops_best'])} TFLOP/s"
    ]
    for name in PARTS:
        part = parts[name]
        if "skipped" in part:
            lines.append(f"\n{name}: skipped ({part['skipped']})")
            continue
        if "error" in part and not any(key in part for key in ("rows", "raw", "pd")):
            lines.append(f"\n{name}: ERROR {part['error']}")
            continue
        if name == "decode":
            lines.append(
                f"\ndecode (ms per step, context {part['context_tokens']}; roofline "
                f"{fmt(part['roofline_ms'], '{:.2f}')} ms = {part['weight_bytes'] / 1e9:.2f} GB of weights at "
                f"{fmt(part['hbm_gb_per_s'], '{:.0f}')} GB/s)"
            )
            lines += _table(
                (
                    ("batch", 6),
                    ("graphs", 9),
                    ("eager", 9),
                    ("HF", 9),
                    ("graphs/roof", 12),
                    ("roof+KV", 9),
                    ("eager/graphs", 13),
                    ("HF/graphs", 10),
                    ("HF/eager", 9),
                ),
                [
                    [
                        r["batch"],
                        fmt(r["graphs_ms"], "{:.2f}"),
                        fmt(r["eager_ms"], "{:.2f}"),
                        fmt(r["hf_ms"], "{:.2f}"),
                        fmt(r["graphs_over_roofline"], "{:.2f}x"),
                        fmt(r["roofline_weights_kv_ms"], "{:.2f}"),
                        fmt(r["eager_over_graphs"], "{:.2f}x"),
                        fmt(r["hf_over_graphs"], "{:.2f}x"),
                        fmt(r["hf_over_eager"], "{:.2f}x"),
                    ]
                    for r in part["rows"]
                ],
            )
            target = part["target"]
            if target["ratio"] is not None:
                lines.append(
                    f"batch 1 with CUDA graphs: {target['ratio']:.2f}x the roofline (target "
                    f"{target['max_ratio']}x: {'met' if target['met'] else 'NOT met'})"
                )
            for sub in ("graphs", "eager", "hf"):
                if "skipped" in part[sub]:
                    lines.append(f"{sub}: skipped ({part[sub]['skipped']})")
        elif name == "prefill":
            lines.append("\nprefill (one request, one engine step)")
            lines += _table(
                (("tokens", 7), ("steps", 6), ("ms", 9), ("tok/s", 10), ("TFLOP/s", 9), ("/peak", 7)),
                [
                    [
                        r["tokens"],
                        r["steps"],
                        fmt(r["seconds_median"] * 1e3),
                        fmt(r["tokens_per_s"], "{:.0f}"),
                        fmt(r["tflops"]),
                        fmt(r["over_matmul_peak"], "{:.0%}"),
                    ]
                    for r in part["rows"]
                ],
            )
        else:
            raw, pd = part.get("raw") or {}, part.get("pd") or {}
            if raw.get("rows"):
                gpus = f"GPU {raw.get('p_gpu')} -> GPU {raw.get('d_gpu')}"
                lines.append(f"\ntransfer, raw cuda_ipc into another process, {gpus} (GB/s moved, median)")
                lines += _table(
                    (
                        ("tokens", 7),
                        ("MiB", 7),
                        ("all layers", 11),
                        ("per layer", 10),
                        ("scattered", 10),
                        ("peer copy", 10),
                        ("slices", 8),
                        ("all/copy", 9),
                        ("layer/copy", 11),
                        ("scat/copy", 10),
                    ),
                    [
                        [
                            r["tokens"],
                            f"{r['nbytes'] / 2**20:.0f}",
                            fmt(r["ipc_all_layers"]["gb_per_s_median"], "{:.0f}"),
                            fmt(r["ipc_layer_by_layer"]["gb_per_s_median"], "{:.0f}"),
                            fmt(r["ipc_scattered"]["gb_per_s_median"], "{:.0f}"),
                            fmt(r["device_copy"]["gb_per_s_median"], "{:.0f}"),
                            fmt(r["local_slices"]["gb_per_s_median"], "{:.0f}"),
                            fmt(r["all_layers_over_copy"], "{:.2f}"),
                            fmt(r["layer_by_layer_over_copy"], "{:.2f}"),
                            fmt(r["scattered_over_copy"], "{:.2f}"),
                        ]
                        for r in raw["rows"]
                    ],
                )
                lines.append(
                    "all layers / per layer: CudaIpcEngine.write (one call, or one per layer) + flush; "
                    "scattered: all layers into every other block of D's; peer copy: one contiguous copy of "
                    "the same bytes between the GPUs; slices: one copy per (layer, K|V) into this process's "
                    "memory on D's GPU"
                )
            else:
                lines.append(f"\ntransfer raw: {raw.get('skipped') or 'ERROR ' + str(raw.get('error'))}")
            if pd.get("rows"):
                where = (
                    f"P on GPU {pd.get('p_gpu')}, D on GPU {pd.get('d_gpu')}" if pd.get("p_gpu") is not None else "CPU"
                )
                lines.append(
                    f"\ntransfer, in-engine PD over {pd['engine']} (P and D in one process, {where}; ms, median)"
                )
                lines += _table(
                    (
                        ("tokens", 7),
                        ("KV MiB", 7),
                        ("TTFT", 9),
                        ("P alone", 9),
                        ("TTFT/alone", 11),
                        ("busy", 8),
                        ("exposed", 8),
                        ("exp/TTFT", 9),
                        ("overlap", 8),
                        ("runs", 7),
                        ("catch-up", 9),
                    ),
                    [
                        [
                            r["tokens"],
                            f"{r['kv_bytes'] / 2**20:.0f}",
                            fmt(r["ttft_ms_median"]),
                            fmt(r["prefill_alone_ms_median"]),
                            fmt(r["ttft_over_prefill_alone"], "{:.2f}x"),
                            fmt(r["busy_ms_median"], "{:.2f}"),
                            fmt(r["exposed_ms_median"], "{:.2f}"),
                            fmt(
                                None if r["exposed_share_of_ttft"] is None else 100 * r["exposed_share_of_ttft"],
                                "{:.2f}%",
                            ),
                            f"{r['num_overlapped']}/{r['requests']}",
                            max(r["copy_runs"]),
                            max(r["catchup_blocks"]),
                        ]
                        for r in pd["rows"]
                    ],
                )
                lines.append(
                    "TTFT: to D's first token; P alone: a plain request of the same length on P; busy / "
                    "exposed: P's sender time writing / steps waiting for it after the forward; overlap: "
                    "requests whose exposed time < half their busy time;\nruns: the most (P block, D block) "
                    "runs a request's sends had (one copy per run, layer and K|V); catch-up: the most blocks "
                    "of a request sent after its forward instead of layer by layer"
                )
            elif "error" in part:
                lines.append(f"\ntransfer pd: ERROR {part['error']}")
    lines.append(
        f"\ntook {result['seconds']['total']:.0f} s; results: {result['files']['json']}, {result['files']['png']}"
    )
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"takes positive integers like 1,8,32, got {text!r}")
    return values


def _parts(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in PARTS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"takes a comma-separated subset of {','.join(PARTS)}, got {text!r}")
    return tuple(p for p in PARTS if p in values)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = GpuBenchConfig()
    p = sub.add_parser(
        "gpu",
        help="decode, prefill and KV transfer (two GPUs where there are two), each against a baseline in the same run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--parts", type=_parts, default=PARTS, help=f"comma-separated subset of {','.join(PARTS)} (default all)"
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default=d.model, help=f"a dummy shape name or a model path (default {d.model})")
    m.add_argument("--load-format", choices=LOAD_FORMATS, default=d.load_format)
    m.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    m.add_argument("--block-size", type=int, default=d.block_size)
    m.add_argument("--seed", type=int, default=d.seed, help="weights and prompts")
    g = p.add_argument_group("decode")
    g.add_argument("--decode-batches", type=_int_list, default=d.decode_batches, help="default 1,8,32,64")
    g.add_argument("--decode-context", type=int, default=d.decode_context, help="prompt tokens per sequence")
    g.add_argument("--decode-steps", type=int, default=d.decode_steps, help="timed decode steps per batch")
    g.add_argument("--decode-warmup", type=int, default=d.decode_warmup, help="untimed decode steps first")
    g.add_argument(
        "--decode-max-model-len",
        type=int,
        default=d.decode_max_model_len,
        help="the decode engines' max_model_len (the CUDA graphs' block-table width and split-K plan)",
    )
    g.add_argument("--skip-hf", action="store_true", help="no HF transformers baseline")
    g.add_argument(
        "--hf-repeats",
        type=int,
        default=d.hf_repeats,
        help="HF generate runs of each length per batch size (best kept)",
    )
    f = p.add_argument_group("prefill")
    f.add_argument("--prefill-lens", type=_int_list, default=d.prefill_lens, help="default 2048,8192")
    f.add_argument("--prefill-repeats", type=int, default=d.prefill_repeats, help="timed prefills per length")
    f.add_argument("--matmul-size", type=int, default=d.matmul_size, help="n of the n^3 matmul peak")
    f.add_argument("--matmul-repeats", type=int, default=d.matmul_repeats)
    t = p.add_argument_group("transfer")
    t.add_argument("--transfer-lens", type=_int_list, default=d.transfer_lens, help="default 1024,4096,16384")
    t.add_argument(
        "--transfer-gpus",
        type=_int_list,
        default=d.transfer_gpus,
        metavar="P,D",
        help="P's and D's CUDA devices (default 0,1 with two GPUs, else 0,0)",
    )
    t.add_argument("--transfer-repeats", type=int, default=d.transfer_repeats, help="timed PD requests per length")
    t.add_argument("--raw-repeats", type=int, default=d.raw_repeats, help="timed raw cuda_ipc writes per length")
    b = p.add_argument_group("bandwidth")
    b.add_argument("--copy-bytes", type=parse_size, default=d.copy_bytes, help="device copy size (default 4GiB)")
    b.add_argument("--copy-repeats", type=int, default=d.copy_repeats)
    o = p.add_argument_group("output")
    o.add_argument("--result-dir", type=Path, default=d.result_dir)
    o.add_argument("--label", default=None, help="file name suffix instead of the timestamp")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # testing only: the smoke test
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> GpuBenchConfig:
    return GpuBenchConfig(
        parts=args.parts,
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        block_size=args.block_size,
        seed=args.seed,
        decode_batches=args.decode_batches,
        decode_context=args.decode_context,
        decode_steps=args.decode_steps,
        decode_warmup=args.decode_warmup,
        decode_max_model_len=args.decode_max_model_len,
        skip_hf=args.skip_hf,
        hf_repeats=args.hf_repeats,
        prefill_lens=args.prefill_lens,
        prefill_repeats=args.prefill_repeats,
        transfer_lens=args.transfer_lens,
        transfer_gpus=args.transfer_gpus,
        transfer_repeats=args.transfer_repeats,
        raw_repeats=args.raw_repeats,
        copy_bytes=args.copy_bytes,
        copy_repeats=args.copy_repeats,
        matmul_size=args.matmul_size,
        matmul_repeats=args.matmul_repeats,
        result_dir=args.result_dir,
        label=args.label,
        allow_cpu=args.allow_cpu,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    resolve_device(config.allow_cpu)  # no GPU: exit 2 before any work
    result = run_bench(config)
    print(format_report(result))
    failed = [name for name, part in result["parts"].items() if "error" in part]
    if failed:
        print(f"pdserve bench gpu: error: {', '.join(failed)} failed (see the log above and the JSON)", file=sys.stderr)
    return 1 if failed else 0
