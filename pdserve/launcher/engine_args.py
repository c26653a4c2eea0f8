"""The engine's command-line flags, shared by `pdserve generate`, `serve`, `launch` and `bench offline`.

add_engine_args defines them, engine_kwargs reads them into make_engine_config's keyword arguments, and
engine_argv renders the ones that were set back into command-line tokens (what `pdserve launch` passes on
to every instance; the reason this module lives with the launcher, which may not import cli.py). Knows
nothing about the commands that use them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from pdserve.config import (
    ATTENTION_BACKENDS,
    DTYPES,
    LOAD_FORMATS,
    STORE_KINDS,
    parse_gpu_ids,
    parse_size,
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The "engine" and "KV cache tiers" argument groups (engine_argv renders them in this order)."""
    _add_engine_group(parser.add_argument_group("engine"))
    _add_cache_group(parser.add_argument_group("KV cache tiers (docs/kv-cache.md)"))


def _add_engine_group(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--model",
        default=None,
        help="HF model directory, .gguf file, or a dummy shape name (default: SmolLM2-135M-Instruct)",
    )
    g.add_argument(
        "--load-format",
        choices=LOAD_FORMATS,
        default="auto",
        help="'dummy' gives random weights in a named real shape (llama3-8b, qwen2.5-7b, tiny, ...)",
    )
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (default: the model's)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--num-blocks", type=int, default=None, help="KV blocks per rank (overrides --kv-cache-memory)")
    g.add_argument("--kv-cache-memory", type=parse_size, default=None, help="KV cache bytes per rank, e.g. 2GiB")
    g.add_argument("--max-num-seqs", type=int, default=64, help="running requests per step")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (prefill chunk budget)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument(
        "--attention-backend",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="auto: Triton paged attention on CUDA (when Triton is installed), torch elsewhere",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs for decode steps (captured by default on CUDA with one rank and Triton)",
    )
    g.add_argument(
        "--gpu-ids",
        type=parse_gpu_ids,
        default=(),
        metavar="I,J,...",
        help="CUDA device of each tensor-parallel rank, e.g. 1 or 2,3 (default: rank r on device r)",
    )
    g.add_argument("--seed", type=int, default=0)


def _add_cache_group(c: argparse._ArgumentGroup) -> None:
    c.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="do not reuse cached prefixes (preempted requests still reuse their own saved blocks)",
    )
    c.add_argument(
        "--host-kv-cache-memory",
        type=parse_size,
        default=None,
        help="host tier bytes per rank, e.g. 8GiB (default: none; 256MiB when --kv-store is set)",
    )
    c.add_argument("--num-host-blocks", type=int, default=None, help="host tier blocks per rank (overrides memory)")
    c.add_argument("--kv-store", choices=STORE_KINDS, default=None, help="pool tier behind the host tier")
    c.add_argument(
        "--kv-store-config",
        default=None,
        help='pool options as JSON or a JSON file, e.g. \'{"master": "127.0.0.1:50051"}\'',
    )
    c.add_argument(
        "--no-preempt-save",
        dest="preempt_save",
        action="store_false",
        help="recompute preempted requests instead of saving their blocks to the host tier",
    )
    c.add_argument(
        "--cache-output",
        action="store_true",
        help="also write generated tokens' full blocks to the pool at finish (for multi-turn reuse)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """make_engine_config's (and LLM's) keyword arguments from the parsed engine flags."""
    return dict(
        model=args.model,
        dtype=args.dtype,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        device=args.device,
        seed=args.seed,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        gpu_ids=args.gpu_ids,
        enable_prefix_caching=args.enable_prefix_caching,
        host_kv_cache_memory=args.host_kv_cache_memory,
        num_host_blocks=args.num_host_blocks,
        kv_store=args.kv_store,
        kv_store_config=args.kv_store_config,
        preempt_save=args.preempt_save,
        cache_output=args.cache_output,
    )


def engine_argv(args: argparse.Namespace, skip: Sequence[str] = ("tensor_parallel_size",)) -> list[str]:
    """The engine flags (add_engine_args) whose values differ from their defaults, as command-line tokens."""
    reference = argparse.ArgumentParser(add_help=False)
    add_engine_args(reference)
    argv: list[str] = []
    for action in reference._actions:
        if not action.option_strings or action.dest in skip:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        option = next(s for s in action.option_strings if s.startswith("--"))
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)  # tuples: --gpu-ids 2,3
        argv += [option] if action.nargs == 0 else [option, text]  # nargs 0: store_true / store_false
    return argv
