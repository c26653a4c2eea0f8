"""Requests as the engine sees them, and outputs as users see them (vLLM-shaped).

A request is its token ids and how many of them are computed; there is no
prefill or decode phase. The prompt is never mutated: prompt + output is built
on demand.

Sampling parameters have one conversion chain: the API's request fields (or the
offline API) build a validated `SamplingParams`; `to_wire()` carries it to the
engine core, `from_wire()` rebuilds (and re-validates) it there, and
`to_spec()` gives the workers what they need to sample. Only the scheduler
writes a request's `status` (scheduler.scheduler).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

import msgspec

from pdserve.messages import GrammarSpec, PromptLogprob, SamplingSpec, WireSamplingParams


@dataclass
class SamplingParams:
    """How to pick tokens. Validated on creation; errors say what to fix."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    # completion tokens generated before this request began: a migrated request's prompt ends with them, and its
    # first sampled token is the completion's token number `output_offset` (what seeded sampling is keyed on)
    output_offset: int = 0
    presence_penalty: float = 0.0  # subtracted once from the logit of every token the completion has
    frequency_penalty: float = 0.0  # subtracted from a token's logit per time the completion has it
    repetition_penalty: float = 1.0  # CTRL's: a token of the prompt or completion has its logit divided (> 0) or
    # multiplied (< 0) by it
    logit_bias: dict[int, float] | list[tuple[int, float]] | None = None  # added to the logits, in [-100, 100]
    min_tokens: int = 0  # EOS and stop_token_ids are banned until the completion has this many tokens
    bad_words_token_ids: list[list[int]] | None = None  # token sequences never completed
    grammar: GrammarSpec | None = None  # structured output (engine.grammar)
    prompt_logprobs: int | None = None  # score the prompt (echo + logprobs): each token's logprob and the top k

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:  # NaN fails too
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise ValueError(f"top_k must be an integer (-1 for off), got {self.top_k!r}")
        if self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if not isinstance(self.output_offset, int) or self.output_offset < 0:
            raise ValueError(f"output_offset must be an integer >= 0, got {self.output_offset!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10] (1 is off), got {self.repetition_penalty}")
        self.logit_bias = self.bias_pairs
        for token_id, b in self.logit_bias:
            if token_id < 0 or not -100 <= b <= 100:
                raise ValueError(f"logit_bias: token {token_id} has bias {b}; biases are in [-100, 100]")
        # (not checked against max_tokens: a prefill instance runs a PD request's first token with max_tokens 1)
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        self.bad_words_token_ids = [list(w) for w in self.bad_words_token_ids or []]
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= 20
        ):
            raise ValueError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs!r}")
        if any(not w for w in self.bad_words_token_ids):
            raise ValueError("bad_words: a bad word encodes to no tokens")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def to_wire(self) -> WireSamplingParams:
        """What the engine core needs (stop strings stay in the API process, which matches them)."""
        return WireSamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            output_offset=self.output_offset,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=self.bias_pairs,
            min_tokens=self.min_tokens,
            bad_words_token_ids=list(self.bad_words_token_ids or []),
            grammar=self.grammar,
            prompt_logprobs=self.prompt_logprobs,
        )

    @classmethod
    def from_wire(cls, wire: WireSamplingParams) -> SamplingParams:
        """Rebuild and re-validate; raises ValueError naming the bad field."""
        return cls(**{f.name: getattr(wire, f.name) for f in dataclasses.fields(cls) if hasattr(wire, f.name)})

    @property
    def bias_pairs(self) -> list[tuple[int, float]]:
        """logit_bias as sorted (token id, bias) pairs."""
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else (self.logit_bias or [])
        return sorted((int(t), float(b)) for t, b in bias)

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def to_spec(self, request: Request | None = None) -> SamplingSpec:
        """What a worker needs to sample `request`'s next token (with no request: its first)."""
        num_output = len(request.output_token_ids) if request is not None else 0
        spec = SamplingSpec(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            num_logprobs=-1 if self.logprobs is None else self.logprobs,
            sample_index=self.output_offset + num_output,
        )
        if request is None or not (
            self.logit_bias
            or self.uses_penalties
            or self.bad_words_token_ids
            or self.min_tokens > self.output_offset + num_output
        ):
            return spec
        completion = request.completion_token_ids  # a migrated request's completion began elsewhere
        banned: set[int] = set()
        if len(completion) < self.min_tokens:
            banned.update(self.stop_token_ids or [])
            if request.eos_token_id is not None:
                banned.add(request.eos_token_id)
        for word in self.bad_words_token_ids or []:  # ban the last token of a word whose other tokens were just made
            if len(word) == 1 or completion[len(completion) - len(word) + 1 :] == word[:-1]:
                banned.add(word[-1])
        return msgspec.structs.replace(
            spec,
            logit_bias=self.bias_pairs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            penalty_prompt_ids=request.unique_prompt_ids if self.repetition_penalty != 1.0 else [],
            penalty_output_ids=list(completion) if self.uses_penalties else [],
            banned_token_ids=sorted(banned),
        )


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class RequestState(enum.Enum):
    """Where a request is in its lifecycle, as the scheduler (its one owner) answers it: `Scheduler.state_of`.
    `RequestStatus` is the coarse field the scheduler writes; this names the waits apart."""

    WAITING = "waiting"  # queued here, never run
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # parked: P waits for D's KVDest, D for admission and P's KV
    RUNNING = "running"
    PREEMPTED = "preempted"  # queued again after it ran; readmission matches what was saved
    FINISHED = "finished"  # with `finish_reason`


@dataclass(eq=False)
class Request:
    """Engine-side state of one request."""

    req_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # chained keys of the full blocks of prompt + output computed so far (kvcache.keys)
    block_keys: list[bytes] = field(default_factory=list)
    # the most tokens ever computed: work below it after a preemption is recompute
    num_computed_high: int = 0
    _unique_prompt_ids: list[int] | None = field(default=None, repr=False)
    # prompt tokens taken from the prefix cache on first admission (device, host or pool; P's for a PD request)
    num_cached_tokens: int = 0
    # prompt logprobs: prompt positions scored so far (position 0 has none), and those not yet sent
    num_prompt_scored: int = 1
    unsent_prompt_logprobs: list[PromptLogprob] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        """The completion so far, a migrated request's tokens from before the move (its prompt's tail) included."""
        offset = self.sampling.output_offset
        resumed = list(self.prompt_token_ids[len(self.prompt_token_ids) - offset :]) if offset else []
        return [*resumed, *self.output_token_ids]

    @property
    def unique_prompt_ids(self) -> list[int]:
        """The client's prompt's distinct token ids (repetition_penalty's), computed once."""
        if self._unique_prompt_ids is None:
            num_prompt = len(self.prompt_token_ids) - self.sampling.output_offset
            self._unique_prompt_ids = sorted(set(self.prompt_token_ids[:num_prompt]))
        return self._unique_prompt_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return list(self.prompt_token_ids[start:end])
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return [*self.prompt_token_ids[start:], *self.output_token_ids[: end - num_prompt]]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def is_preempted(self) -> bool:
        """Waiting again after it ran: on readmission it matches what was saved and recomputes the rest."""
        return self.status is RequestStatus.WAITING and self.num_preemptions > 0


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_preemptions: int = 0
