"""Completions and chat completions: tokenize, validate, generate, detokenize, format.

Text lives here (the engine core sees token ids only): stop strings are
matched by the detokenizer and end the request with finish_reason "stop".
Tokenizing and chat templating run on a small thread pool, never on the event
loop, so /health and every other request keep being answered while a long
prompt is tokenized; a prompt whose length in characters alone proves it too
long for the context is refused before it is tokenized.

A request the router moved here from a failed instance (`resume_token_ids`)
continues its completion: the prompt is followed by the completion so far, the
detokenizer starts from it (so the text continues exactly where the client's
stream stopped), and seeded sampling continues at its index.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, Union, cast

import msgspec
from fastapi import Request

from pdserve.engine.async_client import AsyncEngineClient
from pdserve.engine.tokenizer import Detokenizer
from pdserve.http.errors import ApiError
from pdserve.messages import GrammarSpec, PromptLogprob, RequestDelta, TransferHandle, WireSamplingParams
from pdserve.request import SamplingParams
from pdserve.server import tools
from pdserve.server.metrics import Metrics
from pdserve.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from pdserve.server.structured import grammar_of
from pdserve.validation import PromptTooLongError, validate_prompt_token_ids

T = TypeVar("T")


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    req_id: str
    prompt_token_ids: list[int]
    sampling: WireSamplingParams
    stop: list[str]
    num_logprobs: int | None
    transfer: TransferHandle | None = None
    resume_token_ids: list[int] = field(default_factory=list)  # the completion so far of a migrated request
    stream_token_ids: bool = False  # streamed chunks carry their token ids (for the router)
    parse_tools: bool = False  # the completion may hold tool calls (server.tools)
    index: int = 0  # the choice's index in the response
    echo: str | None = None  # the prompt's text, sent before the completion (echo)
    prompt_logprobs: int | None = None  # the prompt is scored: each token's logprob and the top k
    after: str | None = None  # the sibling choice whose prompt this one shares (AddRequest.after)

    @property
    def num_prompt_tokens(self) -> int:
        """The client's prompt, without a migrated request's completion so far."""
        return len(self.prompt_token_ids) - len(self.resume_token_ids)


@dataclass
class Event:
    text: str
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0


class Serving:
    def __init__(
        self,
        client: AsyncEngineClient,
        tokenizer: Any,
        metrics: Metrics,
        model_name: str,
        max_open_requests: int,
        role: str = "mixed",
        kv_transfer: str = "direct",
        num_tokenizer_threads: int = 1,
        tool_call_parser: str = "hermes",
    ) -> None:
        self.tool_call_parser = tool_call_parser
        self.client = client
        self._tokenizer_pool = ThreadPoolExecutor(num_tokenizer_threads, thread_name_prefix="pdserve-tokenizer")
        self._max_token_chars = _longest_token_chars(tokenizer)
        self.role = role
        self.kv_transfer = kv_transfer
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model_name = model_name
        self.max_open_requests = max_open_requests

    # ---- validation ----------------------------------------------------------------

    def check_ready(self, body: SamplingFields) -> None:
        if self.client.failure is not None:
            raise ApiError(503, f"the engine failed: {self.client.failure}", "engine_dead", "server_error")
        if self.client.stall is not None:
            raise ApiError(503, f"the engine is stalled: {self.client.stall}", "engine_stalled", "server_error")
        if not self.client.is_ready:
            raise ApiError(
                503, "the model is still loading; retry when /health answers 200", "model_loading", "server_error"
            )
        if body.model is not None and body.model != self.model_name:
            raise ApiError(
                404, f"model {body.model!r} does not exist; this server serves {self.model_name!r}", "model_not_found"
            )
        if self.client.num_open_requests >= self.max_open_requests:
            raise ApiError(
                503,
                f"the server is at its queue limit ({self.max_open_requests} open requests); "
                "retry later or raise --max-queue-len",
                "queue_full",
                "server_error",
            )

    def prepare(
        self,
        body: SamplingFields,
        prompt_token_ids: list[int],
        max_tokens: int | None,
        num_logprobs: int | None,
        prefix: str,
        grammar: GrammarSpec | None = None,
        bad_words: list[list[int]] | None = None,
    ) -> Prepared:
        """`max_tokens` None means: the rest of the context. `grammar`: one the request's fields do not name
        (a forced tool call); `bad_words`: body.bad_words tokenized."""
        prompt_logprobs = body.prompt_logprobs
        if isinstance(body, CompletionRequest) and body.echo and body.logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, body.logprobs)
        info = self.client.info
        assert info is not None
        resume = list(body.resume_token_ids or [])
        if resume:
            if max_tokens is not None and len(resume) >= max_tokens:
                raise ApiError(400, f"resume_token_ids has {len(resume)} tokens; max_tokens is {max_tokens}")
            max_tokens = None if max_tokens is None else max_tokens - len(resume)
            prompt_token_ids = [*prompt_token_ids, *resume]
        _check_prompt(prompt_token_ids, info.max_model_len, info.vocab_size)
        n = len(prompt_token_ids)
        max_tokens = max_tokens or info.max_model_len - n
        if n + max_tokens > info.max_model_len:
            raise ApiError(
                400,
                f"the prompt has {n} tokens and max_tokens is {max_tokens}: {n + max_tokens} in "
                f"all, more than this model's maximum context length of {info.max_model_len}; "
                f"lower max_tokens to at most {info.max_model_len - n}",
                "context_length_exceeded",
            )
        try:
            grammar = grammar if grammar is not None else grammar_of(body)
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request") from None
        if body.min_tokens > max_tokens + len(resume):
            raise ApiError(400, f"min_tokens is {body.min_tokens}, more than max_tokens ({max_tokens + len(resume)})")
        if grammar is not None and body.ignore_eos:
            raise ApiError(400, "ignore_eos cannot be combined with structured output (the grammar ends the text)")
        try:  # the one conversion chain: request fields -> SamplingParams -> wire (request.py)
            sampling = SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                min_p=body.min_p,
                seed=body.seed,
                stop_token_ids=list(body.stop_token_ids or []),
                ignore_eos=body.ignore_eos,
                logprobs=num_logprobs,
                output_offset=len(resume),
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                logit_bias=self._logit_bias(body.logit_bias, info.vocab_size),
                min_tokens=body.min_tokens,
                bad_words_token_ids=bad_words,
                grammar=grammar,
                prompt_logprobs=prompt_logprobs,
            ).to_wire()
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request") from e
        transfer = None
        if body.kv_transfer_params is not None:
            kt = body.kv_transfer_params
            if self.role == "mixed":
                raise ApiError(
                    400,
                    "this instance runs --role mixed and takes no kv_transfer_params; send PD "
                    "requests through `pdserve router` to --role prefill/decode instances",
                )
            if kt.mode != self.kv_transfer:
                raise ApiError(
                    400,
                    f"kv_transfer_params.mode is {kt.mode!r} but this instance runs --kv-transfer {self.kv_transfer}",
                )
            transfer = TransferHandle(room=kt.room, peer=kt.peer, peer_incarnation=kt.peer_incarnation, mode=kt.mode)
        return Prepared(
            f"{prefix}-{uuid.uuid4().hex}",
            prompt_token_ids,
            sampling,
            list(body.stop or []),
            num_logprobs,
            transfer,
            resume,
            body.stream_token_ids,
            prompt_logprobs=prompt_logprobs,
        )

    @staticmethod
    def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
        out = {int(k): v for k, v in (bias or {}).items()}
        for token_id in out:
            if token_id >= vocab_size:
                raise ApiError(400, f"logit_bias names token {token_id}, outside the vocabulary [0, {vocab_size})")
        return out

    def _bad_words(self, words: list[str] | None) -> list[list[int]]:
        """Each bad word's token ids, as the word starts a text and as it follows a space (tokenizers differ)."""
        sequences: list[list[int]] = []
        for word in words or []:
            if not word:
                raise ApiError(400, "bad_words: a bad word is empty")
            for text in (word, " " + word):
                ids = list(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences

    def _check_text_length(self, num_chars: int, what: str) -> None:
        """Refuse, before tokenizing, text with more characters than the context holds tokens of the longest."""
        info = self.client.info
        assert info is not None
        if num_chars > info.max_model_len * self._max_token_chars:
            raise ApiError(
                400,
                f"{what} has {num_chars} characters: at least {num_chars // self._max_token_chars} tokens, more than "
                f"this model's maximum context length of {info.max_model_len} tokens; shorten it",
                "context_length_exceeded",
            )

    async def _in_pool(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn)

    async def prepare_completion(self, body: CompletionRequest) -> list[Prepared]:
        """One Prepared per choice: n for each prompt, in the order of the response's choices."""
        self.check_ready(body)
        bad_words = await self._in_pool(lambda: self._bad_words(body.bad_words))
        prepared = []
        prompts = cast(list[Union[str, list[int]]], body.prompt)  # a list of prompts once validated
        for i, prompt in enumerate(prompts):
            where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            ids: list[int]
            if isinstance(prompt, str):
                _check_utf8(prompt, where)
                self._check_text_length(len(prompt), where)
                ids = await self._in_pool(partial(self.tokenizer.encode, prompt))
            else:
                ids = list(prompt)
            if not ids:
                raise ApiError(400, f"{where} encodes to no tokens; send some text")
            p = self.prepare(body, ids, body.max_tokens or 16, body.logprobs, "cmpl", bad_words=bad_words)
            if body.echo:
                p.echo = prompt if isinstance(prompt, str) else await self._in_pool(partial(self.tokenizer.decode, ids))
            prepared.append(p)
        return self.choices(prepared, body.n)

    def choices(self, prepared: list[Prepared], n: int) -> list[Prepared]:
        """Each prompt's n choices. Choice j > 0 of a prompt is a sibling of its choice 0 (it shares the prompt's
        blocks), with its own seed (derived from the request's, so n choices differ and are reproducible). In PD
        each choice has its own room (both halves derive the same)."""
        if n > 1 and any(p.resume_token_ids for p in prepared):
            raise ApiError(400, "resume_token_ids is for a request with one choice (n = 1, one prompt)")
        out: list[Prepared] = []
        for base in prepared:
            for j in range(n):
                p = base if j == 0 else self._sibling(base, j)
                p.index = len(out)
                if p.transfer is not None and p.index > 0:  # one PD room per choice; both halves derive the same
                    room = prepared[0].transfer.room  # type: ignore[union-attr]
                    p.transfer = msgspec.structs.replace(p.transfer, room=f"{room}.{p.index}")
                out.append(p)
        return out

    @staticmethod
    def _sibling(base: Prepared, j: int) -> Prepared:
        seed = base.sampling.seed
        sampling = msgspec.structs.replace(  # the prompt is scored once, by choice 0
            base.sampling, seed=None if seed is None else choice_seed(seed, j), prompt_logprobs=None
        )
        return dataclasses.replace(base, req_id=f"{base.req_id}.{j}", sampling=sampling, after=base.req_id)

    async def prepare_chat(self, body: ChatCompletionRequest) -> list[Prepared]:
        self.check_ready(body)
        try:
            tools.check_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request") from None
        use_tools = bool(body.tools) and body.tool_choice != "none"
        if use_tools and self.tool_call_parser == "none":
            raise ApiError(400, "`tools` needs a tool-call parser; this server runs --tool-call-parser none")
        forced = tools.tool_call_grammar(body.tools, body.tool_choice, body.parallel_tool_calls) if use_tools else None
        try:
            named = grammar_of(body)
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request") from None
        if forced is not None and named is not None:
            raise ApiError(
                400, "tool_choice required (or a named function) cannot be combined with a structured-output field"
            )
        if body.chat_template_kwargs:
            taken = sorted(set(body.chat_template_kwargs) & TEMPLATE_CALL_ARGS)
            if taken:
                raise ApiError(400, f"chat_template_kwargs may not set {', '.join(taken)}: pdserve sets them")
        try:
            renders = tools.template_renders_tools(getattr(self.tokenizer, "chat_template", None))
            messages = [_template_message(m, renders) for m in body.messages]
            for i, m in enumerate(messages):
                _check_utf8(m["content"], f"message {i}")
            self._check_text_length(sum(len(m["content"]) for m in messages), "the messages' text")
            extra = dict(body.chat_template_kwargs or {})
            if use_tools and renders:
                extra["tools"] = body.tools
            elif use_tools:  # the template knows no tools: tell the model in a system message
                messages.insert(0, {"role": "system", "content": tools.tool_system_prompt(body.tools or [])})
            ids = await self._in_pool(
                lambda: self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False, **extra
                )
            )
        except ApiError:
            raise
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except Exception as e:  # noqa: BLE001 - template errors come as jinja exceptions
            raise ApiError(400, f"the chat template rejected these messages: {e}") from None
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true")
        max_tokens = body.max_tokens or body.max_completion_tokens
        bad_words = await self._in_pool(lambda: self._bad_words(body.bad_words))
        prepared = self.prepare(
            body,
            list(ids),
            max_tokens,
            (top or 0) if body.logprobs else None,
            "chatcmpl",
            grammar=GrammarSpec("structural_tag", forced) if forced is not None else None,
            bad_words=bad_words,
        )
        prepared.parse_tools = use_tools
        return self.choices([prepared], body.n)

    # ---- tokenizer endpoints -----------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404, f"model {model!r} does not exist; this server serves {self.model_name!r}", "model_not_found"
            )
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; send token ids", "no_tokenizer")

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize: the token ids of a prompt, or of messages through the chat template."""
        self._check_model(body.model)
        info = self.client.info
        if body.prompt is not None:
            prompt = body.prompt
            _check_utf8(prompt, "the prompt")
            if info is not None:
                self._check_text_length(len(prompt), "the prompt")
            ids = await self._in_pool(
                lambda: list(self.tokenizer.encode(prompt, add_special_tokens=body.add_special_tokens))
            )
        else:
            renders = tools.template_renders_tools(getattr(self.tokenizer, "chat_template", None))
            try:
                messages = [_template_message(m, renders) for m in body.messages or []]
                ids = await self._in_pool(
                    lambda: list(
                        self.tokenizer.apply_chat_template(
                            messages, add_generation_prompt=body.add_generation_prompt, tokenize=True, return_dict=False
                        )
                    )
                )
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            except Exception as e:  # noqa: BLE001 - template errors come as jinja exceptions
                raise ApiError(400, f"the chat template rejected these messages: {e}") from None
        out: dict[str, Any] = {"count": len(ids), "max_model_len": info.max_model_len if info else None, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = self.tokenizer.convert_ids_to_tokens(ids)
        return out

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        """vLLM's /detokenize: the text of token ids."""
        self._check_model(body.model)
        vocab = self.client.info.vocab_size if self.client.info else len(self.tokenizer)
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})")
        return {"prompt": await self._in_pool(partial(self.tokenizer.decode, body.tokens))}

    # ---- generation ----------------------------------------------------------------

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

    def logprobs_completion(
        self, events: list[Event], prompt: tuple[list[int], list[PromptLogprob]] | None = None
    ) -> dict[str, Any] | None:
        """OpenAI's legacy logprobs; with `prompt` (echo: its token ids and their scores) the prompt's tokens come
        first, the very first with a null logprob."""
        entries = [e for ev in events for e in ev.logprobs]
        if not entries and prompt is None:
            return None
        decode = self._token_text
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        if prompt is not None:
            ids, scores = prompt
            tokens += [decode(t) for t in ids]
            token_logprobs += [None, *(s.logprob for s in scores)]
            top_logprobs += [None, *({decode(t): lp for t, lp in s.top} for s in scores)]
        tokens += [decode(e[0][0]) for e in entries]
        token_logprobs += [e[0][1] for e in entries]
        top_logprobs += [{decode(t): lp for t, lp in e[1:]} for e in entries]
        offsets = [0]
        for token in tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    def prompt_logprobs(self, ids: list[int], scores: list[PromptLogprob]) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: per prompt token (the first null) its logprob, rank and text, and the top k."""
        out: list[dict[str, Any] | None] = [None]
        decode = self._token_text
        for token_id, s in zip(ids[1:], scores):
            entry = {
                str(t): {"logprob": lp, "rank": r + 1, "decoded_token": decode(t)} for r, (t, lp) in enumerate(s.top)
            }
            entry[str(token_id)] = {"logprob": s.logprob, "rank": s.rank, "decoded_token": decode(token_id)}
            out.append(entry)
        return out

    def logprobs_chat(self, events: list[Event]) -> dict[str, Any] | None:
        entries = [e for ev in events for e in ev.logprobs]
        if not entries:
            return None
        decode = self._token_text
        return {
            "content": [
                {
                    "token": decode(e[0][0]),
                    "logprob": e[0][1],
                    "bytes": list(decode(e[0][0]).encode()),
                    "top_logprobs": [
                        {"token": decode(t), "logprob": lp, "bytes": list(decode(t).encode())} for t, lp in e[1:]
                    ],
                }
                for e in entries
            ]
        }

    def _token_text(self, token_id: int) -> str:
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


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` > 0 of a seeded request with n > 1: a 63-bit hash of both."""
    digest = hashlib.blake2b(
        struct.pack("<QQ", seed & (2**64 - 1), choice), digest_size=8, person=b"pdserve-n"
    ).digest()
    return int.from_bytes(digest, "little") >> 1


