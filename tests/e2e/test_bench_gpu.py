"""`pdserve bench gpu` without a GPU: it refuses to run (exit 2), and the hidden --allow-cpu runs every part
that can run on the CPU with the tiny dummy model, writing sane JSON and a PNG (CUDA graphs and the raw
cuda_ipc measurement are marked skipped; the in-engine PD pair goes over shared memory)."""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.bench.gpu import PARTS, GpuBenchConfig, clamp_lens, prefill_flops, slug, weight_params
from pdserve.cli import main
from pdserve.models.arch import DUMMY_SHAPES

TINY = [
    "--allow-cpu",
    "--model",
    "tiny",
    "--load-format",
    "dummy",
    "--dtype",
    "float32",
    "--decode-batches",
    "1,2",
    "--decode-context",
    "16",
    "--decode-steps",
    "3",
    "--decode-warmup",
    "1",
    "--hf-repeats",
    "1",
    "--prefill-lens",
    "32,64",
    "--prefill-repeats",
    "1",
    "--transfer-lens",
    "16,48",
    "--transfer-repeats",
    "1",
    "--copy-bytes",
    "1MiB",
    "--copy-repeats",
    "2",
    "--matmul-size",
    "64",
    "--matmul-repeats",
    "2",
]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the behaviour without a GPU")


def test_slug_weights_and_flops() -> None:
    assert slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3" and slug("NVIDIA H200") == "h200"
    assert weight_params(DUMMY_SHAPES["llama3-8b"])["total"] == 8_030_261_248  # Llama-3-8B's parameter count
    arch = DUMMY_SHAPES["tiny"]
    flops = prefill_flops(arch, 100)
    linear = weight_params(arch)["layers"] - arch.num_layers * 2 * arch.hidden_size  # norms are no matmul
    assert flops["linear"] == 2 * 100 * linear
    # causal: query i sees i + 1 keys; QK^T and PV are 2 FLOPs per multiply-add each
    assert flops["attention"] == sum(4 * arch.num_layers * arch.num_heads * arch.head_dim * (i + 1) for i in range(100))
    assert flops["total"] == flops["linear"] + flops["attention"] + 2 * arch.hidden_size * arch.vocab_size
    assert clamp_lens([64, 4096, 8192], 2048, "x") == (
        [64, 2032],
        "x [64, 4096, 8192] clamped to [64, 2032]: the model accepts 2048 tokens and 16 are kept for generated tokens",
    )


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"parts": ("decode", "nope")}, "--parts"),
        ({"decode_steps": 0}, "--decode-steps"),
        ({"prefill_lens": ()}, "--prefill-lens"),
        ({"label": "a/b"}, "--label"),
    ],
)
def test_config_errors_name_the_flag(kwargs, flag) -> None:
    with pytest.raises(ValueError, match=flag):
        GpuBenchConfig(**kwargs)


