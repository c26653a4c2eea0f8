"""The Triton kernels of layers.fused against the torch path they replace: RoPE, SiLU-and-mul and the KV
write bit for bit; the add + RMSNorm to one unit in the last place (its mean sums in another order) and its
residual bit for bit; and a whole model built with them against one built without."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pdserve.layers.attention.base import AttentionBackend  # noqa: E402
from pdserve.layers.norm import RMSNorm  # noqa: E402
from pdserve.layers.rotary import RotaryEmbedding  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_add_rms_norm(dtype: torch.dtype, residual: bool) -> None:
    norm = RMSNorm(4096, 1e-5, dtype).cuda()
    norm.weight.data.normal_(1.0, 0.1)
    x = torch.randn(37, 4096, device="cuda").to(dtype)
    r = torch.randn(37, 4096, device="cuda").to(dtype)
    want = norm(x, r.clone()) if residual else norm(x)
    norm.fused = True
    got = norm(x, r) if residual else norm(x)
    if residual:
        assert torch.equal(got[1], want[1]) and got[1].data_ptr() == r.data_ptr()  # the residual, in place
        got, want = got[0], want[0]
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=1e-5 if dtype == torch.float32 else tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_equals_torch(dtype: torch.dtype) -> None:
    rotary = RotaryEmbedding(
        128,
        4096,
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ).cuda()
    qkv = torch.randn(21, (32 + 2 * 8) * 128, device="cuda").to(dtype)
    q, k = qkv[:, :4096].view(21, 32, 128), qkv[:, 4096:5120].view(21, 8, 128)  # strided views, as in the model
    positions = torch.randint(0, 4096, (21,), device="cuda")
    want_q, want_k = rotary(positions, q, k)
    rotary.fused = True
    got_q, got_k = rotary(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr()
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_torch(dtype: torch.dtype) -> None:
    from pdserve.layers.fused import silu_mul

    x = (3 * torch.randn(9, 2 * 3000, device="cuda")).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(silu_mul(x), torch.nn.functional.silu(gate) * up)


class _Backend(AttentionBackend):
    def prepare(self, layout, device):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def forward(self, q, k, v, kv_cache, metadata):  # type: ignore[no-untyped-def]
        raise NotImplementedError


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_equals_index_copy(dtype: torch.dtype) -> None:
    backend = _Backend(32, 8, 128, 1.0)
    cache = torch.randn(2, 40, 16, 8, 128, device="cuda").to(dtype)
    qkv = torch.randn(13, (32 + 16) * 128, device="cuda").to(dtype)
    k, v = qkv[:, 4096:5120].view(13, 8, 128), qkv[:, 5120:].view(13, 8, 128)
    slots = torch.randperm(40 * 16, device="cuda")[:13]
    want = cache.clone()
    backend.write_kv(k, v, want, slots)
    backend.fused_write = True
    backend.write_kv(k, v, cache, slots)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_with_fused_kernels_gives_the_same_tokens(dtype: str) -> None:
    """Greedy tokens of the tiny model through the engine: Triton attention with and without the fused kernels."""
    from pdserve import LLM, SamplingParams
    from pdserve.models import llama

    prompts = [{"prompt_token_ids": [(i * 37 + j * 11) % 500 + 1 for j in range(n)]} for i, n in enumerate((5, 33, 80))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = {}
    for fused in (True, False):
        original = llama.LlamaForCausalLM._use_fused_kernels
        if not fused:
            llama.LlamaForCausalLM._use_fused_kernels = lambda self: None  # type: ignore[method-assign]
        try:
            with LLM(
                "tiny",
                load_format="dummy",
                dtype=dtype,
                device="cuda",
                attention_backend="triton",
                max_model_len=256,
                num_blocks=64,
            ) as llm:
                outputs[fused] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llama.LlamaForCausalLM._use_fused_kernels = original  # type: ignore[method-assign]
    assert outputs[True] == outputs[False]
