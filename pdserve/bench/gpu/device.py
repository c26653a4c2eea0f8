"""The device under `pdserve bench gpu`: which one, what it is, and its baselines (HBM copy and matmul peak).

Knows nothing about engines: the parts (decode.py, prefill.py, transfer.py) measure those.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import re
import subprocess
import time
from typing import Any

from pdserve.bench.gpu.common import rounded, timing_stats
from pdserve.bench.gpu.config import GpuBenchConfig


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def release(device: str) -> None:
    """Give back what freed engines and tensors held (call once their last reference is gone)."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def transfer_gpus(config: GpuBenchConfig) -> tuple[int, int]:
    """(P's device, D's device) of the transfer part."""
    import torch

    if config.transfer_gpus is not None:
        p, d = config.transfer_gpus
        if max(p, d) >= torch.cuda.device_count():
            raise ValueError(f"--transfer-gpus {p},{d}: torch sees {torch.cuda.device_count()} GPU(s)")
        return p, d
    return (0, 1) if torch.cuda.device_count() >= 2 else (0, 0)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3': the GPU's part of the result file names."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", text) or "gpu"


def package_version(package: str) -> str | None:
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
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
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


# ---- baselines -------------------------------------------------------------------------------------------------------


def measure_copy(device: str, nbytes: int, repeats: int, warmup: int = 3) -> dict[str, Any]:
    """HBM bandwidth: a contiguous copy of `nbytes`; GB/s counts bytes read + written."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(7)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    seconds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        seconds.append(time.perf_counter() - start)
    del src, dst
    release(device)
    t = timing_stats(seconds)
    return {
        "nbytes": nbytes,
        **t,
        "gb_per_s_best": rounded(2 * nbytes / t["seconds_best"] / 1e9, 2),
        "gb_per_s_median": rounded(2 * nbytes / t["seconds_median"] / 1e9, 2),
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
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync(device)
        seconds.append(time.perf_counter() - start)
    del a, b, out
    release(device)
    t = timing_stats(seconds)
    flops = 2 * n**3
    return {
        "n": n,
        "dtype": dtype,
        "flops": flops,
        **t,
        "tflops_best": rounded(flops / t["seconds_best"] / 1e12, 6),
        "tflops_median": rounded(flops / t["seconds_median"] / 1e12, 6),
    }
