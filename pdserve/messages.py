"""Every cross-process message, as msgspec structs. Nothing here is pickled.

Each message is tagged (msgspec tagged union), carries the protocol version and
the sender's incarnation id (new on every process start), so a restarted peer
is noticed and its stale messages are dropped.
"""

from __future__ import annotations

import uuid
from typing import Union

import msgspec

PROTOCOL_VERSION = 1
INCARNATION = uuid.uuid4().hex


class Message(msgspec.Struct, tag=True, kw_only=True):
    version: int = PROTOCOL_VERSION
    incarnation: str = INCARNATION


class SamplingSpec(msgspec.Struct, frozen=True):
    """What a worker needs to sample one request (built on the CPU, before the step)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    num_logprobs: int = -1  # -1: none; k >= 0: the sampled token plus the top k
    # the sampled token's index in the completion: a seeded sample is keyed on (seed, sample_index), so a request
    # continues the same sequence wherever its next token is sampled (P then D, after a preemption or a migration)
    sample_index: int = 0
    # logits processors, applied in this order to a copy of the logits (logprobs stay those of the raw model):
    # logit_bias (token id, bias) pairs; repetition_penalty over penalty_prompt_ids and penalty_output_ids;
    # frequency and presence penalties over penalty_output_ids (the completion so far); the grammar's allowed
    # tokens (`token_bitmask`: xgrammar's int32 bitmask, one bit per vocabulary entry, set = allowed) and
    # banned_token_ids (min_tokens, bad_words) at -inf, unless the bans leave nothing the grammar allows
    logit_bias: list[tuple[int, float]] = []
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    penalty_prompt_ids: list[int] = []
    penalty_output_ids: list[int] = []
    banned_token_ids: list[int] = []
    token_bitmask: bytes | None = None

    @property
    def has_processors(self) -> bool:
        """Anything beyond temperature and filtering changes this row's logits."""
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.banned_token_ids
            or self.token_bitmask is not None
        )


class GrammarSpec(msgspec.Struct, frozen=True):
    """A request's structured-output constraint, compiled by xgrammar in the engine core (engine.grammar).
    kind: json_schema (text: the schema as JSON), json_object (any JSON object), regex, grammar (xgrammar's
    EBNF), structural_tag (xgrammar's structural tag as JSON)."""

    kind: str
    text: str = ""


class ScheduledSeq(msgspec.Struct, frozen=True):
    """One request's share of a step: compute `token_ids` at positions start_pos...

    block_ids is the request's whole block table after this step's allocation.
    """

    req_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    sampling: SamplingSpec
    # prompt logprobs (echo, prompt_logprobs): with k >= 0 the worker scores each prompt token this chunk predicts,
    # returning its logprob, its rank and the top k; the token after the chunk is `prompt_next_token` (-1: the
    # chunk ends the prompt)
    prompt_logprobs: int = -1
    prompt_next_token: int = -1


class CacheOps(msgspec.Struct, frozen=True):
    """Block copies between tiers, run by every rank before the step's forward pass (in field order),
    and pool writes, run after it. Keys are hex block keys; each rank adds its own rank to the object name."""

    swap_out: list[tuple[int, int]] = []  # (device block, host block): save before the device block is reused
    swap_in: list[tuple[int, int]] = []  # (host block, device block)
    pool_put: list[tuple[int, str]] = []  # (host block, key): write through to the pool
    # (device block, device block): copy-on-write of a forked prompt's last block (n > 1), after swap_out
    device_copy: list[tuple[int, int]] = []

    @property
    def is_empty(self) -> bool:
        return not (self.swap_out or self.swap_in or self.pool_put or self.device_copy)


# ---- PD disaggregation: the data plane's part of a step ----------------------------


