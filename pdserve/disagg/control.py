"""The control channel between engine cores: KVDest, KVDone and KVAbort over ZMQ (msgspec, never pickle).

Each engine core binds one PULL socket (127.0.0.1 unless told otherwise) and keeps a PUSH socket per
peer it talks to. Sends never block: a message to a peer that is gone waits in ZMQ's queue (a peer that
comes back under a new incarnation drops it), one that cannot be queued makes `send` return False, and
the caller's deadline takes over either way.

With a cluster secret (--cluster-secret), every message is two frames: the encoded message and its
authenticator, HMAC-SHA256 keyed by the secret over a context label and the message bytes. A receiver with a
secret drops any message without a valid authenticator (logged once per peer address and reason, counted in
`num_refused`); a receiver without one reads the first frame, as it always did. The secret authenticates; it
does not encrypt (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import Counter, OrderedDict

import msgspec
import zmq

from pdserve.messages import PROTOCOL_VERSION, ControlMessage, Message, decode_control, encode

logger = logging.getLogger(__name__)

MAX_PEERS = 256
MAC_LABEL = b"pdserve-control-v1\x00"  # binds an authenticator to this channel's messages, and no other use
REFUSED_NO_MAC = "no authenticator (the sender has no --cluster-secret)"
REFUSED_BAD_MAC = "a wrong authenticator (the sender has another --cluster-secret)"
REFUSED_FRAMES = "an unexpected number of frames"


def authenticator(secret: str, data: bytes) -> bytes:
    """HMAC-SHA256 of one encoded control message, keyed by the deployment's cluster secret."""
    return hmac.new(secret.encode(), MAC_LABEL + data, hashlib.sha256).digest()


class ControlChannel:
    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, ctx: zmq.Context | None = None, secret: str | None = None
    ) -> None:
        self._secret = secret or None
        self.num_refused: Counter[str] = Counter()  # reason -> messages dropped for want of a valid authenticator
        self._warned: set[tuple[str, str]] = set()  # (peer address, reason) already logged at WARNING
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
        data = encode(message)
        frames = [data] if self._secret is None else [data, authenticator(self._secret, data)]
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("peer %s is not reading; dropping %s", address, type(message).__name__)
            return False
        return True

    def recv_all(self) -> list[ControlMessage]:
        """Every message waiting now (never blocks); unauthenticated (when this channel has a secret),
        undecodable or wrong-version messages are dropped."""
        messages: list[ControlMessage] = []
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return messages
            data = self._authenticated(frames)
            if data is None:
                continue
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

    def _authenticated(self, frames: list[zmq.Frame]) -> bytes | None:
        """The message bytes of one received message, or None (counted and logged) if it must be dropped."""
        data = frames[0].bytes
        if self._secret is None:
            return data  # a sender with a secret adds a frame; a receiver without one ignores it
        if len(frames) == 1:
            reason = REFUSED_NO_MAC
        elif len(frames) != 2:
            reason = REFUSED_FRAMES
        elif not hmac.compare_digest(frames[1].bytes, authenticator(self._secret, data)):
            reason = REFUSED_BAD_MAC
        else:
            return data
        self._refuse(_peer_address(frames[0]), reason)
        return None

    def _refuse(self, peer: str, reason: str) -> None:
        self.num_refused[reason] += 1
        key = (peer, reason)
        is_new = key not in self._warned and len(self._warned) < MAX_PEERS
        if is_new:
            self._warned.add(key)
        logger.log(
            logging.WARNING if is_new else logging.DEBUG,
            "refusing a control message from %s: %s; every instance of a deployment needs the same "
            "--cluster-secret (or PDSERVE_CLUSTER_SECRET) (%d refused for this reason so far; further ones "
            "from this peer are logged at DEBUG)",
            peer,
            reason,
            self.num_refused[reason],
        )

    def close(self) -> None:
        for sock in self._peers.values():
            sock.close()
        self._peers.clear()
        self.socket.close()


def _peer_address(frame: zmq.Frame) -> str:
    """The sending host's address as ZMQ saw it (TCP only), or 'an unknown peer'."""
    try:
        return str(frame.get("Peer-Address")) or "an unknown peer"
    except zmq.ZMQError:
        return "an unknown peer"


def prompt_digest(token_ids: tuple[int, ...] | list[int]) -> str:
    """A stable digest of a prompt's token ids (P and D must have tokenized identically)."""
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
