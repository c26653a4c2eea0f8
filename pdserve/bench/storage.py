"""`pdserve bench storage`: PD through the Mooncake Store pool against direct P -> D writes, per prompt length.

One run, so that the ratios come from the same machine state:
1. 1P1D with --kv-transfer direct behind the router (as `pdserve bench transfer` deploys it). For each
   --input-lens length, --num-requests streaming requests of random token ids, one at a time (max_tokens 2:
   TTFT is the first token's chunk), after --num-warmup untimed requests. Then it is stopped.
2. 1P1D with --kv-transfer storage (its own Mooncake master, as `pdserve launch --kv-transfer storage` starts
   it), the very same prompts. Around each request it reads P's and D's counters: bytes P put to the pool and
   P's (rank 0) staging + writing seconds, bytes D read and D's read seconds: put and get GB/s.
3. With both deployments stopped, a raw Mooncake baseline: a fresh master and two client processes (spawned),
   one putting (batch_put_from) and the other getting (batch_get_into) exactly the objects one request of each
   length moves (its number of block objects, each of the block's bytes), as P puts and D gets them.

Writes storage-<label>.json and a .png under --result-dir and prints a table. It knows the servers only by the
OpenAI API and /metrics, and the raw clients only by Mooncake's Python API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pdserve.bench import transfer
from pdserve.bench.common import (
    MIN_RANDOM_TOKEN_ID,
    add_output_args,
    code_version,
    fmt,
    machine_info,
    now_iso,
    random_requests,
    write_json,
)
from pdserve.bench.deployment import Deployment
from pdserve.bench.launch import BenchServerError, sigterm_interrupts
from pdserve.bench.plot import finish_figure, pyplot
from pdserve.bench.serve import BenchServeError, ServeBenchConfig
from pdserve.bench.transfer import (
    MAX_TOKENS,
    KVLayout,
    _model_name,
    _ratio,
    add_input_lens_arg,
    add_instance_args,
    instance_flags,
    lengths_and_model,
    send_counted,
)
from pdserve.config import DEFAULT_STAGING_HOST_MEMORY, parse_size
from pdserve.launcher import KV_TRANSFER_ENGINES, LaunchConfig
from pdserve.piped_child import PipedChild
from pdserve.store.base import StoreError

MODES = ("direct", "storage")
DEFAULT_SEGMENT_BYTES = 256 << 20  # MooncakeStore's global_segment_size default (docs/kv-store.md)
DEFAULT_LOCAL_BUFFER = "64MiB"  # MooncakeStore's local_buffer_size default
SIZE_STEP = 64 << 20  # automatic segment and host tier sizes are rounded up to this
POOL_HEADROOM = 1.25  # each segment holds every object the run puts, with this margin: no eviction
RAW_START_TIMEOUT_S = 120.0  # a spawned client imports pdserve (torch): seconds on a loaded machine
RAW_REPLY_TIMEOUT_S = 120.0
# JSON name -> Prometheus sample, read on P and on D around every request: `bench transfer`'s and the pool's
COUNTERS = transfer.COUNTERS | {
    "put_seconds": 'pdserve_kv_transfer_pool_seconds_total{op="put"}',
    "get_seconds": 'pdserve_kv_transfer_pool_seconds_total{op="get"}',
    "store_errors": "pdserve_kv_store_errors_total",
}
NOTES = {
    "ttft": "client TTFT: POST to the first token's chunk, streaming, through the router; per length the median "
    "over the measured requests",
    "ttft_ratio_storage_over_direct": "storage's median TTFT / direct's median TTFT at the same length (the same "
    "prompts)",
    "put_gb_per_s": "per request, bytes P put to the pool (all ranks) / P rank 0's pool seconds (staging the device "
    "blocks into host blocks, exists check, batch put); per length the median over requests",
    "get_gb_per_s": "per request, bytes D read from the pool / D's read seconds (the batch get into host blocks, "
    "all ranks); per length the median over requests",
    "p_transfer_ms": "P's pdserve_kv_transfer_seconds: direct, its first send to KVDone (during the prefill); "
    "storage, from the step that computes the prompt's last chunk (the staging is in its plan, so "
    "its forward is included) to KVDone",
    "d_transfer_ms": "D's pdserve_kv_transfer_seconds: direct, KVDest sent to KVDone; storage, KVDest sent to the "
    "end of its pool read (both include P's prefill)",
    "raw": "a fresh Mooncake master and two spawned client processes with the deployment's segment and local "
    "buffer sizes: one batch_put_from of the length's objects (one per block, the block's bytes) from the "
    "putter's registered buffer, then one batch_get_into by the getter into its own, then a forced remove; "
    "one untimed round (its copy checked), then --raw-repeats timed ones, timed inside the clients around "
    "the one call; gb_per_s_median is what the ratios use",
    "placement": "where the master put the raw objects: in the putter's segment (its put is a local copy, the "
    "get crosses TCP) or the getter's (the other way round); P and D face the same choice",
}


# ---- the deployments ---------------------------------------------------------------------------------------


def _round_up(nbytes: float, step: int = SIZE_STEP) -> int:
    return int(math.ceil(nbytes / step) * step)


def pool_options(args: argparse.Namespace, layout: KVLayout, lens: list[int]) -> dict[str, Any]:
    """The storage deployment's extra --kv-store-config options: --pool-config over a segment per instance
    large enough to hold every object of the run (nothing is evicted, so no put fails for room)."""
    total = sum(layout.bytes_for(n) * args.num_requests for n in lens) + layout.bytes_for(lens[0]) * args.num_warmup
    options: dict[str, Any] = {"global_segment_size": max(DEFAULT_SEGMENT_BYTES, _round_up(total * POOL_HEADROOM))}
    return options | args.pool_config


def storage_flags(args: argparse.Namespace, layout: KVLayout, lens: list[int]) -> list[str]:
    """Flags the storage instances get beyond the direct ones: a host tier that stages the longest prompt
    (the default one, DEFAULT_STAGING_HOST_MEMORY, unless that is too small or --server-flags sets one)."""
    user = shlex.split(args.server_flags)
    need = layout.bytes_for(max(lens))
    if {"--num-host-blocks", "--host-kv-cache-memory"} & set(
        user
    ) or need * POOL_HEADROOM <= DEFAULT_STAGING_HOST_MEMORY:
        return []
    return ["--host-kv-cache-memory", str(_round_up(need * POOL_HEADROOM))]


def deployment_for(
    mode: str, args: argparse.Namespace, layout: KVLayout, lens: list[int], work_dir: Path
) -> Deployment:
    flags = instance_flags(args, lens)
    options = None
    if mode == "storage":
        flags += storage_flags(args, layout, lens)
        options = pool_options(args, layout, lens)
    config = LaunchConfig(
        num_prefill=1,
        num_decode=1,
        kv_transfer=mode,
        kv_transfer_engine=args.kv_transfer_engine,
        engine_argv=tuple(flags),
    )
    return Deployment(mode, config, work_dir / mode / "logs", args.server_timeout, store_options=options)


# ---- measuring a deployment ----------------------------------------------------------------------------------


def measure_request(
    deployment: Deployment, config: ServeBenchConfig, model: str, prompt_ids: list[int]
) -> dict[str, Any]:
    """Send one request through the router; what the client and P's and D's counters saw of it."""
    record, growth = send_counted(deployment, config, model, prompt_ids, COUNTERS)
    if growth is None:
        return record
    p, d = growth
    record |= {
        "kv_bytes": int(p["bytes_sent"]),
        "d_kv_bytes": int(d["bytes_received"]),
        "p_transfer_ms": round(p["seconds"] * 1000, 3),
        "d_transfer_ms": round(d["seconds"] * 1000, 3),
        "failures": int(p["failures"] + d["failures"]),
        "store_errors": int(p["store_errors"] + d["store_errors"]),
    }
    if deployment.config.kv_transfer == "storage":
        put_s, get_s = p["put_seconds"], d["get_seconds"]
        record |= {
            "put_s": round(put_s, 6),
            "get_s": round(get_s, 6),
            "put_gb_per_s": _ratio(record["kv_bytes"], put_s, 1e9),
            "get_gb_per_s": _ratio(record["d_kv_bytes"], get_s, 1e9),
        }
    else:
        record["busy_s"] = round(p["busy_seconds"], 6)
    return record


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 6) if present else None


def summarize(mode: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's figures at one length: medians over its successful requests."""
    ok = [r for r in records if r["success"]]
    ttfts = [r["ttft_ms"] for r in ok]
    out: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(ok),
        "failures": len(records) - len(ok) + sum(r["failures"] + r["store_errors"] for r in ok),
        "ttft_median_ms": _median(ttfts),
        "ttft_mean_ms": round(statistics.fmean(ttfts), 3) if ttfts else None,
        "ttft_min_ms": min(ttfts, default=None),
        "ttft_max_ms": max(ttfts, default=None),
        "kv_bytes_per_request": _median([r["kv_bytes"] for r in ok]),
        "d_kv_bytes_per_request": _median([r["d_kv_bytes"] for r in ok]),
        "p_transfer_ms_median": _median([r["p_transfer_ms"] for r in ok]),
        "d_transfer_ms_median": _median([r["d_transfer_ms"] for r in ok]),
    }
    if mode == "storage":
        out |= {
            "put_s_median": _median([r["put_s"] for r in ok]),
            "get_s_median": _median([r["get_s"] for r in ok]),
            "put_gb_per_s": _median([r["put_gb_per_s"] for r in ok]),
            "get_gb_per_s": _median([r["get_gb_per_s"] for r in ok]),
        }
    return out | {"requests": records}


