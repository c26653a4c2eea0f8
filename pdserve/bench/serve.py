"""`pdserve bench serve`: an online serving benchmark client for any OpenAI-compatible server.

Sends text prompts (see datasets.py) to /v1/completions or /v1/chat/completions
of pdserve, vLLM or SGLang with `stream: true`, Poisson arrivals and an optional
concurrency cap, and measures TTFT, TPOT, ITL and end-to-end latency from the
SSE stream on the client side. Writes serve-<dataset>-<endpoint>-<label>.json
and a .png of latency CDFs under --result-dir and prints a summary table. With --ab-rounds N it runs the
workload 2N times, alternating a baseline body and --extra-body, and compares the two (serve_ab.py).
It knows nothing about the server's internals: only HTTP and the OpenAI schema.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
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
from pdserve.bench.datasets import (
    DATASETS,
    Conversation,
    DatasetConfig,
    Turn,
    build_dataset,
    dataset_stats,
    load_tokenizer,
)
from pdserve.bench.metrics import RequestResult, format_table, parse_goodput, plot_latency_cdfs, summarize
from pdserve.bench.sse import SSEDecoder, parse_chunk

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
MAX_ERRORS_RECORDED = 10
# body fields that ask the server for structured output (a grammar), which ends the text: no ignore_eos with them
STRUCTURED_OUTPUT_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


class BenchServeError(RuntimeError):
    """The benchmark cannot run against this server as configured (unreachable, wrong endpoint or model)."""


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str
    endpoint: str = "completions"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    request_rate: float = math.inf  # requests/s of the Poisson arrivals; inf: all at once
    max_concurrency: int | None = None  # requests in flight at most; None: unbounded
    goodput_slos: dict[str, float] = field(default_factory=dict)  # name -> ms, see metrics.parse_goodput
    model: str | None = None  # None: the first id of GET /v1/models
    tokenizer: str | None = None  # None: pdserve's default model's
    api_key: str | None = None
    timeout_s: float = 300.0
    result_dir: Path = Path("bench/results")
    label: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    use_tqdm: bool = True

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be above 0 (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout must be above 0 seconds, got {self.timeout_s}")
        if self.label is not None and not LABEL_RE.match(self.label):
            raise ValueError(f"--label {self.label!r} may hold only letters, digits, '.', '_' and '-'")

    @property
    def api_root(self) -> str:
        """The base URL without a trailing '/' or '/v1': both spellings are accepted."""
        root = self.base_url.rstrip("/")
        return root[: -len("/v1")] if root.endswith("/v1") else root

    @property
    def url(self) -> str:
        return self.api_root + ENDPOINTS[self.endpoint]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def asks_structured_output(body: dict[str, Any]) -> bool:
    """Whether `body` constrains the output with a grammar: response_format json_object/json_schema, vLLM's guided_*
    or structured_outputs, or tools the model must call."""
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        return True
    if any(body.get(name) is not None for name in STRUCTURED_OUTPUT_FIELDS):
        return True
    return bool(body.get("tools")) and body.get("tool_choice") not in (None, "none", "auto")


def build_payload(
    endpoint: str,
    model: str,
    conversation: Conversation,
    turn_index: int,
    answers: list[str],
    extra_body: dict[str, Any],
) -> dict[str, Any]:
    """The JSON body of turn `turn_index`, carrying the earlier turns and their `answers`.

    Asks for exactly the turn's output length (ignore_eos) unless `extra_body` asks for structured output,
    whose grammar ends the text: then the lengths are the model's, at most the turn's."""
    turns = conversation.turns[: turn_index + 1]
    if endpoint == "chat":
        messages: list[dict[str, str]] = []
        for turn, answer in zip(turns, answers):
            messages += [{"role": "user", "content": turn.text}, {"role": "assistant", "content": answer}]
        body: dict[str, Any] = {"messages": [*messages, {"role": "user", "content": turns[-1].text}]}
    elif conversation.is_multi_turn:
        history = "".join(f"User:{t.text}\nAssistant:{a}\n" for t, a in zip(turns, answers))
        body = {"prompt": f"{history}User:{turns[-1].text}\nAssistant:"}
    else:
        body = {"prompt": turns[-1].text}
    return {
        "model": model,
        **body,
        "max_tokens": turns[-1].output_len,
        "temperature": 0.0,
        "ignore_eos": not asks_structured_output(extra_body),
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra_body,
    }


def arrival_offsets(num_arrivals: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start of each arrival: a Poisson process of `rate`/s starting at 0; inf: all at 0."""
    if math.isinf(rate):
        return [0.0] * num_arrivals
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num_arrivals)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()[:num_arrivals]


