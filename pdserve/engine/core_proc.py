"""The engine core in its own process, driven by the API server over ZMQ.

Inputs (AddRequest, AbortRequest, Shutdown) arrive on a PULL socket; after
every step the process pushes one EngineOutputs (token deltas of the requests
that advanced, plus engine stats). A thread of its own pushes an
EngineHeartbeat every HEARTBEAT_S on a second socket, during long steps too
(torch releases the GIL): an engine core that sends nothing for longer is
frozen or wedged (the API server's stall detection), while a slow machine's
long step is not mistaken for one. It never sees text and shares no GIL with
HTTP handling. If the API server goes away, the process exits.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback

import msgspec
import zmq

from pdserve.config import EngineConfig
from pdserve.engine.core import EngineCore
from pdserve.messages import (
    AbortRequest,
    AddRequest,
    EngineFailed,
    EngineHeartbeat,
    EngineOutputs,
    EngineReady,
    RequestDelta,
    Shutdown,
    decode_from_api,
    encode,
)
from pdserve.request import FinishReason, SamplingParams
from pdserve.scheduler.scheduler import RequestUpdate

logger = logging.getLogger(__name__)


class CoreProcSpec(msgspec.Struct, frozen=True):
    config: EngineConfig
    input_address: str
    output_address: str
    parent_pid: int
    log_level: str = "INFO"


class CoreLoop:
    def __init__(self, core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket, parent_pid: int) -> None:
        self.core = core
        self.inputs = inputs
        self.outputs = outputs
        self.parent_pid = parent_pid
        self.pending: list[RequestDelta] = []  # rejections and aborts to report with the next output

    def handle(self, message: AddRequest | AbortRequest) -> None:
        if isinstance(message, AddRequest):
            try:
                params = SamplingParams.from_wire(message.sampling)
                self.core.add_request(
                    message.req_id, message.prompt_token_ids, params, message.transfer, after=message.after
                )
            except ValueError as e:
                self.pending.append(RequestDelta(message.req_id, [], finish_reason="abort", error=str(e)))
        else:
            reason = FinishReason(message.finish_reason)
            self.core.finish(message.req_id, reason)
            self.pending.append(RequestDelta(message.req_id, [], finish_reason=reason.value))

    def run(self) -> None:
        dirty = True
        poller = zmq.Poller()
        poller.register(self.inputs, zmq.POLLIN)
        for socket in self.core.pd.sockets:
            poller.register(socket, zmq.POLLIN)
        while True:
            busy = self.core.has_work
            timeout = 0 if busy else PEER_POLL_MS if self.core.is_waiting_on_peers else 1000
            ready = dict(poller.poll(timeout))
            if self.inputs in ready:
                while True:  # drain everything that arrived
                    message = decode_from_api(self.inputs.recv())
                    if isinstance(message, Shutdown):
                        return
                    self.handle(message)
                    dirty = True
                    if not self.inputs.poll(0):
                        break
            elif not ready and not busy and os.getppid() != self.parent_pid:
                return  # the API server is gone
            deltas = self.pending
            self.pending = []
            if self.core.has_work or self.core.is_waiting_on_peers or ready:
                for update in self.core.step():
                    deltas.append(_delta(update))
                dirty = True
            if deltas or dirty:
                self.outputs.send(encode(EngineOutputs(deltas=deltas, stats=self.core.stats())))
                dirty = False


PEER_POLL_MS = 20  # PD requests waiting on a peer or a deadline: look at least this often
HEARTBEAT_S = 1.0  # between two EngineHeartbeats


def _beat(ctx: zmq.Context, address: str, stop: threading.Event) -> None:
    """Push an EngineHeartbeat every HEARTBEAT_S until `stop` (its own socket: ZMQ sockets are not thread-safe)."""
    socket = ctx.socket(zmq.PUSH)
    socket.connect(address)
    try:
        while not stop.wait(HEARTBEAT_S):
            socket.send(encode(EngineHeartbeat()))
    finally:
        socket.close(linger=0)


def _delta(update: RequestUpdate) -> RequestDelta:
    r = update.request
    reason = r.finish_reason.value if update.finished and r.finish_reason else None
    if update.error is not None:
        return RequestDelta(
            r.req_id,
            [],
            finish_reason=reason,
            error=update.error.message,
            error_code=update.error.code,
            error_status=update.error.status,
        )
    return RequestDelta(
        r.req_id,
        update.new_token_ids,
        update.new_logprobs,
        finish_reason=reason,
        prompt_logprobs=update.prompt_logprobs,
        num_cached_tokens=r.num_cached_tokens,
    )


def core_main(spec_json: bytes) -> None:
    spec = msgspec.json.decode(spec_json, type=CoreProcSpec)
    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s engine: %(message)s")
    ctx = zmq.Context()
    inputs = ctx.socket(zmq.PULL)
    inputs.connect(spec.input_address)
    outputs = ctx.socket(zmq.PUSH)
    outputs.connect(spec.output_address)
    core = None
    stop_beat = threading.Event()
    try:
        core = EngineCore(spec.config)
        outputs.send(
            encode(
                EngineReady(
                    model_name=core.source.name,
                    max_model_len=core.max_model_len,
                    vocab_size=core.arch.vocab_size,
                    num_blocks=core.num_blocks,
                    block_size=spec.config.cache.block_size,
                    role=spec.config.disagg.role,
                    control_address=core.control_address,
                    fingerprint=core.fingerprint,
                    tp_size=spec.config.parallel.tensor_parallel_size,
                )
            )
        )
        beat = threading.Thread(target=_beat, args=(ctx, spec.output_address, stop_beat), daemon=True)
        beat.start()
        CoreLoop(core, inputs, outputs, spec.parent_pid).run()
    except Exception as e:  # noqa: BLE001 - reported to the API server, which reports unhealthy
        logger.error("engine core failed: %s", traceback.format_exc())
        outputs.send(encode(EngineFailed(error=f"{type(e).__name__}: {e}")))
    finally:
        stop_beat.set()
        if core is not None:
            core.shutdown()
        outputs.close(linger=1000)
        inputs.close(linger=0)
        ctx.term()
