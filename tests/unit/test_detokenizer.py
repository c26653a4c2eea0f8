"""Detokenizer with the default model's real tokenizer: incremental deltas and stop strings."""

from __future__ import annotations

from typing import Any

import pytest

from pdserve.engine.tokenizer import Detokenizer

TEXTS = [
    "Hello, world! How are you?",
    "I love 🍕 and 🎉🎉 parties 👩‍👩‍👧",
    "日本語のテキストです。中文也可以。",
    "Don't stop , he said . Isn't it ?",
    "naïve café — “quotes” ½ ∑ x² ",
    "  leading   spaces\n\nnewlines\ttabs",
    "Ünïcödé ẞ 😀😃😄 한국어",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from pdserve.config import ModelConfig
    from pdserve.models.loader import ensure_converted, resolve_model

    src = resolve_model(ModelConfig())
    ensure_converted(src)
    return AutoTokenizer.from_pretrained(str(src.hf_dir))


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_one_token_at_a_time_concatenate_to_decode(tokenizer: Any, text: str) -> None:
    ids = encode(tokenizer, text)
    detok = Detokenizer(tokenizer, [])
    deltas = [detok.append([token_id]) for token_id in ids]
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert expected == text
    assert "".join(deltas) == expected
    assert detok.text == expected
    assert detok.token_ids == ids
    assert detok.stop_reason is None
    assert all("\ufffd" not in delta for delta in deltas)


def test_multi_byte_characters_are_held_back_until_complete(tokenizer: Any) -> None:
    ids = encode(tokenizer, "a🍕")
    assert len(ids) >= 3  # 'a' and the emoji split over several byte tokens
    detok = Detokenizer(tokenizer, [])
    deltas = [detok.append([token_id]) for token_id in ids]
    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(ids) - 2)
    assert deltas[-1] == "🍕"


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_of_several_tokens_at_a_time(tokenizer: Any, text: str) -> None:
    ids = encode(tokenizer, text)
    detok = Detokenizer(tokenizer, [])
    deltas = [detok.append(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped(tokenizer: Any) -> None:
    ids = encode(tokenizer, "Hello")
    eos = tokenizer.eos_token_id
    stream = [*ids, eos, *encode(tokenizer, " world"), eos]
    detok = Detokenizer(tokenizer, [])
    deltas = [detok.append([t]) for t in stream]
    assert "".join(deltas) == "Hello world" == tokenizer.decode(stream, skip_special_tokens=True)
    assert detok.token_ids == stream


def test_no_tokenizer_keeps_ids_and_no_text() -> None:
    detok = Detokenizer(None, ["x"])
    assert detok.append([1, 2]) == ""
    assert detok.append([3]) == ""
    assert detok.token_ids == [1, 2, 3]
    assert detok.text == ""
    assert detok.stop_reason is None


# ---- stop strings -----------------------------------------------------------------


def run(tokenizer: Any, text: str, stop: list[str]) -> tuple[Detokenizer, list[str], list[int]]:
    ids = encode(tokenizer, text)
    detok = Detokenizer(tokenizer, stop)
    deltas = [detok.append([token_id]) for token_id in ids]
    return detok, deltas, ids


def test_stop_string_inside_one_token(tokenizer: Any) -> None:
    detok, deltas, ids = run(tokenizer, "Hello, world! How are you?", [" world"])
    assert detok.text == "Hello,"
    assert detok.stop_reason == " world"
    # the last len(" world") - 1 = 5 characters are held back until the match settles them
    assert deltas[:3] == ["", "H", "ello,"]
    assert deltas[3:] == [""] * (len(ids) - 3)  # nothing after the match
    assert detok.token_ids == ids[:3]  # tokens after the stop are not taken


def test_stop_string_spanning_two_tokens(tokenizer: Any) -> None:
    # ", w" starts in the ',' token and ends in the ' world' token
    detok, deltas, ids = run(tokenizer, "Hello, world! How are you?", [", w"])
    assert [tokenizer.decode([t]) for t in ids[:3]] == ["Hello", ",", " world"]
    assert detok.text == "Hello"
    assert detok.stop_reason == ", w"
    assert deltas[:3] == ["Hel", "l", "o"]  # ',' is held back (2 characters), then cut by the match
    assert detok.token_ids == ids[:3]


def test_stop_string_spanning_three_tokens(tokenizer: Any) -> None:
    detok, _, ids = run(tokenizer, "Hello, world! How are you?", ["o, wor"])
    assert detok.text == "Hell"
    assert detok.stop_reason == "o, wor"
    assert detok.token_ids == ids[:3]


def test_earliest_stop_string_wins(tokenizer: Any) -> None:
    detok, _, _ = run(tokenizer, "Hello, world! How are you?", ["are", "! How", "world"])
    assert detok.text == "Hello, "
    assert detok.stop_reason == "world"
    # both complete in the same delta: the one starting first wins
    detok, _, _ = run(tokenizer, "Hello, world! How are you?", ["orld", "world"])
    assert detok.text == "Hello, "
    assert detok.stop_reason == "world"


def test_stop_string_at_the_very_start(tokenizer: Any) -> None:
    detok, deltas, ids = run(tokenizer, "Hello, world!", ["Hel"])
    assert detok.text == ""
    assert detok.stop_reason == "Hel"
    assert deltas == [""] * len(ids)
    assert detok.token_ids == ids[:1]


def test_stop_string_never_matched(tokenizer: Any) -> None:
    text = "Hello, world! How are you?"
    detok, deltas, _ = run(tokenizer, text, ["xyz", "?!"])
    assert "".join(deltas) == text[:-2]  # held back: a stop string could still start there
    assert detok.text == "".join(deltas) + detok.flush() == text
    assert detok.stop_reason is None


def test_multi_byte_stop_strings(tokenizer: Any) -> None:
    detok, _, _ = run(tokenizer, "I love 🍕 and 🎉🎉 parties", ["🎉"])
    assert detok.text == "I love 🍕 and "
    assert detok.stop_reason == "🎉"
    detok, _, _ = run(tokenizer, "日本語のテキストです。中文也可以。", ["中文"])
    assert detok.text == "日本語のテキストです。"
    assert detok.stop_reason == "中文"


def test_append_after_stop_returns_nothing(tokenizer: Any) -> None:
    detok, _, _ = run(tokenizer, "Hello, world!", [","])
    assert detok.text == "Hello"
    held = list(detok.token_ids)
    assert detok.append(encode(tokenizer, " more text")) == ""
    assert detok.text == "Hello"
    assert detok.token_ids == held


def test_streamed_deltas_never_show_part_of_a_stop_string(tokenizer: Any) -> None:
    detok, deltas, _ = run(tokenizer, "Hello, world! How are you?", [", w"])
    assert detok.text == "Hello"
    assert "".join(deltas) == detok.text
