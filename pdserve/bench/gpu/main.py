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
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pdserve.bench.common import code_version, label_or_timestamp, machine_info, now_iso, write_outputs
from pdserve.bench.gpu.common import model_facts
from pdserve.bench.gpu.config import NOTES, PARTS, GpuBenchConfig
from pdserve.bench.gpu.decode import run_decode
from pdserve.bench.gpu.device import gpu_info, measure_copy, measure_matmul, release, resolve_device
from pdserve.bench.gpu.prefill import run_prefill
from pdserve.bench.gpu.report import format_report, plot
from pdserve.bench.gpu.transfer import run_transfer
from pdserve.config import DTYPES, LOAD_FORMATS, parse_size


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
    parts: dict[str, Any] = {name: {"skipped": "not in --parts"} for name in PARTS}
    with torch.inference_mode():
        step = time.perf_counter()
        baselines = _measure_baselines(config, device)
        seconds = {"baselines": time.perf_counter() - step}
    for name in config.parts:
        parts[name], seconds[name] = _run_part(name, config, device, arch, shape, baselines)
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
    stem = f"gpu-{gpu['slug']}-{label_or_timestamp(config.label)}"
    write_outputs(result, config.result_dir, stem, lambda path: plot(path, result))
    return result


def _measure_baselines(config: GpuBenchConfig, device: str) -> dict[str, Any]:
    """The device copy (HBM bandwidth) and the matmul (FLOP rate) every part is set against."""
    baselines: dict[str, Any] = {}
    baselines["copy"] = measure_copy(device, config.copy_bytes, config.copy_repeats)
    print(
        f"[gpu] device copy of {config.copy_bytes / 2**30:.2f} GiB: {baselines['copy']['gb_per_s_best']:.0f} "
        "GB/s (read + written, best)",
        flush=True,
    )
    baselines["matmul"] = measure_matmul(device, config.dtype, config.matmul_size, config.matmul_repeats)
    print(
        f"[gpu] {config.matmul_size}^3 {config.dtype} matmul: {baselines['matmul']['tflops_best']:.1f} TFLOP/s (best)",
        flush=True,
    )
    return baselines


def _run_part(
    name: str, config: GpuBenchConfig, device: str, arch: Any, shape: dict[str, Any], baselines: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    """(the part's record, with its error if it failed, its seconds and peak GPU memory; the seconds it took)."""
    import torch

    step = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        if name == "decode":
            part = run_decode(config, device, arch, shape, baselines["copy"])
        elif name == "prefill":
            part = run_prefill(config, device, arch, baselines["matmul"])
        else:
            part = run_transfer(config, device, arch)
    except Exception as e:  # noqa: BLE001 - one part's failure is recorded; the others still run
        traceback.print_exc()
        part = {"error": f"{type(e).__name__}: {e}"}
    release(device)
    seconds = time.perf_counter() - step
    if device == "cuda":
        part["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    part["seconds"] = round(seconds, 1)
    return part, seconds


# ---- command line ----------------------------------------------------------------------------------------------------


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
    _add_part_args(p, d)
    b = p.add_argument_group("bandwidth")
    b.add_argument("--copy-bytes", type=parse_size, default=d.copy_bytes, help="device copy size (default 4GiB)")
    b.add_argument("--copy-repeats", type=int, default=d.copy_repeats)
    o = p.add_argument_group("output")
    o.add_argument("--result-dir", type=Path, default=d.result_dir)
    o.add_argument("--label", default=None, help="file name suffix instead of the timestamp")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # testing only: the smoke test
    p.set_defaults(func=run)


def _add_part_args(p: argparse.ArgumentParser, d: GpuBenchConfig) -> None:
    """The decode, prefill and transfer groups (`d`: the defaults)."""
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
