"""Batch invariance, chunked prefill and preemption on the default model: same greedy outputs."""

from __future__ import annotations

import random

import pytest
from helpers import assert_greedy_equal

from pdserve import LLM, SamplingParams

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompts(default_llm) -> list[list[int]]:
    rng = random.Random(7)
    lengths = [3, 9, 17, 25, 33, 48, 64, 80, 5, 12, 40, 57, 71, 90, 110, 130, 21, 15]
    return [[rng.randrange(1000, 49152) for _ in range(n)] for n in lengths]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.check_integrity()
    assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def alone(default_llm, prompts) -> list[list[int]]:
    return [_greedy(default_llm, [p])[0] for p in prompts]


def test_batch_equals_alone(default_llm, default_hf_model, prompts, alone):
    assert len(prompts) >= 16 and len({len(p) for p in prompts}) == len(prompts)
    batched = _greedy(default_llm, prompts)
    for p, a, b in zip(prompts, alone, batched):
        assert_greedy_equal(b, a, p, default_hf_model, f"batched, prompt len {len(p)}")


def test_small_token_budget_equals_large(default_hf_model, prompts, alone):
    with LLM(max_num_batched_tokens=24, max_num_seqs=16) as llm:  # prompts up to 130 tokens: 6 chunks
        chunked = _greedy(llm, prompts)
        assert llm.engine.scheduler.stats.num_steps > NEW_TOKENS + 130 // 24
    for p, a, b in zip(prompts, alone, chunked):
        assert_greedy_equal(b, a, p, default_hf_model, f"chunked, prompt len {len(p)}")


def test_preemption_gives_same_outputs(default_hf_model, prompts, alone):
    # 40 blocks of 16 = 640 tokens for 18 requests needing up to 162 tokens each
    with LLM(num_blocks=40, max_model_len=512, max_num_seqs=18) as llm:
        constrained = _greedy(llm, prompts)
        assert llm.num_preemptions > 0
    for p, a, b in zip(prompts, alone, constrained):
        assert_greedy_equal(b, a, p, default_hf_model, f"preempted, prompt len {len(p)}")


def test_seeded_sampling_is_reproducible_in_any_batch(default_llm, prompts):
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
    one = default_llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)[0].outputs[0].token_ids
    batch = default_llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], params, use_tqdm=False)
    assert batch[0].outputs[0].token_ids == one
    assert len({tuple(o.outputs[0].token_ids) for o in batch}) > 1


def test_stop_strings_and_stop_tokens(default_llm):
    base = default_llm.generate(
        ["The capital of France is"], SamplingParams(max_tokens=20, temperature=0), use_tqdm=False
    )[0].outputs[0]
    assert "Paris." in base.text
    stopped = default_llm.generate(
        ["The capital of France is"], SamplingParams(max_tokens=20, temperature=0, stop=["."]), use_tqdm=False
    )[0]
    out = stopped.outputs[0]
    assert out.text == base.text[: base.text.index(".")]
    assert out.finish_reason == "stop" and out.stop_reason == "."
    token = base.token_ids[3]
    by_token = default_llm.generate(
        ["The capital of France is"],
        SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[token]),
        use_tqdm=False,
    )[0].outputs[0]
    assert by_token.token_ids == base.token_ids[: base.token_ids.index(token) + 1]
    assert by_token.finish_reason == "stop"
    assert default_llm.engine.kv.num_free_blocks == default_llm.engine.num_blocks


def test_logprobs(default_llm, default_hf_model):
    import torch

    tokenizer = default_llm.get_tokenizer()
    out = default_llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, logprobs=5), use_tqdm=False)[
        0
    ].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 3
    prompt = tokenizer.encode("Hello")
    with torch.no_grad():
        ref = torch.log_softmax(default_hf_model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    first = out.logprobs[0]
    assert out.token_ids[0] in first and len(first) == 5  # the greedy token is also the top-1
    for token_id, logprob in first.items():
        assert abs(logprob - float(ref[token_id])) < 1e-3
