"""Tensor parallelism on CPU (gloo): TP=2 gives the same greedy outputs as TP=1."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import assert_greedy_equal

from pdserve import LLM, SamplingParams


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama-tied"])
def test_tp2_equals_tp1(tiny_models, kind):
    from transformers import AutoModelForCausalLM

    path = str(tiny_models[kind])
    rng = random.Random(3)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (4, 19, 45, 80)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    with LLM(path, num_blocks=64, max_model_len=512) as llm:
        tp1 = [o.outputs[0].token_ids for o in llm.generate(inputs, params, use_tqdm=False)]
    with LLM(path, num_blocks=64, max_model_len=512, tensor_parallel_size=2, max_num_batched_tokens=32) as llm:
        tp2 = [o.outputs[0].token_ids for o in llm.generate(inputs, params, use_tqdm=False)]
        llm.engine.check_integrity()
        assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
    oracle = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p, a, b in zip(prompts, tp1, tp2):
        assert_greedy_equal(b, a, p, oracle, f"{kind} TP=2 vs TP=1, prompt len {len(p)}")


def test_tp_size_must_divide_heads(default_hf_dir):
    with pytest.raises(ValueError, match="9 attention heads.*tensor_parallel_size=2"):
        LLM(tensor_parallel_size=2)


def test_bfloat16_runs_on_cpu(default_llm):
    with LLM(dtype="bfloat16") as llm:
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[
            0
        ].outputs[0]
        assert llm.engine.executor.runner.kv_cache.dtype == torch.bfloat16
    assert "Paris" in out.text