def _longest_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token decodes to: the longest vocabulary entry (at least 1)."""
    try:
        return max(1, max(len(token) for token in tokenizer.get_vocab()))
    except (AttributeError, TypeError, ValueError):
        return 1 << 20  # unknown: never refuse on length alone


def _check_prompt(token_ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """validate_prompt_token_ids as an HTTP 400: a prompt too long is context_length_exceeded, in OpenAI's terms."""
    try:
        validate_prompt_token_ids(token_ids, max_model_len, vocab_size)
    except PromptTooLongError as e:
        raise ApiError(
            400,
            f"the prompt has {e.num_tokens} tokens; this model's maximum context length is "
            f"{e.max_model_len} tokens, so the prompt may have at most {e.max_model_len - 1}; shorten it",
            "context_length_exceeded",
        ) from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None


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


def _template_message(m: ChatMessage, renders_tools: bool) -> dict[str, Any]:
    """A message as chat templates take it. For a template that does not render tools, an assistant's tool calls
    and a tool's answer are written into the content in the Hermes form the model was told (server.tools)."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        calls = [{"name": c.function.name, "arguments": _json_or_text(c.function.arguments)} for c in m.tool_calls]
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


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400, f"{what} is not valid Unicode text ({e.reason} at character {e.start}); send well-formed UTF-8"
        ) from None
