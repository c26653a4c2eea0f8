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
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from pdserve.bench.common import add_output_args, code_version, label_or_timestamp, machine_info, now_iso, write_outputs
from pdserve.bench.launch import BenchServerError, sigterm_interrupts
from pdserve.bench.serve import BenchServeError
from pdserve.bench.storage.modes import MODES, build_prompts, combine, run_mode
from pdserve.bench.storage.raw import measure_raw
from pdserve.bench.storage.report import figure_title, format_table, plot
from pdserve.bench.transfer.workload import (
    MAX_TOKENS,
    KVLayout,
    add_input_lens_arg,
    add_instance_args,
    lengths_and_model,
)
from pdserve.bench.transfer.workload import check_args as check_workload_args
from pdserve.launcher import KV_TRANSFER_ENGINES
from pdserve.store.base import StoreError

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


# ---- command line ----------------------------------------------------------------------------------------------------


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
    check_workload_args(args)  # --num-requests, --num-warmup, --raw-repeats, --label
    if {"--kv-store", "--kv-store-config", "--kv-transfer"} & set(shlex.split(args.server_flags)):
        raise ValueError(
            "--server-flags must not set --kv-store, --kv-store-config or --kv-transfer: the benchmark "
            "sets them per deployment (use --pool-config for store options)"
        )


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
    result = _result(args, layout, lens, modes, lengths, raw)
    stem = f"storage-{label_or_timestamp(args.label)}"
    title = figure_title(result, args)
    write_outputs(result, args.result_dir, stem, lambda path: plot(path, title, lengths))
    print(format_table(lengths))
    print(f"Results: {result['files']['json']}, {result['files']['png']}")
    failed = sum(x["direct"]["failures"] + x["storage"]["failures"] for x in lengths)
    if failed:
        print(f"pdserve bench storage: error: {failed} requests, KV transfers or pool calls failed", file=sys.stderr)
    return 1 if failed else 0


def _result(
    args: argparse.Namespace,
    layout: KVLayout,
    lens: list[int],
    modes: dict[str, dict[str, Any]],
    lengths: list[dict[str, Any]],
    raw: dict[str, Any],
) -> dict[str, Any]:
    """The JSON of a run: the deployments, the pool, the workload, per length both modes and the raw figures."""
    store_options = modes["storage"]["deployment"]["mooncake_master"]["store_config"]
    return {
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