def build_prompts(
    args: argparse.Namespace, lens: list[int], vocab_size: int
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(warm-up prompts of the first length, per length the measured prompts): fresh random token ids each,
    a seed per length, so no prompt shares a block with another; both modes get the same ones."""
    low = min(MIN_RANDOM_TOKEN_ID, vocab_size // 2)

    def draw(count: int, n: int, seed: int) -> list[list[int]]:
        if count == 0:
            return []
        return [
            r.prompt_token_ids
            for r in random_requests(count, (n, n), (MAX_TOKENS, MAX_TOKENS), vocab_size, seed=seed, min_token_id=low)
        ]

    warmup = draw(args.num_warmup, lens[0], args.seed * 1000 + 999)
    return warmup, [draw(args.num_requests, n, args.seed * 1000 + i) for i, n in enumerate(lens)]


def run_mode(
    mode: str,
    args: argparse.Namespace,
    layout: KVLayout,
    lens: list[int],
    prompts: list[list[list[int]]],
    warmup: list[list[int]],
    work_dir: Path,
) -> dict[str, Any]:
    """Start the mode's deployment, send the warm-up and measured requests one at a time, stop it."""
    deployment = deployment_for(mode, args, layout, lens, work_dir)
    print(f"[storage] {mode}: starting {shlex.join(deployment.launch_argv)}", flush=True)
    with deployment:
        config = ServeBenchConfig(base_url=deployment.url, timeout_s=args.timeout, use_tqdm=False)
        model = asyncio.run(_model_name(config))
        warm = [measure_request(deployment, config, model, p) for p in warmup]
        per_length = []
        for input_len, length_prompts in zip(lens, prompts):
            records = [measure_request(deployment, config, model, p) for p in length_prompts]
            summary = summarize(mode, records)
            per_length.append(summary)
            extra = (
                f", put {fmt(summary['put_gb_per_s'], '{:.2f}')} GB/s, get {fmt(summary['get_gb_per_s'], '{:.2f}')}"
                " GB/s"
                if mode == "storage"
                else ""
            )
            print(
                f"[storage] {mode}, {input_len} tokens: {summary['completed']}/{len(records)} ok, TTFT median "
                f"{fmt(summary['ttft_median_ms'])} ms{extra}",
                flush=True,
            )
        deployment.check_alive()
    return {"model": model, "deployment": deployment.describe(), "warmup": warm, "lengths": per_length}


# ---- the raw Mooncake baseline -------------------------------------------------------------------------------


def _raw_client(conn: Connection, options: dict[str, Any]) -> None:
    """Child process (spawn): one Mooncake Store client with one registered buffer of options["nbytes"] (random
    bytes for the putter, zeros for the getter), answering the parent's JSON commands {"op", "keys", "size"}:
    put / get / remove the keys at consecutive `size`-byte slices of the buffer, digest the first slices,
    where (the replicas' transport endpoints), stop. Its stderr goes to options["log_path"]."""
    import numpy as np

    log = os.open(options["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)  # Mooncake's glog lines go to the log, shown only when the client fails
    os.close(log)
    from mooncake.store import MooncakeDistributedStore

    def reply(message: dict[str, Any]) -> None:
        conn.send_bytes(json.dumps(message).encode())

    client = None
    try:
        client = MooncakeDistributedStore()
        code = client.setup(
            options["local_hostname"],
            options["metadata"],
            options["global_segment_size"],
            options["local_buffer_size"],
            "tcp",
            "",
            options["master"],
        )
        if code != 0:
            client = None  # NOTE: never call into a client whose setup failed: Mooncake crashes the process
            reply({"error": f"setup against {options['master']} failed with code {code}"})
            return
        nbytes = options["nbytes"]
        buffer = (
            np.random.default_rng(0).integers(0, 256, size=nbytes, dtype=np.uint8)
            if options["fill"]
            else np.zeros(nbytes, dtype=np.uint8)
        )
        base = buffer.ctypes.data
        code = client.register_buffer(base, nbytes)
        if code != 0:
            reply({"error": f"register_buffer of {nbytes} bytes failed with code {code}"})
            return
        reply({"hostname": client.get_hostname()})
        while True:
            command = json.loads(conn.recv_bytes())
            op, keys, size = command["op"], command.get("keys", []), command.get("size", 0)
            if op == "stop":
                break
            ptrs, sizes = [base + i * size for i in range(len(keys))], [size] * len(keys)
            if len(keys) * size > nbytes:
                reply({"error": f"{len(keys)} objects of {size} bytes exceed the {nbytes}-byte buffer"})
                continue
            started = time.perf_counter()
            if op == "put":
                codes = client.batch_put_from(keys, ptrs, sizes)
            elif op == "get":
                codes = client.batch_get_into(keys, ptrs, sizes)
            elif op == "remove":
                codes = client.batch_remove(keys, True)  # force: a get leaves a lease
            elif op == "digest":
                view = buffer[: len(keys) * size]
                reply({"digest": hashlib.blake2b(view.tobytes(), digest_size=16).hexdigest()})
                continue
            elif op == "where":
                replicas = client.batch_get_replica_desc(keys)
                reply(
                    {
                        "endpoints": [
                            r.get_memory_descriptor().buffer_descriptor.transport_endpoint
                            for key in keys
                            for r in replicas.get(key, [])
                            if r.is_memory_replica()
                        ]
                    }
                )
                continue
            else:
                reply({"error": f"unknown op {op!r}"})
                continue
            seconds = time.perf_counter() - started
            expected = size if op == "get" else 0  # get answers the bytes read, put and remove 0
            bad = [c for c in codes if c != expected]
            reply({"seconds": seconds, "num_ok": len(codes) - len(bad), "codes": sorted(set(bad))[:5]})
    except (EOFError, OSError):
        pass  # the parent went away
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        with contextlib.suppress(OSError):
            reply({"error": f"{type(e).__name__}: {e}"})
    finally:
        if client is not None:
            client.close()


class RawClient:
    """A spawned Mooncake Store client (_raw_client) and the pipe to it; its log is `log_dir`/raw-<name>.log."""

    def __init__(self, name: str, options: dict[str, Any], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"raw-{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._child = PipedChild(
            _raw_client,
            (options | {"log_path": str(self.log_path)},),
            f"pdserve-raw-{name}",
            f"the raw {name}",
            StoreError,
            self._tail,
        )
        try:
            self.hostname = str(self._recv(RAW_START_TIMEOUT_S)["hostname"])
        except BaseException:
            self.close()
            raise

    def ask(self, op: str, keys: Sequence[str] = (), size: int = 0) -> dict[str, Any]:
        self._child.send(json.dumps({"op": op, "keys": list(keys), "size": size}).encode())
        return self._recv(RAW_REPLY_TIMEOUT_S)

    def _tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-num_lines:]
        except OSError:
            return ""
        return f"; the last lines of its log ({self.log_path}):\n" + "\n".join(lines) if lines else ""

    def _recv(self, timeout_s: float) -> dict[str, Any]:
        reply = json.loads(self._child.recv(timeout_s))
        if "error" in reply:
            raise StoreError(f"the raw {self.name} failed: {reply['error']}{self._tail()}")
        return dict(reply)

    def close(self) -> None:
        """Stop the child (killing it after 30 s: Mooncake's teardown takes seconds); safe twice."""
        self._child.close(json.dumps({"op": "stop"}).encode(), 30.0)


def _checked(reply: dict[str, Any], op: str, num_keys: int) -> float:
    if reply["num_ok"] != num_keys:
        raise StoreError(
            f"raw Mooncake {op}: {num_keys - reply['num_ok']} of {num_keys} objects failed, codes {reply['codes']}"
        )
    return float(reply["seconds"])


def _rates(nbytes: int, seconds: list[float]) -> dict[str, Any]:
    best, median = min(seconds), statistics.median(seconds)
    return {
        "seconds": [round(s, 6) for s in seconds],
        "seconds_best": round(best, 6),
        "seconds_median": round(median, 6),
        "gb_per_s_best": round(nbytes / best / 1e9, 6),
        "gb_per_s_median": round(nbytes / median / 1e9, 6),
    }


def measure_raw(
    lengths: list[dict[str, Any]], layout: KVLayout, store_options: dict[str, Any], repeats: int, log_dir: Path
) -> dict[str, Any]:
    """Add each length's `raw` figures (the same objects through Mooncake alone); returns the setup's facts."""
    from pdserve.launcher import port_allocator
    from pdserve.store.master import MasterProcess

    allocate = port_allocator()
    master = MasterProcess(port=allocate(), metadata_port=allocate())
    options = master.store_config() | {
        "local_hostname": str(store_options.get("local_hostname", "127.0.0.1")),
        "global_segment_size": parse_size(store_options.get("global_segment_size", DEFAULT_SEGMENT_BYTES)),
        "local_buffer_size": parse_size(store_options.get("local_buffer_size", DEFAULT_LOCAL_BUFFER)),
        "nbytes": max(x["num_objects"] for x in lengths) * layout.bytes_per_block,
    }
    print(
        f"[storage] raw Mooncake baseline: master {options['master']}, segments of "
        f"{options['global_segment_size'] / 2**20:.0f} MiB, buffers of {options['nbytes'] / 2**20:.1f} MiB",
        flush=True,
    )
    with master, contextlib.ExitStack() as stack:
        putter = RawClient("putter", options | {"fill": True}, log_dir)
        stack.callback(putter.close)
        getter = RawClient("getter", options | {"fill": False}, log_dir)
        stack.callback(getter.close)
        for x in lengths:
            n, size = x["num_objects"], layout.bytes_per_block
            puts, gets, placement = [], [], {"putter": 0, "getter": 0, "other": 0}
            for r in range(repeats + 1):
                keys = [f"pdserve-bench-raw-{x['input_len']}-{r}-{i}" for i in range(n)]
                put_s = _checked(putter.ask("put", keys, size), "put", n)
                get_s = _checked(getter.ask("get", keys, size), "get", n)
                if r == 0:  # untimed: connections are set up; check the copy and where the objects went
                    if putter.ask("digest", keys, size)["digest"] != getter.ask("digest", keys, size)["digest"]:
                        raise StoreError(
                            f"raw Mooncake: the getter read other bytes than the putter put ({n} "
                            f"objects of {size} bytes)"
                        )
                    for endpoint in putter.ask("where", keys)["endpoints"]:
                        who = {putter.hostname: "putter", getter.hostname: "getter"}.get(endpoint, "other")
                        placement[who] += 1
                else:
                    puts.append(put_s)
                    gets.append(get_s)
                _checked(putter.ask("remove", keys), "remove", n)
            nbytes = n * size
            x["raw"] = {
                "num_objects": n,
                "object_nbytes": size,
                "nbytes": nbytes,
                "repeats": repeats,
                "placement": placement,
                "put": _rates(nbytes, puts),
                "get": _rates(nbytes, gets),
            }
            storage = x["storage"]
            x["put_over_raw"] = _ratio(storage["put_gb_per_s"], x["raw"]["put"]["gb_per_s_median"])
            x["get_over_raw"] = _ratio(storage["get_gb_per_s"], x["raw"]["get"]["gb_per_s_median"])
            print(
                f"[storage] raw, {x['input_len']} tokens ({n} objects of {size / 2**10:.0f} KiB): put "
                f"{x['raw']['put']['gb_per_s_median']:.2f} GB/s, get {x['raw']['get']['gb_per_s_median']:.2f} GB/s "
                f"(median of {repeats})",
                flush=True,
            )
        return {
            "master_argv": master.command(),
            "clients": {"putter": putter.hostname, "getter": getter.hostname},
            "options": {k: v for k, v in options.items() if k != "fill"},
            "repeats": repeats,
        }


# ---- output -------------------------------------------------------------------------------------------------


def format_table(lengths: list[dict[str, Any]]) -> str:
    columns = (
        ("tokens", 7),
        ("KV MiB", 8),
        ("objects", 8),
        ("TTFT dir", 10),
        ("TTFT sto", 10),
        ("sto/dir", 8),
        ("put GB/s", 9),
        ("raw put", 9),
        ("put/raw", 8),
        ("get GB/s", 9),
        ("raw get", 9),
        ("get/raw", 8),
        ("failed", 7),
    )
    head = "".join(f"{n:>{w}}" for n, w in columns)
    rows = [head, "-" * len(head)]
    for x in lengths:
        d, s, raw = x["direct"], x["storage"], x.get("raw") or {}
        cells = [
            x["prompt_tokens"],
            fmt(x["kv_bytes_per_request"] / 2**20, "{:.2f}"),
            x["num_objects"],
            fmt(d["ttft_median_ms"]),
            fmt(s["ttft_median_ms"]),
            fmt(x["ttft_ratio_storage_over_direct"], "{:.2f}x"),
            fmt(s["put_gb_per_s"], "{:.2f}"),
            fmt((raw.get("put") or {}).get("gb_per_s_median"), "{:.2f}"),
            fmt(x.get("put_over_raw"), "{:.2f}"),
            fmt(s["get_gb_per_s"], "{:.2f}"),
            fmt((raw.get("get") or {}).get("gb_per_s_median"), "{:.2f}"),
            fmt(x.get("get_over_raw"), "{:.2f}"),
            d["failures"] + s["failures"],
        ]
        rows.append("".join(f"{c!s:>{w}}" for c, (_, w) in zip(cells, columns)))
    rows.append(
        "TTFT: median ms per mode (dir = direct P->D writes, sto = through the Mooncake pool); put GB/s = "
        "bytes P put / P rank 0's staging + writing seconds;\nget GB/s = bytes D read / D's read seconds "
        "(medians over requests); raw = Mooncake alone, one process putting and another getting the same "
        "objects (median of --raw-repeats)"
    )
    return "\n".join(rows)


def plot(path: Path, title: str, lengths: list[dict[str, Any]]) -> Path:
    """Left: median TTFT per length, direct and storage; right: GB/s of storage put/get and raw put/get."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12.0, 4.6), dpi=110)
    try:
        xs = list(range(len(lengths)))
        names = [str(x["prompt_tokens"]) for x in lengths]

        def line(ax: Any, values: list[float | None], label: str, color: str, marker: str, style: str = "-") -> None:
            points = [(x, v) for x, v in zip(xs, values) if v]
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker=marker, color=color, label=label)

        line(left, [x["direct"]["ttft_median_ms"] for x in lengths], "direct (P writes into D's cache)", "#1f77b4", "o")
        line(
            left,
            [x["storage"]["ttft_median_ms"] for x in lengths],
            "storage (through the Mooncake pool)",
            "#d62728",
            "s",
        )
        for i, x in enumerate(lengths):
            if x["ttft_ratio_storage_over_direct"] and x["storage"]["ttft_median_ms"]:
                left.annotate(
                    f"{x['ttft_ratio_storage_over_direct']:.2f}x",
                    (i, x["storage"]["ttft_median_ms"]),
                    textcoords="offset points",
                    xytext=(0, 7),
                    ha="center",
                    fontsize=8,
                )
        left.set_yscale("log")
        left.set_xticks(xs, names)
        left.set_xlabel("prompt tokens")
        left.set_ylabel("median TTFT (ms)")
        left.set_title("TTFT (labels: storage / direct)", fontsize=10)
        left.legend(fontsize=7, frameon=False)
        line(
            right,
            [x["storage"]["put_gb_per_s"] for x in lengths],
            "storage put (P: stage + write, rank 0)",
            "#ff7f0e",
            "^",
        )
        line(right, [x["storage"]["get_gb_per_s"] for x in lengths], "storage get (D: read)", "#2ca02c", "v")
        line(
            right,
            [(x.get("raw") or {}).get("put", {}).get("gb_per_s_median") for x in lengths],
            "raw Mooncake batch_put_from",
            "#ff7f0e",
            "^",
            "--",
        )
        line(
            right,
            [(x.get("raw") or {}).get("get", {}).get("gb_per_s_median") for x in lengths],
            "raw Mooncake batch_get_into (another process)",
            "#2ca02c",
            "v",
            "--",
        )
        right.set_yscale("log")
        right.set_xticks(xs, names)
        right.set_xlabel("prompt tokens")
        right.set_ylabel("GB/s (1e9 bytes/s)")
        right.set_title("pool throughput per request", fontsize=10)
        right.legend(fontsize=7, frameon=False)
        return finish_figure(fig, (left, right), title, path)
    except BaseException:
        pyplot().close(fig)
        raise


def write_outputs(result: dict[str, Any], args: argparse.Namespace) -> None:
    stem = f"storage-{args.label or time.strftime('%Y%m%d-%H%M%S')}"
    json_path, png_path = args.result_dir / f"{stem}.json", args.result_dir / f"{stem}.png"
    result["files"] = {"json": str(json_path), "png": str(png_path)}
    write_json(json_path, result)
    title = (
        f"{result['model']} ({args.dtype}, block {args.block_size}): 1 prefill + 1 decode behind the router, "
        f"direct vs storage (Mooncake, TCP), {args.num_requests} sequential requests per length, max_tokens "
        f"{MAX_TOKENS}\nraw = Mooncake alone, one process putting, another getting the same objects"
    )
    plot(png_path, title, result["lengths"])


# ---- command line -----------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "storage",
        help="PD through the Mooncake pool vs direct P -> D writes: TTFT per prompt length, pool GB/s vs raw Mooncake",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_argument_group("deployments (1 prefill + 1 decode instance behind the router, direct then storage)")
    add_instance_args(s)
    s.add_argument(
        "--kv-transfer-engine",
        choices=KV_TRANSFER_ENGINES,
        default="auto",
        help="the direct deployment's data plane (auto: shm to a decode instance on this host)",
    )
    s.add_argument(
        "--pool-config",
        type=_json_object,
        default={},
        help="JSON merged into the storage instances' --kv-store-config (and the raw clients' sizes), "
        'e.g. \'{"global_segment_size": "512MiB"}\' (default: a segment per instance that holds '
        "every object of the run)",
    )
    s.add_argument("--server-flags", default="", help="more pdserve serve flags for every instance, one string")
    s.add_argument("--server-timeout", type=float, default=300.0, help="seconds for a deployment to start")
    w = p.add_argument_group("workload")
    add_input_lens_arg(w)
    w.add_argument("--num-requests", type=int, default=3, help="measured requests per length and mode, one at a time")
    w.add_argument(
        "--num-warmup",
        type=int,
        default=1,
        help="untimed requests of the first length when a deployment starts (default 1)",
    )
    w.add_argument("--raw-repeats", type=int, default=5, help="timed put/get rounds of the raw baseline per length")
    w.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    w.add_argument("--seed", type=int, default=0, help="seeds the random prompts")
    add_output_args(p)
    p.set_defaults(func=run)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--pool-config is not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--pool-config must be a JSON object, got {text!r}")
    return value


def check_args(args: argparse.Namespace) -> None:
    transfer.check_args(args)  # --num-requests, --num-warmup, --raw-repeats, --label
    if {"--kv-store", "--kv-store-config", "--kv-transfer"} & set(shlex.split(args.server_flags)):
        raise ValueError(
            "--server-flags must not set --kv-store, --kv-store-config or --kv-transfer: the benchmark "
            "sets them per deployment (use --pool-config for store options)"
        )


def combine(lens: list[int], modes: dict[str, dict[str, Any]], layout: KVLayout) -> list[dict[str, Any]]:
    """One record per length: both modes' summaries, the objects one request moves, the TTFT ratio."""
    out = []
    for i, input_len in enumerate(lens):
        direct, storage = modes["direct"]["lengths"][i], modes["storage"]["lengths"][i]
        ok = [r for m in (direct, storage) for r in m["requests"] if r["success"]]
        prompt_tokens = (ok[0]["prompt_tokens"] if ok else None) or input_len
        num_objects = math.ceil(prompt_tokens / layout.block_size)
        out.append(
            {
                "input_len": input_len,
                "prompt_tokens": prompt_tokens,
                "num_objects": num_objects,
                "object_nbytes": layout.bytes_per_block,
                "kv_bytes_per_request": num_objects * layout.bytes_per_block,
                "direct": direct,
                "storage": storage,
                "ttft_ratio_storage_over_direct": _ratio(storage["ttft_median_ms"], direct["ttft_median_ms"]),
            }
        )
    return out


def run(args: argparse.Namespace) -> int:
    check_args(args)
    layout, vocab_size, lens = lengths_and_model(args, "storage")
    warmup, prompts = build_prompts(args, lens, vocab_size)
    modes: dict[str, dict[str, Any]] = {}
    try:
        with sigterm_interrupts(), tempfile.TemporaryDirectory(prefix="pdserve-bench-storage-") as tmp:
            for mode in MODES:
                modes[mode] = run_mode(mode, args, layout, lens, prompts, warmup, Path(tmp))
            lengths = combine(lens, modes, layout)
            store_options = modes["storage"]["deployment"]["mooncake_master"]["store_config"]
            raw = measure_raw(lengths, layout, store_options, args.raw_repeats, Path(tmp) / "raw")
    except (BenchServerError, BenchServeError, StoreError) as e:
        print(f"pdserve bench storage: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pdserve bench storage: interrupted; every server was stopped", file=sys.stderr)
        return 130
    result = {
        "benchmark": "storage",
        "date": now_iso(),
        "label": args.label,
        "pdserve_version": code_version(),
        "model": modes["direct"]["model"],
        "machine": machine_info(),
        "deployments": {mode: modes[mode]["deployment"] for mode in MODES},
        "pool": {"kind": "mooncake", "protocol": "tcp", "store_config": store_options},
        "kv_layout": layout.as_dict(),
        "workload": {
            "input_lens_requested": args.input_lens,
            "input_lens": lens,
            "num_requests": args.num_requests,
            "num_warmup": args.num_warmup,
            "warmup_len": lens[0],
            "max_tokens": MAX_TOKENS,
            "concurrency": 1,
            "stream": True,
            "order": "direct deployment, then storage, then raw",
            "prompt": "random token ids, fresh for every request (a seed per length), the same in both modes",
            "seed": args.seed,
            "raw_repeats": args.raw_repeats,
        },
        "notes": NOTES,
        "lengths": lengths,
        "warmup": {mode: modes[mode]["warmup"] for mode in MODES},
        "raw_baseline": raw,
    }
    write_outputs(result, args)
    print(format_table(lengths))
    print(f"Results: {result['files']['json']}, {result['files']['png']}")
    failed = sum(x["direct"]["failures"] + x["storage"]["failures"] for x in lengths)
    if failed:
        print(f"pdserve bench storage: error: {failed} requests, KV transfers or pool calls failed", file=sys.stderr)
    return 1 if failed else 0
