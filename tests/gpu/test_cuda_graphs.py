"""CUDA graphs for decode steps give the same greedy tokens as eager steps, whatever the batch size
(padded to a captured size) and however it changes as requests finish."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("triton")  # a CPU machine (CI) has no Triton: skip before importing the graphs module

from pdserve.worker.cuda_graph import capture_sizes  # noqa: E402


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]
    assert capture_sizes(1000)[-1] == 256


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_equal_eager(tiny_models, dtype: str) -> None:
    path = str(tiny_models["llama"])
    rng = random.Random(3)
    prompts = [[rng.randrange(2, 512) for _ in range(rng.randrange(1, 90))] for _ in range(11)]
    params = [SamplingParams(max_tokens=rng.randrange(4, 40), temperature=0, ignore_eos=True) for _ in prompts]
    outs = {}
    for eager in (True, False):
        with LLM(
            path, device="cuda", dtype=dtype, num_blocks=256, max_model_len=512, max_num_seqs=16, enforce_eager=eager
        ) as llm:
            runner = llm.engine.executor.runner
            assert (runner.graphs is None) == eager
            got = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            outs[eager] = [o.outputs[0].token_ids for o in got]
            assert llm.engine.kv.num_free_blocks == llm.engine.num_blocks
    assert outs[False] == outs[True]