class KVRegion(msgspec.Struct, frozen=True):
    """Where a peer can write one rank's device KV cache, [num_layers, 2, num_blocks, block_size, heads, dim].

    engine "shm": `address` is a shared-memory file holding the cache; "mooncake": `address` is the
    Transfer Engine session ("host:port") and `base` the registered cache's address. `chunk_nbytes` is one
    (layer, K|V, block) chunk.
    """

    engine: str
    hostname: str
    address: str
    base: int
    num_layers: int
    num_blocks: int
    chunk_nbytes: int


class KVSend(msgspec.Struct, frozen=True):
    """Copy blocks `src_block_ids` of this instance into the peer's `dst_block_ids`, all layers.

    layerwise: sent layer by layer as this step's forward writes them (overlapping the next layer);
    otherwise before the forward (blocks computed in earlier steps: a catch-up, one request per batch).
    regions[rank]: the engines the peer's rank offers; each rank writes to its own peer rank.
    """

    room: str
    regions: list[list[KVRegion]]
    src_block_ids: list[int]
    dst_block_ids: list[int]
    layerwise: bool


class PoolSend(msgspec.Struct, frozen=True):
    """Storage mode, P: after the step's forward, stage a request's prompt blocks into host blocks (the
    swap op, device layout -> block-major) and put them in the pool, one object per rank (`<key>@<rank>`).
    keys: hex chained keys of the full blocks, then `<hex>:partial:N` for an incomplete last block."""

    room: str
    device_block_ids: list[int]
    host_block_ids: list[int]
    keys: list[str]


class KVSendReport(msgspec.Struct, frozen=True):
    """One rank's account of a step's sends: bytes written, failures by room, and a digest of its batches
    (every rank must batch identically; see DESIGN.md)."""

    rank: int
    num_bytes: int = 0
    failed: dict[str, str] = {}
    batches_digest: str = ""
    seconds_busy: float = 0.0  # the sender thread writing
    seconds_exposed: float = 0.0  # the step waiting for sends after its forward (not overlapped)


class PoolRead(msgspec.Struct, frozen=True):
    """A waiting request's prefix in the pool, run by every rank after the step's forward and pool writes
    (so a block written this step is found). No host blocks: count how many leading `keys` the pool holds.
    With host blocks: read the leading keys into them. Keys are hex block keys (each rank its own objects)."""

    req_id: str
    keys: list[str]
    host_block_ids: list[int] = []


class StepPlan(Message):
    """The one decision per step, broadcast to every rank; all ranks execute it, in this order: cache_ops'
    copies, the forward (kv_sends layer by layer), pool_sends, cache_ops' pool writes, pool_reads."""

    step_id: int
    seqs: list[ScheduledSeq]
    finished_req_ids: list[str] = []
    cache_ops: CacheOps = CacheOps()
    kv_sends: list[KVSend] = []
    pool_sends: list[PoolSend] = []
    pool_reads: list[PoolRead] = []

    @property
    def is_empty(self) -> bool:
        """Nothing for the workers to do (its finished ids ride on the next plan)."""
        return not (self.seqs or self.kv_sends or self.pool_sends or self.pool_reads) and self.cache_ops.is_empty


class LoadFromPool(Message):
    """Read blocks `keys` from the pool into host blocks `host_block_ids`, outside a step (storage-mode D's
    prompt reads); every rank answers."""

    load_id: int
    keys: list[str]
    host_block_ids: list[int]


class StoreCounters(msgspec.Struct, frozen=True):
    """Pool traffic of one rank since its start (monotonic)."""

    num_errors: int = 0
    bytes_put: int = 0
    bytes_get: int = 0


class PoolLoaded(Message):
    """How many leading blocks of a LoadFromPool this rank read completely."""

    load_id: int
    rank: int
    num_loaded: int
    store: StoreCounters = StoreCounters()


class PromptLogprob(msgspec.Struct, array_like=True, frozen=True):
    """One prompt token's score: its logprob and rank under the model given the tokens before it, and the top k."""

    logprob: float
    rank: int
    top: list[tuple[int, float]] = []


