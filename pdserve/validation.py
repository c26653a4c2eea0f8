"""Prompt checks shared by the API server and the engine core. Pure Python: no torch, no tokenizer.

It knows token ids, the context length and the vocabulary size, nothing else; how a failure reaches a user
(an HTTP 400, a ValueError from `LLM.generate`) is the caller's business.
"""

from __future__ import annotations

from collections.abc import Sequence


class PromptTooLongError(ValueError):
    """The prompt leaves no position to generate into: num_tokens >= max_model_len."""

    def __init__(self, num_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"the prompt has {num_tokens} tokens; this model accepts at most "
            f"{max_model_len - 1} prompt tokens (max_model_len {max_model_len}, one left to generate); "
            "shorten the prompt or raise --max-model-len"
        )
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len


def validate_prompt_token_ids(token_ids: Sequence[int], max_model_len: int, vocab_size: int) -> None:
    """Raise ValueError naming the problem and the fix; return None for a prompt the engine can run.

    Checks in this order, the first failure wins: empty; len(token_ids) >= max_model_len (PromptTooLongError,
    a ValueError carrying num_tokens and max_model_len); the first id that is not an int in [0, vocab_size).
    Reads `token_ids` only.
    """
    if not token_ids:
        raise ValueError("the prompt is empty; give at least one token")
    if len(token_ids) >= max_model_len:
        raise PromptTooLongError(len(token_ids), max_model_len)
    for token_id in token_ids:
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ValueError(f"token id {token_id!r} is outside the vocabulary [0, {vocab_size})")