async def send_request(
    session: Any, config: ServeBenchConfig, payload: dict[str, Any], input_len: int, bench_start: float
) -> RequestResult:
    """POST one streaming request and time it; never raises for server or network failures."""
    import aiohttp

    sent = time.perf_counter()
    result = RequestResult(False, input_len, 0, payload["max_tokens"], start=sent - bench_start)
    try:
        async with session.post(config.url, json=payload, headers=config.headers()) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {_error_message(await resp.text())}"
                return result
            await _read_stream(resp, config.endpoint, sent, result)
    except asyncio.TimeoutError:
        result.error = f"no complete response within --timeout {config.timeout_s:g} s"
    except (aiohttp.ClientError, OSError, UnicodeDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    if not result.success:
        result.latency = time.perf_counter() - sent
    return result


async def _read_stream(resp: Any, endpoint: str, sent: float, result: RequestResult) -> None:
    """Fill `result` from the SSE stream; result.success stays False on an in-stream error or no text."""
    decoder, texts, usage = SSEDecoder(), [], None
    last: float | None = None
    stream = resp.content.iter_any()
    is_done = False
    while not is_done:
        raw = await anext(stream, None)
        now = time.perf_counter()
        for data in decoder.feed(raw) if raw is not None else decoder.close():
            chunk = parse_chunk(data, endpoint)
            if chunk.error is not None:
                result.error = f"error in stream: {chunk.error}"
                return
            usage = chunk.usage or usage
            if chunk.text:
                if last is None:
                    result.ttft = now - sent
                else:
                    result.itl.append(now - last)
                last = now
                texts.append(chunk.text)
            is_done = is_done or chunk.is_done
        is_done = is_done or raw is None
    result.latency = time.perf_counter() - sent
    if not texts:
        result.error = "stream ended without generated text (no chunk with non-empty text)"
        return
    result.text = "".join(texts)
    result.output_len = int(usage.get("completion_tokens") or len(texts)) if usage else len(texts)
    if usage and usage.get("prompt_tokens"):
        result.input_len, result.usage_reported = int(usage["prompt_tokens"]), True
    result.success = True


def _error_message(body: str) -> str:
    """The 'message' of an OpenAI error body, else the body's start."""
    try:
        err = json.loads(body)
        err = err.get("error", err) if isinstance(err, dict) else err
        message = err.get("message") or err.get("detail") if isinstance(err, dict) else err
        return str(message)[:300]
    except (json.JSONDecodeError, AttributeError):
        return body[:300]


async def discover_model(session: Any, config: ServeBenchConfig) -> str:
    """The first model id of GET /v1/models."""
    import aiohttp

    url = config.api_root + "/v1/models"
    try:
        async with session.get(url, headers=config.headers()) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise BenchServeError(
                    f"GET {url} returned HTTP {resp.status}: {_error_message(body)}; "
                    "check --base-url and --api-key, or pass --model"
                )
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise BenchServeError(
            f"cannot reach {url} ({type(e).__name__}: {e}); is the server running at --base-url?"
        ) from e
    try:
        return str(json.loads(body)["data"][0]["id"])
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise BenchServeError(f"GET {url} listed no model ({body[:200]!r}); pass --model NAME") from None


@dataclass
class _Run:
    """Shared state of one benchmark run."""

    session: Any
    config: ServeBenchConfig
    model: str
    start: float
    semaphore: asyncio.Semaphore
    progress: Any
    extra_body: dict[str, Any]  # merged into every request of this run (see build_payload)


async def _run_conversation(run: _Run, conversation: Conversation, offset: float) -> list[RequestResult]:
    """Wait for the arrival time, then send the turns one after another; later turns fail if one fails."""
    await asyncio.sleep(max(0.0, run.start + offset - time.perf_counter()))
    results: list[RequestResult] = []
    answers: list[str] = []
    history_len = 0
    for i, turn in enumerate(conversation.turns):
        payload = build_payload(run.config.endpoint, run.model, conversation, i, answers, run.extra_body)
        async with run.semaphore:
            result = await send_request(run.session, run.config, payload, history_len + turn.input_len, run.start)
        results.append(result)
        run.progress.update(1)
        if not result.success:
            break
        answers.append(result.text)
        history_len += turn.input_len + result.output_len
    for turn in conversation.turns[len(results) :]:
        results.append(
            RequestResult(
                False,
                turn.input_len,
                0,
                turn.output_len,
                error=f"not sent: turn {len(answers) + 1} of its conversation failed",
            )
        )
        run.progress.update(1)
    return results


def open_session(config: ServeBenchConfig) -> Any:
    """An aiohttp.ClientSession (async context manager) with the connection cap and timeout of `config`."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=config.timeout_s))


async def send_test_request(
    session: Any, config: ServeBenchConfig, model: str, extra_body: dict[str, Any], what: str = "the test request"
) -> None:
    """One short request with `extra_body` that must succeed (it also warms the server: a grammar compiles here);
    BenchServeError if it fails."""
    probe = Conversation((Turn(" Hello", 1, 2),))
    payload = build_payload(config.endpoint, model, probe, 0, [], extra_body)
    test = await send_request(session, config, payload, 1, time.perf_counter())
    if not test.success:
        raise BenchServeError(
            f"{what} to {config.url} failed: {test.error}; check --base-url, "
            f"--endpoint ({config.endpoint}), --model ({model}) and the request body ({json.dumps(extra_body)})"
        )


async def run_workload(
    session: Any,
    config: ServeBenchConfig,
    model: str,
    conversations: list[Conversation],
    extra_body: dict[str, Any],
    desc: str = "bench serve",
) -> tuple[list[list[RequestResult]], float]:
    """(results per conversation, duration_s) of the whole workload sent with `extra_body`."""
    from tqdm import tqdm

    num_requests = sum(len(c.turns) for c in conversations)
    offsets = arrival_offsets(len(conversations), config.request_rate, config.dataset.seed)
    with tqdm(total=num_requests, desc=desc, unit="req", disable=not config.use_tqdm) as progress:
        run = _Run(
            session,
            config,
            model,
            time.perf_counter(),
            asyncio.Semaphore(config.max_concurrency or num_requests),
            progress,
            extra_body,
        )
        results = await asyncio.gather(*(_run_conversation(run, c, t) for c, t in zip(conversations, offsets)))
        duration = time.perf_counter() - run.start
    return list(results), duration


async def _benchmark(
    config: ServeBenchConfig, conversations: list[Conversation]
) -> tuple[str, list[list[RequestResult]], float]:
    """(model, results per conversation, duration_s) after a test request that must succeed."""
    async with open_session(config) as session:
        model = config.model or await discover_model(session, config)
        await send_test_request(session, config, model, config.extra_body)
        results, duration = await run_workload(session, config, model, conversations, config.extra_body)
    return model, results, duration


def run_benchmark(config: ServeBenchConfig, conversations: list[Conversation]) -> dict[str, Any]:
    """Run the workload against the server, write the JSON and PNG, return the result dict."""
    model, per_conversation, duration = asyncio.run(_benchmark(config, conversations))
    flat = [(c, t, r) for c, results in enumerate(per_conversation) for t, r in enumerate(results)]
    results = [r for _, _, r in flat]
    metrics = summarize(results, duration, config.goodput_slos)
    result: dict[str, Any] = {
        "benchmark": "serve",
        "date": now_iso(),
        "label": config.label,
        "pdserve_version": code_version(),
        "server": server_record(config, model),
        "config": config_record(config),
        "client_machine": machine_info(),
        "dataset": dataset_stats(conversations),
        "metrics": metrics,
        "errors": [
            {"conversation": c, "turn": t, "status": r.status, "error": r.error} for c, t, r in flat if not r.success
        ][:MAX_ERRORS_RECORDED],
        "requests": [request_record(c, t, r) for c, t, r in flat],
    }
    stem = f"serve-{config.dataset.name}-{config.endpoint}-{label_or_timestamp(config.label)}"
    title = figure_title(result, config)
    write_outputs(result, config.result_dir, stem, lambda path: plot_latency_cdfs(path, title, results))
    return result


def server_record(config: ServeBenchConfig, model: str) -> dict[str, Any]:
    return {"base_url": config.api_root, "url": config.url, "endpoint": config.endpoint, "model": model}


def config_record(config: ServeBenchConfig) -> dict[str, Any]:
    """The client configuration as the result JSON records it."""
    workload = asdict(config.dataset) | {
        "prefix_len": config.dataset.shared_prefix_len if config.dataset.name == "shared-prefix" else None
    }
    return {
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "max_concurrency": config.max_concurrency,
        "timeout_s": config.timeout_s,
        "tokenizer": config.tokenizer,
        "extra_body": config.extra_body,
        "dataset": workload,
    }


def request_record(conversation: int, turn: int, r: RequestResult) -> dict[str, Any]:
    def ms(seconds: float | None) -> float | None:
        return None if seconds is None or not r.success else round(seconds * 1000.0, 3)

    return {
        "conversation": conversation,
        "turn": turn,
        "success": r.success,
        "status": r.status,
        "start_s": round(r.start, 4),
        "input_len": r.input_len,
        "output_len": r.output_len,
        "ttft_ms": ms(r.ttft),
        "tpot_ms": ms(r.tpot),
        "latency_ms": ms(r.latency),
    }


def figure_title(result: dict[str, Any], config: ServeBenchConfig) -> str:
    m, cfg = result["metrics"], result["config"]
    return (
        f"{result['server']['model']} at {config.api_root} ({config.endpoint}), {config.dataset.name}, "
        f"rate {cfg['request_rate']}/s, max concurrency {config.max_concurrency or 'none'}\n"
        f"{m['completed']}/{m['num_requests']} ok, {m['request_throughput']:.2f} req/s, "
        f"{m['output_throughput']:.1f} output tok/s"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="online serving benchmark against any OpenAI-compatible server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_argument_group("server")
    s.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    s.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions")
    s.add_argument("--model", default=None, help="model name to request (default: first id of GET /v1/models)")
    s.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    s.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request before it counts as failed (default 300)"
    )
    s.add_argument(
        "--extra-body",
        type=_json_object,
        default={},
        help="JSON object merged into every request body, e.g. '{\"top_k\": 1}'",
    )
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=DATASETS, default="random")
    w.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer dir/name sizing the prompts (default: pdserve's default model's)",
    )
    w.add_argument("--num-prompts", type=int, default=100, help="requests; conversations for multi-turn")
    w.add_argument("--input-len", type=int, default=256, help="prompt tokens (per user message for multi-turn)")
    w.add_argument("--output-len", type=int, default=128, help="tokens to generate per request (max_tokens)")
    w.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [len*(1-r), len*(1+r)] (default 0: fixed)",
    )
    w.add_argument(
        "--prefix-len", type=int, default=None, help="shared-prefix: common prefix tokens (default input-len/2)"
    )
    w.add_argument("--num-turns", type=int, default=3, help="multi-turn: turns per conversation")
    w.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals/s (default inf: all at once); conversation starts for multi-turn",
    )
    w.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    w.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="NAME:MS",
        help="SLOs in ms, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)",
    )
    w.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    from pdserve.bench.serve_ab import add_ab_args

    add_ab_args(p, _json_object)
    add_output_args(p)
    p.set_defaults(func=run)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"top_k\": 1}}', got {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    dataset = DatasetConfig(
        name=args.dataset,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.random_range_ratio,
        prefix_len=args.prefix_len,
        num_turns=args.num_turns,
        seed=args.seed,
    )
    return ServeBenchConfig(
        base_url=args.base_url,
        endpoint=args.endpoint,
        dataset=dataset,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        goodput_slos=parse_goodput(args.goodput),
        model=args.model,
        tokenizer=args.tokenizer,
        api_key=args.api_key,
        timeout_s=args.timeout,
        result_dir=args.result_dir,
        label=args.label,
        extra_body=args.extra_body,
        use_tqdm=args.use_tqdm,
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from pdserve.bench.serve_ab import ab_config_from_args, format_ab_table, run_ab_benchmark

    config = config_from_args(args)
    ab = ab_config_from_args(args)
    conversations = build_dataset(config.dataset, load_tokenizer(config.tokenizer))
    try:
        if ab is None:
            result = run_benchmark(config, conversations)
        else:
            result = run_ab_benchmark(config, ab, conversations)
    except BenchServeError as e:
        print(f"pdserve bench serve: error: {e}", file=sys.stderr)
        return 1
    print(format_table(result["metrics"]) if ab is None else format_ab_table(result))
    print(f"Results: {result['files']['json']}, {result['files']['png']}")
    return 0
