"""The request fields contract (pdserve/server/protocol.py, docs/server.md "Request fields"): every unsupported
field is a 400 naming it, a null one is accepted, ignored fields are dropped, unknown fields are refused; and
docs/server.md's tables list exactly the code's fields. Checked on the pydantic models and over HTTP through the
API server's app with a stub engine client that is still loading (no model, no engine core): a body the
protocol takes reaches the engine check and is a 503 model_loading, one it refuses is a 400."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from pdserve.server.api import ServerSettings, build_app
from pdserve.server.protocol import (
    IGNORED_FIELDS,
    SAME_AS_PDSERVE,
    UNSUPPORTED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "server.md"

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"prompt": "hi"}
ENDPOINTS = [  # (model, minimal valid body, path)
    pytest.param(ChatCompletionRequest, CHAT, "/v1/chat/completions", id="chat"),
    pytest.param(CompletionRequest, COMPLETION, "/v1/completions", id="completions"),
]
IGNORED_VALUES = {
    "user": "user-1234",
    "metadata": {"team": "search"},
    "store": True,
    "service_tier": "auto",
    "prompt_cache_key": "k",
    "safety_identifier": "s",
}


def doc_table(heading: str) -> dict[str, str]:
    """docs/server.md's table under `heading`: first cell (a field name in backticks, unquoted) -> last cell."""
    lines = DOC.read_text().splitlines()
    start = lines.index(heading)
    rows: dict[str, str] = {}
    in_table = False
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("field", "---"):
            continue
        name = cells[0]
        assert name.startswith("`") and name.endswith("`"), f"{heading}: first cell {name!r} is not `a field`"
        assert name[1:-1] not in rows, f"{heading}: {name} is listed twice"
        rows[name[1:-1]] = cells[-1]
    assert rows, f"no table under {heading!r} in {DOC}"
    return rows


def refusal(model: type[BaseModel], body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return str(info.value)


# ---- the docs list exactly the code's fields -------------------------------------------------------------------


def test_doc_lists_exactly_the_unsupported_fields_with_their_reasons() -> None:
    assert doc_table("### Unsupported fields") == UNSUPPORTED_FIELDS


def test_doc_lists_exactly_the_ignored_fields() -> None:
    assert set(doc_table("### Ignored fields")) == IGNORED_FIELDS
    assert set(IGNORED_VALUES) == IGNORED_FIELDS


@pytest.mark.parametrize("model, body, path", ENDPOINTS)
def test_no_unsupported_field_is_a_declared_field(model: type[BaseModel], body: dict, path: str) -> None:
    """A declared field would be taken before the unsupported check ever saw it."""
    assert not set(UNSUPPORTED_FIELDS) & set(model.model_fields)


# ---- the pydantic models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_FIELDS))
@pytest.mark.parametrize("model, body, path", ENDPOINTS)
def test_unsupported_field_is_refused_naming_it(model: type[BaseModel], body: dict, path: str, field: str) -> None:
    message = refusal(model, {**body, field: _not_pdserves(field)})
    assert f"`{field}` is not supported by pdserve: {UNSUPPORTED_FIELDS[field]}" in message


def _not_pdserves(field: str) -> Any:
    """A value of `field` that asks for something pdserve does not do."""
    same = SAME_AS_PDSERVE.get(field)
    if isinstance(same, bool):
        return not same
    return 2 if same is not None else True


@pytest.mark.parametrize("value", [False, 0, "", [], {}, "x", 1.5])
@pytest.mark.parametrize("model, body, path", ENDPOINTS)
def test_any_non_null_value_is_refused(model: type[BaseModel], body: dict, path: str, value: Any) -> None:
    """Any value but the one that asks for what pdserve does anyway."""
    for field in ("best_of", "skip_special_tokens", "use_beam_search", "audio"):
        if (
            field in SAME_AS_PDSERVE
            and value == SAME_AS_PDSERVE[field]
            and isinstance(value, bool) == isinstance(SAME_AS_PDSERVE[field], bool)
        ):
            continue
        assert f"`{field}` is not supported by pdserve" in refusal(model, {**body, field: value})


@pytest.mark.parametrize("field", sorted(SAME_AS_PDSERVE))
@pytest.mark.parametrize("model, body, path", ENDPOINTS)
def test_pdserves_own_behaviour_is_accepted(model: type[BaseModel], body: dict, path: str, field: str) -> None:
    """vLLM clients send its defaults, such as `skip_special_tokens: true`: what pdserve does anyway."""
    assert field not in model.model_validate({**body, field: SAME_AS_PDSERVE[field]}).model_dump()


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_FIELDS))
@pytest.mark.parametrize("model, body, path", ENDPOINTS)
def test_null_unsupported_field_is_accepted(model: type[BaseModel], body: dict, path: str, field: str) -> None:
    assert field not in model.model_validate({**body, field: None}).model_dump()


@pytest.mark.parametrize("field", sorted(IGNORED_FIELDS))
@pytest.mark.parametrize("model, body, path", ENDPOINTS)
def test_ignored_field_is_accepted_and_dropped(model: type[BaseModel], body: dict, path: str, field: str) -> None:
    assert field not in model.model_validate({**body, field: IGNORED_VALUES[field]}).model_dump()


@pytest.mark.parametrize("model, body, path", ENDPOINTS)
def test_unknown_field_is_refused_naming_it(model: type[BaseModel], body: dict, path: str) -> None:
    message = refusal(model, {**body, "frobnicate": 1})
    assert "`frobnicate` is not a field pdserve knows; remove it" in message
    assert "`frobnicate`" in refusal(model, {**body, "frobnicate": None})  # a null does not excuse an unknown field


# ---- over HTTP -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http() -> TestClient:
    """The API server's app over a stub engine client that is still loading; the lifespan (which would start the
    client) does not run outside `with TestClient(...)`."""
    client = SimpleNamespace(
        config=SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=1)),
        failure=None,
        stall=None,
        is_ready=False,
        num_open_requests=0,
        info=None,
    )
    return TestClient(build_app(client, None, ServerSettings(model_name="m")), raise_server_exceptions=False)  # type: ignore[arg-type]


def assert_refused(http: TestClient, path: str, body: dict, fragment: str) -> None:
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert fragment in error["message"]


def assert_taken(http: TestClient, path: str, body: dict) -> None:
    """The protocol took the body: the request got as far as the engine check."""
    r = http.post(path, json=body)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "model_loading"


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_FIELDS))
@pytest.mark.parametrize("model, body, path", ENDPOINTS)
def test_http_unsupported_field(http: TestClient, model: type, body: dict, path: str, field: str) -> None:
    assert_refused(http, path, {**body, field: _not_pdserves(field)}, f"`{field}` is not supported by pdserve: ")
    assert_taken(http, path, {**body, field: None})


@pytest.mark.parametrize("model, body, path", ENDPOINTS)
def test_http_ignored_and_unknown_fields(http: TestClient, model: type, body: dict, path: str) -> None:
    assert_taken(http, path, {**body, **IGNORED_VALUES})
    assert_refused(http, path, {**body, "frobnicate": 1}, "`frobnicate` is not a field pdserve knows")
    assert_taken(http, path, body)
