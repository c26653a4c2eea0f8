"""The control channel between engine cores: KVDest, KVDone and KVAbort over ZMQ (msgspec, never pickle).

Each engine core binds one PULL socket (127.0.0.1 unless told otherwise) and keeps a PUSH socket per
peer it talks to. Sends never block: a message to a peer that is gone waits in ZMQ's queue (a peer that
comes back under a new incarnation drops it), one that cannot be queued makes `send` return False, and
the caller's deadline takes over either way.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import msgspec
import zmq

from pdserve.messages import PROTOCOL_VERSION, ControlMessage, Message, decode_control, encode

logger = logging.getLogger(__name__)

MAX_PEERS = 256


class ControlChannel:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, ctx: zmq.Context | None = None) -> None:
        self._ctx = ctx or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        if port:
            self.socket.bind(f"tcp://{host}:{port}")
        else:
            port = self.socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._peers: OrderedDict[str, zmq.Socket] = OrderedDict()

    def send(self, address: str, message: Message) -> bool:
        """Queue `message` for the peer at `address`; False if it cannot be queued now."""
        sock = self._peers.get(address)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10000)  # a dead peer queues this many; its receiver drops stale ones
            try:
                sock.connect(address)
            except zmq.ZMQError as e:
                sock.close()
                logger.warning("cannot connect to peer %s: %s", address, e)
                return False
            self._peers[address] = sock
            if len(self._peers) > MAX_PEERS:
                _, old = self._peers.popitem(last=False)
                old.close()
        self._peers.move_to_end(address)
        try:
            sock.send(encode(message), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("peer %s is not reading; dropping %s", address, type(message).__name__)
            return False
        return True

    def recv_all(self) -> list[ControlMessage]:
        """Every message waiting now (never blocks); undecodable or wrong-version messages are dropped."""
        messages: list[ControlMessage] = []
        while True:
            try:
                data = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            try:
                message = decode_control(data)
            except msgspec.DecodeError as e:
                logger.error("dropping an undecodable control message: %s", e)
                continue
            if message.version != PROTOCOL_VERSION:
                logger.error(
                    "dropping a control message of protocol version %d (this instance speaks %d)",
                    message.version,
                    PROTOCOL_VERSION,
                )
                continue
            messages.append(message)

    def close(self) -> None:
        for sock in self._peers.values():
            sock.close()
        self._peers.clear()
        self.socket.close()


def prompt_digest(token_ids: tuple[int, ...] | list[int]) -> str:
    """A stable digest of a prompt's token ids (P and D must have tokenized identically)."""
    import hashlib
    import struct

    return hashlib.blake2b(struct.pack(f"<{len(token_ids)}I", *token_ids), digest_size=16).hexdigest()


def layout_mismatch(
    own_fingerprint: str, own_tp: int, peer_fingerprint: str, peer_tp: int, own_role: str
) -> str | None:
    """Why this instance and its peer cannot exchange KV blocks, or None if they can."""
    peer_role = "decode" if own_role == "prefill" else "prefill"
    if own_tp != peer_tp:
        sizes = {own_role: own_tp, peer_role: peer_tp}
        return (
            f"the prefill instance has tensor-parallel size {sizes['prefill']} and the decode instance "
            f"{sizes['decode']}; P and D must have the same tensor-parallel size for now"
        )
    if own_fingerprint != peer_fingerprint:
        return (
            f"KV layout mismatch: this {own_role} instance's fingerprint is {own_fingerprint[:16]}..., the "
            f"{peer_role} instance's {peer_fingerprint[:16]}...; both must serve the same model weights, "
            "dtype and block size"
        )
    return None
