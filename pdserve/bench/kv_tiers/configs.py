"""`pdserve bench kv-tiers`'s four configurations (none, device, host, pool): each one's `pdserve serve` flags,
its pool, and the `bench serve` workload every one of them gets."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pdserve.bench.datasets import DatasetConfig
from pdserve.bench.launch import BenchServerError, free_port
from pdserve.bench.serve import ServeBenchConfig

CONFIGS = ("none", "device", "host", "pool")
DESCRIPTIONS = {
    "none": "no prefix caching: every prompt token is computed",
    "device": "prefix caching on the device tier only",
    "host": "prefix caching, device tier + host tier",
    "pool": "prefix caching, device tier + host tier + pool",
}
POOLS = ("mooncake", "file", "memory")
DATASETS = ("multi-turn", "shared-prefix")
SETTLE_TIMEOUT_S = 60.0
# JSON name -> Prometheus sample of a counter whose change over a run is recorded
COUNTERS = {
    "prompt_tokens_computed": "pdserve_prompt_tokens_total",
    "query_tokens": "pdserve_prefix_cache_query_tokens_total",
    "hit_tokens_device": 'pdserve_prefix_cache_hit_tokens_total{tier="device"}',
    "hit_tokens_host": 'pdserve_prefix_cache_hit_tokens_total{tier="host"}',
    "hit_tokens_pool": 'pdserve_prefix_cache_hit_tokens_total{tier="pool"}',
    "store_bytes_put": 'pdserve_kv_store_bytes_total{op="put"}',
    "store_bytes_get": 'pdserve_kv_store_bytes_total{op="get"}',
    "store_errors": "pdserve_kv_store_errors_total",
    "recomputed_tokens": "pdserve_recomputed_tokens_total",
    "preemptions": "pdserve_preemptions_total",
    "blocks_saved_on_preemption": "pdserve_kv_blocks_saved_on_preemption_total",
}
TIERS = ("device", "host", "pool")


@contextlib.contextmanager
def open_pool(kind: str, work_dir: Path) -> Iterator[dict[str, Any]]:
    """The --kv-store-config of a fresh pool; a Mooncake master runs until the block exits."""
    if kind == "file":
        path = work_dir / "pool"
        path.mkdir(parents=True, exist_ok=True)
        yield {"path": str(path)}
    elif kind == "memory":
        yield {}
    else:
        from pdserve.store.base import StoreError
        from pdserve.store.master import MasterProcess

        port = free_port()
        master = MasterProcess(port=port, metadata_port=next(p for p in iter(free_port, None) if p != port))
        try:
            master.start()
        except StoreError as e:
            raise BenchServerError(
                f"cannot start a Mooncake master for the pool config ({e}); or use --pool file"
            ) from e
        try:
            yield master.store_config()
        finally:
            master.stop()


def cache_output(name: str, args: argparse.Namespace) -> bool:
    """Multi-turn host and pool servers also keep generated tokens' blocks, so a next turn can hit the answer."""
    return args.dataset == "multi-turn" and name in ("host", "pool")


def server_flags(name: str, args: argparse.Namespace, pool_config: dict[str, Any] | None) -> list[str]:
    """The exact `pdserve serve` flags of one configuration (port and host are added at start)."""
    flags = [
        "--dtype",
        args.dtype,
        "--load-format",
        args.load_format,
        "--block-size",
        str(args.block_size),
        "--num-blocks",
        str(args.num_blocks),
        "--max-model-len",
        str(args.max_model_len or args.num_blocks * args.block_size),
    ]
    if args.model is not None:
        flags = ["--model", args.model, *flags]
    if name == "none":
        flags.append("--no-prefix-caching")
    if name in ("host", "pool"):
        flags += ["--num-host-blocks", str(args.num_host_blocks)]
    if name == "pool":
        flags += ["--kv-store", args.pool, "--kv-store-config", json.dumps(pool_config or {})]
    if cache_output(name, args):
        flags.append("--cache-output")
    return flags + shlex.split(args.server_flags)


def bench_config(args: argparse.Namespace, url: str, result_dir: Path, label: str) -> ServeBenchConfig:
    dataset = DatasetConfig(
        name=args.dataset,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        prefix_len=args.prefix_len,
        num_turns=args.num_turns,
        seed=args.seed,
    )
    return ServeBenchConfig(
        base_url=url,
        endpoint=args.endpoint,
        dataset=dataset,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        tokenizer=client_tokenizer(args),
        timeout_s=args.timeout,
        result_dir=result_dir,
        label=label,
        use_tqdm=args.use_tqdm,
    )


def client_tokenizer(args: argparse.Namespace) -> str | None:
    """--tokenizer, else the --model directory when it holds a tokenizer, else pdserve's default model's."""
    if args.tokenizer is not None:
        return str(args.tokenizer)
    if args.model is not None and (Path(args.model) / "tokenizer.json").is_file():
        return str(args.model)
    return None