class ForwardOutput(Message):
    """What rank 0 returns for a step: one sampled token per sampling request."""

    step_id: int
    req_ids: list[str]
    token_ids: list[int]
    # per sampled token: [[token_id, logprob], ...], the sampled token first
    logprobs: list[list[tuple[int, float]]] | None = None
    store: StoreCounters = StoreCounters()
    kv_sent: list[KVSendReport] = []  # one per rank when the plan had kv_sends or pool_sends
    # per PoolRead of the plan: leading blocks counted / read, the least any rank answered
    pool_read: list[int] = []
    # per request with prompt logprobs in the plan: (the first prompt position scored, one PromptLogprob each)
    prompt_logprobs: dict[str, tuple[int, list[PromptLogprob]]] = {}


class RankReport(Message):
    """A rank other than 0 reporting its part of a step (rank 0's rides on its ForwardOutput): its sends, and
    what its pool reads found."""

    step_id: int
    rank: int
    report: KVSendReport | None = None
    pool_read: list[int] = []


class WorkerReady(Message):
    rank: int
    regions: list[KVRegion] = []  # the engines through which a peer can write this rank's KV cache


class WorkerError(Message):
    rank: int
    error: str


class Shutdown(Message):
    pass


# ---- API server <-> engine core -------------------------------------------------


class WireSamplingParams(msgspec.Struct, frozen=True):
    """SamplingParams on the wire; the engine core rebuilds (and re-validates) them."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    output_offset: int = 0  # completion tokens generated before this request (a migrated request resumes after them)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: list[tuple[int, float]] = []
    min_tokens: int = 0
    bad_words_token_ids: list[list[int]] = []
    grammar: GrammarSpec | None = None
    prompt_logprobs: int | None = None  # score the prompt: its tokens' logprobs and the top k at each


class TransferHandle(msgspec.Struct, frozen=True):
    """The router's pairing of one request: `room` names the transfer on both sides; `peer` is the other
    instance's control address and `peer_incarnation` its incarnation ("" if unknown)."""

    room: str
    peer: str
    peer_incarnation: str = ""
    mode: str = "direct"


class AddRequest(Message):
    req_id: str
    prompt_token_ids: list[int]
    sampling: WireSamplingParams
    transfer: TransferHandle | None = None
    # a sibling choice of the same prompt (n > 1): queued once that request's prompt is computed, so its full
    # blocks come from the prefix cache and only the last partial block is computed again
    after: str | None = None


class AbortRequest(Message):
    req_id: str
    finish_reason: str = "abort"  # "stop" when the API server matched a stop string


class RequestDelta(msgspec.Struct, frozen=True):
    """New tokens of one request since the last delta; `error` set means it was rejected."""

    req_id: str
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[PromptLogprob] | None = None  # prompt tokens 1.. (token 0 has none), with the first tokens
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache (on P, for a PD request)
    error: str | None = None
    error_code: str | None = None  # set with error: "kv_transfer_timeout", "no_capacity", ...
    error_status: int = 400  # the HTTP status the error maps to


class TransferCounters(msgspec.Struct, frozen=True):
    """P->D KV transfer since start: bytes, per-request seconds (sum and histogram buckets), failures."""

    bytes_sent: int = 0
    bytes_received: int = 0
    num_transfers: int = 0
    seconds_sum: float = 0.0
    seconds_buckets: list[int] = []  # cumulative counts per TRANSFER_SECONDS_BUCKETS upper bound
    failures: dict[str, int] = {}  # reason -> count
    send_seconds_busy: float = 0.0  # P, rank 0: time its sender spent writing
    send_seconds_exposed: float = 0.0  # P, rank 0: time steps waited for sends after the forward
    pool_seconds_put: float = 0.0  # storage mode, P, rank 0: staging and writing prompt blocks to the pool
    pool_seconds_get: float = 0.0  # storage mode, D: reading prompt blocks from the pool (all ranks, wall)
    num_load_recomputes: int = 0  # storage mode, D: requests whose missing blocks D prefilled itself
    num_recomputed_tokens: int = 0  # ... and the prompt tokens that took


