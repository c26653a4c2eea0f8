"""Request bodies into engine requests: tokenize, template, validate, and one `Prepared` per choice.

Text lives in the API server (the engine core sees token ids only). Tokenizing
and chat templating run on a small thread pool, never on the event loop, so
/health and every other request keep being answered while a long prompt is
tokenized; a prompt whose length in characters alone proves it too long for
the context is refused before it is tokenized. Every generation field becomes
one SamplingParams (request.py) or a 400 naming it.

A request the router moved here from a failed instance (`resume_token_ids`)
continues its completion: the prompt is followed by the completion so far and
seeded sampling continues at its index.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import struct
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, Union, cast

import msgspec

from pdserve.engine.async_client import AsyncEngineClient
from pdserve.http.errors import ApiError
from pdserve.messages import GrammarSpec, TransferHandle, WireSamplingParams
from pdserve.request import SamplingParams
from pdserve.server import tools
from pdserve.server.chat import template_inputs, template_message
from pdserve.server.protocol import (
    ChatCompletionRequest,
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


class Preparer:
    def __init__(
        self,
        client: AsyncEngineClient,
        tokenizer: Any,
        model_name: str,
        max_open_requests: int,
        role: str = "mixed",
        kv_transfer: str = "direct",
        num_tokenizer_threads: int = 1,
        tool_call_parser: str = "hermes",
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_open_requests = max_open_requests
        self.role = role
        self.kv_transfer = kv_transfer
        self.tool_call_parser = tool_call_parser
        self._tokenizer_pool = ThreadPoolExecutor(num_tokenizer_threads, thread_name_prefix="pdserve-tokenizer")
        self._max_token_chars = _longest_token_chars(tokenizer)

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
        """Each prompt's n choices. Choice j > 0 of a prompt is a sibling of its choice 0 (it runs on the blocks of
        choice 0's prompt), with its own seed (derived from the request's, so n choices differ and are
        reproducible). In PD each prompt's choice 0 has its own room (both halves derive the same); siblings are
        no PD requests: P computes each prompt once and D forks the siblings from choice 0's received blocks, so P
        leaves them out and D runs them itself."""
        if n > 1 and any(p.resume_token_ids for p in prepared):
            raise ApiError(400, "resume_token_ids is for a request with one choice (n = 1, one prompt)")
        out: list[Prepared] = []
        for base in prepared:
            for j in range(n):
                p = base if j == 0 else self._sibling(base, j)
                p.index = len(out)
                if p.transfer is not None and p.index > 0:
                    room = prepared[0].transfer.room  # type: ignore[union-attr]
                    p.transfer = None if j else msgspec.structs.replace(p.transfer, room=f"{room}.{p.index}")
                if p.transfer is None and j and base.transfer is not None and self.role == "prefill":
                    continue  # P's part of a sibling: nothing (D forks it)
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
        try:
            messages, extra = template_inputs(body, self.tokenizer, use_tools)
            for i, m in enumerate(messages):
                _check_utf8(m["content"], f"message {i}")
            self._check_text_length(sum(len(m["content"]) for m in messages), "the messages' text")
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
                messages = [template_message(m, renders) for m in body.messages or []]
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


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400, f"{what} is not valid Unicode text ({e.reason} at character {e.start}); send well-formed UTF-8"
        ) from None
