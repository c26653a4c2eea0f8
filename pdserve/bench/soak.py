"""`pdserve bench soak`: a long run at a constant request rate, watching every process of the deployment.

Sends requests through the router at --rate per second (Poisson or evenly spaced arrivals) for --duration
minutes: completions and chat completions, streaming or not, short prompts and small max_tokens, and a
fraction of streaming clients that close the connection after one or two SSE events. Meanwhile it samples
RSS, open fds and threads of every process of the deployment every --interval seconds: the `pdserve launch`
process it starts (with its children, recursively), or with --url the trees under --pids. After the load,
it waits for the deployment to go idle and reads every instance's free and total KV blocks (the router's
/health lists the instances, each one's /v1/pd/info has the counts). Figures after --warmup (default the
first 20 % of the run) give each process's RSS growth and its fd and thread counts. Writes
soak-<label>.json and .png under --result-dir and prints a table. It knows the deployment only by its
command line, pids, /health, /v1/pd/info and the OpenAI API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.common import (
    LABEL_RE,
    add_output_args,
    code_version,
    label_or_timestamp,
    machine_info,
    now_iso,
    write_outputs,
)
from pdserve.bench.launch import BenchServerError, ServerProcess, sigterm_interrupts
from pdserve.bench.serve import (
    ENDPOINTS,
    BenchServeError,
    ServeBenchConfig,
    _error_message,
    arrival_offsets,
    discover_model,
)
from pdserve.bench.soak_report import (
    NOTES,
    ProcessWatch,
    find_problems,
    format_table,
    plot,
    processes_summary,
    requests_summary,
    wait_idle,
)
from pdserve.bench.sse import SSEDecoder, parse_chunk

ARRIVALS = ("poisson", "fixed")
MODES = ("plain", "stream", "disconnect")  # a request's mode: not streaming, streaming, closing mid-stream
PROMPTS = (
    "Write one sentence about the sea.",
    "Name three colors.",
    "What is two plus two?",
    "Say hello in French.",
    "Give me a short tip for sleeping well.",
    "Describe a cat in five words.",
    "List two prime numbers.",
    "What day comes after Monday?",
)


@dataclass(frozen=True)
class SoakConfig:
    """The load and the watch. Fractions are of all requests; a disconnecting client always streams."""

    duration_s: float
    rate: float
    arrival: str = "poisson"
    warmup_s: float | None = None  # None: 20 % of duration_s
    stream_fraction: float = 0.5
    chat_fraction: float = 0.5
    disconnect_fraction: float = 0.1
    max_tokens: tuple[int, int] = (8, 16)
    timeout_s: float = 60.0
    interval_s: float = 5.0
    drain_timeout_s: float = 60.0
    idle_wait_s: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.duration_s > 0 or not self.rate > 0:
            raise ValueError(f"--duration and --rate must be above 0, got {self.duration_s / 60:g} and {self.rate:g}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"--arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if not 0 <= self.warmup_seconds < self.duration_s:
            raise ValueError(f"--warmup must be in [0, duration), got {self.warmup_seconds:g} s")
        for name, value in (("stream", self.stream_fraction), ("chat", self.chat_fraction)):
            if not 0 <= value <= 1:
                raise ValueError(f"--{name}-fraction must be in [0, 1], got {value:g}")
        if not 0 <= self.disconnect_fraction <= self.stream_fraction:
            raise ValueError(
                f"--disconnect-fraction ({self.disconnect_fraction:g}) must be in [0, --stream-fraction "
                f"({self.stream_fraction:g})]: a disconnecting client streams"
            )
        if not 1 <= self.max_tokens[0] <= self.max_tokens[1]:
            raise ValueError(f"need 1 <= --max-tokens-min <= --max-tokens-max, got {self.max_tokens}")
        if not self.interval_s > 0 or not self.timeout_s > 0:
            raise ValueError(f"--interval and --timeout must be above 0, got {self.interval_s} and {self.timeout_s}")

    @property
    def warmup_seconds(self) -> float:
        return 0.2 * self.duration_s if self.warmup_s is None else self.warmup_s


@dataclass(frozen=True)
class RequestSpec:
    offset: float  # seconds after the load's start
    endpoint: str  # a key of ENDPOINTS
    is_stream: bool
    disconnect_after: int  # SSE events read before closing the connection; 0: read to the end
    max_tokens: int
    temperature: float
    prompt: str

    @property
    def kind(self) -> str:
        mode = MODES[2] if self.disconnect_after else MODES[int(self.is_stream)]
        return f"{self.endpoint}-{mode}"


@dataclass
class Outcome:
    kind: str
    start: float
    latency: float = 0.0
    error: str | None = None
    is_disconnected: bool = False


def plan_requests(config: SoakConfig) -> list[RequestSpec]:
    """Every request of the run, seeded: arrivals within the duration, then each one's kind and sizes."""
    num_max = int(config.rate * config.duration_s * 2) + 20
    if config.arrival == "fixed":
        offsets = [i / config.rate for i in range(num_max)]
    else:
        offsets = arrival_offsets(num_max, config.rate, config.seed)
    offsets = [t for t in offsets if t < config.duration_s]
    rng = np.random.default_rng(config.seed + 1)
    specs = []
    for offset in offsets:
        draw = rng.random()  # [0, disconnect): disconnect; [.., stream): stream; else plain
        is_stream = draw < config.stream_fraction
        specs.append(
            RequestSpec(
                offset=offset,
                endpoint="chat" if rng.random() < config.chat_fraction else "completions",
                is_stream=is_stream,
                disconnect_after=int(rng.integers(1, 3)) if draw < config.disconnect_fraction else 0,
                max_tokens=int(rng.integers(config.max_tokens[0], config.max_tokens[1], endpoint=True)),
                temperature=float(rng.choice([0.0, 0.8])),
                prompt=f"{PROMPTS[int(rng.integers(len(PROMPTS)))]} ({int(rng.integers(10_000))})",
            )
        )
    return specs


