"""OpenAI tool calling for models that write Hermes/Qwen-style calls:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Validates `tools`/`tool_choice`, builds the structural-tag grammar that forces calls for tool_choice
"required" or a named function (xgrammar compiles it), writes the system prompt for chat templates that do
not render tools, and parses calls out of finished and streamed text. Pure logic: it knows nothing about
HTTP, the engine or tokens; a call that does not parse stays in the content as text, so parsing never raises.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import xgrammar

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
CALL_END = "}\n" + CALL_CLOSE  # closes the outer {"name": ..., "arguments": {...}} object, then the block
CALL_SEPARATOR = "\n"  # between parallel calls in a forced output
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
BLOCK_RE = re.compile(re.escape(CALL_OPEN) + "(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \S+: ")  # "[00:41:49] /project/cpp/json_schema_converter.cc:5082: "


def check_tools(tools: list[dict] | None, tool_choice: str | dict | None, parallel_tool_calls: bool | None) -> None:
    """Raise ValueError naming the field and the fix when `tools`, `tool_choice` or `parallel_tool_calls` is invalid."""
    names: set[str] = set()
    for i, tool in enumerate(tools or []):
        _check_tool(tool, f"tools[{i}]", names)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ValueError(f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}")
    if tool_choice is None or tool_choice in ("none", "auto"):
        return
    if tool_choice == "required":
        if not names:
            raise ValueError('tool_choice "required" needs at least one function in tools; add tools or use "auto"')
        return
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError(
            f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}, '
            f"got {json.dumps(tool_choice)}"
        )
    if not names:
        raise ValueError(f"tool_choice names function {name!r} but no tools were given; add it to tools")
    if name not in names:
        raise ValueError(
            f"tool_choice names function {name!r}, which is not in tools ({', '.join(sorted(names))}); "
            "name one of those or add it to tools"
        )


def _check_tool(tool: Any, where: str, names: set[str]) -> None:
    """Check one entry of `tools`, adding its function name to `names`."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else tool
        raise ValueError(f'{where}.type must be "function", got {json.dumps(kind)}; only function tools are supported')
    function = tool.get("function")
    if not isinstance(function, dict):
        function = {}
    name = function.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(
            f"{where}.function.name must be 1-64 letters, digits, underscores or dashes, got {json.dumps(name)}"
        )
    if name in names:
        raise ValueError(f"{where}.function.name {name!r} is used by an earlier tool; give each function its own name")
    names.add(name)
    params = function.get("parameters")
    if params is None:
        return
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise ValueError(
            f'{where}.function.parameters must be a JSON schema of an object ({{"type": "object", ...}}), '
            f"got {json.dumps(params)[:200]}"
        )
    try:
        xgrammar.Grammar.from_json_schema(json.dumps(params))
    except Exception as e:
        reason = XGRAMMAR_LOG_PREFIX.sub("", str(e)).strip()
        raise ValueError(f"{where}.function.parameters is not a usable JSON schema: {reason}") from e


def tool_call_grammar(
    tools: list[dict] | None, tool_choice: str | dict | None, parallel_tool_calls: bool | None
) -> str | None:
    """The structural tag (JSON) forcing tool calls from the first token, or None; expects checked arguments."""
    if not tools or tool_choice is None or tool_choice in ("none", "auto"):
        return None
    functions = [tool["function"] for tool in tools]
    if isinstance(tool_choice, dict):
        functions = [f for f in functions if f["name"] == tool_choice["function"]["name"]]
    # NOTE: tags_with_separator admits no text outside the calls, unlike triggered_tags; parallel_tool_calls
    # defaults to true as in OpenAI's API, and a named tool_choice always gets exactly one call.
    single = isinstance(tool_choice, dict) or parallel_tool_calls is False
    tags = [
        {
            "type": "tag",
            "begin": _call_begin(f["name"]),
            "content": {
                "type": "json_schema",
                "json_schema": f.get("parameters") or {"type": "object"},
                "max_whitespace_cnt": 1,  # small models otherwise pad the arguments with whitespace
            },
            "end": CALL_END,
        }
        for f in functions
    ]
    fmt = {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": CALL_SEPARATOR,
        "at_least_one": True,
        "stop_after_first": single,
    }
    return json.dumps({"type": "structural_tag", "format": fmt})


