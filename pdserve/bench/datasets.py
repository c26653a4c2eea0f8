"""Text prompts of exact token lengths for `pdserve bench serve`: random, shared-prefix, multi-turn.

Prompts are TEXT, not token ids, so the same workload can be sent to any
OpenAI-compatible server (token-id prompts do not exist for chat). A tokenizer
only sizes them: each prompt is random vocabulary words, re-encoded and trimmed
until it has exactly the requested number of tokens (no special tokens
counted). This module knows nothing about HTTP or servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DATASETS = ("random", "shared-prefix", "multi-turn")
_MIN_POOL = 1000  # fewer clean words than this: fall back to space-joined words
_FIT_ATTEMPTS = 12


@dataclass(frozen=True)
class Turn:
    """One user message (the whole prompt for single-turn datasets) and the tokens to generate for it."""

    text: str
    input_len: int  # tokens of `text` under the client tokenizer, special tokens excluded
    output_len: int


@dataclass(frozen=True)
class Conversation:
    """Turns sent one after another; each later turn carries the earlier turns and the server's answers."""

    turns: tuple[Turn, ...]

    @property
    def is_multi_turn(self) -> bool:
        return len(self.turns) > 1


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "random"
    num_prompts: int = 100  # conversations for multi-turn
    input_len: int = 256  # per prompt; per user message for multi-turn
    output_len: int = 128
    range_ratio: float = 0.0  # lengths uniform in [len * (1 - r), len * (1 + r)]
    prefix_len: int | None = None  # shared-prefix: tokens of the common prefix (default input_len // 2)
    num_turns: int = 3  # multi-turn
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.name!r}")
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(
                f"--input-len and --output-len must be at least 1, got {self.input_len} and {self.output_len}"
            )
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got {self.range_ratio}")
        if self.num_turns < 1:
            raise ValueError(f"--num-turns must be at least 1, got {self.num_turns}")
        if self.name == "shared-prefix" and not 0 <= self.shared_prefix_len < self.input_len:
            raise ValueError(
                f"--prefix-len ({self.shared_prefix_len}) must be in [0, --input-len) "
                f"(= [0, {self.input_len})) so every prompt keeps a unique suffix"
            )

    @property
    def shared_prefix_len(self) -> int:
        return self.input_len // 2 if self.prefix_len is None else self.prefix_len


def load_tokenizer(name_or_path: str | None) -> Any:
    """An HF tokenizer; None: the tokenizer of pdserve's default model (converted on first use)."""
    from transformers import AutoTokenizer

    if name_or_path is None:
        from pdserve.config import ModelConfig
        from pdserve.models.loader import ensure_converted, resolve_model

        source = resolve_model(ModelConfig())
        ensure_converted(source)
        if source.hf_dir is None:
            raise ValueError("pdserve's default model has no HF tokenizer directory; pass --tokenizer PATH")
        name_or_path = str(source.hf_dir)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load tokenizer {name_or_path!r} ({e}); pass --tokenizer with an HF "
            "tokenizer directory (the served model's, for exact lengths)"
        ) from e


def num_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


class PromptMaker:
    """Random-word texts of an exact token count under one tokenizer, from one seeded generator."""

    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(seed)
        self.words, self.sep = word_pool(tokenizer)

    def _words(self, n: int) -> str:
        picks = self.rng.integers(0, len(self.words), size=max(n, 1))
        return self.sep.join(self.words[i] for i in picks)

    def text(self, num_tokens: int, head: str = "") -> str:
        """`head` + random words, exactly len(encode(head)) + num_tokens tokens when the tokenizer allows.

        Trimming cuts at a token boundary, so after a few rounds a near miss is kept: callers
        record the measured length, never assume it.
        """
        head_len = len(self._encode(head)) if head else 0
        target = head_len + num_tokens
        text = head + (self.sep if head else "") + self._words(num_tokens)
        for _ in range(_FIT_ATTEMPTS):
            ids = self._encode(text)
            if len(ids) == target:
                break
            if len(ids) > target:  # cut the tail only, so the text keeps starting with `head`
                text = head + self.tokenizer.decode(ids[head_len:target], clean_up_tokenization_spaces=False)
            else:
                text += self.sep + self._words(target - len(ids))
        return text

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def length(self, base: int, ratio: float) -> int:
        """A length uniform in [base * (1 - ratio), base * (1 + ratio)], at least 1."""
        if ratio == 0.0:
            return base
        low, high = max(1, int(base * (1 - ratio))), max(1, int(base * (1 + ratio)))
        return int(self.rng.integers(low, high, endpoint=True))


def word_pool(tokenizer: Any) -> tuple[list[str], str]:
    """(words, separator): single-token ASCII words, sorted so a seed gives the same prompts every run.

    Byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen): tokens that decode to ' word' join with ''
    and re-encode to one token each. Otherwise (SentencePiece): alphabetic tokens joined by ' '.
    """
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer)) if i not in special])
    spaced = sorted({t for t in texts if t.startswith(" ") and _is_word(t[1:])})
    if len(spaced) >= _MIN_POOL:
        return spaced, ""
    plain = sorted({t.strip() for t in texts if _is_word(t.strip())})
    if len(plain) < 10:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has only {len(plain)} alphabetic tokens; "
            "pass a text tokenizer with --tokenizer"
        )
    return plain, " "


def _is_word(s: str) -> bool:
    return len(s) >= 2 and s.isascii() and s.isalpha()


def build_dataset(config: DatasetConfig, tokenizer: Any) -> list[Conversation]:
    """`config.num_prompts` conversations (one turn each unless multi-turn), reproducible from the seed."""
    maker = PromptMaker(tokenizer, config.seed)
    if config.name == "random":
        return [_single(maker, "", config.input_len, config) for _ in range(config.num_prompts)]
    if config.name == "shared-prefix":
        prefix_len = config.shared_prefix_len
        prefix = maker.text(prefix_len) if prefix_len else ""
        suffix_len = config.input_len - prefix_len
        return [_single(maker, prefix, suffix_len, config) for _ in range(config.num_prompts)]
    return [
        Conversation(tuple(_turn(maker, "", config.input_len, config) for _ in range(config.num_turns)))
        for _ in range(config.num_prompts)
    ]


def _single(maker: PromptMaker, head: str, new_len: int, config: DatasetConfig) -> Conversation:
    return Conversation((_turn(maker, head, new_len, config),))


def _turn(maker: PromptMaker, head: str, new_len: int, config: DatasetConfig) -> Turn:
    text = maker.text(maker.length(new_len, config.range_ratio), head)
    output_len = maker.length(config.output_len, config.range_ratio)
    return Turn(text, num_tokens(maker.tokenizer, text), output_len)


def dataset_stats(conversations: Sequence[Conversation]) -> dict[str, Any]:
    """Client-side counts: user-message tokens (server-side prompts add templates and history)."""
    turns = [t for c in conversations for t in c.turns]
    in_lens, out_lens = [t.input_len for t in turns], [t.output_len for t in turns]
    return {
        "num_conversations": len(conversations),
        "num_requests": len(turns),
        "total_input_tokens": sum(in_lens),
        "total_output_tokens": sum(out_lens),
        "min_input_len": min(in_lens),
        "max_input_len": max(in_lens),
        "mean_input_len": round(sum(in_lens) / len(turns), 2),
        "min_output_len": min(out_lens),
        "max_output_len": max(out_lens),
        "mean_output_len": round(sum(out_lens) / len(turns), 2),
    }
