"""Logprobs in OpenAI's shapes (legacy completions, chat) and vLLM's prompt_logprobs; `decode` gives a token's text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdserve.messages import PromptLogprob

Entries = list[list[tuple[int, float]]]  # per token: (the token, its logprob), then the top k


def completion(
    decode: Callable[[int], str], entries: Entries, prompt: tuple[list[int], list[PromptLogprob]] | None = None
) -> dict[str, Any] | None:
    """OpenAI's legacy logprobs; with `prompt` (echo: its token ids and their scores) the prompt's tokens come
    first, the very first with a null logprob."""
    if not entries and prompt is None:
        return None
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    if prompt is not None:
        ids, scores = prompt
        tokens += [decode(t) for t in ids]
        token_logprobs += [None, *(s.logprob for s in scores)]
        top_logprobs += [None, *({decode(t): lp for t, lp in s.top} for s in scores)]
    tokens += [decode(e[0][0]) for e in entries]
    token_logprobs += [e[0][1] for e in entries]
    top_logprobs += [{decode(t): lp for t, lp in e[1:]} for e in entries]
    offsets = [0]
    for token in tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def chat(decode: Callable[[int], str], entries: Entries) -> dict[str, Any] | None:
    """Chat's logprobs: each token with its text, bytes and the top k."""
    if not entries:
        return None
    return {
        "content": [
            {
                "token": decode(e[0][0]),
                "logprob": e[0][1],
                "bytes": list(decode(e[0][0]).encode()),
                "top_logprobs": [
                    {"token": decode(t), "logprob": lp, "bytes": list(decode(t).encode())} for t, lp in e[1:]
                ],
            }
            for e in entries
        ]
    }


def prompt_scores(
    decode: Callable[[int], str], ids: list[int], scores: list[PromptLogprob]
) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first null) its logprob, rank and text, and the top k."""
    out: list[dict[str, Any] | None] = [None]
    for token_id, s in zip(ids[1:], scores):
        entry = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": decode(t)} for r, (t, lp) in enumerate(s.top)}
        entry[str(token_id)] = {"logprob": s.logprob, "rank": s.rank, "decoded_token": decode(token_id)}
        out.append(entry)
    return out
