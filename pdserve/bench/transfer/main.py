"""`pdserve bench transfer`: what the P -> D KV transfer costs per prompt length, beside the engine's raw speed.

Starts one prefill and one decode instance behind the router (the `pdserve launch` machinery, see
deployment.Deployment) and sends, for each --input-lens length, --num-requests streaming requests of random
token ids one at a time (max_tokens 2, so the first token comes from the stream), after untimed
warm-up requests. Around every request it reads P's and D's pdserve_kv_transfer_* counters: KV bytes,
P's transfer time (first send to KVDone, overlapping the prefill when sends run layer by layer), P's sender busy and exposed
seconds (rank 0), D's receive time (KVDest sent to KVDone). With the deployment stopped, it then
measures the raw bandwidth of the same transfer engine between two processes
(probe.measure_raw_bandwidth) for each length's KV bytes. Writes transfer-<label>.json and a .png
under --result-dir and prints a table. It knows the servers only by the OpenAI API and /metrics.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pdserve.bench.common import add_output_args, code_version, label_or_timestamp, machine_info, now_iso, write_outputs
from pdserve.bench.deployment import Deployment
from pdserve.bench.launch import BenchServerError, sigterm_interrupts
from pdserve.bench.serve import BenchServeError
from pdserve.bench.transfer.measure import OVERLAP_EXPOSED_SHARE, measure_lengths, measure_raw
from pdserve.bench.transfer.report import figure_title, format_table, plot
from pdserve.bench.transfer.workload import (
    MAX_TOKENS,
    add_input_lens_arg,
    add_instance_args,
    check_args,
    instance_flags,
    lengths_and_model,
)
from pdserve.disagg.transfer.base import TransferError
from pdserve.launcher import KV_TRANSFER_ENGINES, LaunchConfig

NOTES = {
    "gb_per_s_busy": "KV bytes / P's sender busy seconds. Busy time is measured on rank 0 by its sender thread, "
    "while the forward runs on the same CPU cores: the engine's throughput while sending, not a "
    "link speed",
    "gb_per_s_window": "KV bytes / P's transfer window (first send to KVDone), which overlaps the prefill compute "
    "when the sends run layer by layer",
    "transfer_share_of_ttft": "P's exposed sender seconds (steps waiting for sends after the forward: the part not "
    "hidden behind compute) / client TTFT",
    "busy_share_of_ttft": "P's busy sender seconds / client TTFT (hidden and exposed together)",
    "d_receive_s": "D's pdserve_kv_transfer_seconds: KVDest sent to KVDone, so it includes P's prefill",
    "raw": "probe.measure_raw_bandwidth: the same engine writing a cache of the same bytes (at least 1 MiB), in "
    "chunks of one (layer, K|V, block), into another process; all blocks in one write, nothing else running",
    "overlapped": f"a request whose exposed sender seconds are below {OVERLAP_EXPOSED_SHARE} x its busy seconds: its "
    "sends ran layer by layer during the forward. Otherwise D's KVDest reached P after P's prefill step "
    "had started, and the blocks went as a catch-up after the forward (exposed = busy)",
    "engine": "auto picks shm for a decode instance on this host when the KV cache is in host memory "
    "(transfer/base.py pick_region), else mooncake",
}


def engine_used(requested: str, device: str) -> str:
    """The engine P's sender uses for a D on this host (transfer/base.py pick_region): shm first, CPU caches only."""
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return "shm" if requested != "mooncake" and on_cpu else "mooncake"


# ---- command line ----------------------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "transfer",
        help="P -> D KV transfer per prompt length: bytes, time, GB/s vs the raw engine, share of TTFT",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_argument_group("deployment (1 prefill + 1 decode instance behind the router)")
    add_instance_args(s)
    s.add_argument(
        "--kv-transfer-engine",
        choices=KV_TRANSFER_ENGINES,
        default="auto",
        help="auto: shm to a decode instance on this host with a CPU cache, else mooncake",
    )
    s.add_argument("--server-flags", default="", help="more pdserve serve flags for both instances, one string")
    s.add_argument("--server-timeout", type=float, default=300.0, help="seconds for the deployment to start")
    w = p.add_argument_group("workload")
    add_input_lens_arg(w)
    w.add_argument("--num-requests", type=int, default=5, help="measured requests per length, one at a time")
    w.add_argument("--num-warmup", type=int, default=1, help="untimed requests before each length's (default 1)")
    w.add_argument(
        "--raw-repeats", type=int, default=10, help="timed writes of each raw engine measurement (default 10)"
    )
    w.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    w.add_argument("--seed", type=int, default=0, help="seeds the random prompts")
    add_output_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    layout, vocab_size, lens = lengths_and_model(args, "transfer")
    engine = engine_used(args.kv_transfer_engine, args.device)
    config = LaunchConfig(
        num_prefill=1,
        num_decode=1,
        kv_transfer_engine=args.kv_transfer_engine,
        engine_argv=tuple(instance_flags(args, lens)),
    )
    try:
        with sigterm_interrupts(), tempfile.TemporaryDirectory(prefix="pdserve-bench-transfer-") as tmp:
            deployment = Deployment("pd", config, Path(tmp) / "logs", args.server_timeout)
            print(f"[transfer] starting {' '.join(deployment.launch_argv)}", flush=True)
            with deployment:
                model, lengths = measure_lengths(args, deployment, lens, layout, vocab_size)
            measure_raw(engine, lengths, layout, args.raw_repeats)
    except (BenchServerError, BenchServeError, TransferError) as e:
        print(f"pdserve bench transfer: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pdserve bench transfer: interrupted; every server was stopped", file=sys.stderr)
        return 130
    result = {
        "benchmark": "transfer",
        "date": now_iso(),
        "label": args.label,
        "pdserve_version": code_version(),
        "model": model,
        "machine": machine_info(),
        "deployment": deployment.describe() | {"kv_transfer_engine": args.kv_transfer_engine, "engine_used": engine},
        "kv_layout": layout.as_dict(),
        "workload": {
            "input_lens_requested": args.input_lens,
            "input_lens": lens,
            "num_requests": args.num_requests,
            "num_warmup": args.num_warmup,
            "max_tokens": MAX_TOKENS,
            "concurrency": 1,
            "stream": True,
            "prompt": "random token ids, a different seed per length",
            "seed": args.seed,
            "raw_repeats": args.raw_repeats,
        },
        "notes": NOTES,
        "lengths": lengths,
    }
    stem = f"transfer-{label_or_timestamp(args.label)}"
    title = figure_title(result, args, engine)
    write_outputs(result, args.result_dir, stem, lambda path: plot(path, title, lengths, engine))
    print(format_table(lengths, engine))
    print(f"Results: {result['files']['json']}, {result['files']['png']}")
    failed = sum(x["failures"] for x in lengths)
    if failed:
        print(f"pdserve bench transfer: error: {failed} requests or KV transfers failed", file=sys.stderr)
    return 1 if failed else 0
