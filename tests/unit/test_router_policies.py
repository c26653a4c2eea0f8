"""The router's pure parts: policies, the prefix key, the P/D pairing rule, registry bookkeeping, the metrics
text and the command line. Exact choices, no I/O."""

from __future__ import annotations

import argparse

import pytest

from pdserve.router.cli import add_router_parser, build_from_args
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import (
    PREFIX_KEY_CHARS,
    CacheAware,
    LeastLoaded,
    RoundRobin,
    RouteError,
    make_policy,
    plan_route,
    rendezvous_score,
    request_key,
)
from pdserve.router.registry import HealthSettings, Instance, InstanceInfo, Registry, normalize_url


def inst(
    url: str,
    role: str = "prefill",
    load: int = 0,
    healthy: bool = True,
    tp: int = 1,
    fp: str = "fp",
    mode: str = "direct",
) -> Instance:
    info = InstanceInfo(role, f"inc-{url}", f"tcp://{url}:1", fp, "m", tp, mode)
    return Instance(f"http://{url}:1", role, is_static=True, is_healthy=healthy, info=info, num_in_flight=load)


def urls(chosen: list[Instance]) -> list[str]:
    return [i.url.removeprefix("http://").removesuffix(":1") for i in chosen]


def test_round_robin_cycles_in_url_order() -> None:
    rr = RoundRobin()
    cands = [inst("c"), inst("a"), inst("b")]
    assert urls([rr.choose(cands, None) for _ in range(4)]) == ["a", "b", "c", "a"]


def test_round_robin_keeps_one_position_per_role() -> None:
    rr = RoundRobin()
    ps, ds = [inst("p1"), inst("p2")], [inst("d1", "decode"), inst("d2", "decode")]
    picks = [rr.choose(ps, "k") for _ in range(1)] + [rr.choose(ds, None)] + [rr.choose(ps, "k")]
    picks += [rr.choose(ds, None)]
    assert urls(picks) == ["p1", "d1", "p2", "d2"]


def test_round_robin_survives_membership_change() -> None:
    rr = RoundRobin()
    a, b, c = inst("a"), inst("b"), inst("c")
    assert urls([rr.choose([a, b, c], None), rr.choose([a, b, c], None)]) == ["a", "b"]
    assert urls([rr.choose([a, c], None)]) == ["c"]  # b left: the one after b
    assert urls([rr.choose([a, b], None)]) == ["a"]  # wraps


def test_least_loaded_picks_fewest_in_flight_ties_round_robin() -> None:
    ll = LeastLoaded()
    a, b, c = inst("a", load=2), inst("b", load=0), inst("c", load=0)
    assert urls([ll.choose([a, b, c], None) for _ in range(3)]) == ["b", "c", "b"]
    b.num_in_flight = 3
    assert urls([ll.choose([a, b, c], None)]) == ["c"]
    c.num_in_flight = 5
    assert urls([ll.choose([a, b, c], None)]) == ["a"]


def test_cache_aware_same_key_same_instance_by_rendezvous() -> None:
    ca = CacheAware()
    cands = [inst("a"), inst("b"), inst("c")]
    key = "You are a helpful assistant."
    expected = max(cands, key=lambda i: rendezvous_score(key, i.url))
    assert all(ca.choose(cands, key) is expected for _ in range(5))
    others = [i for i in cands if i is not expected]
    assert ca.choose([expected, others[0]], key) is expected  # another leaving keeps the key where it was


def test_cache_aware_spreads_keys() -> None:
    ca = CacheAware()
    cands = [inst("a"), inst("b"), inst("c")]
    counts = {i.url: 0 for i in cands}
    for n in range(300):
        counts[ca.choose(cands, f"prompt number {n}").url] += 1
    assert sorted(counts.values())[0] >= 70, counts


def test_cache_aware_yields_to_least_loaded_past_threshold() -> None:
    ca = CacheAware(load_threshold=4)
    cands = [inst("a"), inst("b"), inst("c")]
    key = "shared system prompt"
    hashed = ca.choose(cands, key)
    others = sorted((i for i in cands if i is not hashed), key=lambda i: i.url)
    hashed.num_in_flight = 4  # exactly the threshold above the least loaded (0): still the hashed one
    assert ca.choose(cands, key) is hashed
    hashed.num_in_flight = 5
    others[0].num_in_flight = 1
    assert ca.choose(cands, key) is others[1]  # least loaded
    assert ca.choose(cands, None) is others[1]  # no key: least loaded (a D choice)


