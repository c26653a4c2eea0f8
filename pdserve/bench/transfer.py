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
import asyncio
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.bench.common import (
    LABEL_RE,
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
from pdserve.bench.launch import BenchServerError, scrape, sigterm_interrupts
from pdserve.bench.plot import finish_figure, pyplot
from pdserve.bench.serve import BenchServeError, ServeBenchConfig, discover_model
from pdserve.bench.sse import SSEDecoder
from pdserve.config import DTYPES, LOAD_FORMATS
from pdserve.disagg.transfer.base import TransferError
from pdserve.launcher import KV_TRANSFER_ENGINES, LaunchConfig

DEFAULT_INPUT_LENS = (128, 256, 512, 1024, 2048, 4096)
MAX_TOKENS = 2  # the first token (TTFT) and one more, so the stream carries the first token as it comes
MIN_RAW_NBYTES = 1 << 20
SETTLE_TIMEOUT_S = 30.0
OVERLAP_EXPOSED_SHARE = 0.5  # a request whose exposed sender time is below this share of its busy time overlapped
# JSON name -> Prometheus sample, read on P and on D around every request
COUNTERS = {
    "bytes_sent": 'pdserve_kv_transfer_bytes_total{direction="send"}',
    "bytes_received": 'pdserve_kv_transfer_bytes_total{direction="recv"}',
    "seconds": "pdserve_kv_transfer_seconds_sum",
    "num_transfers": "pdserve_kv_transfer_seconds_count",
    "busy_seconds": 'pdserve_kv_transfer_send_seconds_total{kind="busy"}',
    "exposed_seconds": 'pdserve_kv_transfer_send_seconds_total{kind="exposed"}',
}
FAILURES_PREFIX = "pdserve_kv_transfer_failures_total{"
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


@dataclass(frozen=True)
class KVLayout:
    """What one block of the model's KV cache weighs on the wire (one rank: tensor parallel 1)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    dtype_bytes: int
    block_size: int

    @property
    def chunk_nbytes(self) -> int:
        """One (layer, K|V, block) chunk: the unit of a transfer."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * 2 * self.chunk_nbytes

    def bytes_for(self, num_tokens: int) -> int:
        """KV bytes P sends for a prompt of `num_tokens`: its blocks, the last one whole."""
        return math.ceil(num_tokens / self.block_size) * self.bytes_per_block

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "dtype_bytes": self.dtype_bytes,
            "block_size": self.block_size,
            "chunk_nbytes": self.chunk_nbytes,
            "bytes_per_block": self.bytes_per_block,
        }


def model_facts(args: argparse.Namespace) -> tuple[KVLayout, int, int]:
    """(KV layout, vocab size, longest sequence the model accepts) of --model."""
    from pdserve.config import ModelConfig
    from pdserve.engine.core import DTYPE_SIZES
    from pdserve.models.loader import load_arch, resolve_model

    arch = load_arch(resolve_model(ModelConfig(model=args.model, load_format=args.load_format, dtype=args.dtype)))
    limit = min(arch.max_position_embeddings, arch.sliding_window or arch.max_position_embeddings)
    layout = KVLayout(
        arch.num_layers, arch.num_kv_heads, arch.head_dim, args.dtype, DTYPE_SIZES[args.dtype], args.block_size
    )
    return layout, arch.vocab_size, limit


def resolve_input_lens(requested: list[int], model_limit: int, max_model_len: int | None) -> list[int]:
    """Each length clamped to what the model (and --max-model-len) leaves for MAX_TOKENS; duplicates dropped."""
    limit = min(model_limit, max_model_len or model_limit) - MAX_TOKENS
    if limit < 1:
        raise ValueError(f"--max-model-len {max_model_len} leaves no room for a prompt and {MAX_TOKENS} tokens")
    return list(dict.fromkeys(min(n, limit) for n in requested))