@no_cuda
def test_without_cuda_it_exits_2(tmp_path, capsys) -> None:
    assert main(["bench", "gpu", "--result-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err
    assert not list(tmp_path.iterdir())


@no_cuda
@pytest.mark.timeout(300)
def test_bench_gpu_on_cpu_with_the_tiny_model(tmp_path, capsys) -> None:
    assert main(["bench", "gpu", *TINY, "--label", "smoke", "--result-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "decode (ms per step" in out and "prefill (one request" in out and "in-engine PD over shm" in out
    result = json.loads((tmp_path / "gpu-cpu-smoke.json").read_text())
    assert (tmp_path / "gpu-cpu-smoke.png").stat().st_size > 5000
    assert result["benchmark"] == "gpu" and result["device"] == "cpu" and result["gpu"]["slug"] == "cpu"
    assert result["model"]["name"] == "tiny" and result["model"]["arch"]["num_layers"] == 2
    assert result["model"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert set(result["parts"]) == set(PARTS) and set(result["pdserve_version"]) == {"commit", "dirty"}
    assert "two EngineCores in ONE process, P on p_gpu and D on d_gpu" in result["notes"]["transfer_pd"]
    copy, matmul = result["baselines"]["copy"], result["baselines"]["matmul"]
    assert copy["nbytes"] == 1 << 20 and copy["gb_per_s_best"] > 0 and matmul["tflops_best"] > 0

    decode = result["parts"]["decode"]
    assert "error" not in decode and decode["batches"] == [1, 2]
    assert decode["graphs"] == {"skipped": "CUDA graphs need a CUDA device"}
    assert decode["eager"]["enforce_eager"] and not decode["eager"]["cuda_graphs"]
    assert decode["weight_bytes"] == weight_params(DUMMY_SHAPES["tiny"])["total"] * 4
    assert decode["eager"]["engine_weight_bytes"] >= decode["weight_bytes"]  # the CPU's packed weights may pad
    assert decode["roofline_ms"] == pytest.approx(
        decode["weight_bytes"] / (copy["gb_per_s_best"] * 1e9) * 1e3, rel=1e-2, abs=1e-4
    )
    for row in decode["rows"]:
        assert row["graphs_ms"] is None and row["eager_ms"] > 0 and row["hf_ms"] is not None
        assert row["eager_over_roofline"] > 0 and row["hf_over_eager"] is not None
    for batch in ("1", "2"):
        assert decode["eager"]["batches"][batch]["steps"] == 3
        assert decode["hf"]["batches"][batch]["new_tokens"] == 3
    assert decode["hf"]["class"] == "LlamaForCausalLM"
    assert decode["target"]["ratio"] is None and decode["target"]["max_ratio"] == 1.3

    prefill = result["parts"]["prefill"]
    assert [r["tokens"] for r in prefill["rows"]] == [32, 64]
    for row in prefill["rows"]:
        assert row["steps"] == 1 and row["tokens_per_s"] > 0 and row["tflops"] >= 0
        assert row["flops"] == prefill_flops(DUMMY_SHAPES["tiny"], row["tokens"])
        assert row["matmul_peak_tflops"] == matmul["tflops_best"]

    transfer = result["parts"]["transfer"]
    assert transfer["raw"] == {"skipped": "cuda_ipc needs a CUDA device"}
    pd = transfer["pd"]
    assert pd["engine"] == "shm" and pd["same_process"] and pd["max_tokens"] == 2
    block_bytes = result["model"]["kv_bytes_per_block"]
    for row, tokens in zip(pd["rows"], (16, 48)):
        assert row["tokens"] == tokens and row["kv_bytes"] == -(-tokens // 16) * block_bytes
        assert row["ttft_ms_median"] > 0 and row["prefill_alone_ms_median"] > 0 and row["requests"] == 1
        assert 0 <= row["exposed_share_of_ttft"] <= 1 and row["busy_ms_median"] >= 0 and row["exposed_ms_median"] >= 0
        assert row["ttft_over_prefill_alone"] == pytest.approx(
            row["ttft_ms_median"] / row["prefill_alone_ms_median"], rel=1e-2
        )
    assert result["seconds"]["total"] > 0 and result["files"]["json"].endswith("gpu-cpu-smoke.json")


@no_cuda
@pytest.mark.timeout(120)
def test_bench_gpu_one_part(tmp_path, capsys) -> None:
    assert main(["bench", "gpu", *TINY, "--parts", "prefill", "--label", "one", "--result-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu-cpu-one.json").read_text())
    assert result["parts"]["decode"] == {"skipped": "not in --parts"} == result["parts"]["transfer"]
    assert result["parts"]["prefill"]["rows"]
    assert (tmp_path / "gpu-cpu-one.png").is_file()
    assert "decode: skipped (not in --parts)" in capsys.readouterr().out


def test_bad_parts_flag_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "gpu", "--parts", "decode,warp"])
    assert exc.value.code == 2 and "--parts" in capsys.readouterr().err
