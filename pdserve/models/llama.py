"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2) over a flat token batch.

Tensor-parallel: q/k/v and gate/up are column-parallel (fused), o and down are
row-parallel, the embedding and LM head are vocab-parallel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.layers.attention import AttentionBackend, get_backend
from pdserve.layers.linear import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from pdserve.layers.norm import RMSNorm
from pdserve.layers.parallel import get_tp_group
from pdserve.layers.rotary import RotaryEmbedding
from pdserve.models.arch import ModelArch

# checkpoint name fragment -> (our module attribute, shard id)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, backend: str, dtype: torch.dtype, rotary: RotaryEmbedding) -> None:
        super().__init__()
        tp = get_tp_group()
        self.num_heads = arch.num_heads // tp.size
        self.num_kv_heads = arch.num_kv_heads // tp.size
        self.head_dim = arch.head_dim
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        self.qkv_proj = ColumnParallelLinear(arch.hidden_size, [q_size, kv_size, kv_size], arch.qkv_bias, dtype)
        self.o_proj = RowParallelLinear(q_size, arch.hidden_size, arch.o_bias, dtype)
        self.rotary = rotary
        self.attn: AttentionBackend = get_backend(
            backend, self.num_heads, self.num_kv_heads, self.head_dim, arch.head_dim**-0.5
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: Any) -> torch.Tensor:
        n = x.shape[0]
        q_len, kv_len = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_len, kv_len, kv_len], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn.forward(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype) -> None:
        super().__init__()
        size = arch.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, [size, size], arch.mlp_bias, dtype)
        self.down_proj = RowParallelLinear(size, arch.hidden_size, arch.mlp_bias, dtype)

        self.fused = False  # set by the model on CUDA with Triton: silu(gate) * up in one kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused:
            from pdserve.layers.fused import silu_mul

            return self.down_proj(silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, backend: str, dtype: torch.dtype, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, backend, dtype, rotary)
        self.mlp = LlamaMLP(arch, dtype)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor, meta: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried apart from the sublayer outputs (x): each norm adds its input to the
        residual first, so that a fused kernel does the add and the norm in one pass. Returns (x, residual)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, backend: str, dtype: torch.dtype, max_position: int) -> None:
        super().__init__()
        self.arch = arch
        rotary = RotaryEmbedding(arch.head_dim, max_position, arch.rope_theta, arch.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, backend, dtype, rotary) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.lm_head = (
            self.embed_tokens
            if arch.tie_word_embeddings
            else VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype)
        )
        head_dim = arch.head_dim
        if backend == "triton" and head_dim & (head_dim - 1) == 0:
            self._use_fused_kernels()

    def _use_fused_kernels(self) -> None:
        """The Triton kernels of layers.fused for the norms, RoPE, SiLU-and-mul and the KV write."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, RotaryEmbedding, LlamaMLP)):
                module.fused = True
            if isinstance(module, LlamaAttention):
                module.attn.fused_write = True

    @property
    def attention_backend(self) -> AttentionBackend:
        layer: LlamaDecoderLayer = self.layers[0]  # type: ignore[assignment]
        return layer.self_attn.attn

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: Any,
        layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """token_ids, positions: [num_tokens]; kv_cache: [num_layers, 2, ...] -> hidden [num_tokens, hidden].

        layer_done(i), if given, is called once layer i has written its KV (e.g. to send it to a peer).
        """
        x = self.embed_tokens(token_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, kv_cache[i], meta)
            if layer_done is not None:
                layer_done(i)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Consume (HF checkpoint name, full tensor) pairs; raise if any parameter is left unset."""
        params = dict(self.named_parameters())
        unset = set(params)
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            shard_id = 0
            for part, (fused, sid) in _FUSED.items():
                if f".{part}." in name:
                    name, shard_id = name.replace(part, fused), sid
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint has a tensor {name!r} that this {self.arch.architecture} does not use")
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                param.data.copy_(tensor)
            else:
                loader(param, tensor.to(param.dtype), shard_id)
            unset.discard(name)
        if unset:
            raise ValueError(f"checkpoint is missing {len(unset)} tensors, e.g. {sorted(unset)[:3]}")