def engine_used(requested: str, device: str) -> str:
    """The engine P's sender uses for a D on this host (transfer/base.py pick_region): shm first, CPU caches only."""
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return "shm" if requested != "mooncake" and on_cpu else "mooncake"


# ---- measuring ----------------------------------------------------------------------------------------------


def read_counters(url: str, counters: Mapping[str, str] = COUNTERS) -> dict[str, Any]:
    """`counters` (JSON name -> Prometheus sample) of `url`, its KV transfer failures and whether it is idle."""
    samples = scrape(url)
    values: dict[str, Any] = {key: samples.get(name, 0.0) for key, name in counters.items()}
    values["failures"] = int(sum(v for k, v in samples.items() if k.startswith(FAILURES_PREFIX)))
    values["is_idle"] = samples.get("pdserve_num_requests_running") == samples.get("pdserve_num_requests_waiting") == 0
    return values


def settled(url: str, before: dict[str, Any], counters: Mapping[str, str] = COUNTERS) -> dict[str, Any]:
    """Counters of `url` once one more transfer (or failure) than `before` is counted and nothing runs."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        now = read_counters(url, counters)
        if now["is_idle"] and now["num_transfers"] + now["failures"] > before["num_transfers"] + before["failures"]:
            return now
        if time.monotonic() > deadline:
            raise BenchServerError(
                f"{url} counted no finished KV transfer within {SETTLE_TIMEOUT_S:.0f} s of the request's end"
            )
        time.sleep(0.05)


@dataclass
class Timing:
    """What the client saw of one request: seconds to the first token's chunk and to the end of the stream."""

    success: bool = False
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float = 0.0
    prompt_tokens: int | None = None


async def send_timed(config: ServeBenchConfig, model: str, prompt_ids: list[int]) -> Timing:
    """POST one streaming completion and time it; never raises for server or network failures.

    Asks for logprobs so the server sends a chunk for every token, even one whose text is empty (a random
    prompt may well get one): TTFT is the first chunk with a choice, not the first with text.
    """
    import aiohttp

    payload = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "logprobs": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    timing, num_tokens = Timing(), 0
    sent = time.perf_counter()
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=config.timeout_s)) as session,
            session.post(config.url, json=payload) as resp,
        ):
            if resp.status != 200:
                timing.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return timing
            decoder = SSEDecoder()
            async for raw in resp.content.iter_any():
                now = time.perf_counter()
                for data in decoder.feed(raw):
                    chunk = json.loads(data) if data != "[DONE]" else {}
                    if "error" in chunk:
                        timing.error = f"error in stream: {chunk['error']}"
                        return timing
                    if chunk.get("choices"):
                        num_tokens += len((chunk["choices"][0].get("logprobs") or {}).get("tokens") or [])
                        timing.ttft_s = now - sent if timing.ttft_s is None else timing.ttft_s
                    timing.prompt_tokens = (chunk.get("usage") or {}).get("prompt_tokens", timing.prompt_tokens)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        timing.error = f"{type(e).__name__}: {e}"
    timing.latency_s = time.perf_counter() - sent
    if timing.error is None and num_tokens != MAX_TOKENS:
        timing.error = f"the stream carried {num_tokens} tokens, not {MAX_TOKENS}"
    timing.success = timing.error is None
    return timing


async def _model_name(config: ServeBenchConfig) -> str:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=config.timeout_s)) as session:
        return await discover_model(session, config)


