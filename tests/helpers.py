"""Shared test helpers: tiny random HF checkpoints and greedy comparison with a near-tie rule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

# Two greedy runs may pick different tokens only where the reference's top two
# logits are within this (absolute, fp32 logits) of each other.
NEAR_TIE = 2e-3


def make_tiny_model(path: Path, kind: str, seed: int = 0) -> Path:
    """Save a tiny random-weight HF checkpoint (safetensors + config.json) under `path`."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        eos_token_id=0,
        bos_token_id=1,
    )
    if kind == "llama":
        cfg, cls = LlamaConfig(**common, tie_word_embeddings=False), LlamaForCausalLM
    elif kind == "llama-tied":
        cfg, cls = LlamaConfig(**common, tie_word_embeddings=True), LlamaForCausalLM
    elif kind == "llama3-rope":
        cfg, cls = (
            LlamaConfig(
                **common,
                tie_word_embeddings=False,
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
            LlamaForCausalLM,
        )
    elif kind == "qwen2":
        cfg, cls = Qwen2Config(**common, tie_word_embeddings=False), Qwen2ForCausalLM
    elif kind == "mistral":
        cfg, cls = MistralConfig(**common, tie_word_embeddings=False, sliding_window=None), MistralForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg).float()
    with torch.no_grad():  # HF zero-initialises biases; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


@dataclass
class Divergence:
    index: int
    ours: int
    reference: int
    gap: float


def reference_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0, -1].float()


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy continuation by HF transformers over its own KV cache, EOS ignored.

    (generate(min_new_tokens=...) would suppress EOS logits, which is not plain greedy.)
    """
    tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def assert_greedy_equal(
    ours: list[int], expected: list[int], prompt: list[int], oracle: torch.nn.Module, what: str = ""
) -> Divergence | None:
    """Token-for-token equality, except at a genuine near-tie of the oracle's top two logits.

    At the first differing position the oracle (an HF model) scores prompt +
    the common prefix; the two tokens must be its top two, within NEAR_TIE.
    Tokens after an accepted divergence are not compared (the contexts differ).
    """
    assert len(ours) == len(expected), f"{what}: {len(ours)} tokens vs {len(expected)}"
    for i, (a, b) in enumerate(zip(ours, expected)):
        if a == b:
            continue
        logits = reference_logits(oracle, prompt + ours[:i])
        top2 = logits.topk(2)
        gap = float(top2.values[0] - top2.values[1])
        assert {a, b} == set(top2.indices.tolist()) and gap < NEAR_TIE, (
            f"{what}: token {i} differs ({a} vs {b}) and it is not a near-tie: "
            f"oracle top-2 {top2.indices.tolist()} gap {gap:.3g} (tolerance {NEAR_TIE})"
        )
        return Divergence(i, a, b, gap)
    return None


def require_module(name: str) -> Any:
    """Import `name`, or skip the test where it is not installed; under CI=true a missing module fails."""
    import importlib
    import os

    if os.environ.get("CI") == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name)


def make_tiny_chat_model(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random-weight Llama (4 heads, 2 KV heads: TP=2 divides it) with the tokenizer of
    `tokenizer_dir` (the default model's), so that `pdserve serve` can run it over HTTP."""
    import json
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).float().save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path
