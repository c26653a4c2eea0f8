"""`pdserve bench gpu` on CUDA with the tiny dummy model and a few steps: every part (CUDA graphs and eager
decode, HF generate, prefill, raw cuda_ipc into a spawned process, the in-engine PD pair) gives numbers."""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.bench.gpu import slug
from pdserve.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SMALL = [
    "--model",
    "tiny",
    "--load-format",
    "dummy",
    "--dtype",
    "bfloat16",
    "--decode-batches",
    "1,4",
    "--decode-context",
    "32",
    "--decode-steps",
    "4",
    "--decode-warmup",
    "2",
    "--hf-repeats",
    "1",
    "--prefill-lens",
    "64,256",
    "--prefill-repeats",
    "2",
    "--transfer-lens",
    "64,300",
    "--transfer-repeats",
    "2",
    "--raw-repeats",
    "3",
    "--copy-bytes",
    "64MiB",
    "--matmul-size",
    "1024",
]


@pytest.mark.timeout(600)
def test_bench_gpu_tiny_on_cuda(tmp_path, capsys) -> None:
    assert main(["bench", "gpu", *SMALL, "--label", "tiny", "--result-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "batch 1 with CUDA graphs" in out and "raw cuda_ipc" in out and "in-engine PD over cuda_ipc" in out
    name = slug(torch.cuda.get_device_name(0))
    result = json.loads((tmp_path / f"gpu-{name}-tiny.json").read_text())
    assert (tmp_path / f"gpu-{name}-tiny.png").stat().st_size > 5000
    gpu = result["gpu"]
    assert result["device"] == "cuda" and gpu["name"] == torch.cuda.get_device_name(0) and gpu["memory_gib"] > 1
    assert gpu["torch_cuda"] and gpu["triton"]
    assert result["baselines"]["copy"]["gb_per_s_best"] > 10 and result["baselines"]["matmul"]["tflops_best"] > 1

    decode = result["parts"]["decode"]
    assert "error" not in decode, decode
    assert decode["graphs"]["cuda_graphs"] and not decode["eager"]["cuda_graphs"]
    assert decode["graphs"]["attention_backend"] == "triton"
    assert decode["eager"]["engine_weight_bytes"] == decode["weight_bytes"]  # every parameter counted
    for row in decode["rows"]:
        assert row["graphs_ms"] > 0 and row["eager_ms"] > 0 and row["hf_ms"] > 0
        assert row["graphs_over_roofline"] > 0 and row["hf_over_graphs"] > 0
    assert decode["target"]["ratio"] == decode["rows"][0]["graphs_over_roofline"]
    assert isinstance(decode["target"]["met"], bool)

    prefill = result["parts"]["prefill"]
    assert "error" not in prefill, prefill
    assert [r["steps"] for r in prefill["rows"]] == [1, 1] and all(r["tflops"] > 0 for r in prefill["rows"])

    transfer = result["parts"]["transfer"]
    assert "error" not in transfer, transfer
    raw = transfer["raw"]["rows"]
    assert [r["tokens"] for r in raw] == [64, 300]
    for row in raw:
        assert row["nbytes"] == row["num_blocks"] * result["model"]["kv_bytes_per_block"]
        for key in ("ipc_all_layers", "ipc_layer_by_layer", "device_copy", "local_slices"):
            assert row[key]["gb_per_s_median"] > 0 and row[key]["repeats"] == 3
    pd = transfer["pd"]
    assert pd["engine"] == "cuda_ipc" and pd["same_gpu"] == (torch.cuda.device_count() < 2)
    for row in pd["rows"]:
        assert row["ttft_ms_median"] > 0 and row["prefill_alone_ms_median"] > 0 and row["kv_bytes"] > 0
        assert row["requests"] == 2 and 0 <= row["exposed_share_of_ttft"] < 1
        assert all(1 <= runs <= row["num_blocks"] for runs in row["d_block_runs"])
    for part in result["parts"].values():
        assert part["peak_gpu_memory_gib"] > 0
