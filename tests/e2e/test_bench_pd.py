"""`pdserve bench transfer` and `pdserve bench pd` end to end on the default model, tiny workloads.

Both run in this process through their own argparse parsers (the `pdserve bench` wiring is cli.py's),
start real deployments with the launcher's machinery, and write their JSON and PNG into tmp_path.
KV bytes are checked exactly: every prompt block moves whole, so a prompt of n tokens moves
ceil(n / block_size) x (layers x (K, V) x block_size x kv heads x head_dim x 4 bytes) in fp32.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import psutil
import pytest

from pdserve.bench import pd, transfer

BLOCK_SIZE = 16
SMALL_ENGINE = ["--num-blocks", "64", "--max-model-len", "128"]


@pytest.fixture(scope="module")
def block_bytes(default_hf_dir: Path) -> int:
    """Bytes of one fp32 KV block of the default model, from its config.json."""
    cfg = json.loads((default_hf_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * BLOCK_SIZE * cfg["num_key_value_heads"] * head_dim * 4


def run_bench(name: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench")
    sub = parser.add_subparsers(required=True)
    pd.add_parser(sub)
    transfer.add_parser(sub)
    args = parser.parse_args([name, *argv])
    return int(args.func(args))


def leftover_parts(result: dict[str, Any]) -> list[str]:
    """Command lines of processes still running with a port of the benchmark's deployment(s)."""
    ports = set()
    for deployment in (
        [result["deployment"]] if "deployment" in result else [c["deployment"] for c in result["configs"]]
    ):
        ports |= {p["url"].rsplit(":", 1)[1] for p in deployment["parts"]}
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "pdserve.cli" in cmdline and any(a == "--port" and b in ports for a, b in zip(cmdline, cmdline[1:])):
            out.append(" ".join(cmdline))
    return out


