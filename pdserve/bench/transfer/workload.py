"""The workload `pdserve bench transfer` and `bench storage` share: one request at a time, of random token ids, at
each --input-lens length, through 1 prefill + 1 decode instance; the model's KV layout, the lengths the model
accepts, and the instances' flags. Knows nothing about the servers beyond their command-line flags.
"""

from __future__ import annotations

import argparse
import math
import shlex
from dataclasses import dataclass
from typing import Any

from pdserve.bench.common import LABEL_RE
from pdserve.config import DTYPES, LOAD_FORMATS

DEFAULT_INPUT_LENS = (128, 256, 512, 1024, 2048, 4096)
MAX_TOKENS = 2  # the first token (TTFT) and one more, so the stream carries the first token as it comes


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


def instance_flags(args: argparse.Namespace, lens: list[int]) -> list[str]:
    """Every instance's `pdserve serve` flags (add_instance_args, then --server-flags)."""
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


# ---- flags -----------------------------------------------------------------------------------------------------------


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
