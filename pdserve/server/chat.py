"""Chat messages as chat templates take them, and the template's variables a request may set."""

from __future__ import annotations

import json
from typing import Any

from pdserve.server import tools
from pdserve.server.protocol import ChatCompletionRequest, ChatMessage

# apply_chat_template's own parameters: chat_template_kwargs passes only the template's variables
TEMPLATE_CALL_ARGS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def template_inputs(
    body: ChatCompletionRequest, tokenizer: Any, use_tools: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and the keyword arguments for `tokenizer.apply_chat_template`; ValueError naming what is wrong."""
    if body.chat_template_kwargs:
        taken = sorted(set(body.chat_template_kwargs) & TEMPLATE_CALL_ARGS)
        if taken:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(taken)}: pdserve sets them")
    renders = tools.template_renders_tools(getattr(tokenizer, "chat_template", None))
    messages = [template_message(m, renders) for m in body.messages]
    extra = dict(body.chat_template_kwargs or {})
    if use_tools and renders:
        extra["tools"] = body.tools
    elif use_tools:  # the template knows no tools: tell the model in a system message
        messages.insert(0, {"role": "system", "content": tools.tool_system_prompt(body.tools or [])})
    return messages, extra


def template_message(m: ChatMessage, renders_tools: bool) -> dict[str, Any]:
    """A message as chat templates take it. For a template that does not render tools, an assistant's tool calls
    and a tool's answer are written into the content in the Hermes form the model was told (server.tools)."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        calls = [{"name": c.function.name, "arguments": json_or_text(c.function.arguments)} for c in m.tool_calls]
        if renders_tools:
            out["tool_calls"] = [{"type": "function", "id": c.id, "function": f} for c, f in zip(m.tool_calls, calls)]
        else:
            text = "\n".join(f"<tool_call>\n{json.dumps(f, ensure_ascii=False)}\n</tool_call>" for f in calls)
            out["content"] = f"{out['content']}\n{text}" if out["content"] else text
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
        if not renders_tools:
            out["content"] = f"<tool_response>\n{out['content']}\n</tool_response>"
    if m.name is not None:
        out["name"] = m.name
    return out


def json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
