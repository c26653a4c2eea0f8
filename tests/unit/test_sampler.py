"""Sampler: greedy, filters, per-request seeds, logprobs. Needs torch, no model."""

from __future__ import annotations

import msgspec
import pytest
import torch

from pdserve.layers.sampler import Sampler
from pdserve.messages import SamplingSpec

CPU = torch.device("cpu")
VOCAB = 64


def make_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB, generator=g) * 3


def test_greedy_is_argmax() -> None:
    logits = make_logits(5)
    tokens, logprobs = Sampler(CPU)(logits, [f"r{i}" for i in range(5)], [SamplingSpec(temperature=0.0)] * 5)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs is None


def test_greedy_rows_stay_argmax_next_to_random_rows() -> None:
    logits = make_logits(4)
    specs = [
        SamplingSpec(temperature=0.0),
        SamplingSpec(temperature=1.5),
        SamplingSpec(temperature=0.0),
        SamplingSpec(temperature=1.0, top_k=3),
    ]
    tokens, _ = Sampler(CPU)(logits, ["a", "b", "c", "d"], specs)
    argmax = logits.argmax(dim=-1).tolist()
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]
    top3 = logits[3].topk(3).indices.tolist()
    assert tokens[3] in top3


def test_top_k_one_equals_greedy() -> None:
    logits = make_logits(8, seed=1)
    specs = [SamplingSpec(temperature=t, top_k=1) for t in (0.5, 1.0, 2.0, 10.0)] * 2
    for seed in range(3):
        tokens, _ = Sampler(CPU, seed=seed)(logits, [f"r{i}" for i in range(8)], specs)
        assert tokens == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = make_logits(8, seed=2)
    specs = [SamplingSpec(temperature=1.0, top_p=1e-6)] * 8
    for seed in range(3):
        tokens, _ = Sampler(CPU, seed=seed)(logits, [f"r{i}" for i in range(8)], specs)
        assert tokens == logits.argmax(dim=-1).tolist()


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.8)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    num_rows = 4000
    logits = probs.log().expand(num_rows, 4).clone()
    tokens, _ = Sampler(CPU, seed=3)(
        logits, [f"r{i}" for i in range(num_rows)], [SamplingSpec(temperature=1.0, top_p=0.7)] * num_rows
    )
    counts = torch.bincount(torch.tensor(tokens), minlength=4)
    assert counts[2:].tolist() == [0, 0]
    assert abs(counts[0].item() / num_rows - 0.5 / 0.8) < 0.04


def test_min_p_drops_tokens_below_a_fraction_of_the_top() -> None:
    # min_p 0.5: keep tokens with p >= 0.25 (half of the top 0.5): tokens 0 and 1
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    num_rows = 4000
    logits = probs.log().expand(num_rows, 4).clone()
    tokens, _ = Sampler(CPU, seed=4)(
        logits, [f"r{i}" for i in range(num_rows)], [SamplingSpec(temperature=1.0, min_p=0.5)] * num_rows
    )
    counts = torch.bincount(torch.tensor(tokens), minlength=4)
    assert counts[2:].tolist() == [0, 0]
    assert counts[1].item() > 0
    assert abs(counts[0].item() / num_rows - 0.5 / 0.8) < 0.04
    # min_p 0.2 keeps token 2 as well (0.15 >= 0.1), never token 3 (0.05 < 0.1)
    tokens, _ = Sampler(CPU, seed=4)(
        logits, [f"r{i}" for i in range(num_rows)], [SamplingSpec(temperature=1.0, min_p=0.2)] * num_rows
    )
    counts = torch.bincount(torch.tensor(tokens), minlength=4)
    assert counts[3].item() == 0 and counts[2].item() > 0


def test_top_k_restricts_to_the_k_most_likely() -> None:
    logits = make_logits(1, seed=5).expand(2000, VOCAB).clone()
    tokens, _ = Sampler(CPU, seed=5)(
        logits, [f"r{i}" for i in range(2000)], [SamplingSpec(temperature=5.0, top_k=3)] * 2000
    )
    assert set(tokens) == set(logits[0].topk(3).indices.tolist())


def test_temperature_one_follows_the_softmax() -> None:
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    num_rows = 8000
    logits = probs.log().expand(num_rows, 4).clone()
    tokens, _ = Sampler(CPU, seed=6)(
        logits, [f"r{i}" for i in range(num_rows)], [SamplingSpec(temperature=1.0)] * num_rows
    )
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / num_rows
    assert torch.allclose(freq, probs, atol=0.03)


def _draws(
    sampler: Sampler, logits: torch.Tensor, req_ids: list[str], specs: list[SamplingSpec], target: str, steps: int
) -> list[int]:
    """`steps` tokens of `target`; spec i of a step samples token number i (as the scheduler's to_spec does)."""
    out = []
    for i in range(steps):
        tokens, _ = sampler(logits, req_ids, [msgspec.structs.replace(s, sample_index=i) for s in specs])
        out.append(tokens[req_ids.index(target)])
    return out


SEEDED = SamplingSpec(temperature=1.0, seed=1234)


def test_seeded_request_is_reproducible_and_differs_by_seed() -> None:
    logits = make_logits(1, seed=7)
    first = _draws(Sampler(CPU, seed=0), logits, ["s"], [SEEDED], "s", 10)
    again = _draws(Sampler(CPU, seed=99), logits, ["s"], [SEEDED], "s", 10)
    assert first == again
    other = _draws(Sampler(CPU), logits, ["s"], [SamplingSpec(temperature=1.0, seed=4321)], "s", 10)
    assert other != first
    # a seeded request's generator advances: 10 draws are not all the same token
    assert len(set(first)) > 1


