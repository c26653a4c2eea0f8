"""Logits processors (logit bias, repetition / frequency / presence penalties, banned tokens, grammar bitmask)
against a per-row reference over Python lists, and SamplingParams.to_spec's processor fields. Needs torch, no
model."""

from __future__ import annotations

import math
import struct
from collections import Counter

import msgspec
import pytest
import torch

from pdserve.layers.sampler import Sampler, process_logits
from pdserve.messages import SamplingSpec
from pdserve.request import Request, SamplingParams

CPU = torch.device("cpu")
VOCAB = 100
NUM_WORDS = (VOCAB + 31) // 32  # int32 words of a full-vocabulary bitmask
INF = float("inf")


def make_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB, generator=g) * 3


def make_bitmask(allowed_ids: list[int], num_words: int = NUM_WORDS) -> bytes:
    """xgrammar's layout: int32 words, bit j of word i set = token 32 * i + j allowed."""
    words = [0] * num_words
    for t in allowed_ids:
        words[t // 32] |= 1 << (t % 32)
    return struct.pack(f"<{num_words}i", *(w - (1 << 32) if w >= 1 << 31 else w for w in words))


def reference_row(row: list[float], spec: SamplingSpec) -> list[float]:
    """The processors of SamplingSpec, in its order, one token at a time."""
    out = list(row)
    vocab = len(out)
    for t, b in spec.logit_bias:
        if 0 <= t < vocab:
            out[t] += b
    if spec.repetition_penalty != 1.0:
        for t in set(spec.penalty_prompt_ids) | set(spec.penalty_output_ids):
            if 0 <= t < vocab:
                out[t] = out[t] / spec.repetition_penalty if out[t] > 0 else out[t] * spec.repetition_penalty
    for t, count in Counter(spec.penalty_output_ids).items():
        if 0 <= t < vocab:
            out[t] -= spec.frequency_penalty * count + spec.presence_penalty
    for t in spec.banned_token_ids:
        if 0 <= t < vocab:
            out[t] = -INF
    if spec.token_bitmask is not None:
        num_words = len(spec.token_bitmask) // 4
        words = struct.unpack(f"<{num_words}i", spec.token_bitmask)
        for t in range(vocab):
            if t >= 32 * num_words or not (words[t // 32] >> (t % 32)) & 1:
                out[t] = -INF
    return out


def assert_matches_reference(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    before = logits.clone()
    processed = process_logits(logits, specs)
    assert torch.equal(logits, before), "process_logits must not change its input (logprobs read the raw logits)"
    expected = torch.tensor([reference_row(row, spec) for row, spec in zip(logits.tolist(), specs)])
    torch.testing.assert_close(processed, expected, rtol=1e-6, atol=1e-5)
    return processed


PROMPT_IDS = [3, 7, 7, 12, 40, 99]
OUTPUT_IDS = [7, 12, 12, 12, 55, 0, 55, 98]
BITMASK_IDS = [0, 7, 12, 31, 32, 55, 63, 64, 98, 99]  # 31 and 63: the sign bit of a word

PROCESSOR_SPECS = {
    "logit_bias": SamplingSpec(logit_bias=[(0, 5.0), (12, -3.5), (55, 100.0), (99, -100.0), (500, 7.0)]),
    "repetition": SamplingSpec(repetition_penalty=1.7, penalty_prompt_ids=PROMPT_IDS, penalty_output_ids=OUTPUT_IDS),
    "repetition_below_one": SamplingSpec(
        repetition_penalty=0.6, penalty_prompt_ids=PROMPT_IDS, penalty_output_ids=OUTPUT_IDS
    ),
    "frequency": SamplingSpec(frequency_penalty=0.8, penalty_output_ids=OUTPUT_IDS),
    "presence": SamplingSpec(presence_penalty=1.5, penalty_output_ids=OUTPUT_IDS),
    "negative_frequency_presence": SamplingSpec(
        frequency_penalty=-0.5, presence_penalty=-1.25, penalty_output_ids=OUTPUT_IDS
    ),
    "banned": SamplingSpec(banned_token_ids=[0, 7, 55, 99]),
    "bitmask": SamplingSpec(token_bitmask=make_bitmask(BITMASK_IDS)),
    "all": SamplingSpec(
        logit_bias=[(7, 2.0), (12, -1.0), (40, 4.0)],
        repetition_penalty=1.3,
        frequency_penalty=0.7,
        presence_penalty=0.4,
        penalty_prompt_ids=PROMPT_IDS,
        penalty_output_ids=OUTPUT_IDS,
        banned_token_ids=[98],
        token_bitmask=make_bitmask(BITMASK_IDS),
    ),
}


@pytest.mark.parametrize("name", sorted(PROCESSOR_SPECS))
def test_one_processor_in_every_row(name: str) -> None:
    spec = PROCESSOR_SPECS[name]
    processed = assert_matches_reference(make_logits(4, seed=1), [spec] * 4)
    assert not torch.equal(processed, make_logits(4, seed=1)), f"{name} changed nothing: the test proves nothing"


@pytest.mark.parametrize("name", sorted(PROCESSOR_SPECS))
def test_one_processor_in_rows_mixed_with_plain_rows(name: str) -> None:
    plain = SamplingSpec()
    spec = PROCESSOR_SPECS[name]
    logits = make_logits(5, seed=2)
    processed = assert_matches_reference(logits, [plain, spec, plain, plain, spec])
    for row in (0, 2, 3):
        assert torch.equal(processed[row], logits[row]), f"plain row {row} changed"


def test_every_processor_in_one_batch_with_plain_rows() -> None:
    specs = [SamplingSpec(temperature=0.7)]
    for spec in PROCESSOR_SPECS.values():
        specs += [spec, SamplingSpec()]
    logits = make_logits(len(specs), seed=3)
    processed = assert_matches_reference(logits, specs)
    for row, spec in enumerate(specs):
        if not spec.has_processors:
            assert torch.equal(processed[row], logits[row])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[4.0, -4.0, 0.0, 2.0]])
    spec = SamplingSpec(repetition_penalty=2.0, penalty_prompt_ids=[0], penalty_output_ids=[1, 2])
    assert process_logits(logits, [spec]).tolist() == [[2.0, -8.0, 0.0, 2.0]]


def test_frequency_counts_occurrences_and_presence_counts_once() -> None:
    logits = torch.zeros(1, 4)
    spec = SamplingSpec(frequency_penalty=1.0, presence_penalty=0.5, penalty_output_ids=[1, 1, 1, 3])
    assert process_logits(logits, [spec]).tolist() == [[0.0, -3.5, 0.0, -1.5]]


def test_sampler_greedy_picks_the_best_token_after_processors() -> None:
    logits = make_logits(len(PROCESSOR_SPECS) * 2, seed=4)
    specs = [msgspec.structs.replace(s, temperature=0.0) for s in PROCESSOR_SPECS.values()]
    specs = [s for spec in specs for s in (spec, SamplingSpec())]
    tokens, logprobs = Sampler(CPU)(logits, [f"r{i}" for i in range(len(specs))], specs)
    expected = [max(range(VOCAB), key=reference_row(row, s).__getitem__) for row, s in zip(logits.tolist(), specs)]
    assert tokens == expected
    assert logprobs is None


def test_logprobs_are_those_of_the_raw_logits() -> None:
    logits = make_logits(3, seed=5)
    raw_argmax = logits.argmax(dim=-1).tolist()
    boosted = (raw_argmax[0] + 1) % VOCAB
    specs = [
        SamplingSpec(num_logprobs=2, logit_bias=[(boosted, 100.0)]),
        SamplingSpec(num_logprobs=2),
        SamplingSpec(num_logprobs=2, banned_token_ids=[raw_argmax[2]]),
    ]
    tokens, logprobs = Sampler(CPU)(logits, ["a", "b", "c"], specs)
    assert tokens[0] == boosted and tokens[1] == raw_argmax[1]
    assert tokens[2] == logits[2].topk(2).indices[1].item(), "banning the argmax picks the runner-up"
    assert tokens[2] != raw_argmax[2]
    assert logprobs is not None
    raw = torch.log_softmax(logits, dim=-1)
    for row, entries in enumerate(logprobs):
        (token, chosen), *top = entries
        assert token == tokens[row]
        assert chosen == pytest.approx(raw[row, token].item(), abs=1e-6), "the chosen token's raw logprob"
        top2 = raw[row].topk(2)
        assert [t for t, _ in top] == top2.indices.tolist(), "the raw top-2, not the processed one"
        assert [v for _, v in top] == pytest.approx(top2.values.tolist(), abs=1e-6)
    assert math.isfinite(logprobs[2][0][1])


def test_bitmask_round_trip_greedy_picks_the_best_allowed_token() -> None:
    logits = make_logits(6, seed=6)
    allowed = [2, 31, 33, 63, 64, 97]
    spec = SamplingSpec(token_bitmask=make_bitmask(allowed))
    tokens, _ = Sampler(CPU)(logits, [f"r{i}" for i in range(6)], [spec, SamplingSpec()] * 3)
    for row in range(0, 6, 2):
        best = max(allowed, key=lambda t: logits[row, t].item())
        assert tokens[row] == best
    assert tokens[1::2] == logits[1::2].argmax(dim=-1).tolist()
    processed = process_logits(logits, [spec])
    finite = torch.isfinite(processed[0]).nonzero().flatten().tolist()
    assert finite == allowed


def test_bitmask_with_every_bit_set_allows_everything() -> None:
    logits = make_logits(2, seed=7)
    spec = SamplingSpec(token_bitmask=struct.pack(f"<{NUM_WORDS}i", *[-1] * NUM_WORDS))
    assert torch.equal(process_logits(logits, [spec, spec]), logits)


def test_bitmask_shorter_than_the_vocabulary_allows_nothing_past_it() -> None:
    logits = make_logits(2, seed=8)
    logits[:, 90] = 100.0  # the best token lies past the mask
    allowed = [5, 40, 63]
    spec = SamplingSpec(token_bitmask=make_bitmask(allowed, num_words=2))  # 64 of 100 tokens
    processed = assert_matches_reference(logits, [spec, SamplingSpec()])
    assert torch.isfinite(processed[0]).nonzero().flatten().tolist() == allowed
    tokens, _ = Sampler(CPU)(logits, ["a", "b"], [spec, SamplingSpec()])
    assert tokens[0] == max(allowed, key=lambda t: logits[0, t].item())
    assert tokens[1] == 90


def test_logit_bias_for_a_token_past_the_vocabulary_is_ignored() -> None:
    logits = make_logits(1, seed=9)
    spec = SamplingSpec(logit_bias=[(VOCAB, 50.0), (VOCAB + 7, -50.0)], banned_token_ids=[VOCAB + 1])
    assert torch.equal(process_logits(logits, [spec]), logits)


# ---- SamplingParams.to_spec -------------------------------------------------------

EOS = 2


def make_request(params: SamplingParams, prompt: list[int], output: list[int]) -> Request:
    return Request("r", tuple(prompt), params, eos_token_id=EOS, output_token_ids=list(output))


def test_min_tokens_bans_eos_and_stop_ids_before_not_after() -> None:
    params = SamplingParams(max_tokens=10, temperature=0, min_tokens=3, stop_token_ids=[7, 8])
    prompt = [1, 5, 6]
    for output in ([], [9], [9, 9]):
        spec = params.to_spec(make_request(params, prompt, output))
        assert spec.banned_token_ids == [EOS, 7, 8], f"{len(output)} tokens of min_tokens 3"
        assert spec.has_processors
    for output in ([9, 9, 9], [9, 9, 9, 9]):
        spec = params.to_spec(make_request(params, prompt, output))
        assert spec.banned_token_ids == [] and not spec.has_processors, f"{len(output)} tokens of min_tokens 3"


def test_min_tokens_with_no_eos_bans_only_stop_ids() -> None:
    params = SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=[7])
    request = Request("r", (1, 2), params, eos_token_id=None)
    assert params.to_spec(request).banned_token_ids == [7]


@pytest.mark.parametrize(
    ("output", "banned"),
    [
        ([], [5]),
        ([10], [5]),  # the 3-token word needs 10, 11 before 12 is banned
        ([11], [5]),
        ([10, 11], [5, 12]),
        ([3, 4, 10, 11], [5, 12]),
        ([10, 11, 4], [5]),
        ([11, 10], [5]),
        ([20], [5, 21]),
        ([10, 11, 20], [5, 21]),
        ([20, 10, 11], [5, 12]),
    ],
)
def test_bad_words_ban_the_last_token_after_the_others(output: list[int], banned: list[int]) -> None:
    params = SamplingParams(bad_words_token_ids=[[5], [10, 11, 12], [20, 21]])
    spec = params.to_spec(make_request(params, [10, 11, 20, 1], output))  # the prompt's tail does not count
    assert spec.banned_token_ids == banned
    assert spec.penalty_output_ids == [] and spec.penalty_prompt_ids == []


def test_penalties_carry_the_prompt_and_the_completion() -> None:
    params = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5, logit_bias={9: 3.0, 4: -1.0})
    spec = params.to_spec(make_request(params, [8, 3, 8, 1], [4, 4, 6]))
    assert spec.penalty_prompt_ids == [1, 3, 8]
    assert spec.penalty_output_ids == [4, 4, 6]
    assert spec.logit_bias == [(4, -1.0), (9, 3.0)]
    assert (spec.repetition_penalty, spec.frequency_penalty, spec.presence_penalty) == (1.2, 0.5, 0.0)
    only_presence = SamplingParams(presence_penalty=0.5)
    spec = only_presence.to_spec(make_request(only_presence, [8, 3], [4]))
    assert spec.penalty_prompt_ids == [], "repetition_penalty 1 needs no prompt ids"
    assert spec.penalty_output_ids == [4]
    assert (spec.repetition_penalty, spec.frequency_penalty, spec.presence_penalty) == (1.0, 0.0, 0.5)


