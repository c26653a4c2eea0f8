"""`pdserve bench storage` end to end on the default model, tiny workload.

It runs in this process through its own argparse parser (the `pdserve bench` wiring is cli.py's), starts a
direct 1P1D deployment, then a storage one with its own Mooncake master, then a raw Mooncake baseline (a
fresh master, two client processes), and writes its JSON and PNG into tmp_path. KV bytes are checked
exactly: every prompt block moves whole, as one pool object of a whole block in storage mode.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import require_module

require_module("mooncake.store")  # under CI=true a missing Mooncake fails instead of skipping

from pdserve.bench import storage  # noqa: E402

BLOCK_SIZE = 16
LENS = [16, 48]


@pytest.fixture(scope="module")
def block_bytes(default_hf_dir: Path) -> int:
    """Bytes of one fp32 KV block of the default model, from its config.json."""
    cfg = json.loads((default_hf_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * BLOCK_SIZE * cfg["num_key_value_heads"] * head_dim * 4


def run_bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench")
    storage.add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["storage", *argv])
    return int(args.func(args))


def leftovers(result: dict[str, Any]) -> list[str]:
    """Command lines of processes still running with a port of the benchmark's deployments or masters."""
    ports = {p["url"].rsplit(":", 1)[1] for d in result["deployments"].values() for p in d["parts"]}
    masters = {a for a in result["deployments"]["storage"]["mooncake_master"]["argv"] if a.startswith("--rpc_port=")}
    masters |= {a for a in result["raw_baseline"]["master_argv"] if a.startswith("--rpc_port=")}
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if (
            "pdserve.cli" in cmdline and any(a == "--port" and b in ports for a, b in zip(cmdline, cmdline[1:]))
        ) or masters & set(cmdline):
            out.append(" ".join(cmdline))
    return out


def test_pool_sizes() -> None:
    """A segment per instance holds every object of the run; the default host tier stages 4096 fp32 tokens."""
    layout = storage.KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32", dtype_bytes=4, block_size=16)
    args = argparse.Namespace(num_requests=3, num_warmup=1, pool_config={}, server_flags="")
    assert storage.pool_options(args, layout, [16, 48]) == {"global_segment_size": 256 << 20}
    big = storage.pool_options(args, layout, [128, 256, 512, 1024, 2048, 4096])["global_segment_size"]
    total = 3 * sum(layout.bytes_for(n) for n in (128, 256, 512, 1024, 2048, 4096)) + layout.bytes_for(128)
    assert big % (64 << 20) == 0 and total * 1.25 <= big < total * 1.25 + (64 << 20)
    args.pool_config = {"global_segment_size": "512MiB"}
    assert storage.pool_options(args, layout, [4096]) == {"global_segment_size": "512MiB"}
    assert storage.storage_flags(args, layout, [4096]) == []
    assert storage.storage_flags(args, layout, [8192]) == [
        "--host-kv-cache-memory",
        str(512 << 20),
    ]  # 512 blocks of 720 KiB, x 1.25, rounded up to 64 MiB
    args.server_flags = "--num-host-blocks 600"
    assert storage.storage_flags(args, layout, [8192]) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_storage(tmp_path: Path, block_bytes: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_bench(
        [
            "--input-lens",
            ",".join(map(str, LENS)),
            "--num-requests",
            "1",
            "--raw-repeats",
            "2",
            "--num-blocks",
            "64",
            "--result-dir",
            str(tmp_path),
            "--label",
            "e2e",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "TTFT sto" in out.out and "raw get" in out.out and "Results:" in out.out
    result = json.loads((tmp_path / "storage-e2e.json").read_text())
    assert (tmp_path / "storage-e2e.png").stat().st_size > 10_000
    assert result["benchmark"] == "storage" and result["model"] == "SmolLM2-135M-Instruct"
    direct, pooled = result["deployments"]["direct"], result["deployments"]["storage"]
    assert (
        [p["role"] for p in direct["parts"]] == [p["role"] for p in pooled["parts"]] == ["prefill", "decode", "router"]
    )
    assert "--kv-transfer" not in direct["launch_argv"] and "mooncake_master" not in direct
    assert pooled["launch_argv"][pooled["launch_argv"].index("--kv-transfer") + 1] == "storage"
    store_config = pooled["mooncake_master"]["store_config"]
    for part in pooled["parts"][:2]:
        argv = part["argv"]
        assert argv[argv.index("--kv-transfer") + 1] == "storage"
        assert argv[argv.index("--kv-store") + 1] == "mooncake"
        assert json.loads(argv[argv.index("--kv-store-config") + 1]) == store_config
    assert result["pool"]["store_config"] == store_config and store_config["global_segment_size"] == 256 << 20
    assert [x["input_len"] for x in result["lengths"]] == LENS
    assert all(w["success"] for mode in ("direct", "storage") for w in result["warmup"][mode])
    for x in result["lengths"]:
        num_blocks = math.ceil(x["input_len"] / BLOCK_SIZE)
        expected = num_blocks * block_bytes
        assert x["prompt_tokens"] == x["input_len"] and x["num_objects"] == num_blocks
        assert x["object_nbytes"] == block_bytes and x["kv_bytes_per_request"] == expected
        for mode in ("direct", "storage"):
            m = x[mode]
            assert m["completed"] == m["num_requests"] == 1 and m["failures"] == 0, m["requests"]
            assert m["ttft_median_ms"] > 0 and m["kv_bytes_per_request"] == m["d_kv_bytes_per_request"] == expected
        assert x["direct"]["requests"][0]["prompt_tokens"] == x["storage"]["requests"][0]["prompt_tokens"]
        s = x["storage"]
        assert s["put_gb_per_s"] > 0 and s["get_gb_per_s"] > 0 and s["put_s_median"] > 0 and s["get_s_median"] > 0
        assert s["put_gb_per_s"] == pytest.approx(expected / s["put_s_median"] / 1e9, rel=1e-3)
        assert x["ttft_ratio_storage_over_direct"] == pytest.approx(
            s["ttft_median_ms"] / x["direct"]["ttft_median_ms"], rel=1e-4
        )
        raw = x["raw"]
        assert raw["num_objects"] == num_blocks and raw["object_nbytes"] == block_bytes and raw["nbytes"] == expected
        assert sum(raw["placement"].values()) == num_blocks and raw["placement"]["other"] == 0
        for op in ("put", "get"):
            assert len(raw[op]["seconds"]) == 2 and raw[op]["gb_per_s_median"] > 0 and raw[op]["gb_per_s_best"] > 0
        assert x["put_over_raw"] > 0 and x["get_over_raw"] > 0
    assert not leftovers(result)
