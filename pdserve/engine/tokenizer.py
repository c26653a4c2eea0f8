"""Tokenizer loading and incremental detokenization with stop strings."""

from __future__ import annotations

import logging
from typing import Any

from pdserve.models.loader import ModelSource

logger = logging.getLogger(__name__)


def load_tokenizer(source: ModelSource) -> Any | None:
    """The HF tokenizer of `source`, or None where there is none (dummy weights, bare checkpoints)."""
    directory = source.hf_dir
    if directory is None:
        return None
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        if source.kind != "dummy":
            logger.warning("%s has no tokenizer; only token-id prompts will work and outputs have no text", directory)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


class Detokenizer:
    """Turns one request's output token ids into text, a delta at a time.

    Holds back bytes of an incomplete UTF-8 character. With stop strings, it
    truncates the text before the first match and reports which one matched,
    and holds back the last (longest stop - 1) characters from the deltas it
    returns, so a streamed delta never shows part of a stop string; `flush`
    returns what was held back once the request ends.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted = 0
        self._holdback = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def append(self, token_ids: list[int]) -> str:
        """Add tokens; return the new text that is safe to show. After a stop string matched, returns ''."""
        if self.stop_reason is not None:
            return ""
        self.token_ids.extend(token_ids)
        if self.tokenizer is None:
            return ""
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        start = len(self.text)
        self.text += delta
        if self.stop:
            self._match_stop(start)
        if self.stop_reason is not None:
            return self.flush()
        return self._emit(len(self.text) - self._holdback)

    def flush(self) -> str:
        """The text not yet returned (call when the request has finished)."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta, self._emitted = self.text[self._emitted : end], end
        return delta

    def _match_stop(self, delta_start: int) -> None:
        longest = max(len(s) for s in self.stop)
        window_start = max(0, delta_start - longest + 1)
        hits = [(self.text.find(s, window_start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index, stop = min(hits)
            self.text = self.text[:index]
            self.stop_reason = stop
