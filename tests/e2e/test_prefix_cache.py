"""Prefix caching and the host/pool tiers on the default model: greedy outputs never change.

The reference is the same engine with prefix caching off (itself checked against
HF transformers in test_hf_parity); near ties are judged by the HF oracle.
"""

from __future__ import annotations

import random

import pytest
from helpers import assert_greedy_equal

from pdserve import LLM, SamplingParams

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Shared system prefixes, exact repeats and multi-turn extensions, in one mix."""
    rng = random.Random(11)
    system = [rng.randrange(1000, 49152) for _ in range(70)]
    other = [rng.randrange(1000, 49152) for _ in range(40)]
    out = []
    for n in (5, 17, 33, 3):
        out.append(system + [rng.randrange(1000, 49152) for _ in range(n)])
    out.append(other + [rng.randrange(1000, 49152) for _ in range(9)])
    out.append(list(out[0]))  # an exact repeat
    out.append(out[1] + [rng.randrange(1000, 49152) for _ in range(20)])  # the next turn of prompt 1
    out.append(system[:32])  # exactly two full blocks: a full hit recomputes the last block
    return out


def _greedy(llm: LLM, prompts: list[list[int]], one_by_one: bool = False) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    batches = [[p] for p in prompts] if one_by_one else [prompts]
    outs = []
    for batch in batches:
        outs += llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        llm.engine.check_integrity()
        assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks  # cached blocks count as free
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(prompts) -> list[list[int]]:
    with LLM(enable_prefix_caching=False, max_model_len=512) as llm:
        out = _greedy(llm, prompts, one_by_one=True)
        stats = llm.engine.stats()
        assert stats.prefix_hit_tokens_device == stats.prefix_hit_tokens_host == 0
        assert stats.num_prompt_tokens == sum(map(len, prompts))
    return out


def _assert_same(ours, reference, prompts, oracle, label):
    for p, a, b in zip(prompts, reference, ours):
        assert_greedy_equal(b, a, p, oracle, f"{label}, prompt len {len(p)}")


def test_prefix_caching_on_gives_same_outputs_and_computes_less(default_hf_model, prompts, reference):
    with LLM(max_model_len=512) as llm:
        ours = _greedy(llm, prompts, one_by_one=True)
        stats = llm.engine.stats()
    _assert_same(ours, reference, prompts, default_hf_model, "prefix caching")
    # prompts 1-3 reuse the 4 full system blocks of prompt 0; the repeat reuses 4 of its 4 full blocks;
    # the next turn reuses prompt 1's 5 full blocks; system[:32] reuses 1 (its last block is recomputed)
    assert stats.prefix_hit_tokens_device == 16 * (4 * 3 + 4 + 5 + 1)
    assert stats.num_prompt_tokens == sum(map(len, prompts)) - stats.prefix_hit_tokens_device
    assert stats.prefix_query_tokens == sum(map(len, prompts))


def test_batched_identical_prompts_with_prefix_caching(default_hf_model, prompts, reference):
    with LLM(max_model_len=512) as llm:
        first = _greedy(llm, prompts)
        second = _greedy(llm, prompts)  # everything but each prompt's last block is on the device now
    _assert_same(first, reference, prompts, default_hf_model, "batched, cold")
    _assert_same(second, reference, prompts, default_hf_model, "batched, warm")


@pytest.mark.parametrize("store", ["memory", "file"])
def test_tiny_device_tier_takes_host_and_pool_paths(default_hf_model, prompts, reference, store, tmp_path):
    options = {"path": str(tmp_path / "pool")} if store == "file" else None
    # 12 device blocks hold one request at a time; 6 host blocks hold less than one prompt's prefix,
    # so most blocks are only found again in the pool
    with LLM(
        max_model_len=192, num_blocks=12, num_host_blocks=6, kv_store=store, kv_store_config=options, max_num_seqs=1
    ) as llm:
        ours = _greedy(llm, prompts, one_by_one=True)
        again = _greedy(llm, prompts, one_by_one=True)
        stats = llm.engine.stats()
        llm.engine.kv.host.check_integrity()
    _assert_same(ours, reference, prompts, default_hf_model, f"{store} pool, first pass")
    _assert_same(again, reference, prompts, default_hf_model, f"{store} pool, second pass")
    assert stats.prefix_hit_tokens_host > 0, stats
    assert stats.prefix_hit_tokens_pool > 0, stats
    assert stats.store.bytes_put > 0 and stats.store.bytes_get > 0 and stats.store.num_errors == 0, stats


def test_preempted_request_resumes_from_saved_blocks(default_hf_model):
    rng = random.Random(5)
    prompts = [[rng.randrange(1000, 49152) for _ in range(n)] for n in (60, 75, 90, 50, 66, 81)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    runs = {}
    for save in (True, False):
        # 24 blocks of 16 for 6 requests of up to 130 tokens (9 blocks): preemption is certain
        with LLM(max_model_len=256, num_blocks=24, num_host_blocks=64, preempt_save=save) as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            llm.engine.check_integrity()
            runs[save] = ([o.outputs[0].token_ids for o in outs], llm.engine.stats())
    (saved_out, saved), (plain_out, plain) = runs[True], runs[False]
    assert saved.num_preemptions > 0 and plain.num_preemptions > 0
    assert saved.num_blocks_saved_on_preemption > 0 and plain.num_blocks_saved_on_preemption == 0
    assert saved.num_recomputed_tokens < plain.num_recomputed_tokens, (saved, plain)
    with LLM(max_model_len=256) as llm:  # no pressure: the reference
        reference = [
            o.outputs[0].token_ids
            for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        ]
    _assert_same(saved_out, reference, prompts, default_hf_model, "preempted with saving")
    _assert_same(plain_out, reference, prompts, default_hf_model, "preempted, recomputed")


def test_tensor_parallel_ranks_share_one_pool_by_rank(tmp_path):
    """TP=2: each rank writes and reads its own shard (`<key>@<rank>`); a block counts when both have it."""
    rng = random.Random(3)
    prompts = [[rng.randrange(0, 500) for _ in range(70)] for _ in range(4)]  # 4 full blocks each
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    common = dict(load_format="dummy", max_model_len=128, tensor_parallel_size=2, max_num_seqs=1)
    with LLM("tiny", **common) as llm:
        reference = [
            o.outputs[0].token_ids
            for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        ]
    # 8 device blocks and 2 host blocks: the second round finds most blocks only in the pool
    with LLM(
        "tiny",
        **common,
        num_blocks=8,
        num_host_blocks=2,
        kv_store="file",
        kv_store_config={"path": str(tmp_path / "pool")},
    ) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts + prompts], params, use_tqdm=False)
        stats = llm.engine.stats()
        llm.engine.check_integrity()
    assert [o.outputs[0].token_ids for o in outs] == reference + reference
    # each repeat reads the 2 blocks the host tier can stage: 4 repeats x 2 blocks x 16 tokens
    assert stats.prefix_hit_tokens_pool == 4 * 2 * 16, stats
    names = sorted(p.name for p in (tmp_path / "pool").rglob("*") if p.is_file())
    assert len(names) == 2 * 16  # 16 blocks, one object per rank