def test_plain_params_build_a_spec_without_processors() -> None:
    params = SamplingParams(temperature=0.5, top_k=5)
    spec = params.to_spec(make_request(params, [1, 2, 3], [4, 5]))
    assert not spec.has_processors
    assert spec == SamplingSpec(temperature=0.5, top_k=5, sample_index=2)


def test_migrated_request_counts_the_prompt_tail_as_completion() -> None:
    """output_offset 2: the prompt's last 2 tokens were generated elsewhere, before the move."""
    params = SamplingParams(
        max_tokens=5,
        output_offset=2,
        min_tokens=4,
        stop_token_ids=[7],
        repetition_penalty=1.5,
        presence_penalty=1.0,
        bad_words_token_ids=[[31, 32], [31, 33, 34]],
    )
    prompt = [30, 30, 3, 33, 31]  # client prompt [30, 30, 3], completion so far [33, 31]
    spec = params.to_spec(make_request(params, prompt, []))
    assert spec.sample_index == 2
    assert spec.penalty_prompt_ids == [3, 30]
    assert spec.penalty_output_ids == [33, 31]
    assert spec.banned_token_ids == [EOS, 7, 32], "2 of min_tokens 4; the completion ends with 31"
    spec = params.to_spec(make_request(params, prompt, [33]))
    assert spec.sample_index == 3
    assert spec.penalty_output_ids == [33, 31, 33]
    assert spec.banned_token_ids == [EOS, 7, 34], "3 of min_tokens 4; the completion ends with 31, 33"
    spec = params.to_spec(make_request(params, prompt, [33, 5]))
    assert spec.banned_token_ids == [], "4 of min_tokens 4"
    # min_tokens counts the tokens from before the move: 2 of them reach min_tokens 2 with no new output
    done = SamplingParams(max_tokens=5, output_offset=2, min_tokens=2)
    spec = done.to_spec(make_request(done, prompt, []))
    assert spec.banned_token_ids == [] and not spec.has_processors


