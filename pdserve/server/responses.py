"""The OpenAI response of a request's choices: one JSON body, or one server-sent event stream that merges them.

Each choice is one engine request (serving.Serving.events); a response waits for every choice's first token
before it answers, so a failure before it is an HTTP status. Tool calls are parsed out of chat text
(server.tools), and echo and prompt logprobs come with a choice's first chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdserve.engine.async_client import EngineDeadError, RequestRejected
from pdserve.http.errors import error_response
from pdserve.messages import PromptLogprob
from pdserve.server import logprobs as lp
from pdserve.server import tools
from pdserve.server.prepare import Prepared
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.server.serving import Event, Serving, sse, usage

T = TypeVar("T")


def rejection(exc: RequestRejected) -> JSONResponse:
    if exc.status >= 500:
        return error_response(exc.status, str(exc), exc.code, "server_error")
    return error_response(exc.status, str(exc), exc.code or "invalid_request")


async def respond(
    serving: Serving,
    choices: list[Prepared],
    body: CompletionRequest | ChatCompletionRequest,
    request: Request,
    keepalive_s: float,
    is_chat: bool,
) -> Response:
    """One response for the request's choices (n for each prompt), generated concurrently."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        # wait for every choice's first token before answering, so that a failure before it (no capacity, a failed
        # KV transfer) is an HTTP status, not an error event in a 200 stream
        streams = [serving.events(p, keepalive_s) for p in choices]
        try:
            firsts = await _all([serving.first(events, request) for events in streams])
        except RequestRejected as exc:
            await _close_all(streams)
            return rejection(exc)
        except BaseException:
            await _close_all(streams)
            raise
        return StreamingResponse(
            _stream(serving, choices, firsts, streams, include_usage, is_chat),
            media_type="text/event-stream",
        )
    collected = await _all([serving.collect(p, request) for p in choices])
    return JSONResponse(
        {
            "id": choices[0].req_id,
            "object": "chat.completion" if is_chat else "text_completion",
            "created": int(time.time()),
            "model": serving.model_name,
            "choices": [
                _choice(serving, p, events, is_chat, _scores(choices, collected, p))
                for p, events in zip(choices, collected)
            ],
            "usage": usage(
                choices,
                [sum(len(e.token_ids) for e in events) for events in collected],
                [max((e.num_cached_tokens for e in events), default=0) for events in collected],
            ),
        }
    )


def _scores(choices: list[Prepared], collected: list[list[Event]], p: Prepared) -> list[PromptLogprob]:
    """The prompt scores of `p`'s prompt: its own, or its choice 0's (a sibling's prompt is scored once)."""
    leader = next(i for i, c in enumerate(choices) if c.req_id == (p.after or p.req_id))
    return [s for e in collected[leader] for s in e.prompt_logprobs]


def _choice(
    serving: Serving, p: Prepared, events: list[Event], is_chat: bool, scores: list[PromptLogprob]
) -> dict[str, Any]:
    text = "".join(e.text for e in events)
    choice: dict[str, Any] = {"index": p.index, "finish_reason": events[-1].finish_reason if events else "abort"}
    if p.prompt_logprobs is not None:
        choice["prompt_logprobs"] = lp.prompt_scores(serving.token_text, p.prompt_token_ids, scores)
    if not is_chat:
        prompt = (p.prompt_token_ids, scores) if p.echo is not None and p.num_logprobs is not None else None
        logprobs = lp.completion(serving.token_text, _entries(events), prompt) if p.num_logprobs is not None else None
        return {**choice, "text": (p.echo or "") + text, "logprobs": logprobs}
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if p.parse_tools:
        message["content"], calls = tools.parse_tool_calls(text)
        if calls:
            message["tool_calls"] = calls
            if choice["finish_reason"] == "stop":
                choice["finish_reason"] = "tool_calls"
    return {**choice, "message": message, "logprobs": lp.chat(serving.token_text, _entries(events))}


async def _all(work: list[Awaitable[T]]) -> list[T]:
    """Await all of `work` concurrently; the first to fail cancels the others and raises."""
    if len(work) == 1:
        return [await work[0]]
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close_all(streams: list[AsyncIterator[Event | None]]) -> None:
    for events in streams:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]


