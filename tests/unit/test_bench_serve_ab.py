"""`pdserve bench serve --ab-rounds`: argument parsing, round order, pooling and ratio math, without a server."""

from __future__ import annotations

import argparse

import pytest

from pdserve.bench.datasets import Conversation, Turn
from pdserve.bench.metrics import RequestResult
from pdserve.bench.serve import ServeBenchConfig, add_parser, asks_structured_output, build_payload
from pdserve.bench.serve_ab import (
    ABConfig,
    Round,
    ab_config_from_args,
    arm_metrics,
    fixed_output_len,
    format_ab_table,
    output_len_notes,
    pair_spread,
    pooled_ratios,
    ratio,
    round_order,
    tpot_verdict,
)

JSON_OBJECT = {"response_format": {"type": "json_object"}}


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", "--base-url", "http://h:1", *argv])


def test_ab_flags_parse_into_an_ab_config():
    args = _parse("--ab-rounds", "3", "--ab-baseline-body", '{"top_k": 1}', "--extra-body", '{"top_k": 2}')
    assert ab_config_from_args(args) == ABConfig(rounds=3, baseline_body={"top_k": 1})
    assert args.extra_body == {"top_k": 2}
    assert ab_config_from_args(_parse("--ab-rounds", "2")) == ABConfig(rounds=2, baseline_body={})


def test_without_ab_rounds_the_run_is_plain():
    assert ab_config_from_args(_parse()) is None
    with pytest.raises(ValueError, match="--ab-baseline-body needs --ab-rounds"):
        ab_config_from_args(_parse("--ab-baseline-body", "{}"))
    with pytest.raises(ValueError, match="--ab-rounds must be at least 1"):
        ab_config_from_args(_parse("--ab-rounds", "-1"))
    with pytest.raises(SystemExit):
        _parse("--ab-rounds", "1", "--ab-baseline-body", "[1]")  # not a JSON object


def test_round_order_alternates_which_arm_goes_first():
    assert round_order(1) == ["baseline", "treatment"]
    assert round_order(3) == ["baseline", "treatment", "treatment", "baseline", "baseline", "treatment"]
    assert all(round_order(n).count("baseline") == n == round_order(n).count("treatment") for n in range(1, 6))


def test_structured_output_bodies_drop_ignore_eos():
    assert asks_structured_output(JSON_OBJECT)
    assert asks_structured_output({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}})
    assert asks_structured_output({"guided_regex": "a+"}) and asks_structured_output({"structured_outputs": {}})
    assert asks_structured_output({"tools": [{"type": "function"}], "tool_choice": "required"})
    assert not asks_structured_output({"response_format": {"type": "text"}})
    assert not asks_structured_output({"tools": [{"type": "function"}], "tool_choice": "auto"})
    assert not asks_structured_output({"top_k": 1, "guided_json": None})
    conv = Conversation((Turn(" a", 1, 5),))
    assert build_payload("chat", "m", conv, 0, [], {})["ignore_eos"] is True
    structured = build_payload("chat", "m", conv, 0, [], JSON_OBJECT)
    assert structured["ignore_eos"] is False and structured["response_format"] == {"type": "json_object"}
    assert build_payload("chat", "m", conv, 0, [], JSON_OBJECT | {"ignore_eos": True})["ignore_eos"] is True
    config = ServeBenchConfig(base_url="http://h:1", endpoint="chat")
    assert fixed_output_len(config, {}) and not fixed_output_len(config, JSON_OBJECT)


def _ok(ttft: float, latency: float, output_len: int, requested: int = 8) -> RequestResult:
    gap = (latency - ttft) / max(output_len - 1, 1)
    return RequestResult(True, 10, output_len, requested, ttft=ttft, latency=latency, itl=[gap] * (output_len - 1))


