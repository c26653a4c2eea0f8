"""`pdserve bench offline` on a tiny workload: the CLI runs end to end and writes sane JSON and a PNG."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.common import random_requests
from pdserve.bench.offline import OfflineConfig
from pdserve.cli import main

TINY = [
    "--num-prompts",
    "4",
    "--input-len-min",
    "8",
    "--input-len-max",
    "24",
    "--output-len-min",
    "3",
    "--output-len-max",
    "6",
    "--hf-batch-size",
    "2",
    "--no-tqdm",
]


def test_random_requests_are_seeded_and_in_range():
    a = random_requests(16, (5, 9), (2, 4), 49152, seed=3)
    assert a == random_requests(16, (5, 9), (2, 4), 49152, seed=3)
    assert a != random_requests(16, (5, 9), (2, 4), 49152, seed=4)
    assert all(5 <= r.input_len <= 9 and 2 <= r.output_len <= 4 for r in a)
    assert all(1000 <= t < 49152 for r in a for t in r.prompt_token_ids)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"num_prompts": 0}, "--num-prompts"),
        ({"input_len": (10, 5)}, "--input-len-max"),
        ({"output_len": (0, 5)}, "--output-len-min"),
        ({"hf_batch_size": 0}, "--hf-batch-size"),
    ],
)
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        OfflineConfig(**kwargs)


@pytest.mark.timeout(120)
def test_bench_offline_tiny(tmp_path, capsys):
    assert main(["bench", "offline", *TINY, "--result-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pdserve/HF =" in out and str(tmp_path) in out

    result = json.loads((tmp_path / "offline-float32.json").read_text())
    assert (tmp_path / "offline-float32.png").stat().st_size > 1000
    assert result["benchmark"] == "offline" and result["dtype"] == "float32"
    assert result["model"] == "SmolLM2-135M-Instruct"
    assert result["dataset"]["num_requests"] == 4
    assert 4 * 8 <= result["dataset"]["total_input_tokens"] <= 4 * 24
    assert 4 * 3 <= result["dataset"]["total_output_tokens"] <= 4 * 6
    for system in ("pdserve", "hf"):
        figures = result[system]
        assert figures["wall_s"] > 0 and figures["output_tokens_per_s"] > 0 and figures["requests_per_s"] > 0
        assert figures["cpu_s"] > 0 and 0 < figures["cpu_utilization"] <= 1.5
        assert figures["computed_output_tokens"] >= result["dataset"]["total_output_tokens"]
    assert result["pdserve"]["computed_output_tokens"] == result["dataset"]["total_output_tokens"]
    assert result["ratio_pdserve_over_hf"] == pytest.approx(
        result["pdserve"]["output_tokens_per_s"] / result["hf"]["output_tokens_per_s"], rel=1e-2
    )
    assert isinstance(result["meets_target"], bool)
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["torch_num_threads"] >= 1
    assert set(result["pdserve_version"]) == {"commit", "dirty"}
    # same weights, fp32, greedy: the first token of every request agrees with HF
    assert result["greedy_agreement"]["first_token_match"] == 4


@pytest.mark.timeout(120)
def test_bench_offline_skip_hf(tmp_path, capsys):
    assert main(["bench", "offline", *TINY, "--skip-hf", "--result-dir", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().out
    result = json.loads((tmp_path / "offline-float32.json").read_text())
    assert result["hf"] is None and result["ratio_pdserve_over_hf"] is None and result["meets_target"] is None
    assert result["pdserve"]["output_tokens_per_s"] > 0
    assert (tmp_path / "offline-float32.png").is_file()