def test_config_list_and_input_lens() -> None:
    assert pd._config_list("mixed, pd") == ["pd", "mixed"]
    with pytest.raises(argparse.ArgumentTypeError, match="--configs takes names from pd,mixed"):
        pd._config_list("pd,storage")
    # clamped to the model's 8192 tokens less the 2 generated; a duplicate after clamping is dropped
    assert transfer.resolve_input_lens([128, 9000, 8190], 8192, None) == [128, 8190]
    assert transfer.resolve_input_lens([32, 64, 512], 8192, 128) == [32, 64, 126]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_transfer(tmp_path: Path, block_bytes: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_bench(
        "transfer",
        [
            "--input-lens",
            "32,64",
            "--num-requests",
            "2",
            *SMALL_ENGINE,
            "--raw-repeats",
            "2",
            "--result-dir",
            str(tmp_path),
            "--label",
            "e2e",
        ],
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "GB/s busy" in out.out and "Results:" in out.out
    result = json.loads((tmp_path / "transfer-e2e.json").read_text())
    assert (tmp_path / "transfer-e2e.png").stat().st_size > 10_000
    assert result["benchmark"] == "transfer" and result["model"] == "SmolLM2-135M-Instruct"
    assert result["deployment"]["engine_used"] == "shm" and result["deployment"]["kv_transfer_engine"] == "auto"
    assert [p["role"] for p in result["deployment"]["parts"]] == ["prefill", "decode", "router"]
    assert result["kv_layout"]["bytes_per_block"] == block_bytes
    assert result["kv_layout"]["chunk_nbytes"] * 2 * result["kv_layout"]["num_layers"] == block_bytes
    assert "rank 0" in result["notes"]["gb_per_s_busy"] and "same CPU cores" in result["notes"]["gb_per_s_busy"]
    assert [x["input_len"] for x in result["lengths"]] == [32, 64]
    for x in result["lengths"]:
        expected = math.ceil(x["input_len"] / BLOCK_SIZE) * block_bytes
        assert x["prompt_tokens"] == x["input_len"]  # token-id prompts: nothing added
        assert x["completed"] == x["num_requests"] == 2 and x["failures"] == 0, x["requests"]
        assert len(x["warmup"]) == 1 and x["warmup"][0]["success"]
        assert x["expected_kv_bytes_per_request"] == x["kv_bytes_per_request"] == expected
        assert x["d_kv_bytes_per_request"] == expected
        for r in x["requests"]:
            assert r["kv_bytes"] == r["d_kv_bytes"] == expected, r
            assert 0 < r["busy_s"] <= r["transfer_s"] and r["exposed_s"] >= 0, r  # the sender works inside the window
            assert 0 < r["transfer_s"] < r["ttft_ms"] / 1000 and 0 < r["d_receive_s"] < r["ttft_ms"] / 1000, r
        assert x["gb_per_s_busy"] > 0 and x["gb_per_s_window"] > 0
        assert x["gb_per_s_busy"] == pytest.approx(expected / x["busy_s_per_request"] / 1e9, rel=1e-3)
        assert 0 <= x["transfer_share_of_ttft"] < 1 and 0 < x["busy_share_of_ttft"] < 1
        assert x["raw"]["engine"] == "shm" and x["raw"]["nbytes"] >= 1 << 20 and x["raw"]["gb_per_s_best"] > 0
        assert x["raw"]["chunk_nbytes"] == result["kv_layout"]["chunk_nbytes"]
    assert not leftover_parts(result)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_pd(tmp_path: Path, block_bytes: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_bench(
        "pd",
        [
            "--num-prompts",
            "4",
            "--input-len",
            "16",
            "--output-len",
            "4",
            "--max-concurrency",
            "2",
            *SMALL_ENGINE,
            "--no-tqdm",
            "--result-dir",
            str(tmp_path),
            "--label",
            "e2e",
        ],
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "NOT measured here" in out.out and "pdserve 1P1D, this run:" in out.out
    result = json.loads((tmp_path / "pd-serve-e2e.json").read_text())
    assert (tmp_path / "pd-serve-e2e.png").stat().st_size > 10_000
    assert result["benchmark"] == "pd-serve" and result["dataset"]["num_requests"] == 4
    configs = {c["name"]: c for c in result["configs"]}
    assert list(configs) == ["pd", "mixed"]
    assert [p["role"] for p in configs["pd"]["deployment"]["parts"]] == ["prefill", "decode", "router"]
    assert [p["role"] for p in configs["mixed"]["deployment"]["parts"]] == ["mixed", "mixed", "router"]
    for c in configs.values():
        m = c["client"]
        assert m["completed"] == m["num_requests"] == 4 and m["failed"] == 0 and c["num_errors"] == 0, c["errors"]
        assert m["total_output_tokens"] == 16 and m["output_throughput"] > 0 and m["request_throughput"] > 0
        for key in ("ttft", "tpot", "itl"):
            assert 0 < m[key]["mean_ms"] and 0 < m[key]["p50_ms"] <= m[key]["p99_ms"], (key, m[key])
        assert all(s["preemptions"] == 0 and not any(s["kv_transfer_failures"].values()) for s in c["server"].values())
    prefill, decode = configs["pd"]["server"]["prefill-0"], configs["pd"]["server"]["decode-0"]
    # the 4 prompts' blocks plus one block of the client's 2-token test request, sent by P and received by D
    num_blocks = sum(math.ceil(r["input_len"] / BLOCK_SIZE) for r in configs["pd"]["requests"]) + 1
    assert prefill["kv_bytes_sent"] == decode["kv_bytes_received"] == num_blocks * block_bytes
    assert prefill["kv_transfers"] == decode["kv_transfers"] == 5
    assert prefill["prompt_tokens"] > 0 and decode["prompt_tokens"] == 0  # D computes no prompt
    assert all(s["kv_bytes_sent"] == s["kv_bytes_received"] == 0 for s in configs["mixed"]["server"].values())
    ratios = result["pd_over_mixed"]
    assert ratios["output_throughput"] == pytest.approx(
        configs["pd"]["client"]["output_throughput"] / configs["mixed"]["client"]["output_throughput"], rel=1e-3
    )
    assert all(v is not None and v > 0 for v in ratios.values()), ratios
    ref = result["reference"]
    assert ref["measured_here"] is False and ref["output_throughput_tok_s"] == [208.0, 225.0]
    assert ref["pdserve_pd_this_run"]["output_throughput_tok_s"] == configs["pd"]["client"]["output_throughput"]
    assert ref["workload_differences"]["num_prompts"] == {"reference": 64, "this_run": 4}
    assert not leftover_parts(result)
