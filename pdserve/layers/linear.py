"""Tensor-parallel linear layers and the vocab-parallel embedding.

Each parameter carries a `weight_loader(param, full_tensor, shard_id)` that
copies this rank's slice out of a full checkpoint tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.layers.parallel import get_tp_group


def _set_loader(param: nn.Parameter, loader) -> nn.Parameter:  # type: ignore[no-untyped-def]
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b), W split by output rows; the output stays sharded.

    `output_sizes` lists the fused sub-matrices (e.g. q, k, v); each is split
    across ranks separately, so shard_id i selects sub-matrix i.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        tp = get_tp_group()
        for size in output_sizes:
            if size % tp.size:
                raise ValueError(f"output size {size} is not divisible by tensor_parallel_size {tp.size}")
        self.local_sizes = [size // tp.size for size in output_sizes]
        out = sum(self.local_sizes)
        self.weight = _set_loader(
            nn.Parameter(torch.empty(out, input_size, dtype=dtype), requires_grad=False), self._load
        )
        self.packed_weight: torch.Tensor | None = None  # see prepack_for_cpu
        self.bias = None
        if bias:
            self.bias = _set_loader(nn.Parameter(torch.zeros(out, dtype=dtype), requires_grad=False), self._load)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        tp = get_tp_group()
        size = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        part = loaded.narrow(0, tp.rank * size, size)
        param.data.narrow(0, offset, size).copy_(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T + b, W split by input columns; partial outputs are summed across ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        tp = get_tp_group()
        if input_size % tp.size:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size {tp.size}")
        self.local_in = input_size // tp.size
        self.weight = _set_loader(
            nn.Parameter(torch.empty(output_size, self.local_in, dtype=dtype), requires_grad=False), self._load
        )
        self.packed_weight: torch.Tensor | None = None  # see prepack_for_cpu
        self.bias = None
        if bias:
            self.bias = _set_loader(
                nn.Parameter(torch.zeros(output_size, dtype=dtype), requires_grad=False), _copy_full
            )

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        tp = get_tp_group()
        param.data.copy_(loaded.narrow(1, tp.rank * self.local_in, self.local_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = get_tp_group().all_reduce(_linear(x, self, None))
        return y if self.bias is None else y + self.bias


def _linear(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
    """x [num_tokens, in] -> [num_tokens, out], through the prepacked weight when there is one."""
    packed = layer.packed_weight
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, layer.weight, bias)


def prepack_for_cpu(model: nn.Module) -> int:
    """Reorder every linear weight on the CPU into oneDNN's blocked layout, once, after loading; the plain
    weight is released. Measured on a 2-core EPYC (torch 2.13, one thread, SmolLM2-135M, batch-16 decode
    step): fp32 185 -> 124 ms, bf16 115 -> 93 ms, same tokens. Returns how many layers were packed."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        weight = module.weight.data
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            continue
        try:
            module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, PREPACK_BATCH_HINT)
        except (RuntimeError, AttributeError):  # a torch build without these oneDNN ops
            return count
        module.weight.data = torch.empty(0, dtype=weight.dtype)
        count += 1
    return count


PREPACK_BATCH_HINT = 16  # rows the packed layout is tuned for; measured faster at 1..2048 rows


def _copy_full(param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
    param.data.copy_(loaded)


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks by vocab range; also serves as the (tied) LM head.

    The vocabulary is padded to a multiple of tp_size; padded rows are zero
    and their logits are dropped by `logits`.
    """

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        tp = get_tp_group()
        self.vocab_size = vocab_size
        self.local_vocab = -(-vocab_size // tp.size)
        self.start = tp.rank * self.local_vocab
        self.weight = _set_loader(
            nn.Parameter(torch.zeros(self.local_vocab, hidden_size, dtype=dtype), requires_grad=False), self._load
        )

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        rows = loaded[self.start : self.start + self.local_vocab]
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        tp = get_tp_group()
        if tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.local_vocab)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0)
        return tp.all_reduce(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab_size] full logits on every rank, float32."""
        local = F.linear(hidden, self.weight).float()
        return get_tp_group().all_gather_last_dim(local)[:, : self.vocab_size]
