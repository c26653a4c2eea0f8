"""The deployment's cluster secret: authenticated control messages (two ZMQ channels on loopback), the engine's
refusal to open its control socket beyond loopback without a secret, the router's /register and /unregister
guard and the heartbeat that passes it, and `pdserve launch` handing it to children through the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
import zmq

from pdserve.config import DisaggConfig
from pdserve.disagg.control import (
    REFUSED_BAD_MAC,
    REFUSED_FRAMES,
    REFUSED_NO_MAC,
    ControlChannel,
    authenticator,
)
from pdserve.launcher import add_launch_parser, build_instance_argv, build_router_argv, child_env, plan_parts
from pdserve.launcher.cli import launch_config_from_args
from pdserve.launcher.plan import CLUSTER_SECRET_VAR, cluster_secret_for
from pdserve.messages import KVAbort, KVDone, encode
from pdserve.procs import free_port
from pdserve.router.app import RouterSettings, build_router_app
from pdserve.router.membership import SECRET_HEADER
from pdserve.router.policies import make_policy
from pdserve.router.registry import HealthSettings, Registry
from pdserve.server import heartbeat as heartbeat_module
from pdserve.server.heartbeat import heartbeat

SECRET = "s3cret-of-the-deployment"
DONE = KVDone(room="room-1", first_token=5, logprobs=[(5, -0.25)])
ABORT = KVAbort(room="room-1", reason="gone")


# ---- the ZMQ control channel -----------------------------------------------------------------------------


def _recv_until(channel: ControlChannel, count: int, timeout: float = 2.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += channel.recv_all()
        if len(got) < count:
            time.sleep(0.002)
    return got


def _settle(channel: ControlChannel, num_refused: int, timeout: float = 2.0) -> list[Any]:
    """Everything `channel` accepts until it has refused `num_refused` messages in all."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while sum(channel.num_refused.values()) < num_refused and time.monotonic() < deadline:
        got += channel.recv_all()
        time.sleep(0.002)
    time.sleep(0.02)
    return got + channel.recv_all()


@contextmanager
def channels(*secrets: str | None) -> Iterator[list[ControlChannel]]:
    ctx = zmq.Context()
    made = [ControlChannel(ctx=ctx, secret=s) for s in secrets]
    try:
        yield made
    finally:
        for c in made:
            c.close()
        ctx.term()


def test_channels_with_the_same_secret_exchange_messages() -> None:
    with channels(SECRET, SECRET) as (p, d):
        assert p.address.startswith("tcp://127.0.0.1:")
        assert d.send(p.address, ABORT) and p.send(d.address, DONE)
        assert _recv_until(p, 1) == [ABORT]
        assert _recv_until(d, 1) == [DONE]
        assert not p.num_refused and not d.num_refused