def _chunk(
    serving: Serving,
    head: dict[str, Any],
    e: Event,
    is_chat: bool,
    p: Prepared,
    calls: tools.ToolCallStream | None = None,
    scores: list[PromptLogprob] | None = None,
) -> dict[str, Any]:
    """One streamed chunk of `e`: a chat delta or a completion's text (and its token ids, for the router). With
    `calls`, the chat text goes through the tool-call parser: tool calls come as `tool_calls` deltas. `scores`
    (the choice's first chunk only): the prompt's, for echo and prompt_logprobs."""
    if is_chat:
        delta: dict[str, Any] = {"content": e.text} if e.text else {}
        finish_reason = e.finish_reason
        if calls is not None:
            content, new_calls = calls.feed(e.text)
            if e.finish_reason is not None:
                tail, last_calls = calls.finish()
                content, new_calls = content + tail, new_calls + last_calls
                if calls.called and finish_reason == "stop":
                    finish_reason = "tool_calls"
            delta = {"content": content} if content else {}
            if new_calls:
                delta["tool_calls"] = new_calls
        choice = {
            "index": p.index,
            "delta": delta,
            "finish_reason": finish_reason,
            "logprobs": lp.chat(serving.token_text, e.logprobs),
        }
    else:
        echo = p.echo if scores is not None else None
        prompt = (p.prompt_token_ids, scores) if echo is not None and scores is not None else None
        choice = {
            "index": p.index,
            "text": (echo or "") + e.text,
            "finish_reason": e.finish_reason,
            "logprobs": lp.completion(serving.token_text, e.logprobs, prompt) if p.num_logprobs is not None else None,
        }
    if scores is not None and p.prompt_logprobs is not None:
        choice["prompt_logprobs"] = lp.prompt_scores(serving.token_text, p.prompt_token_ids, scores)
    if p.stream_token_ids:
        choice["token_ids"] = e.token_ids
    return {**head, "choices": [choice]}


KEEPALIVE = ": keepalive\n\n"  # an SSE comment: clients skip it


async def _stream(
    serving: Serving,
    choices: list[Prepared],
    firsts: list[Event | None],
    streams: list[AsyncIterator[Event | None]],
    include_usage: bool,
    is_chat: bool,
) -> AsyncIterator[str]:
    created = int(time.time())
    head = {
        "id": choices[0].req_id,
        "object": "chat.completion.chunk" if is_chat else "text_completion",
        "created": created,
        "model": serving.model_name,
    }
    num_out = [0] * len(choices)
    num_cached = [first.num_cached_tokens if first is not None else 0 for first in firsts]
    by_id = {p.req_id: first.prompt_logprobs if first is not None else [] for p, first in zip(choices, firsts)}
    unscored = {i for i, p in enumerate(choices) if p.echo is not None or p.prompt_logprobs is not None}
    calls = [tools.ToolCallStream() if is_chat and p.parse_tools else None for p in choices]
    for p in choices:
        if is_chat and not p.resume_token_ids:  # a migrated stream's client has had its role chunk
            role = {"index": p.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield sse({**head, "choices": [{**role, "logprobs": None}]})
    try:
        async for i, e in _merged(firsts, streams):
            if e is None:  # nothing for a while: a keepalive
                yield KEEPALIVE
                continue
            p = choices[i]
            num_out[i] += len(e.token_ids)
            if _is_worth_a_chunk(e, p) or i in unscored:
                scores = by_id.get(p.after or p.req_id, []) if i in unscored else None
                unscored.discard(i)
                yield sse(_chunk(serving, head, e, is_chat, p, calls[i], scores))
    except RequestRejected as exc:
        yield sse({"error": {"message": str(exc), "type": "server_error", "code": exc.code or "generation_failed"}})
    except EngineDeadError as exc:
        yield sse({"error": {"message": str(exc), "type": "server_error", "code": "engine_dead"}})
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(choices, num_out, num_cached)})
    yield "data: [DONE]\n\n"


async def _merged(
    firsts: list[Event | None], streams: list[AsyncIterator[Event | None]]
) -> AsyncIterator[tuple[int, Event | None]]:
    """(choice, event) of every stream as they come, each stream's first event first; a None event only when no
    stream has anything (a keepalive cue). All streams are closed at the end (which aborts unfinished ones)."""
    for i, first in enumerate(firsts):
        if first is not None:
            yield i, first
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):  # type: ignore[type-var]
            async for e in streams[0]:
                yield 0, e
        return
    queue: asyncio.Queue[tuple[int, Event | None] | BaseException | None] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for e in streams[i]:
                await queue.put((i, e))
        except BaseException as exc:  # noqa: BLE001 - handed to the merged stream, which raises it
            await queue.put(exc)
            return
        await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        open_streams = len(streams)
        while open_streams:
            item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            elif item[1] is not None or queue.empty():  # a keepalive only while nothing else is waiting
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close_all(streams)


def _is_worth_a_chunk(e: Event, p: Prepared) -> bool:
    """Text, an end or logprobs; or, for the router, any token (it must see every token id)."""
    return bool(e.text or e.finish_reason or e.logprobs or (p.stream_token_ids and e.token_ids))


def _entries(events: list[Event]) -> lp.Entries:
    return [entry for e in events for entry in e.logprobs]