def send_counted(
    deployment: Deployment,
    config: ServeBenchConfig,
    model: str,
    prompt_ids: list[int],
    counters: Mapping[str, str] = COUNTERS,
) -> tuple[dict[str, Any], tuple[dict[str, Any], dict[str, Any]] | None]:
    """Send one request through the router: what the client saw of it and, if it succeeded, how much P's and
    D's `counters` (and their "failures") grew, read before it and once each counted its transfer."""
    p_url, d_url = deployment.instances("prefill")[0].probe_url, deployment.instances("decode")[0].probe_url
    p0, d0 = read_counters(p_url, counters), read_counters(d_url, counters)
    result = asyncio.run(send_timed(config, model, prompt_ids))
    record: dict[str, Any] = {
        "input_len": len(prompt_ids),
        "prompt_tokens": result.prompt_tokens,
        "success": result.success,
        "error": result.error,
        "ttft_ms": None if result.ttft_s is None else round(result.ttft_s * 1000, 3),
        "latency_ms": round(result.latency_s * 1000, 3),
    }
    if not result.success:
        deployment.check_alive()
        return record, None
    p1, d1 = settled(p_url, p0, counters), settled(d_url, d0, counters)
    return record, (_growth(p0, p1), _growth(d0, d1))


def _growth(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {key: after[key] - before[key] for key in after if key != "is_idle"}


def measure_request(
    deployment: Deployment, config: ServeBenchConfig, model: str, prompt_ids: list[int]
) -> dict[str, Any]:
    """Send one request through the router; what the client and P's and D's counters saw of it."""
    record, growth = send_counted(deployment, config, model, prompt_ids)
    if growth is None:
        return record
    p, d = growth
    record |= {
        "kv_bytes": int(p["bytes_sent"]),
        "transfer_s": round(p["seconds"], 6),
        "busy_s": round(p["busy_seconds"], 6),
        "exposed_s": round(p["exposed_seconds"], 6),
        "d_kv_bytes": int(d["bytes_received"]),
        "d_receive_s": round(d["seconds"], 6),
        "failures": p["failures"] + d["failures"],
    }
    record["overlapped"] = record["exposed_s"] < OVERLAP_EXPOSED_SHARE * record["busy_s"]
    return record


def summarize_length(input_len: int, records: list[dict[str, Any]], layout: KVLayout) -> dict[str, Any]:
    """Per-request figures of one length from its measured requests (sums over the successful ones / their count)."""
    ok = [r for r in records if r["success"]]
    n = len(ok)

    def per_request(key: str) -> float | None:
        return sum(r[key] for r in ok) / n if n else None

    kv_bytes, transfer_s, busy_s, exposed_s = (
        per_request(k) for k in ("kv_bytes", "transfer_s", "busy_s", "exposed_s")
    )
    ttfts = [r["ttft_ms"] / 1000 for r in ok]
    ttft_s = statistics.fmean(ttfts) if ttfts else None
    prompt_tokens = (ok[0]["prompt_tokens"] if ok else None) or input_len
    return {
        "input_len": input_len,
        "prompt_tokens": prompt_tokens,
        "num_requests": len(records),
        "completed": n,
        "num_blocks": math.ceil(prompt_tokens / layout.block_size),
        "expected_kv_bytes_per_request": layout.bytes_for(prompt_tokens),
        "kv_bytes_per_request": kv_bytes,
        "d_kv_bytes_per_request": per_request("d_kv_bytes"),
        "transfer_s_per_request": transfer_s,
        "busy_s_per_request": busy_s,
        "exposed_s_per_request": exposed_s,
        "gb_per_s_busy": _ratio(kv_bytes, busy_s, 1e9),
        "gb_per_s_window": _ratio(kv_bytes, transfer_s, 1e9),
        "ttft_mean_ms": None if ttft_s is None else round(ttft_s * 1000, 3),
        "ttft_min_ms": min((r["ttft_ms"] for r in ok), default=None),
        "ttft_max_ms": max((r["ttft_ms"] for r in ok), default=None),
        "transfer_share_of_ttft": _ratio(exposed_s, ttft_s),
        "busy_share_of_ttft": _ratio(busy_s, ttft_s),
        "d_receive_s_per_request": per_request("d_receive_s"),
        "num_overlapped": sum(r["overlapped"] for r in ok),
        "failures": sum(r.get("failures", 0) for r in ok) + len(records) - n,
        "requests": records,
    }


def _ratio(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    return None if a is None or not b else round(a / b / scale, 6)


def measure_lengths(
    args: argparse.Namespace, deployment: Deployment, lens: list[int], layout: KVLayout, vocab_size: int
) -> tuple[str, list[dict[str, Any]]]:
    """(the served model's name, one summary per length)."""
    config = ServeBenchConfig(base_url=deployment.url, timeout_s=args.timeout, use_tqdm=False)
    model = asyncio.run(_model_name(config))
    out = []
    for i, input_len in enumerate(lens):
        count = args.num_warmup + args.num_requests
        # a seed per length: prompts share no prefix (no prefix-cache hit on P), within or across lengths
        requests = random_requests(
            count,
            (input_len, input_len),
            (MAX_TOKENS, MAX_TOKENS),
            vocab_size,
            seed=args.seed * 1000 + i,
            min_token_id=min(MIN_RANDOM_TOKEN_ID, vocab_size // 2),
        )
        records = [measure_request(deployment, config, model, r.prompt_token_ids) for r in requests]
        summary = summarize_length(input_len, records[args.num_warmup :], layout)
        summary["warmup"] = records[: args.num_warmup]
        out.append(summary)
        print(
            f"[transfer] {input_len} tokens: {summary['completed']}/{args.num_requests} ok, TTFT "
            f"{fmt(summary['ttft_mean_ms'])} ms, {fmt(_mib(summary['kv_bytes_per_request']), '{:.2f}')} MiB KV "
            f"per request",
            flush=True,
        )
    return model, out


def measure_raw(engine: str, lengths: list[dict[str, Any]], layout: KVLayout, repeats: int) -> None:
    """Add each length's `raw` figures: the engine alone moving that length's KV bytes (at least 1 MiB)."""
    from pdserve.disagg.transfer.probe import measure_raw_bandwidth

    for length in lengths:
        nbytes = max(
            length["kv_bytes_per_request"] or length["expected_kv_bytes_per_request"],
            MIN_RAW_NBYTES,
            2 * layout.chunk_nbytes,
        )
        raw = measure_raw_bandwidth(engine, nbytes=int(nbytes), chunk_nbytes=layout.chunk_nbytes, repeats=repeats)
        length["raw"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in raw.items()}
        length["raw"]["chunk_nbytes"] = layout.chunk_nbytes
        length["busy_over_raw"] = _ratio(length["gb_per_s_busy"], raw["gb_per_s_best"])
        print(
            f"[transfer] raw {engine}, {_mib(raw['nbytes']):.2f} MiB: {raw['gb_per_s_best']:.2f} GB/s best, "
            f"{raw['gb_per_s_mean']:.2f} mean",
            flush=True,
        )


# ---- output -------------------------------------------------------------------------------------------------


def format_table(lengths: list[dict[str, Any]], engine: str) -> str:
    columns = (
        ("tokens", 7),
        ("ok", 5),
        ("KV MiB", 8),
        ("window", 8),
        ("busy", 7),
        ("exposed", 8),
        ("overlap", 8),
        ("GB/s busy", 10),
        ("GB/s win", 9),
        (f"raw {engine}", 10),
        ("TTFT", 8),
        ("exp/TTFT", 9),
        ("D recv", 8),
        ("failed", 7),
    )
    head = "".join(f"{n:>{w}}" for n, w in columns)
    rows = [head, "-" * len(head)]
    for x in lengths:
        raw = x.get("raw") or {}
        share = x["transfer_share_of_ttft"]
        cells = [
            x["prompt_tokens"],
            f"{x['completed']}/{x['num_requests']}",
            fmt(_mib(x["kv_bytes_per_request"]), "{:.2f}"),
            fmt(_ms(x["transfer_s_per_request"])),
            fmt(_ms(x["busy_s_per_request"])),
            fmt(_ms(x["exposed_s_per_request"])),
            f"{x['num_overlapped']}/{x['completed']}",
            fmt(x["gb_per_s_busy"], "{:.2f}"),
            fmt(x["gb_per_s_window"], "{:.3f}"),
            fmt(raw.get("gb_per_s_best"), "{:.2f}"),
            fmt(x["ttft_mean_ms"]),
            fmt(None if share is None else share * 100, "{:.1f}%"),
            fmt(_ms(x["d_receive_s_per_request"])),
            x["failures"],
        ]
        rows.append("".join(f"{c!s:>{w}}" for c, (_, w) in zip(cells, columns)))
    rows.append(
        "per request, times in ms: window = P's first send to KVDone; busy / exposed = "
        "P rank 0's sender writing / steps waiting for it;\nGB/s busy = KV bytes / busy (rank 0's sender, "
        "while the forward runs on the same cores); raw = the engine alone (best of its repeats); "
        "exp/TTFT = exposed / mean TTFT; D recv = D's KVDest to KVDone;\noverlap = requests whose sends ran during the "
        "forward (the others' KVDest reached P after its prefill step began: sent after the forward)"
    )
    return "\n".join(rows)


def _mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def plot(path: Path, title: str, lengths: list[dict[str, Any]], engine: str) -> Path:
    """Left: GB/s of pdserve's transfers and of the raw engine per length; right: share of TTFT on transfer."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12.0, 4.4), dpi=110)
    try:
        xs = list(range(len(lengths)))
        names = [str(x["prompt_tokens"]) for x in lengths]
        series = (
            (
                f"raw {engine} engine alone (best)",
                [(x.get("raw") or {}).get("gb_per_s_best") for x in lengths],
                "#2ca02c",
                "s",
            ),
            (
                "pdserve: KV bytes / sender busy time\n(P rank 0, forward on the same cores)",
                [x["gb_per_s_busy"] for x in lengths],
                "#1f77b4",
                "o",
            ),
            (
                "pdserve: KV bytes / transfer window\n(first send to KVDone)",
                [x["gb_per_s_window"] for x in lengths],
                "#ff7f0e",
                "^",
            ),
        )
        for label, values, color, marker in series:
            points = [(x, v) for x, v in zip(xs, values) if v]
            left.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=label)
        left.set_yscale("log")
        left.set_xticks(xs, names)
        left.set_xlabel("prompt tokens")
        left.set_ylabel("GB/s (1e9 bytes/s)")
        left.set_title("KV transfer throughput", fontsize=10)
        left.legend(fontsize=7, frameon=False)
        exposed = [100 * (x["transfer_share_of_ttft"] or 0.0) for x in lengths]
        busy = [100 * (x["busy_share_of_ttft"] or 0.0) for x in lengths]
        bars = right.bar(xs, exposed, width=0.6, color="#d62728", label="exposed sender time / TTFT (not hidden)")
        right.bar_label(bars, labels=[f"{v:.2f}%" for v in exposed], fontsize=8)
        right.plot(xs, busy, "o", color="#1f77b4", label="busy sender time / TTFT (hidden + exposed)")
        right.set_xticks(
            xs, [f"{name}\n{x['num_overlapped']}/{x['completed']} overlapped" for name, x in zip(names, lengths)]
        )
        right.set_xlabel("prompt tokens (requests whose sends ran during the forward)")
        right.set_ylabel("% of mean TTFT")
        right.set_ylim(0, max([*exposed, *busy, 1.0]) * 1.3)
        right.set_title("share of TTFT spent on KV transfer", fontsize=10)
        right.legend(fontsize=7, frameon=False, loc="upper left")
        return finish_figure(fig, (left, right), title, path)
    except BaseException:
        pyplot().close(fig)
        raise


# ---- command line -----------------------------------------------------------------------------------------


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


def add_instance_args(group: argparse._ArgumentGroup) -> None:
    """The flags of the P and D instances' engine that `pdserve bench transfer` and `bench storage` share."""
    group.add_argument("--model", default=None, help="as for pdserve serve (default: pdserve's default model)")
    group.add_argument("--load-format", choices=LOAD_FORMATS, default="auto", help="dummy: random weights")
    group.add_argument("--dtype", choices=DTYPES, default="float32")
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--max-model-len", type=int, default=None, help=f"default: the longest prompt + {MAX_TOKENS}")
    group.add_argument("--num-blocks", type=int, default=None, help="KV blocks per instance (default: the engine's)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def add_input_lens_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--input-lens",
        type=_int_list,
        default=list(DEFAULT_INPUT_LENS),
        help="comma-separated prompt lengths in tokens, clamped to what the model accepts "
        f"(default {','.join(map(str, DEFAULT_INPUT_LENS))})",
    )


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--input-lens takes positive integers like 128,256,512, got {text!r}")
    return values


def check_args(args: argparse.Namespace) -> None:
    if args.num_requests < 1 or args.num_warmup < 0 or args.raw_repeats < 1:
        raise ValueError(
            f"--num-requests and --raw-repeats must be at least 1 and --num-warmup at least 0, got "
            f"{args.num_requests}, {args.raw_repeats} and {args.num_warmup}"
        )
    if args.label is not None and not LABEL_RE.match(args.label):
        raise ValueError(f"--label {args.label!r} may hold only letters, digits, '.', '_' and '-'")


def instance_flags(args: argparse.Namespace, lens: list[int]) -> list[str]:
    flags = [
        "--dtype",
        args.dtype,
        "--load-format",
        args.load_format,
        "--block-size",
        str(args.block_size),
        "--device",
        args.device,
        "--max-model-len",
        str(args.max_model_len or max(lens) + MAX_TOKENS),
    ]
    if args.model is not None:
        flags += ["--model", args.model]
    if args.num_blocks is not None:
        flags += ["--num-blocks", str(args.num_blocks)]
    return flags + shlex.split(args.server_flags)


def lengths_and_model(args: argparse.Namespace, tag: str) -> tuple[KVLayout, int, list[int]]:
    """(KV layout, vocab size, --input-lens clamped to what the model accepts); says so, after `tag`, if clamped."""
    layout, vocab_size, model_limit = model_facts(args)
    lens = resolve_input_lens(args.input_lens, model_limit, args.max_model_len)
    if lens != args.input_lens:
        print(
            f"[{tag}] input lengths {args.input_lens} clamped to {lens}: the model accepts "
            f"{min(model_limit, args.max_model_len or model_limit)} tokens, {MAX_TOKENS} of them generated",
            flush=True,
        )
    return layout, vocab_size, lens


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
    write_outputs(result, args, engine)
    print(format_table(lengths, engine))
    print(f"Results: {result['files']['json']}, {result['files']['png']}")
    failed = sum(x["failures"] for x in lengths)
    if failed:
        print(f"pdserve bench transfer: error: {failed} requests or KV transfers failed", file=sys.stderr)
    return 1 if failed else 0


def write_outputs(result: dict[str, Any], args: argparse.Namespace, engine: str) -> None:
    stem = f"transfer-{args.label or time.strftime('%Y%m%d-%H%M%S')}"
    json_path, png_path = args.result_dir / f"{stem}.json", args.result_dir / f"{stem}.png"
    result["files"] = {"json": str(json_path), "png": str(png_path)}
    write_json(json_path, result)
    title = (
        f"{result['model']} ({args.dtype}, block {args.block_size}): 1 prefill + 1 decode behind the router, "
        f"engine {engine} ({args.kv_transfer_engine}), {args.num_requests} sequential requests per length, "
        f"max_tokens {MAX_TOKENS}\nbusy-time GB/s is measured on P's rank 0 while the forward runs on the same "
        f"cores; raw = the engine alone"
    )
    plot(png_path, title, result["lengths"], engine)
