"""`pdserve bench pd-sweep` end to end on CPU: both deployments (dummy weights in the SmolLM2 shape, the
server given the default model's tokenizer), two rates each, goodput under SLOs, JSON and PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from test_bench_pd import leftover_parts

from pdserve.bench import sweep


def run_sweep(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench")
    sweep.add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["pd-sweep", *argv])
    return int(args.func(args))


def test_rates_are_checked() -> None:
    assert sweep._rates("1, 2.5,4") == [1.0, 2.5, 4.0]
    for bad in ("0,1", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="--request-rates takes"):
            sweep._rates(bad)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_pd_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_sweep(
        [
            "--model",
            "smollm2-135m",
            "--load-format",
            "dummy",
            "--server-tokenizer",
            "default",
            "--max-model-len",
            "128",
            "--num-blocks",
            "48",
            "--input-len",
            "24",
            "--output-len",
            "12",
            "--num-prompts",
            "3",
            "--warmup-prompts",
            "1",
            "--request-rates",
            "4,8",
            "--goodput",
            "ttft:60000",
            "tpot:1",
            "--no-tqdm",
            "--result-dir",
            str(tmp_path),
            "--label",
            "e2e",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "pd / mixed at 8 req/s: goodput" in out.out
    result = json.loads((tmp_path / "pd-sweep-e2e.json").read_text())
    assert (tmp_path / "pd-sweep-e2e.png").stat().st_size > 10_000
    assert [c["name"] for c in result["configs"]] == ["pd", "mixed"]
    assert result["workload"]["goodput_slos_ms"] == {"ttft": 60000.0, "tpot": 1.0}
    for config in result["configs"]:
        assert [r["request_rate"] for r in config["rates"]] == [4.0, 8.0]
        for r in config["rates"]:
            assert r["completed"] == r["num_requests"] == 3 and r["num_errors"] == 0
            # a 1 ms TPOT no CPU step meets: no request is good, and goodput says so
            assert r["num_good"] == 0 and r["goodput"] == 0.0
            assert sum(d["generation_tokens"] for d in r["server"].values()) >= 3 * 12
    pd = result["configs"][0]["rates"][0]["server"]
    assert pd["decode-0"]["kv_bytes_received"] > 0 and pd["prefill-0"]["kv_bytes_sent"] > 0
    assert [q["request_rate"] for q in result["pd_over_mixed"]] == [4.0, 8.0]
    assert leftover_parts(result) == []