def test_rendezvous_score_is_stable() -> None:
    assert rendezvous_score("k", "http://a:1") == rendezvous_score("k", "http://a:1")
    assert rendezvous_score("k", "http://a:1") != rendezvous_score("k", "http://b:1")
    assert 0 <= rendezvous_score("k", "u") < 2**64


def test_make_policy() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("least_loaded"), LeastLoaded)
    assert isinstance(make_policy("cache_aware"), CacheAware)
    with pytest.raises(ValueError, match="unknown router policy 'random'"):
        make_policy("random")


def test_request_key() -> None:
    long = "x" * 1000
    assert request_key({"prompt": long}) == "x" * PREFIX_KEY_CHARS
    assert request_key({"prompt": ["hello"]}) == "hello"
    assert request_key({"prompt": [1, 2, 3]}) == "ids:1,2,3"
    assert request_key({"prompt": [[1, 2]]}) == "ids:1,2"
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ]
    }
    assert request_key(chat) == "system:be brief\nuser:hi\n"
    assert len(request_key({"messages": [{"role": "user", "content": long}]}) or "") == PREFIX_KEY_CHARS
    assert request_key({"model": "m"}) is None


def test_plan_route_pd_pair_and_peers() -> None:
    p, d = inst("p", mode="storage"), inst("d", "decode", mode="storage")
    route = plan_route([p, d, inst("m", "mixed")], RoundRobin(), "k")
    assert route.prefill is p and route.primary is d and route.mode == "storage"


def test_plan_route_picks_d_compatible_with_p() -> None:
    p = inst("p", tp=2)
    d_bad, d_good = inst("d1", "decode", tp=1), inst("d2", "decode", tp=2)
    for _ in range(3):
        assert plan_route([p, d_bad, d_good], RoundRobin(), None).primary is d_good


def test_plan_route_refuses_tp_mismatch() -> None:
    with pytest.raises(RouteError) as e:
        plan_route([inst("p", tp=2), inst("d", "decode", tp=1)], LeastLoaded(), None)
    assert e.value.status == 500 and e.value.code == "pd_mismatch"
    assert "http://p:1" in e.value.message and "http://d:1" in e.value.message
    assert "P and D must have the same tensor-parallel size for now" in e.value.message


def test_plan_route_refuses_fingerprint_mismatch() -> None:
    with pytest.raises(RouteError) as e:
        plan_route([inst("p", fp="llama-bf16"), inst("d", "decode", fp="qwen-bf16")], LeastLoaded(), None)
    assert e.value.code == "pd_mismatch"
    assert all(s in e.value.message for s in ("http://p:1", "http://d:1", "llama-bf16", "qwen-bf16"))


def test_plan_route_refuses_kv_transfer_mismatch() -> None:
    with pytest.raises(RouteError, match="kv_transfer direct .* storage"):
        plan_route([inst("p"), inst("d", "decode", mode="storage")], LeastLoaded(), None)


def test_plan_route_falls_back_to_mixed() -> None:
    m = inst("m", "mixed")
    assert plan_route([inst("p"), inst("d", "decode", healthy=False), m], LeastLoaded(), "k").primary is m
    route = plan_route([m], LeastLoaded(), "k")
    assert route.primary is m and route.prefill is None and route.mode is None


def test_plan_route_no_healthy_instance() -> None:
    with pytest.raises(RouteError) as e:
        plan_route([inst("p"), inst("d", "decode", healthy=False)], LeastLoaded(), None)
    assert (e.value.status, e.value.code) == (503, "instance_unavailable")
    assert "no healthy decode instance" in e.value.message and "decode 0/1" in e.value.message
    with pytest.raises(RouteError, match="no healthy mixed instance"):
        plan_route([inst("m", "mixed", healthy=False)], LeastLoaded(), None)
    with pytest.raises(RouteError, match="no instance is registered"):
        plan_route([], LeastLoaded(), None)


