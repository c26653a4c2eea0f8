"""Tool calling: request checks, the forcing grammar (run through an xgrammar matcher over a byte-level
vocabulary), the system prompt, and parsing of finished and streamed text. No model, no downloads."""

from __future__ import annotations

import json
import random
import re

import pytest
import xgrammar

from pdserve.server.tools import (
    ToolCallStream,
    check_tools,
    parse_tool_calls,
    template_renders_tools,
    tool_call_grammar,
    tool_system_prompt,
)

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_PARAMS},
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters: any object
TOOLS = [WEATHER, CLOCK]
EOS = 256
ID_RE = re.compile(r"^call_[0-9a-f]{24}$")


def call_text(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


PARIS = call_text("get_weather", '{"city": "Paris"}')
NOW = call_text("get_time", "{}")


# ---- check_tools


def test_valid_requests_pass() -> None:
    for choice in (None, "none", "auto", "required", {"type": "function", "function": {"name": "get_time"}}):
        check_tools(TOOLS, choice, None)
    check_tools(None, None, None)
    check_tools(None, "auto", True)
    check_tools([], "none", False)


def with_function(**function: object) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", **function}}]


@pytest.mark.parametrize(
    "tools, tool_choice, parallel, message",
    [
        ([{"type": "code_interpreter"}], None, None, 'tools[0].type must be "function", got "code_interpreter"'),
        ([WEATHER, {"function": {"name": "g"}}], None, None, 'tools[1].type must be "function", got null'),
        ([{"type": "function", "function": {}}], None, None, "tools[0].function.name must be 1-64 letters"),
        (with_function(name="get weather"), None, None, "tools[0].function.name must be 1-64 letters, digits, under"),
        (with_function(name="f" * 65), None, None, "tools[0].function.name must be 1-64"),
        (with_function(parameters=[1]), None, None, "tools[0].function.parameters must be a JSON schema of an object"),
        (with_function(parameters={"type": "string"}), None, None, "parameters must be a JSON schema of an object"),
        (with_function(parameters={"type": "object", "properties": 3}), None, None, "properties must be an object"),
        (with_function(parameters={"$ref": "#/defs/x"}), None, None, "not a usable JSON schema: Cannot find field"),
        ([WEATHER, CLOCK, WEATHER], None, None, "tools[2].function.name 'get_weather' is used by an earlier tool"),
        (TOOLS, "any", None, 'tool_choice must be "none", "auto", "required" or {"type": "function"'),
        (TOOLS, {"type": "function", "name": "get_time"}, None, "tool_choice must be"),
        (TOOLS, {"type": "function", "function": {}}, None, "tool_choice must be"),
        (TOOLS, {"function": {"name": "get_time"}}, None, "tool_choice must be"),
        (TOOLS, {"type": "function", "function": {"name": "ls"}}, None, "'ls', which is not in tools (get_time, get_"),
        (None, "required", None, 'tool_choice "required" needs at least one function in tools'),
        ([], {"type": "function", "function": {"name": "f"}}, None, "'f' but no tools were given; add it to tools"),
        (TOOLS, "auto", "yes", "parallel_tool_calls must be true or false, got 'yes'"),
    ],
)
def test_invalid_requests_name_the_field(tools: list, tool_choice: object, parallel: object, message: str) -> None:
    with pytest.raises(ValueError) as e:
        check_tools(tools, tool_choice, parallel)  # type: ignore[arg-type]
    assert message in str(e.value)


def test_schema_error_drops_xgrammar_log_prefix() -> None:
    with pytest.raises(ValueError, match=r"schema: Unsupported type \"foo\"$"):
        check_tools(with_function(parameters={"type": "object", "properties": {"a": {"type": "foo"}}}), None, None)


# ---- tool_call_grammar


@pytest.fixture(scope="module")
def compiler() -> xgrammar.GrammarCompiler:
    info = xgrammar.TokenizerInfo([bytes([i]) for i in range(256)] + [b"<eos>"], stop_token_ids=[EOS])
    return xgrammar.GrammarCompiler(info)


def accepts(compiler: xgrammar.GrammarCompiler, structural_tag: str, text: str) -> bool:
    """Whether the grammar accepts `text` followed by end of sequence."""
    matcher = xgrammar.GrammarMatcher(compiler.compile_grammar(xgrammar.Grammar.from_structural_tag(structural_tag)))
    return matcher.accept_string(text) and matcher.accept_token(EOS)


@pytest.mark.parametrize("choice", [None, "none", "auto"])
def test_unforced_choices_have_no_grammar(choice: str | None) -> None:
    assert tool_call_grammar(TOOLS, choice, True) is None
    assert tool_call_grammar(None, "required", True) is None


def test_required_grammar_shape() -> None:
    st = json.loads(tool_call_grammar(TOOLS, "required", False))  # type: ignore[arg-type]
    fmt = st["format"]
    assert st["type"] == "structural_tag"
    assert (fmt["type"], fmt["separator"], fmt["at_least_one"], fmt["stop_after_first"]) == (
        "tags_with_separator",
        "\n",
        True,
        True,
    )
    assert [tag["begin"] for tag in fmt["tags"]] == [
        '<tool_call>\n{"name": "get_weather", "arguments": ',
        '<tool_call>\n{"name": "get_time", "arguments": ',
    ]
    assert [tag["content"]["json_schema"] for tag in fmt["tags"]] == [
        WEATHER_PARAMS,
        {"type": "object"},
    ]
    assert {tag["end"] for tag in fmt["tags"]} == {"}\n</tool_call>"}


def test_required_forces_a_call_from_the_first_character(compiler: xgrammar.GrammarCompiler) -> None:
    st = tool_call_grammar(TOOLS, "required", False)
    assert st is not None
    assert accepts(compiler, st, PARIS)
    assert accepts(compiler, st, NOW)
    assert accepts(compiler, st, call_text("get_time", '{"any": [1, 2]}'))
    assert not accepts(compiler, st, "Sure! " + PARIS)
    assert not accepts(compiler, st, "\n" + PARIS)
    assert not accepts(compiler, st, "")  # at least one call
    assert not accepts(compiler, st, call_text("get_weather", "{}"))  # city is required
    assert not accepts(compiler, st, call_text("get_weather", '{"city": 3}'))
    assert not accepts(compiler, st, call_text("search", "{}"))
    assert not accepts(compiler, st, PARIS + "\n" + NOW)  # parallel_tool_calls false: one call
    assert not accepts(compiler, st, PARIS + " done")


@pytest.mark.parametrize("parallel", [True, None])
def test_required_parallel_allows_calls_separated_by_newline(
    compiler: xgrammar.GrammarCompiler, parallel: bool
) -> None:
    st = tool_call_grammar(TOOLS, "required", parallel)
    assert st is not None
    assert accepts(compiler, st, PARIS)
    assert accepts(compiler, st, PARIS + "\n" + NOW + "\n" + PARIS)
    assert not accepts(compiler, st, PARIS + "\n\n" + NOW)
    assert not accepts(compiler, st, PARIS + "\n")
    assert not accepts(compiler, st, "ok\n" + PARIS)


def test_named_choice_forces_exactly_that_function(compiler: xgrammar.GrammarCompiler) -> None:
    st = tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, True)
    assert st is not None
    assert [tag["begin"] for tag in json.loads(st)["format"]["tags"]] == [
        '<tool_call>\n{"name": "get_weather", "arguments": '
    ]
    assert accepts(compiler, st, PARIS)
    assert not accepts(compiler, st, NOW)
    assert not accepts(compiler, st, PARIS + "\n" + PARIS)
    assert not accepts(compiler, st, " " + PARIS)