TRANSFER_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EngineStats(msgspec.Struct, frozen=True):
    num_running: int = 0
    num_waiting: int = 0
    num_blocks_total: int = 0
    num_blocks_free: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_recomputed_tokens: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens_device: int = 0
    prefix_hit_tokens_host: int = 0
    prefix_hit_tokens_pool: int = 0
    num_blocks_saved_on_preemption: int = 0
    store: StoreCounters = StoreCounters()
    kv_transfer: TransferCounters = TransferCounters()


class EngineOutputs(Message):
    deltas: list[RequestDelta]
    stats: EngineStats


class EngineReady(Message):
    model_name: str
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    role: str = "mixed"
    control_address: str = ""  # where peers send KVDest / KVDone / KVAbort ("" for mixed)
    fingerprint: str = ""
    tp_size: int = 1


# ---- PD control plane: engine core <-> engine core ---------------------------------


class KVDest(Message):
    """D -> P: D has allocated `block_ids` for `room` and waits for its KV. Carries D's layout so P can
    refuse a mismatch, and the prompt's length and digest so P can refuse a different tokenization."""

    room: str
    block_ids: list[int]
    regions: list[list[KVRegion]]  # per D rank
    fingerprint: str
    tp_size: int
    num_prompt_tokens: int
    prompt_digest: str
    reply_to: str  # D's control address
    load_failure_policy: str = "fail"  # storage mode: what D does when blocks are missing (fail | recompute)


class KVDone(Message):
    """P -> D: every rank has written every block of `room` (into D's blocks, or to the pool in storage
    mode); `first_token` is the prefill's sampled token. status "error": the transfer failed (`error` says
    why; D fails the request with 502, or in storage mode with code "kv_store_write_failed" and the
    recompute policy, prefills it itself). tp_size, fingerprint: the writer's, so a reader of pool
    objects can tell a layout it cannot read."""

    room: str
    status: str = "ok"
    first_token: int = -1
    logprobs: list[tuple[int, float]] | None = None
    num_cached_tokens: int = 0  # prompt tokens P took from its prefix cache (the client's usage reports them)
    error: str = ""
    code: str = ""
    tp_size: int = 0
    fingerprint: str = ""


class KVAbort(Message):
    """Either side -> the other: forget `room` and free its blocks."""

    room: str
    reason: str = "abort"


class EngineFailed(Message):
    error: str


WorkerToEngine = Union[ForwardOutput, PoolLoaded, RankReport, WorkerReady, WorkerError]
ControlMessage = Union[KVDest, KVDone, KVAbort]
EngineToWorker = Union[StepPlan, LoadFromPool, Shutdown]
ApiToEngine = Union[AddRequest, AbortRequest, Shutdown]


class EngineHeartbeat(Message):
    """The engine core process is alive (sent every second by a thread of its own, during long steps too)."""


EngineToApi = Union[EngineOutputs, EngineReady, EngineFailed, EngineHeartbeat]

_encoder = msgspec.msgpack.Encoder()
_worker_decoder = msgspec.msgpack.Decoder(WorkerToEngine)
_engine_decoder = msgspec.msgpack.Decoder(EngineToWorker)
_api_decoder = msgspec.msgpack.Decoder(ApiToEngine)
_core_decoder = msgspec.msgpack.Decoder(EngineToApi)
_control_decoder = msgspec.msgpack.Decoder(ControlMessage)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode_from_worker(data: bytes) -> WorkerToEngine:
    return _worker_decoder.decode(data)


def decode_from_engine(data: bytes) -> EngineToWorker:
    return _engine_decoder.decode(data)


def decode_from_api(data: bytes) -> ApiToEngine:
    return _api_decoder.decode(data)


def decode_from_core(data: bytes) -> EngineToApi:
    return _core_decoder.decode(data)


def decode_control(data: bytes) -> ControlMessage:
    return _control_decoder.decode(data)