def test_a_receiver_with_a_secret_drops_messages_without_a_valid_one(caplog: pytest.LogCaptureFixture) -> None:
    with channels(SECRET, None, "another-secret", SECRET) as (receiver, plain, wrong, good):
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(receiver.address)
        try:
            with caplog.at_level(logging.DEBUG, logger="pdserve.disagg.control"):
                for _ in range(3):
                    assert plain.send(receiver.address, DONE)  # no authenticator
                    assert wrong.send(receiver.address, ABORT)  # another secret's
                data = encode(DONE)
                raw.send_multipart([data, authenticator(SECRET, data)[:-1] + b"\x00"])  # tampered
                raw.send_multipart([data, authenticator(SECRET, data), b"extra"])  # three frames
                raw.send_multipart([encode(ABORT), authenticator(SECRET, data)])  # another message's
                assert good.send(receiver.address, DONE)
                got = _settle(receiver, 9)
        finally:
            raw.close()
        assert got == [DONE]
        assert receiver.num_refused == {REFUSED_NO_MAC: 3, REFUSED_BAD_MAC: 5, REFUSED_FRAMES: 1}
    refusals = [r for r in caplog.records if r.getMessage().startswith("refusing a control message")]
    assert len(refusals) == 9
    warnings = [r.getMessage() for r in refusals if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # once per (peer address, reason): every sender here is 127.0.0.1
    assert all(w.startswith("refusing a control message from 127.0.0.1: ") for w in warnings)
    assert any(REFUSED_NO_MAC in w for w in warnings) and any("--cluster-secret" in w for w in warnings)


def test_a_receiver_without_a_secret_accepts_as_before() -> None:
    with channels(None, SECRET, None) as (receiver, signed, plain):
        assert signed.send(receiver.address, DONE) and plain.send(receiver.address, ABORT)
        assert sorted(_recv_until(receiver, 2), key=lambda m: type(m).__name__) == [ABORT, DONE]
        assert not receiver.num_refused


def test_authenticator_is_hmac_sha256_bound_to_the_secret_and_the_bytes() -> None:
    mac = authenticator(SECRET, b"message")
    assert len(mac) == 32
    assert mac == authenticator(SECRET, b"message")
    assert mac != authenticator(SECRET + "x", b"message") and mac != authenticator(SECRET, b"messagf")


# ---- the engine refuses an exposed control socket without a secret ----------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::", "my-host.example", ""])
@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_control_socket_beyond_loopback_needs_a_secret(role: str, host: str) -> None:
    with pytest.raises(ValueError, match=r"beyond loopback.*--cluster-secret \(or PDSERVE_CLUSTER_SECRET\)"):
        DisaggConfig(role=role, control_host=host)
    assert DisaggConfig(role=role, control_host=host, cluster_secret=SECRET).cluster_secret == SECRET


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_a_loopback_control_socket_needs_no_secret(host: str) -> None:
    assert DisaggConfig(role="prefill", control_host=host).cluster_secret is None


def test_a_mixed_instance_opens_no_control_socket_and_needs_no_secret() -> None:
    assert DisaggConfig(role="mixed", control_host="0.0.0.0").role == "mixed"


# ---- the router's membership routes and the heartbeat ----------------------------------------------------


def _router_app(secret: str | None, api_key: str | None = None) -> Any:
    registry = Registry(HealthSettings(interval_s=60))
    return build_router_app(
        registry, make_policy("round_robin"), RouterSettings(api_key=api_key, cluster_secret=secret)
    )


async def _post(app: Any, path: str, headers: dict[str, str], client_host: str = "127.0.0.1") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client_host, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        body = {"url": "http://127.0.0.1:8123", "role": "decode"}
        return await client.post(path, json=body if path == "/register" else {"url": body["url"]}, headers=headers)


def post(app: Any, path: str, headers: dict[str, str] | None = None, client_host: str = "127.0.0.1") -> httpx.Response:
    return asyncio.run(_post(app, path, headers or {}, client_host))


def test_a_router_with_a_secret_requires_it_on_register_and_unregister() -> None:
    app = _router_app(SECRET)
    for path in ("/register", "/unregister"):
        for headers, what in (({}, "no"), ({SECRET_HEADER: "nope"}, "a wrong")):
            resp = post(app, path, headers)
            assert resp.status_code == 403, resp.text
            error = resp.json()["error"]
            assert error["code"] == "invalid_cluster_secret" and error["type"] == "permission_error"
            assert error["message"].startswith(f"{what} cluster secret in the {SECRET_HEADER} header")
    assert app.state.router.registry.instances() == []
    resp = post(app, "/register", {SECRET_HEADER: SECRET}, client_host="10.1.2.3")
    assert resp.status_code == 200 and resp.json()["status"] == "registered"
    assert post(app, "/unregister", {SECRET_HEADER: SECRET}).json()["status"] == "unregistered"


def test_a_router_without_a_secret_takes_membership_only_from_loopback() -> None:
    app = _router_app(None)
    for host in ("10.1.2.3", "::ffff:10.1.2.3", "192.168.0.7"):
        resp = post(app, "/register", client_host=host)
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
        assert f"from other hosts ({host}) only with a cluster secret" in resp.json()["error"]["message"]
    assert post(app, "/unregister", client_host="10.1.2.3").status_code == 403
    for host in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"):
        assert post(app, "/register", client_host=host).status_code == 200
    assert post(app, "/unregister").status_code == 200


def test_the_api_key_is_checked_before_the_secret() -> None:
    app = _router_app(SECRET, api_key="key")
    assert post(app, "/register", {SECRET_HEADER: SECRET}).status_code == 401
    assert post(app, "/register", {"Authorization": "Bearer key"}).status_code == 403
    assert post(app, "/register", {"Authorization": "Bearer key", SECRET_HEADER: SECRET}).status_code == 200


def test_the_heartbeat_names_the_routers_header() -> None:
    assert heartbeat_module.SECRET_HEADER == SECRET_HEADER


@contextmanager
def serving(app: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait(lambda: server.started or not thread.is_alive(), "the router to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _wait(cond: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextmanager
def beating(router_url: str, secret: str | None) -> Iterator[None]:
    loop, stop = asyncio.new_event_loop(), asyncio.Event()
    beat = heartbeat(router_url, "http://127.0.0.1:8123", "decode", 0.1, stop, cluster_secret=secret)
    thread = threading.Thread(target=loop.run_until_complete, args=(beat,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


def test_the_heartbeat_sends_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    app = _router_app(SECRET)
    registry: Registry = app.state.router.registry
    with serving(app) as url:
        with caplog.at_level(logging.WARNING, logger="pdserve.server.heartbeat"), beating(url, "wrong"):
            _wait(lambda: "HTTP 403" in caplog.text, "a refused heartbeat")
            assert registry.instances() == []
        assert "a wrong cluster secret" in caplog.text
        with beating(url, SECRET):
            _wait(lambda: registry.get("http://127.0.0.1:8123") is not None, "the heartbeat to register")
        assert registry.get("http://127.0.0.1:8123") is None  # it unregistered, with the secret


# ---- pdserve launch ---------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pdserve")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO")
    add_launch_parser(parser.add_subparsers(dest="command", required=True), common)
    return parser.parse_args(["launch", *argv])


def test_launch_on_loopback_has_no_secret_unless_given() -> None:
    assert cluster_secret_for("127.0.0.1", None) is None
    assert cluster_secret_for("localhost", "") is None
    assert cluster_secret_for("127.0.0.1", SECRET) == SECRET
    assert launch_config_from_args(parse()).cluster_secret is None
    assert launch_config_from_args(parse(), None, SECRET).cluster_secret == SECRET


def test_launch_beyond_loopback_makes_a_random_secret_unless_given() -> None:
    made = {cluster_secret_for(host, None) for host in ("0.0.0.0", "10.0.0.1", "::", "0.0.0.0")}
    assert len(made) == 4 and all(s is not None and len(s) == 64 and int(s, 16) >= 0 for s in made)
    assert cluster_secret_for("0.0.0.0", SECRET) == SECRET
    config = launch_config_from_args(parse("--host", "0.0.0.0"))
    assert config.cluster_secret is not None and len(config.cluster_secret) == 64
    assert config.cluster_secret not in repr(config)


@pytest.mark.parametrize("kv_transfer", ["direct", "storage"])
def test_the_secret_reaches_children_through_the_environment_only(kv_transfer: str) -> None:
    config = launch_config_from_args(parse("--host", "0.0.0.0", "--kv-transfer", kv_transfer), None, SECRET)
    parts = plan_parts(config, iter(range(9000, 9100)).__next__)
    store = {"master": "127.0.0.1:7001", "metadata": "http://127.0.0.1:7002/metadata"}
    argvs = [build_instance_argv(config, p, store if kv_transfer == "storage" else None) for p in parts[:-1]]
    argvs.append(build_router_argv(config, parts[:-1]))
    assert not any(SECRET in arg or "--cluster-secret" in arg for argv in argvs for arg in argv)
    env = child_env({"PATH": "/bin", "PDSERVE_API_KEY": "key"}, 4, config.cluster_secret)
    assert env[CLUSTER_SECRET_VAR] == SECRET and "PDSERVE_API_KEY" not in env
    assert CLUSTER_SECRET_VAR not in child_env({"PATH": "/bin"}, 4)
    assert child_env({CLUSTER_SECRET_VAR: "users"}, 4)[CLUSTER_SECRET_VAR] == "users"