# ---- prompt


def test_system_prompt_lists_every_tool_and_the_call_format() -> None:
    prompt = tool_system_prompt(TOOLS)
    tools_json = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert [json.loads(line) for line in tools_json.splitlines()] == TOOLS
    assert '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call>' in prompt


def test_template_renders_tools() -> None:
    assert template_renders_tools("{% if tools %}{% for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}")
    assert not template_renders_tools("{% for message in messages %}{{ message.content }}{% endfor %}")
    assert not template_renders_tools("{{ toolset }}")
    assert not template_renders_tools(None)


# ---- parse_tool_calls


def strip_ids(calls: list[dict]) -> list[dict]:
    assert all(ID_RE.match(call["id"]) for call in calls)
    return [{k: v for k, v in call.items() if k not in ("id", "index")} for call in calls]


def function_call(name: str, arguments: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def test_plain_text_has_no_calls() -> None:
    assert parse_tool_calls("  Hello <b>there</b> <tool  ") == ("Hello <b>there</b> <tool", [])
    assert parse_tool_calls(" \n ") == (None, [])


def test_calls_are_split_from_content() -> None:
    content, calls = parse_tool_calls(f"Let me check.\n\n{PARIS}\n{NOW}\n")
    assert content == "Let me check."
    assert strip_ids(calls) == [
        function_call("get_weather", '{"city": "Paris"}'),
        function_call("get_time", "{}"),
    ]
    assert calls[0]["id"] != calls[1]["id"]


def test_only_calls_give_no_content() -> None:
    content, calls = parse_tool_calls(PARIS)
    assert content is None
    assert strip_ids(calls) == [function_call("get_weather", '{"city": "Paris"}')]


@pytest.mark.parametrize(
    "body, arguments",
    [
        ('{"name": "f", "parameters": {"x": "é"}}', '{"x": "é"}'),
        ('{"name": "f", "arguments": "{\\"x\\": 1}"}', '{"x": 1}'),
        ('{"name": "f", "arguments": "not json"}', "not json"),
        ('{"name": "f"}', "{}"),
        ('  {"arguments": {"y":2},"name":"f"}  ', '{"y": 2}'),
    ],
)
def test_call_bodies(body: str, arguments: str) -> None:
    assert strip_ids(parse_tool_calls(f"<tool_call>{body}</tool_call>")[1]) == [function_call("f", arguments)]


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>\n{'name': 'f'}\n</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>["f"]</tool_call>',
        "<tool_call></tool_call>",
    ],
)
def test_bad_blocks_stay_in_content(block: str) -> None:
    assert parse_tool_calls(f"a {block} b") == (f"a {block} b", [])


