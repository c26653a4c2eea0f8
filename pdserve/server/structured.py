"""A request's structured-output fields as one grammar for the engine core (engine.grammar).

OpenAI's `response_format` (json_object, json_schema) and vLLM's `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` and `structured_outputs` all become one `GrammarSpec`. At most one may be
sent. Each is checked here with xgrammar's own parser, so a schema, regex or grammar it cannot take is a 400
with xgrammar's reason before the request reaches the engine.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.messages import GrammarSpec
from pdserve.server.protocol import SamplingFields


def grammar_of(body: SamplingFields) -> GrammarSpec | None:
    """The one grammar `body` asks for (None: free text); ValueError naming the field if it is wrong."""
    found: list[tuple[str, GrammarSpec]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", GrammarSpec("json_object")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise ValueError("response_format json_schema needs json_schema.schema")
        found.append(("response_format", _json_schema(rf.json_schema.json_schema, "response_format")))
    found += _vllm("guided_", body.guided_json, body.guided_regex, body.guided_choice, body.guided_grammar)
    so = body.structured_outputs
    if so is not None:
        found += _vllm("structured_outputs.", so.json_, so.regex, so.choice, so.grammar)
        if so.json_object:
            found.append(("structured_outputs.json_object", GrammarSpec("json_object")))
    if len(found) > 1:
        raise ValueError(f"send one structured-output constraint, not {', '.join(name for name, _ in found)}")
    if not found:
        return None
    name, spec = found[0]
    check(spec, name)
    return spec


def _vllm(
    prefix: str, schema: dict[str, Any] | str | None, regex: str | None, choice: list[str] | None, grammar: str | None
) -> list[tuple[str, GrammarSpec]]:
    """vLLM's constraints, as its older guided_* fields or its structured_outputs object name them."""
    found = []
    if schema is not None:
        found.append((f"{prefix}json", _json_schema(schema, f"{prefix}json")))
    if regex is not None:
        found.append((f"{prefix}regex", GrammarSpec("regex", regex)))
    if choice is not None:
        found.append((f"{prefix}choice", _choice(choice, f"{prefix}choice")))
    if grammar is not None:
        found.append((f"{prefix}grammar", GrammarSpec("grammar", grammar)))
    return found


def _json_schema(schema: dict[str, Any] | str, name: str) -> GrammarSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{name} must be a JSON schema (an object)")
    return GrammarSpec("json_schema", json.dumps(schema))


def _choice(choices: list[str], name: str) -> GrammarSpec:
    if not choices or any(not c for c in choices):
        raise ValueError(f"{name} needs at least one choice, none of them empty")
    return GrammarSpec("grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


def check(spec: GrammarSpec, name: str) -> None:
    """Parse the grammar with xgrammar (no tokenizer needed); ValueError with its reason."""
    import xgrammar as xgr

    try:
        if spec.kind == "json_schema":
            xgr.Grammar.from_json_schema(spec.text, any_whitespace=False, strict_mode=True)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.text)
        elif spec.kind == "grammar":
            xgr.Grammar.from_ebnf(spec.text)
        elif spec.kind == "structural_tag":
            xgr.Grammar.from_structural_tag(spec.text)
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError and its own types
        raise ValueError(f"{name} cannot be compiled: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    """xgrammar's message without its C++ source location prefix."""
    text = str(e).strip()
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
