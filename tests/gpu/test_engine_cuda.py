"""The engine on an NVIDIA GPU (run through the device tool: pytest -m gpu tests/gpu)."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import assert_greedy_equal, hf_greedy

from pdserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_model_on_cuda_matches_hf(tiny_models, kind):
    from transformers import AutoModelForCausalLM

    path = tiny_models[kind]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (3, 20, 70)]
    with LLM(str(path), device="cuda", num_blocks=64, max_model_len=512) as llm:
        assert llm.engine.executor.runner.kv_cache.is_cuda
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=32, temperature=0, ignore_eos=True),
            use_tqdm=False,
        )
        assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
    for p, o in zip(prompts, outs):
        assert_greedy_equal(o.outputs[0].token_ids, hf_greedy(hf, p, 32), p, hf, f"{kind} cuda")


def test_llama3_8b_shape_bf16_on_cuda():
    with LLM(
        "llama3-8b", load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=4096, kv_cache_memory="4GiB"
    ) as llm:
        prompts = [{"prompt_token_ids": list(range(1000, 1000 + n))} for n in (5, 300, 1500)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [16, 16, 16]
        assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks


def test_host_tier_and_pool_on_cuda_give_the_same_tokens(tiny_models, tmp_path):
    """Swap-out to pinned host blocks, swap-in back to the GPU, file pool reads: the same greedy tokens."""
    path = str(tiny_models["llama"])
    rng = random.Random(2)
    prompts = [[rng.randrange(2, 512) for _ in range(70)] for _ in range(4)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM(path, device="cuda", num_blocks=64, max_model_len=128) as llm:
        reference = [
            o.outputs[0].token_ids
            for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        ]
    with LLM(
        path,
        device="cuda",
        num_blocks=8,
        num_host_blocks=6,
        max_model_len=128,
        max_num_seqs=1,
        kv_store="file",
        kv_store_config={"path": str(tmp_path / "pool")},
    ) as llm:
        assert llm.engine.executor.runner.tiers.host.is_pinned()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts * 3], params, use_tqdm=False)
        stats = llm.engine.stats()
        llm.engine.check_integrity()
    assert [o.outputs[0].token_ids for o in outs] == reference * 3
    # every repeat is read from the pool into pinned host blocks and swapped in; write-through swapped out
    assert stats.prefix_hit_tokens_pool > 0 and stats.store.bytes_put > 0 and stats.store.bytes_get > 0, stats


def test_swaps_between_the_gpu_and_pinned_host_blocks() -> None:
    """swap_out gathers on the GPU into pinned block-major host blocks; swap_in copies them back and scatters."""
    from pdserve.worker.kv_tiers import swap_in, swap_out

    cache = torch.randn(4, 2, 32, 16, 2, 64, device="cuda").to(torch.bfloat16)
    host = torch.zeros(10, 4, 2, 16, 2, 64, dtype=torch.bfloat16, pin_memory=True)
    swap_out(cache, host, [5, 6, 7, 30, 1], [2, 3, 4, 0, 9])
    torch.cuda.synchronize()
    for d, h in zip([5, 6, 7, 30, 1], [2, 3, 4, 0, 9]):
        assert torch.equal(host[h], cache[:, :, d].cpu())
    target = torch.zeros_like(cache)
    swap_in(target, host, [2, 3, 4, 0, 9], [10, 11, 12, 0, 31])
    torch.cuda.synchronize()
    for d, n in zip([5, 6, 7, 30, 1], [10, 11, 12, 0, 31]):
        assert torch.equal(target[:, :, n], cache[:, :, d])
