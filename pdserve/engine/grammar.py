"""Structured output in the engine core: xgrammar compiles each request's grammar and keeps its matcher.

A request with a grammar is held here until its grammar compiles, on one thread beside the step loop (the
compiler caches compiled grammars, so a schema compiles once). Each step, `fill` gives every sampled row with
a grammar the bitmask of the tokens the grammar allows next; the worker applies it on the device
(layers.sampler). The matcher follows the request's completion, wherever its tokens came from: sampled here, the
first token a prefill instance sampled under the same grammar (PD), or the completion a migrated request
resumes. A grammar that cannot compile ends its request with a 400 carrying xgrammar's reason (the API server
checks schemas first, so this is rare).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec

from pdserve.messages import GrammarSpec, StepPlan, TransferHandle
from pdserve.request import Request

logger = logging.getLogger(__name__)


@dataclass
class Held:
    """A request waiting for its grammar."""

    request: Request
    transfer: TransferHandle | None
    compiled: Future[Any]


@dataclass
class Matcher:
    matcher: Any  # xgrammar.GrammarMatcher
    num_accepted: int = 0  # completion tokens the matcher has consumed


class Grammars:
    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int, stop_token_ids: list[int]) -> None:
        self._load_tokenizer = load_tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = stop_token_ids
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pdserve-grammar")
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()
        self.held: dict[str, Held] = {}
        self._matchers: dict[str, Matcher] = {}

    # ---- compiling, off the step loop ----------------------------------------------

    def hold(self, request: Request, transfer: TransferHandle | None) -> None:
        grammar = request.sampling.grammar
        assert grammar is not None
        self.held[request.req_id] = Held(request, transfer, self._pool.submit(self._compile, grammar))

    def take_ready(self) -> tuple[list[Held], list[tuple[Held, str]]]:
        """Requests whose grammar compiled (each now has a matcher), and those whose grammar failed (why)."""
        ready: list[Held] = []
        failed: list[tuple[Held, str]] = []
        for req_id, held in list(self.held.items()):
            if not held.compiled.done():
                continue
            del self.held[req_id]
            error = held.compiled.exception()
            if error is not None:
                failed.append((held, f"the grammar does not compile: {error}"))
                continue
            import xgrammar as xgr

            self._matchers[req_id] = Matcher(xgr.GrammarMatcher(held.compiled.result()))
            ready.append(held)
        return ready, failed

    def drop(self, req_id: str) -> bool:
        """Forget a request (aborted or finished); True if it was still waiting for its grammar."""
        self._matchers.pop(req_id, None)
        held = self.held.pop(req_id, None)
        if held is not None:
            held.compiled.cancel()
        return held is not None

    def _compile(self, grammar: GrammarSpec) -> Any:
        compiler = self._get_compiler()
        if grammar.kind == "json_schema":
            return compiler.compile_json_schema(grammar.text, any_whitespace=False, strict_mode=True)
        if grammar.kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if grammar.kind == "regex":
            return compiler.compile_regex(grammar.text)
        if grammar.kind == "grammar":
            return compiler.compile_grammar(grammar.text)
        if grammar.kind == "structural_tag":
            return compiler.compile_structural_tag(grammar.text)
        raise ValueError(f"unknown grammar kind {grammar.kind!r}")

    def _get_compiler(self) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                tokenizer = self._load_tokenizer()
                if tokenizer is None:
                    raise ValueError("this model has no tokenizer, so structured output is not available")
                info = xgr.TokenizerInfo.from_huggingface(
                    tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
            return self._compiler

    # ---- every step ------------------------------------------------------------------

    def fill(self, plan: StepPlan, requests: dict[str, Request]) -> list[tuple[str, str]]:
        """Give each sampled row with a grammar its bitmask; returns (req_id, why) for requests whose completion
        the grammar does not accept."""
        if not self._matchers:
            return []
        failed = []
        for i, seq in enumerate(plan.seqs):
            state = self._matchers.get(seq.req_id)
            request = requests.get(seq.req_id)
            if state is None or request is None or not seq.sample:
                continue
            why = self._follow(state, request.completion_token_ids)
            if why is not None:
                failed.append((seq.req_id, why))
                continue
            plan.seqs[i] = msgspec.structs.replace(
                seq, sampling=msgspec.structs.replace(seq.sampling, token_bitmask=self._bitmask(state))
            )
        return failed

    @staticmethod
    def _follow(state: Matcher, completion: list[int]) -> str | None:
        for token_id in completion[state.num_accepted :]:
            if not state.matcher.accept_token(token_id):
                return f"the grammar does not accept token {token_id} at completion position {state.num_accepted}"
            state.num_accepted += 1
        return None

    def _bitmask(self, state: Matcher) -> bytes:
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(1, self._vocab_size)
        state.matcher.fill_next_token_bitmask(bitmask, 0)
        return bitmask.numpy().tobytes()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