def _call_begin(name: str) -> str:
    """The text of a call up to its arguments object: `<tool_call>\\n{"name": "NAME", "arguments": `."""
    return f'{CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '


def tool_system_prompt(tools: list[dict]) -> str:
    """Return Hermes-style system prompt text listing the functions and how to call them."""
    signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\n"
        "You can call functions to help with the user's request. "
        "The functions you may call are described as JSON inside <tools></tools>:\n"
        f"<tools>\n{signatures}\n</tools>\n\n"
        "To call a function, answer with its name and a JSON object of arguments inside <tool_call></tool_call>, "
        "one block per call:\n"
        f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <arguments-json-object>}}\n{CALL_CLOSE}'
    )


def template_renders_tools(chat_template: str | None) -> bool:
    """Return whether a chat template's source mentions `tools` (so it renders them itself)."""
    return chat_template is not None and re.search(r"\btools\b", chat_template) is not None


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Split a finished completion into content (None if empty) and OpenAI tool calls."""
    pieces: list[str] = []
    calls: list[dict] = []
    pos = 0
    for m in BLOCK_RE.finditer(text):
        pieces.append(text[pos : m.start()])
        function = _parse_block(m.group(1))
        if function is None:
            pieces.append(m.group(0))
        else:
            calls.append({"id": _call_id(), "type": "function", "function": function})
        pos = m.end()
    pieces.append(text[pos:])
    return "".join(pieces).strip() or None, calls


def _parse_block(body: str) -> dict | None:
    """Parse the JSON inside one <tool_call> block into {"name", "arguments"}; None if it is not a call."""
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    elif not isinstance(arguments, str):
        return None
    return {"name": call["name"], "arguments": arguments}


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallStream:
    """Incremental `parse_tool_calls` for one streamed completion.

    The concatenated content of all feed()/finish() results equals parse_tool_calls' content on the whole
    text ("" for None): text that may begin `<tool_call>` is held until disambiguated, whitespace before the
    first content is dropped, and a whitespace run is held until more content follows (so trailing and
    between-call whitespace never reaches the client on its own).
    """

    def __init__(self) -> None:
        self._buffer = ""  # text not yet classified: a partial CALL_OPEN, or the body of an open block
        self._in_call = False  # the buffer follows a CALL_OPEN whose CALL_CLOSE has not arrived
        self._pending_space = ""  # whitespace held until more content follows
        self._has_content = False
        self._num_calls = 0

    @property
    def called(self) -> bool:
        """Whether any tool call has been emitted."""
        return self._num_calls > 0

    def feed(self, delta_text: str) -> tuple[str, list[dict]]:
        """Add generated text; return (content safe to emit now, tool-call deltas completed by it)."""
        self._buffer += delta_text
        content: list[str] = []
        calls: list[dict] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(CALL_OPEN)
                if start < 0:
                    keep = _partial_open_len(self._buffer)
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(CALL_OPEN) :]
                self._in_call = True
            else:
                end = self._buffer.find(CALL_CLOSE)
                if end < 0:
                    break
                body = self._buffer[:end]
                self._buffer = self._buffer[end + len(CALL_CLOSE) :]
                self._in_call = False
                function = _parse_block(body)
                if function is None:
                    content.append(CALL_OPEN + body + CALL_CLOSE)
                    continue
                calls.append({"index": self._num_calls, "id": _call_id(), "type": "function", "function": function})
                self._num_calls += 1
        return self._release("".join(content)), calls

    def finish(self) -> tuple[str, list[dict]]:
        """Flush at end of stream: a held tag prefix or an unterminated block is returned as content."""
        tail = CALL_OPEN + self._buffer if self._in_call else self._buffer
        self._buffer, self._in_call = "", False
        return self._release(tail), []

    def _release(self, text: str) -> str:
        """Content to emit now out of `text`, holding back leading and trailing whitespace."""
        text = self._pending_space + text
        if not self._has_content:
            text = text.lstrip()
        body = text.rstrip()
        self._pending_space = text[len(body) :]
        self._has_content = self._has_content or bool(body)
        return body


def _partial_open_len(text: str) -> int:
    """Length of the longest proper prefix of CALL_OPEN that `text` ends with."""
    for size in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(CALL_OPEN[:size]):
            return size
    return 0