# -- pure parts: registry, metrics, CLI ---------------------------------------------------------------------------


def test_normalize_url() -> None:
    assert normalize_url("http://127.0.0.1:8001/") == "http://127.0.0.1:8001"
    for bad in ("127.0.0.1:8001", "http://host", "ftp://h:1", "http://h:1/v1"):
        with pytest.raises(ValueError):
            normalize_url(bad)


def test_registry_membership_and_expiry() -> None:
    reg = Registry(HealthSettings(interval_s=1.0))
    reg.add("http://a:1", "prefill")
    with pytest.raises(ValueError, match="listed twice"):
        reg.add("http://a:1/", "decode")
    inst, is_new = reg.register("http://b:2", "decode", 0.5)
    assert is_new and not inst.is_static
    assert reg.register("http://b:2", "decode", 0.5) == (inst, False)
    assert reg.expire(inst.last_heartbeat + 1.4) == [] and reg.expire(inst.last_heartbeat + 1.6) == [inst]
    assert [i.url for i in reg.instances()] == ["http://a:1"]
    static = reg.get("http://a:1")
    assert static is not None
    static.is_healthy = True
    assert reg.unregister("http://a:1") is static and not static.is_healthy and reg.get("http://a:1") is static
    with pytest.raises(ValueError, match="prefill instance on the router's command line"):
        reg.register("http://a:1", "decode")
    assert reg.register("http://a:1", "prefill") == (static, False) and reg.expire(static.last_heartbeat + 99) == []


def test_instance_info_validation() -> None:
    good = {
        "role": "decode",
        "incarnation": "i",
        "control_address": "tcp://h:1",
        "fingerprint": "f",
        "model": "m",
        "tp_size": 1,
        "kv_transfer": "storage",
        "num_open_requests": 0,
        "num_blocks_free": 1,
        "num_blocks_total": 2,
    }
    assert InstanceInfo.from_json(good).kv_transfer == "storage"
    with pytest.raises(ValueError, match="'tp_size' should be a int"):
        InstanceInfo.from_json({**good, "tp_size": "1"})
    with pytest.raises(ValueError, match="kv_transfer 'rdma'"):
        InstanceInfo.from_json({**good, "kv_transfer": "rdma"})


def test_metrics_render() -> None:
    m = RouterMetrics()
    a = Instance("http://a:1", "prefill", is_static=True, is_healthy=True, num_in_flight=2)
    m.count_request(a)
    m.count_error("http://a:1", 'we"ird')
    m.observe_seconds(0.05)
    m.observe_seconds(1000)
    text = m.render([a])
    assert 'pdserve_router_requests_total{instance="http://a:1",role="prefill"} 1' in text
    assert 'pdserve_router_errors_total{instance="http://a:1",code="we\\"ird"} 1' in text
    assert 'pdserve_router_in_flight{instance="http://a:1"} 2' in text
    assert 'pdserve_router_request_seconds_bucket{le="0.05"} 1' in text
    assert 'pdserve_router_request_seconds_bucket{le="640"} 1' in text
    assert 'pdserve_router_request_seconds_bucket{le="+Inf"} 2' in text


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pdserve")
    add_router_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_API_KEY", "k")
    args = _parse(
        [
            "router",
            "--prefill",
            "http://127.0.0.1:8001",
            "http://127.0.0.1:8002",
            "--decode",
            "http://127.0.0.1:8003",
            "--decode",
            "http://127.0.0.1:8004",
            "--health-interval",
            "0.5",
        ]
    )
    assert args.policy == "least_loaded" and args.port == 8000 and args.host == "127.0.0.1"
    registry, policy, settings = build_from_args(args)
    assert [i.role for i in registry.instances()] == ["prefill"] * 2 + ["decode"] * 2
    assert policy.name == "least_loaded" and settings.api_key == "k" and registry.health.interval_s == 0.5
    with pytest.raises(ValueError, match="--decode URL 'localhost:9'"):
        build_from_args(_parse(["router", "--decode", "localhost:9"]))
    with pytest.raises(ValueError, match="--request-timeout"):
        build_from_args(_parse(["router", "--request-timeout", "0"]))
    with pytest.raises(SystemExit):
        _parse(["router", "--policy", "random"])