def test_seeded_request_independent_of_batch_neighbours_and_order() -> None:
    logits = make_logits(4, seed=8)
    alone = _draws(Sampler(CPU), logits[:1], ["s"], [SEEDED], "s", 10)
    plain = SamplingSpec(temperature=1.0)
    greedy = SamplingSpec(temperature=0.0)
    other_seed = SamplingSpec(temperature=0.7, seed=5)
    batches = [
        (logits[[1, 0]], ["x", "s"], [plain, SEEDED]),
        (logits[[0, 2, 3]], ["s", "y", "z"], [SEEDED, greedy, other_seed]),
        (logits[[3, 2, 0, 1]], ["z", "y", "s", "x"], [other_seed, plain, SEEDED, greedy]),
    ]
    for batch_logits, req_ids, specs in batches:
        assert _draws(Sampler(CPU, seed=3), batch_logits, req_ids, specs, "s", 10) == alone


def test_seeded_request_with_its_own_filter_independent_of_neighbours() -> None:
    logits = make_logits(3, seed=9)
    spec = SamplingSpec(temperature=1.0, top_k=10, top_p=0.9, seed=77)
    alone = _draws(Sampler(CPU), logits[:1], ["s"], [spec], "s", 10)
    mixed = _draws(
        Sampler(CPU),
        logits[[2, 0, 1]],
        ["a", "s", "b"],
        [SamplingSpec(temperature=1.0, min_p=0.1), spec, SamplingSpec(temperature=2.0)],
        "s",
        10,
    )
    assert mixed == alone


def test_seeded_request_independent_of_a_filtering_neighbour() -> None:
    logits = make_logits(2, seed=10)
    alone = _draws(Sampler(CPU), logits[:1], ["s"], [SEEDED], "s", 10)
    with_top_k = _draws(
        Sampler(CPU), logits[[1, 0]], ["x", "s"], [SamplingSpec(temperature=1.0, top_k=5), SEEDED], "s", 10
    )
    assert with_top_k == alone


def test_seeded_sample_is_keyed_on_seed_and_index_alone() -> None:
    """A fresh sampler asked for token number 5 of a seeded request draws what a sampler that drew 0..4 first
    draws: a request continues its sequence on another instance (P then D, a migration)."""
    logits = make_logits(1, seed=11)
    run = _draws(Sampler(CPU), logits, ["s"], [SEEDED], "s", 8)
    fresh = Sampler(CPU, seed=42)
    resumed = [
        fresh(logits, ["other-id"], [msgspec.structs.replace(SEEDED, sample_index=i)])[0][0] for i in range(5, 8)
    ]
    assert resumed == run[5:]


# ---- logprobs -------------------------------------------------------------------


def test_logprobs_sampled_first_then_top_k_of_raw_logits() -> None:
    logits = make_logits(3, seed=12)
    specs = [
        SamplingSpec(temperature=0.0, num_logprobs=3),
        SamplingSpec(temperature=2.0, top_k=4, seed=1, num_logprobs=2),  # logprobs ignore temperature and top_k
        SamplingSpec(temperature=0.0, num_logprobs=0),
    ]
    tokens, logprobs = Sampler(CPU)(logits, ["a", "b", "c"], specs)
    assert logprobs is not None and len(logprobs) == 3
    reference = torch.log_softmax(logits, dim=-1)
    for row, (spec, entries) in enumerate(zip(specs, logprobs)):
        assert len(entries) == 1 + spec.num_logprobs
        assert entries[0][0] == tokens[row]
        top = reference[row].topk(spec.num_logprobs) if spec.num_logprobs else None
        expected_ids = [tokens[row]] + (top.indices.tolist() if top is not None else [])
        assert [token for token, _ in entries] == expected_ids
        values = torch.tensor([value for _, value in entries])
        assert torch.allclose(values, reference[row, expected_ids], atol=1e-5)
    # the top-1 entry of a greedy row is the sampled token itself
    assert logprobs[0][1][0] == tokens[0]
    assert logprobs[0][0][1] == pytest.approx(logprobs[0][1][1])


def test_no_logprobs_when_no_row_asks() -> None:
    logits = make_logits(2)
    _, logprobs = Sampler(CPU)(logits, ["a", "b"], [SamplingSpec(temperature=0.0), SamplingSpec(temperature=1.0)])
    assert logprobs is None


def test_logprobs_of_sampled_token_when_it_is_not_in_the_top() -> None:
    # near-uniform logits: a seeded draw lands away from the top token 0 (checked: seed 3 draws token 0)
    logits = torch.zeros(1, VOCAB)
    logits[0, 0] = 0.01
    spec = SamplingSpec(temperature=1.0, seed=4, num_logprobs=1)
    tokens, logprobs = Sampler(CPU)(logits, ["a"], [spec])
    assert logprobs is not None
    reference = torch.log_softmax(logits, dim=-1)[0]
    (sampled, value), (top_id, top_value) = logprobs[0]
    assert sampled == tokens[0] != 0
    assert value == pytest.approx(reference[sampled].item(), abs=1e-6)
    assert (top_id, top_value) == (0, pytest.approx(reference[0].item(), abs=1e-6))