def test_arm_metrics_pool_rounds_over_summed_durations():
    round_a = [_ok(0.1, 0.8, 8), _ok(0.2, 1.6, 8)]  # tpot 0.1, 0.2 s
    round_b = [_ok(0.1, 1.5, 8), RequestResult(False, 10, 0, 8, status=500, error="x")]  # tpot 0.2 s
    pooled = arm_metrics(round_a + round_b, duration_s=4.0, slos={})
    assert (pooled["completed"], pooled["failed"], pooled["total_output_tokens"]) == (3, 1, 24)
    assert pooled["output_throughput"] == 6.0 and pooled["mean_output_len"] == 8.0
    assert pooled["tpot"]["p50_ms"] == pytest.approx(200.0) and pooled["tpot"]["mean_ms"] == 166.667
    assert arm_metrics([RequestResult(False, 1, 0, 8)], 1.0, {})["mean_output_len"] is None


def _metrics(tpot_p50: float | None, throughput: float, itl_p50: float = 10.0) -> dict:
    return {
        "tpot": {"p50_ms": tpot_p50, "mean_ms": tpot_p50},
        "itl": {"p50_ms": itl_p50, "mean_ms": itl_p50},
        "ttft": {"p50_ms": 100.0},
        "e2el": {"p50_ms": 1000.0},
        "output_throughput": throughput,
        "request_throughput": 1.0,
        "mean_output_len": 64.0,
    }


def test_ratios_are_treatment_over_baseline():
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 3.0) == 0.3333
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None
    ratios = pooled_ratios(_metrics(40.0, 100.0), _metrics(44.0, 80.0, itl_p50=12.0))
    assert ratios == {
        "tpot_p50": 1.1,
        "tpot_mean": 1.1,
        "itl_p50": 1.2,
        "itl_mean": 1.2,
        "ttft_p50": 1.0,
        "e2el_p50": 1.0,
        "output_throughput": 0.8,
        "request_throughput": 1.0,
        "mean_output_len": 1.0,
    }
    assert tpot_verdict(ratios) == {
        "metric": "pooled median TPOT, treatment / baseline",
        "ratio": 1.1,
        "target": 1.1,
        "met": True,
    }
    assert tpot_verdict({"tpot_p50": 1.1001})["met"] is False and tpot_verdict({"tpot_p50": None})["met"] is None


def test_pair_spread_pairs_the_ith_rounds():
    baseline = [_metrics(40.0, 100.0), _metrics(50.0, 90.0), _metrics(40.0, 80.0)]
    treatment = [_metrics(44.0, 90.0), _metrics(50.0, 45.0), _metrics(None, 100.0)]
    spread = pair_spread(baseline, treatment)
    assert spread["tpot_p50"] == {"per_pair": [1.1, 1.0, None], "min": 1.0, "median": 1.05, "max": 1.1}
    assert spread["output_throughput"] == {"per_pair": [0.9, 0.5, 1.25], "min": 0.5, "median": 0.9, "max": 1.25}
    assert spread["itl_p50"]["per_pair"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="2 baseline rounds but 3 treatment"):
        pair_spread(baseline[:2], treatment)


def test_notes_say_when_output_lengths_are_the_models():
    fixed = {"fixed_output_len": True}
    free = {"fixed_output_len": False}
    assert output_len_notes({"baseline": fixed, "treatment": fixed}) == []
    (note,) = output_len_notes({"baseline": fixed, "treatment": free})
    assert note.startswith("the treatment arm's output lengths are the model's") and "TPOT" in note
    assert "both arms" in output_len_notes({"baseline": free, "treatment": free})[0]


def test_format_ab_table_lists_both_arms_and_ratios():
    base, treat = _metrics(40.0, 100.0) | {"failed": 0}, _metrics(44.0, 80.0) | {"failed": 1}
    ratios = pooled_ratios(base, treat)
    result = {
        "arms": {"baseline": {"pooled": base}, "treatment": {"pooled": treat}},
        "ratios": {"pooled": ratios, "per_pair": pair_spread([base], [treat])},
        "tpot_target": tpot_verdict(ratios),
        "notes": ["n1"],
    }
    table = format_ab_table(result)
    assert "Median TPOT (ms)" in table and "1.100" in table and "0.800" in table
    assert "vs target 1.1: met" in table and "note: n1" in table


def test_round_results_flatten_conversations():
    r = Round(0, "baseline", [[_ok(0.1, 0.8, 8)], [_ok(0.1, 0.8, 8), _ok(0.1, 0.8, 8)]], 1.0, {})
    assert len(r.results) == 3
