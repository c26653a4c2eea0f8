"""validate_prompt_token_ids: the prompt checks the API server and the engine core share (pure Python)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdserve.validation import PromptTooLongError, validate_prompt_token_ids

MAX_MODEL_LEN = 64
VOCAB = 100


@pytest.mark.parametrize("token_ids", [[0], [VOCAB - 1], [5] * (MAX_MODEL_LEN - 1), (1, 2, 3)])
def test_valid_prompts_pass(token_ids: list[int]) -> None:
    assert validate_prompt_token_ids(token_ids, MAX_MODEL_LEN, VOCAB) is None


@pytest.mark.parametrize("token_ids", [[], ()])
def test_empty_prompt(token_ids: list[int]) -> None:
    with pytest.raises(ValueError) as info:
        validate_prompt_token_ids(token_ids, MAX_MODEL_LEN, VOCAB)
    assert type(info.value) is ValueError
    assert str(info.value) == "the prompt is empty; give at least one token"


@pytest.mark.parametrize("num_tokens", [MAX_MODEL_LEN, MAX_MODEL_LEN + 1, 9000])
def test_prompt_too_long(num_tokens: int) -> None:
    with pytest.raises(PromptTooLongError) as info:
        validate_prompt_token_ids([7] * num_tokens, MAX_MODEL_LEN, VOCAB)
    assert isinstance(info.value, ValueError)
    assert (info.value.num_tokens, info.value.max_model_len) == (num_tokens, MAX_MODEL_LEN)
    assert str(info.value) == (
        f"the prompt has {num_tokens} tokens; this model accepts at most 63 prompt tokens "
        "(max_model_len 64, one left to generate); shorten the prompt or raise --max-model-len"
    )


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1000, -1])
def test_token_id_outside_the_vocabulary(bad: int) -> None:
    with pytest.raises(ValueError) as info:
        validate_prompt_token_ids([1, 2, bad, 3, VOCAB + 7], MAX_MODEL_LEN, VOCAB)
    assert type(info.value) is ValueError
    assert str(info.value) == f"token id {bad} is outside the vocabulary [0, {VOCAB})"  # the first bad id


@pytest.mark.parametrize("bad", [1.0, "3", None])
def test_token_id_that_is_not_an_int(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        validate_prompt_token_ids([1, bad], MAX_MODEL_LEN, VOCAB)  # type: ignore[list-item]
    assert str(info.value) == f"token id {bad!r} is outside the vocabulary [0, {VOCAB})"


def test_length_is_checked_before_the_vocabulary() -> None:
    with pytest.raises(PromptTooLongError):
        validate_prompt_token_ids([VOCAB] * MAX_MODEL_LEN, MAX_MODEL_LEN, VOCAB)


def test_imports_only_the_standard_library() -> None:
    """Beyond the package root (which the module does not choose), only standard-library modules."""
    code = (
        "import json, sys, pdserve; before = set(sys.modules); import pdserve.validation; "
        "print(json.dumps(sorted(m for m in set(sys.modules) - before if not m.startswith('pdserve'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = json.loads(out.stdout)
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in loaded), loaded
