"""Greedy decoding equals HF transformers token for token (fp32, CPU)."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import assert_greedy_equal, hf_greedy

from pdserve import LLM, SamplingParams

NEW_TOKENS = 40


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "llama3-rope", "qwen2", "mistral"])
def test_tiny_models_match_hf(tiny_models, kind):
    from transformers import AutoModelForCausalLM

    path = tiny_models[kind]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(512, [1, 7, 16, 33, 70], seed=len(kind))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    with LLM(str(path), dtype="float32", num_blocks=64, max_model_len=512) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        llm.engine.check_integrity()
        assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
    exact = 0
    for prompt, out in zip(prompts, outputs):
        assert len(out.outputs[0].token_ids) == NEW_TOKENS
        assert out.outputs[0].finish_reason == "length"
        expected = hf_greedy(hf, prompt, NEW_TOKENS)
        exact += (
            assert_greedy_equal(out.outputs[0].token_ids, expected, prompt, hf, f"{kind} len {len(prompt)}") is None
        )
    assert exact >= len(prompts) - 1, "more than one near-tie in five prompts: suspicious"


def test_qwen2_biases_are_used(tiny_models):
    """The qkv biases change the output: a model without them would not match HF."""
    import json

    from pdserve.models.arch import arch_from_hf_config

    cfg = json.loads((tiny_models["qwen2"] / "config.json").read_text())
    arch = arch_from_hf_config(cfg)
    assert arch.qkv_bias and not arch.o_bias


DEFAULT_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "In 1492, Christopher Columbus",
    "List three primary colors:",
    "Translate to French: I like apples.",
]


def test_default_model_matches_hf(default_llm, default_hf_model):
    tokenizer = default_llm.get_tokenizer()
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    outputs = default_llm.generate(DEFAULT_PROMPTS, params, use_tqdm=False)
    for text, out in zip(DEFAULT_PROMPTS, outputs):
        prompt = tokenizer.encode(text)
        assert out.prompt_token_ids == prompt
        expected = hf_greedy(default_hf_model, prompt, 32)
        assert_greedy_equal(out.outputs[0].token_ids, expected, prompt, default_hf_model, text)
        assert out.outputs[0].text == tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    assert default_llm.engine.kv.num_free_blocks == default_llm.engine.num_blocks


def test_default_model_chat_template(default_llm):
    tokenizer = default_llm.get_tokenizer()
    messages = [{"role": "user", "content": "What is 2+2?"}]
    out = default_llm.chat(messages, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0]
    expected_prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert out.prompt_token_ids == list(expected_prompt)
    assert "<|im_start|>assistant" in tokenizer.decode(out.prompt_token_ids)
    assert out.outputs[0].text.strip()


def test_gguf_weights_equal_transformers_gguf_loader(default_hf_dir):
    """Our GGUF dequantization (with the q/k un-permutation) equals transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM

    from pdserve.models.loader import default_model_path, iter_safetensors

    path = default_model_path()
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = theirs.state_dict()
    ours = dict(iter_safetensors(default_hf_dir))
    assert set(ours) <= set(state)
    for name, tensor in ours.items():
        assert torch.equal(tensor, state[name]), name
