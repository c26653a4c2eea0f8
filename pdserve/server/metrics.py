"""Prometheus metrics. The names are part of pdserve's contract (docs/server.md)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from pdserve.messages import TRANSFER_SECONDS_BUCKETS, EngineStats

TRANSFER_FAILURE_REASONS = ("timeout", "send_error", "peer_error", "no_capacity", "write_error", "load_failed")


class _TransferCollector:
    """P->D KV transfer metrics, taken as the engine core reports them (it keeps the histogram)."""

    def __init__(self) -> None:
        self.stats = EngineStats()

    def collect(self) -> Iterator[Metric]:
        t = self.stats.kv_transfer
        moved = CounterMetricFamily(
            "pdserve_kv_transfer_bytes", "KV bytes moved between P and D (all ranks)", labels=["direction"]
        )
        moved.add_metric(["send"], t.bytes_sent)
        moved.add_metric(["recv"], t.bytes_received)
        yield moved
        buckets = t.seconds_buckets or [0] * len(TRANSFER_SECONDS_BUCKETS)
        seconds = HistogramMetricFamily(
            "pdserve_kv_transfer_seconds", "Per request: P, first send to KVDone; D, KVDest to KVDone"
        )
        seconds.add_metric(
            [],
            [(str(b), float(n)) for b, n in zip(TRANSFER_SECONDS_BUCKETS, buckets)]
            + [("+Inf", float(t.num_transfers))],
            t.seconds_sum,
        )
        yield seconds
        failures = CounterMetricFamily(
            "pdserve_kv_transfer_failures", "KV transfers that failed, by reason", labels=["reason"]
        )
        for reason in sorted({*TRANSFER_FAILURE_REASONS, *t.failures}):
            failures.add_metric([reason], t.failures.get(reason, 0))
        yield failures
        sender = CounterMetricFamily(
            "pdserve_kv_transfer_send_seconds",
            "P, rank 0: seconds its sender wrote KV (busy), and seconds steps waited for "
            "sends after the forward (exposed, not overlapped)",
            labels=["kind"],
        )
        sender.add_metric(["busy"], t.send_seconds_busy)
        sender.add_metric(["exposed"], t.send_seconds_exposed)
        yield sender
        pool = CounterMetricFamily(
            "pdserve_kv_transfer_pool_seconds",
            "Storage mode: seconds P (rank 0) staged and wrote prompt blocks to the pool (put), and D read them (get)",
            labels=["op"],
        )
        pool.add_metric(["put"], t.pool_seconds_put)
        pool.add_metric(["get"], t.pool_seconds_get)
        yield pool
        recomputes = CounterMetricFamily(
            "pdserve_kv_load_recomputes",
            "Storage mode, D: requests whose missing prompt blocks D prefilled itself "
            "(--kv-load-failure-policy recompute)",
        )
        recomputes.add_metric([], t.num_load_recomputes)
        yield recomputes
        tokens = CounterMetricFamily(
            "pdserve_kv_load_recomputed_tokens",
            "Storage mode, D: prompt tokens prefilled because their blocks were missing",
        )
        tokens.add_metric([], t.num_recomputed_tokens)
        yield tokens


_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("pdserve_num_requests_running", "Requests running in the engine", registry=r)
        self.waiting = Gauge("pdserve_num_requests_waiting", "Requests waiting for admission", registry=r)
        self.blocks_total = Gauge("pdserve_kv_blocks_total", "KV cache blocks (device tier, per rank)", registry=r)
        self.blocks_free = Gauge("pdserve_kv_blocks_free", "Free KV cache blocks", registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens computed", registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens", "Tokens generated", registry=r)
        self.preemptions = Counter("pdserve_preemptions", "Requests preempted", registry=r)
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds", "Time to first token", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.tpot = Histogram(
            "pdserve_time_per_output_token_seconds",
            "Time per output token after the first",
            registry=r,
            buckets=_TPOT_BUCKETS,
        )
        self.latency = Histogram(
            "pdserve_request_latency_seconds", "End-to-end request latency", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.requests = Counter("pdserve_requests", "Finished requests by finish reason", ["finish_reason"], registry=r)
        self.recomputed_tokens = Counter(
            "pdserve_recomputed_tokens", "Tokens computed again after a preemption", registry=r
        )
        self.prefix_query_tokens = Counter(
            "pdserve_prefix_cache_query_tokens", "Tokens of admitted requests looked up in the prefix cache", registry=r
        )
        self.prefix_hit_tokens = Counter(
            "pdserve_prefix_cache_hit_tokens", "Prompt tokens reused, by the tier found in", ["tier"], registry=r
        )
        self.store_errors = Counter(
            "pdserve_kv_store_errors", "KV pool calls that failed (each read as a miss)", registry=r
        )
        self.store_bytes = Counter(
            "pdserve_kv_store_bytes", "Bytes written to and read from the KV pool (rank 0)", ["op"], registry=r
        )
        self.saved_on_preemption = Counter(
            "pdserve_kv_blocks_saved_on_preemption",
            "Blocks saved to the host tier when their request was preempted",
            registry=r,
        )
        for tier in ("device", "host", "pool"):
            self.prefix_hit_tokens.labels(tier=tier)
        for op in ("put", "get"):
            self.store_bytes.labels(op=op)
        self._transfer = _TransferCollector()
        r.register(self._transfer)  # type: ignore[arg-type]
        self._last = EngineStats()

    def update_engine(self, stats: EngineStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.blocks_total.set(stats.num_blocks_total)
        self.blocks_free.set(stats.num_blocks_free)
        last = self._last
        self.prompt_tokens.inc(max(0, stats.num_prompt_tokens - last.num_prompt_tokens))
        self.generation_tokens.inc(max(0, stats.num_generation_tokens - last.num_generation_tokens))
        self.preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        self.recomputed_tokens.inc(max(0, stats.num_recomputed_tokens - last.num_recomputed_tokens))
        self.prefix_query_tokens.inc(max(0, stats.prefix_query_tokens - last.prefix_query_tokens))
        for tier, now, before in (
            ("device", stats.prefix_hit_tokens_device, last.prefix_hit_tokens_device),
            ("host", stats.prefix_hit_tokens_host, last.prefix_hit_tokens_host),
            ("pool", stats.prefix_hit_tokens_pool, last.prefix_hit_tokens_pool),
        ):
            self.prefix_hit_tokens.labels(tier=tier).inc(max(0, now - before))
        self.store_errors.inc(max(0, stats.store.num_errors - last.store.num_errors))
        self.store_bytes.labels(op="put").inc(max(0, stats.store.bytes_put - last.store.bytes_put))
        self.store_bytes.labels(op="get").inc(max(0, stats.store.bytes_get - last.store.bytes_get))
        self.saved_on_preemption.inc(max(0, stats.num_blocks_saved_on_preemption - last.num_blocks_saved_on_preemption))
        self._transfer.stats = stats
        self._last = stats

    def observe_request(self, ttft: float | None, latency: float, num_output_tokens: int, finish_reason: str) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
            if num_output_tokens > 1:
                self.tpot.observe((latency - ttft) / (num_output_tokens - 1))
        self.latency.observe(latency)
        self.requests.labels(finish_reason=finish_reason).inc()

    def render(self, stats: EngineStats) -> bytes:
        self.update_engine(stats)
        return generate_latest(self.registry)