def build_body(spec: RequestSpec, model: str) -> dict[str, Any]:
    text: dict[str, Any] = (
        {"messages": [{"role": "user", "content": spec.prompt}]} if spec.endpoint == "chat" else {"prompt": spec.prompt}
    )
    body = {"model": model, **text, "max_tokens": spec.max_tokens, "temperature": spec.temperature}
    body |= {"ignore_eos": True, "stream": spec.is_stream}
    if spec.is_stream:
        body["stream_options"] = {"include_usage": True}
    return body


# ---- one request -----------------------------------------------------------------------------------------


def _check_plain(body: dict[str, Any], spec: RequestSpec) -> str | None:
    """The error of a non-streaming answer: no text, or not max_tokens completion tokens (ignore_eos)."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"] if spec.endpoint == "chat" else choice["text"]
        num_tokens = body["usage"]["completion_tokens"]
    except (KeyError, IndexError, TypeError):
        return f"answer without choices[0] text or usage: {json.dumps(body)[:200]}"
    if not isinstance(text, str) or num_tokens != spec.max_tokens:
        return f"answer has {num_tokens} completion tokens, asked for {spec.max_tokens} with ignore_eos"
    return None


async def _read_stream(resp: Any, spec: RequestSpec, outcome: Outcome) -> None:
    """Read the SSE stream to [DONE], or close the connection after spec.disconnect_after events."""
    decoder, num_events, usage, is_done = SSEDecoder(), 0, None, False
    stream = resp.content.iter_any()
    while not is_done:
        raw = await anext(stream, None)
        for data in decoder.feed(raw) if raw is not None else decoder.close():
            chunk = parse_chunk(data, spec.endpoint)
            if chunk.error is not None:
                outcome.error = f"error in stream: {chunk.error}"
                return
            num_events, usage, is_done = num_events + 1, chunk.usage or usage, is_done or chunk.is_done
            if spec.disconnect_after and num_events >= spec.disconnect_after and not is_done:
                resp.close()  # the client goes away mid-stream: the connection is dropped, not reused
                outcome.is_disconnected = True
                return
        if raw is None and not is_done:
            outcome.error = f"stream ended after {num_events} events without [DONE]"
            return
    if usage is None or usage.get("completion_tokens") != spec.max_tokens:
        outcome.error = f"stream usage {usage} is not {spec.max_tokens} completion tokens (ignore_eos)"


async def send_one(
    session: Any, url: str, headers: dict[str, str], spec: RequestSpec, model: str, t0: float
) -> Outcome:
    """POST one request; never raises for server or network failures (they become outcome.error)."""
    import aiohttp

    sent = time.monotonic()
    outcome = Outcome(spec.kind, round(sent - t0, 3))
    try:
        async with session.post(url + ENDPOINTS[spec.endpoint], json=build_body(spec, model), headers=headers) as resp:
            if resp.status != 200:
                outcome.error = f"HTTP {resp.status}: {_error_message(await resp.text())}"
            elif spec.is_stream:
                await _read_stream(resp, spec, outcome)
            else:
                outcome.error = _check_plain(await resp.json(), spec)
    except asyncio.TimeoutError:
        outcome.error = "no complete answer within --timeout"
    except (aiohttp.ClientError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        outcome.error = f"{type(e).__name__}: {e}"
    outcome.latency = round(time.monotonic() - sent, 4)
    return outcome


# ---- the load --------------------------------------------------------------------------------------------


@dataclass
class LoadState:
    """What the process watch reads at each sample (written by the event loop's thread only)."""

    in_flight: int = 0
    max_in_flight: int = 0
    num_done: int = 0
    num_errors: int = 0
    outcomes: list[Outcome] = field(default_factory=list)

    def counts(self) -> tuple[int, int, int]:
        return self.in_flight, self.num_done, self.num_errors

    async def track(self, request: Any) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        outcome = await request
        self.in_flight -= 1
        self.num_done += 1
        self.num_errors += outcome.error is not None
        self.outcomes.append(outcome)


async def _progress(config: SoakConfig, state: LoadState, t0: float) -> None:
    while True:
        await asyncio.sleep(60.0)
        minutes = (time.monotonic() - t0) / 60
        print(
            f"[soak] {minutes:.1f}/{config.duration_s / 60:g} min: {state.num_done} requests done, "
            f"{state.num_errors} errors, {state.in_flight} in flight",
            flush=True,
        )


async def drive(config: SoakConfig, target: ServeBenchConfig, watch: ProcessWatch, state: LoadState) -> str:
    """Run the load (the watch's phases follow it) until every request is answered; the model name."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        model = target.model or await discover_model(session, target)
        specs, tasks = plan_requests(config), []
        t0 = watch.t0 = time.monotonic()
        watch.start()
        watch.phase = "warmup"
        progress = asyncio.create_task(_progress(config, state, t0))
        for spec in specs:
            await asyncio.sleep(max(0.0, t0 + spec.offset - time.monotonic()))
            if watch.phase == "warmup" and spec.offset >= config.warmup_seconds:
                watch.phase = "load"
            request = send_one(session, target.api_root, target.headers(), spec, model, t0)
            tasks.append(asyncio.create_task(state.track(request)))
        await asyncio.sleep(max(0.0, t0 + config.duration_s - time.monotonic()))
        watch.phase = "drain"
        await asyncio.gather(*tasks)
        progress.cancel()
    return model


# ---- the deployment --------------------------------------------------------------------------------------


@dataclass(eq=False)
class LaunchProcess(ServerProcess):
    """`pdserve launch` in its own session, its router on `port`; the parts' logs go beside its own log."""

    def argv(self) -> list[str]:
        log_dir = self.log_path.parent / "parts"
        return [sys.executable, "-m", "pdserve.cli", "launch", "--port", str(self.port), "--log-dir", str(log_dir)]

    def env(self) -> dict[str, str] | None:
        return None  # the launcher makes its children's environment (and reads PDSERVE_API_KEY for its router)


# ---- command line ------------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "soak",
        help="constant-rate load for minutes: RSS, fds and threads of every process, errors, KV blocks at the end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = p.add_argument_group("deployment (default: one `pdserve launch` started here)")
    d.add_argument("--url", default=None, help="the router of a running deployment instead of launching one")
    d.add_argument("--pids", default="", help="with --url: comma-separated pids to watch, each with its children")
    d.add_argument("--api-key", default=None, help="the router's key, if it requires one")
    d.add_argument("--launch-flags", default="", help="more `pdserve launch` flags, one string (not --port)")
    d.add_argument("--server-timeout", type=float, default=300.0, help="seconds for the router to answer /health")
    w = p.add_argument_group("load")
    w.add_argument("--duration", type=float, default=10.0, help="minutes of load (default 10)")
    w.add_argument("--rate", type=float, default=1.0, help="requests per second (default 1)")
    w.add_argument("--arrival", choices=ARRIVALS, default="poisson", help="fixed: evenly spaced arrivals")
    w.add_argument("--stream-fraction", type=float, default=0.5)
    w.add_argument("--chat-fraction", type=float, default=0.5, help="the rest are completions")
    w.add_argument("--disconnect-fraction", type=float, default=0.1, help="clients closing after 1-2 SSE events")
    w.add_argument("--max-tokens-min", type=int, default=8)
    w.add_argument("--max-tokens-max", type=int, default=16)
    w.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    w.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("watch")
    m.add_argument("--warmup", type=float, default=None, help="seconds left out of growth figures (default 20 %%)")
    m.add_argument("--interval", type=float, default=5.0, help="seconds between process samples")
    m.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for the deployment to idle")
    m.add_argument("--idle-wait", type=float, default=5.0, help="seconds idle before the last sample and read")
    add_output_args(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        duration_s=args.duration * 60, rate=args.rate, arrival=args.arrival, warmup_s=args.warmup,
        stream_fraction=args.stream_fraction, chat_fraction=args.chat_fraction,
        disconnect_fraction=args.disconnect_fraction, max_tokens=(args.max_tokens_min, args.max_tokens_max),
        timeout_s=args.timeout, interval_s=args.interval, drain_timeout_s=args.drain_timeout,
        idle_wait_s=args.idle_wait, seed=args.seed,
    )  # fmt: skip


def _parse_pids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--pids takes comma-separated process ids, got {text!r}") from None


Measured = tuple[dict[str, Any], ProcessWatch]  # the result's measured part, and the watch for the figure


def soak(args: argparse.Namespace, config: SoakConfig, url: str, root_pids: list[int]) -> Measured:
    """The load and the watch against the router at `url`."""
    target = ServeBenchConfig(base_url=url, api_key=args.api_key, timeout_s=config.timeout_s)
    state = LoadState()
    watch = ProcessWatch(root_pids, config.interval_s, time.monotonic(), state.counts)
    try:
        model = asyncio.run(drive(config, target, watch, state))
        load_end_s = time.monotonic() - watch.t0
        watch.phase = "idle"
        blocks = wait_idle(target.api_root, config.drain_timeout_s, config.idle_wait_s)
    finally:
        watch.stop()
    warmup_end_s = config.warmup_seconds
    return {
        "model": model,
        "timeline": {"warmup_end_s": warmup_end_s, "load_end_s": round(load_end_s, 2), "end_s": watch.samples[-1]["t"]},
        "requests": requests_summary(state.outcomes, config.duration_s, state.max_in_flight),
        "processes": processes_summary(watch, warmup_end_s),
        "blocks": blocks,
        "process_names": {str(pid): name for pid, name in watch.names.items()},
        "samples": watch.samples,
    }, watch


def run_launched(args: argparse.Namespace, config: SoakConfig) -> Measured:
    """Start `pdserve launch`, soak it, stop it; the measured part gets the deployment's description."""
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-soak-") as tmp:
        launch = LaunchProcess("launch", shlex.split(args.launch_flags), Path(tmp) / "launch.log")
        print(f"[soak] starting pdserve launch --port {launch.port} {args.launch_flags}".rstrip(), flush=True)
        try:
            launch.start()
            launch.wait_ready(args.server_timeout)
            assert launch.proc is not None
            measured, watch = soak(args, config, launch.url, [launch.proc.pid])
            measured["deployment"] = {"launch_flags": args.launch_flags, "url": launch.url, "alive_at_end": True}
            if launch.proc.poll() is not None:
                measured["deployment"] |= {"alive_at_end": False, "log_tail": launch.log_tail()}
        finally:
            launch.stop()
        measured["deployment"]["log_tracebacks"], first = count_tracebacks(Path(tmp))
        if first:
            measured["deployment"]["first_traceback"] = first
    return measured, watch


def count_tracebacks(log_dir: Path) -> tuple[dict[str, int], str]:
    """Tracebacks in each log under `log_dir` (the launcher's and its parts'), and the first one's text: any is a
    defect, even one that no client saw."""
    marker = "Traceback (most recent call last)"
    counts, first = {}, ""
    for log in sorted(log_dir.rglob("*.log")):
        text = log.read_text(errors="replace")
        counts[str(log.relative_to(log_dir))] = text.count(marker)
        if not first and marker in text:
            start = text.index(marker)
            first = text[max(0, text.rfind("\n", 0, start - 200)) : start + 4000]
    return counts, first


def run(args: argparse.Namespace) -> int:
    if args.label is not None and not LABEL_RE.match(args.label):
        raise ValueError(f"--label {args.label!r} may hold only letters, digits, '.', '_' and '-'")
    if args.pids and not args.url:
        raise ValueError("--pids goes with --url; without it the benchmark watches the deployment it launches")
    config = config_from_args(args)
    try:
        with sigterm_interrupts():
            if args.url:
                measured, watch = soak(args, config, args.url, _parse_pids(args.pids))
                measured["deployment"] = {"url": args.url, "pids": _parse_pids(args.pids)}
            else:
                measured, watch = run_launched(args, config)
    except (BenchServerError, BenchServeError) as e:
        print(f"pdserve bench soak: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pdserve bench soak: interrupted; the deployment it launched was stopped", file=sys.stderr)
        return 130
    result = {
        "benchmark": "soak",
        "date": now_iso(),
        "label": args.label,
        "pdserve_version": code_version(),
        "machine": machine_info(),
        "config": asdict(config) | {"warmup_s": config.warmup_seconds},
        "notes": NOTES,
        **measured,
    }
    stem = f"soak-{label_or_timestamp(args.label)}"
    timeline = result["timeline"]
    title = (
        f"pdserve bench soak: {result['model']}, {config.rate:g} req/s ({config.arrival}) for "
        f"{config.duration_s / 60:g} min, {config.disconnect_fraction:.0%} disconnecting"
    )
    write_outputs(
        result,
        args.result_dir,
        stem,
        lambda path: plot(path, title, watch, timeline["warmup_end_s"], timeline["load_end_s"]),
    )
    print(format_table(result))
    print(f"Results: {result['files']['json']}, {result['files']['png']}")
    problems = find_problems(result)
    for problem in problems:
        print(f"pdserve bench soak: error: {problem}", file=sys.stderr)
    return 1 if problems else 0
