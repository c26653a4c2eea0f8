"""Pieces every part of `pdserve bench gpu` shares: rounding, the model's shape and limits, its engines and prompts."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from pdserve.bench.common import MIN_RANDOM_TOKEN_ID, random_requests
from pdserve.bench.gpu.config import LEN_MARGIN, GpuBenchConfig


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def ratio_of(a: float | None, b: float | None, digits: int = 4) -> float | None:
    return None if a is None or not b else round(a / b, digits)


def timing_stats(seconds: Sequence[float]) -> dict[str, Any]:
    return {
        "seconds_best": rounded(min(seconds), 7),
        "seconds_median": rounded(statistics.median(seconds), 7),
        "seconds_mean": rounded(statistics.fmean(seconds), 7),
        "repeats": len(seconds),
    }


def model_limit(arch: Any) -> int:
    """The longest sequence the engine accepts for this shape (as resolve_max_model_len)."""
    limit = int(arch.max_position_embeddings)
    return min(limit, arch.sliding_window) if arch.sliding_window else limit


def clamp_lens(lens: Sequence[int], limit: int, what: str) -> tuple[list[int], str | None]:
    """Each length at most `limit` - LEN_MARGIN, duplicates dropped; a note when any was clamped."""
    top = limit - LEN_MARGIN
    if top < 1:
        raise ValueError(f"the model accepts {limit} tokens, too few for {what}")
    used = list(dict.fromkeys(min(n, top) for n in lens))
    note = (
        None
        if used == list(lens)
        else (
            f"{what} {list(lens)} clamped to {used}: the model accepts {limit} "
            f"tokens and {LEN_MARGIN} are kept for generated tokens"
        )
    )
    return used, note


def model_facts(config: GpuBenchConfig) -> tuple[Any, dict[str, Any]]:
    """(arch, the model's shape for the JSON)."""
    from pdserve.config import ModelConfig
    from pdserve.engine.core import DTYPE_SIZES
    from pdserve.models.loader import load_arch, resolve_model

    source = resolve_model(ModelConfig(model=config.model, load_format=config.load_format, dtype=config.dtype))
    arch = load_arch(source)
    dtype_size = DTYPE_SIZES[config.dtype]
    shape = {k: v for k, v in asdict(arch).items() if k not in ("eos_token_ids", "bos_token_id")}
    return arch, {
        "name": source.name,
        "load_format": config.load_format,
        "dtype": config.dtype,
        "dtype_bytes": dtype_size,
        "arch": shape,
        "kv_bytes_per_token": arch.kv_bytes_per_token(dtype_size),
        "kv_bytes_per_block": arch.kv_bytes_per_token(dtype_size) * config.block_size,
        "block_size": config.block_size,
        "max_len": model_limit(arch),
    }


def make_engine(config: GpuBenchConfig, device: str, **kwargs: Any) -> Any:
    from pdserve.config import make_engine_config
    from pdserve.engine.core import EngineCore

    return EngineCore(
        make_engine_config(
            config.model,
            dtype=config.dtype,
            load_format=config.load_format,
            device=device,
            block_size=config.block_size,
            seed=config.seed,
            **kwargs,
        )
    )


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`count` seeded random prompts of `length` token ids (no shared prefix between them)."""
    requests = random_requests(
        count, (length, length), (1, 1), vocab_size, seed, min_token_id=min(MIN_RANDOM_TOKEN_ID, vocab_size // 2)
    )
    return [r.prompt_token_ids for r in requests]


def greedy(max_tokens: int) -> Any:
    from pdserve.request import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def num_blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def weight_params(arch: Any) -> dict[str, int]:
    """Parameters of the shape, by where they are read: every layer's, the input embedding table, the LM
    head (none when tied to the embedding), the final norm."""
    h, hd, heads, kv_heads, inter = (
        arch.hidden_size,
        arch.head_dim,
        arch.num_heads,
        arch.num_kv_heads,
        arch.intermediate_size,
    )
    attention = h * heads * hd + 2 * h * kv_heads * hd + heads * hd * h
    attention += (heads * hd + 2 * kv_heads * hd if arch.qkv_bias else 0) + (h if arch.o_bias else 0)
    mlp = 3 * h * inter + (2 * inter + h if arch.mlp_bias else 0)
    layers = arch.num_layers * (attention + mlp + 2 * h)
    embedding = arch.vocab_size * h
    head = 0 if arch.tie_word_embeddings else arch.vocab_size * h
    return {
        "layers": layers,
        "embedding": embedding,
        "lm_head": head,
        "final_norm": h,
        "total": layers + embedding + head + h,
    }
