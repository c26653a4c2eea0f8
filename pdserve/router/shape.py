"""The shape of an OpenAI request body, checked once by the router before the body goes to P and D.

Only the JSON types of the fields the router reads or both instances would refuse alike: a bad body is one 400
from the router instead of two requests that fail on P and D. Values (ranges, lengths, the context) are the
instances' to check. Unknown fields pass untouched. Pure: no I/O, nothing of the router's state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdserve.http.limits import json_type

MAX_TOKEN_ID = 2**31 - 1  # the instances' bound (pdserve.server.protocol.TokenId)
PROMPT_TYPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def body_shape_problem(body: Any, path: str) -> str | None:
    """What is wrong with the shape of `body` sent to `path` ('/v1/completions' or '/v1/chat/completions'), in a
    message naming the field; None if nothing is."""
    if not isinstance(body, dict):
        return f"the request body must be a JSON object, not {json_type(body)}"
    required = "messages" if path.endswith("/chat/completions") else "prompt"
    if required not in body:
        return f"{required} is required"
    for name, check in _CHECKS.items():
        problem = check(body[name]) if name in body else None
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _prompt_problem(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return None
    if not isinstance(prompt, list) or not prompt:
        return f"must be {PROMPT_TYPES}; got {'an empty array' if prompt == [] else json_type(prompt)}"
    if all(isinstance(p, str) for p in prompt):
        return None
    if all(isinstance(p, list) for p in prompt):
        return next((problem for p in prompt if (problem := _token_ids_problem(p)) is not None), None)
    return _token_ids_problem(prompt)


def _token_ids_problem(token_ids: list[Any]) -> str | None:
    if not token_ids:
        return "a list of token ids must not be empty"
    for i, t in enumerate(token_ids):
        if isinstance(t, bool) or not isinstance(t, int):
            return f"token id {i} is {json_type(t)}; token ids must be JSON integers"
        if not 0 <= t <= MAX_TOKEN_ID:
            return f"token id {i} is {t}; token ids are 0..{MAX_TOKEN_ID}"
    return None


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"must be a non-empty array of message objects; got {json_type(messages)}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is {json_type(m)}; each message must be an object"
    return None


def _optional_int_problem(value: Any) -> str | None:
    return None if value is None else _int_problem(value)


def _int_problem(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    return f"must be an integer; got {json_type(value)}"


def _bool_problem(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false; got {json_type(value)}"


_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "prompt": _prompt_problem,
    "messages": _messages_problem,
    "max_tokens": _optional_int_problem,
    "max_completion_tokens": _optional_int_problem,
    "n": _int_problem,
    "stream": _bool_problem,
}
