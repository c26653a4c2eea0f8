"""Generation: one choice's engine deltas as text events (detokenized, stop strings matched), with metrics.

Stop strings are matched by the detokenizer and end the request with
finish_reason "stop". A migrated request's detokenizer starts from its
completion so far, so the text continues exactly where the client's stream
stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from pdserve.engine.async_client import AsyncEngineClient
from pdserve.engine.tokenizer import Detokenizer
from pdserve.http.errors import ApiError
from pdserve.messages import PromptLogprob, RequestDelta
from pdserve.server.metrics import Metrics
from pdserve.server.prepare import Prepared

T = TypeVar("T")


@dataclass
class Event:
    text: str
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0


class Serving:
    def __init__(self, client: AsyncEngineClient, tokenizer: Any, metrics: Metrics, model_name: str) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model_name = model_name

    async def events(self, p: Prepared, keepalive_s: float | None = None) -> AsyncIterator[Event | None]:
        """Text deltas of one request, and a None whenever `keepalive_s` passes without one; records metrics; a stop
        string ends it as 'stop'."""
        detok = Detokenizer(self.tokenizer, p.stop)
        detok.append(p.resume_token_ids)  # a migrated request: the client has this text already
        start = time.monotonic()
        first: float | None = None
        reason = "abort"
        try:
            async with contextlib.aclosing(
                self.client.generate(p.req_id, p.prompt_token_ids, p.sampling, p.transfer, keepalive_s, p.after)
            ) as deltas:
                async for delta in deltas:
                    if delta is None:
                        yield None
                        continue
                    if first is None and delta.token_ids:
                        first = time.monotonic() - start
                    text = detok.append(delta.token_ids)
                    if detok.stop_reason is not None:
                        await self.client.abort(p.req_id, "stop")
                        reason = "stop"
                        yield Event(text + detok.flush(), delta.token_ids, delta.logprobs or [], "stop", *extras(delta))
                        return
                    if delta.finish_reason is not None:
                        reason = delta.finish_reason
                        text += detok.flush()
                    yield Event(text, delta.token_ids, delta.logprobs or [], delta.finish_reason, *extras(delta))
        finally:
            self.metrics.observe_request(first, time.monotonic() - start, len(detok.token_ids), reason)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    async def first(self, events: AsyncIterator[Event | None], request: Request) -> Event | None:
        """The first event of `events` (None if there is none; keepalive cues are skipped); a client that
        disconnects meanwhile aborts. On any failure `events` is closed (which aborts the request in the engine)."""
        try:
            return await _unless_disconnected(_first_event(events), request)
        except BaseException:
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]
            raise

    async def collect(self, p: Prepared, request: Request) -> list[Event]:
        """All events of a non-streaming request; a client that disconnects aborts it."""
        return await _unless_disconnected(self._collect(p), request)

    async def _collect(self, p: Prepared) -> list[Event]:
        return [e async for e in self.events(p) if e is not None]


async def _first_event(events: AsyncIterator[Event | None]) -> Event | None:
    async for e in events:
        if e is not None:
            return e
    return None


async def _unless_disconnected(work: Awaitable[T], request: Request) -> T:
    """Await `work`, checking every 0.5 s that the client is still there; if it left, cancel `work` and
    raise 499 client_disconnected."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await task
            raise ApiError(499, "client disconnected", "client_disconnected")
    return task.result()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(choices: list[Prepared], num_outputs: list[int], num_cached: list[int]) -> dict[str, Any]:
    """Token counts as the client sees them: each prompt once (not once per choice), with the tokens of it that
    came from the prefix cache; a migrated request's completion includes what came before the move."""
    n = sum(p.num_prompt_tokens for p in choices if p.after is None)
    cached = sum(min(c, p.num_prompt_tokens) for p, c in zip(choices, num_cached) if p.after is None)
    num_output = sum(num_outputs) + sum(len(p.resume_token_ids) for p in choices)
    return {
        "prompt_tokens": n,
        "completion_tokens": num_output,
        "total_tokens": n + num_output,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def extras(delta: RequestDelta) -> tuple[list[PromptLogprob], int]:
    """An Event's fields beyond the text and tokens: prompt scores and cached prompt tokens."""
    return delta.prompt_logprobs or [], delta.num_cached_tokens