def test_processors_from_to_spec_match_the_reference() -> None:
    params = SamplingParams(
        max_tokens=8,
        temperature=0,
        repetition_penalty=1.4,
        frequency_penalty=0.3,
        presence_penalty=0.2,
        logit_bias={50: 4.0},
        min_tokens=5,
        bad_words_token_ids=[[60, 61]],
    )
    request = make_request(params, [1, 9, 9, 60], [60, 9, 60])
    spec = params.to_spec(request)
    assert spec.banned_token_ids == [EOS, 61]
    assert_matches_reference(make_logits(1, seed=10), [spec])


# ---- validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": 10.5}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: -101}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": [(3, 1.0), (4, 200.0)]}, "logit_bias"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": True}, "min_tokens"),
        ({"min_tokens": 2.5}, "min_tokens"),
        ({"bad_words_token_ids": [[3], []]}, "bad_words"),
    ],
)
def test_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_validation_accepts_the_bounds() -> None:
    params = SamplingParams(
        presence_penalty=-2,
        frequency_penalty=2,
        repetition_penalty=10,
        logit_bias={0: -100, 5: 100},
        min_tokens=16,
        max_tokens=16,
        bad_words_token_ids=[(1, 2)],  # type: ignore[list-item]
    )
    assert params.bad_words_token_ids == [[1, 2]]
    assert params.logit_bias == [(0, -100.0), (5, 100.0)]
    # not bounded by max_tokens: a prefill instance runs a PD request's first token with max_tokens 1
    assert SamplingParams(max_tokens=1, min_tokens=7).min_tokens == 7