def test_unterminated_block_is_content() -> None:
    content, calls = parse_tool_calls(f'{PARIS}\n<tool_call>\n{{"name": "get_time"')
    assert content == '<tool_call>\n{"name": "get_time"'
    assert len(calls) == 1


# ---- ToolCallStream

TEXTS = [
    "",
    "Just an answer.",
    "  leading and trailing  \n",
    PARIS,
    f"Let me check.\n\n{PARIS}\n{NOW}\n",
    f"{PARIS}\ntrailing words {NOW} and more",
    f"a <tool_cal b <tool_call <<tool_call>{{}}</tool_call> c {PARIS}",
    f'{PARIS}\n<tool_call>\n{{"name": "get_time"',
    'x <tool_call>A<tool_call>{"name": "f"}</tool_call></tool_call> y',
    "ends in a prefix <tool_c",
    '<tool_call>{"name": "f", "arguments": "</tool_call>"}</tool_call>',
    'über 😀 <tool_call>{"name": "f", "arguments": {"q": "日本"}}</tool_call>',
]


def run_stream(chunks: list[str]) -> tuple[str, list[dict], bool]:
    stream = ToolCallStream()
    content, calls = "", []
    for chunk in chunks:
        text, deltas = stream.feed(chunk)
        content += text
        calls += deltas
    text, deltas = stream.finish()
    assert [call["index"] for call in calls] == list(range(len(calls)))
    return content + text, calls + deltas, stream.called


def expected(text: str) -> tuple[str, list[dict], bool]:
    content, calls = parse_tool_calls(text)
    return content or "", strip_ids(calls), bool(calls)


def stripped(result: tuple[str, list[dict], bool]) -> tuple[str, list[dict], bool]:
    return result[0], strip_ids(result[1]), result[2]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_parse_for_every_split(text: str) -> None:
    want = expected(text)
    assert stripped(run_stream([text])) == want
    assert stripped(run_stream(list(text))) == want
    for cut in range(len(text) + 1):
        assert stripped(run_stream([text[:cut], text[cut:]])) == want
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 8))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert stripped(run_stream(chunks)) == want


def test_stream_holds_a_possible_tag_until_disambiguated() -> None:
    stream = ToolCallStream()
    assert stream.feed("Hello <tool") == ("Hello", [])
    assert stream.feed("s are nice") == (" <tools are nice", [])
    assert stream.feed(" <tool_") == ("", [])
    assert not stream.called
    text, calls = stream.feed('call>{"name": "f", "arguments": {}}</tool_call>')
    assert text == "" and stream.called
    assert strip_ids(calls) == [function_call("f", "{}")] and calls[0]["index"] == 0
    assert stream.feed("\n") == ("", [])
    assert stream.feed(PARIS)[1][0]["index"] == 1
    assert stream.finish() == ("", [])


def test_stream_flushes_unterminated_block_at_finish() -> None:
    stream = ToolCallStream()
    assert stream.feed('ok <tool_call>{"name": ') == ("ok", [])
    assert stream.finish() == (' <tool_call>{"name":', [])
    assert not stream.called
