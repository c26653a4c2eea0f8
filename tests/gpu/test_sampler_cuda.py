"""Sampling on the GPU without host syncs on the hot path: everything up to the one copy of the step's
results to the host runs under torch's sync debug mode set to raise, for greedy, temperature, top-k/p,
min-p, seeded rows and logprobs mixed in one batch; that one copy gives what the CPU sampler gives."""

from __future__ import annotations

import pytest
import torch

from pdserve.layers.sampler import Sampler
from pdserve.messages import SamplingSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SPECS = [
    SamplingSpec(),
    SamplingSpec(temperature=0.8),
    SamplingSpec(temperature=1.0, top_k=20, top_p=0.9, seed=7),
    SamplingSpec(temperature=0.7, min_p=0.1, num_logprobs=3),
    SamplingSpec(num_logprobs=0),
]


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_sampling_makes_no_host_sync_before_the_result_copy(with_logprobs: bool) -> None:
    specs = SPECS if with_logprobs else [s for s in SPECS if s.num_logprobs < 0]
    ids = [f"r{i}" for i in range(len(specs))]
    logits = torch.randn(len(specs), 32000, device="cuda")
    sampler = Sampler(torch.device("cuda"), seed=3)
    sampler.sample_on_device(logits, ids, specs)  # first use: generators and caches, outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        packed = sampler.sample_on_device(logits, ids, specs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens, logprobs = Sampler.to_host(packed, specs)
    assert len(tokens) == len(specs) and tokens[0] == int(logits[0].argmax())
    if with_logprobs:
        assert logprobs is not None
        assert [len(entry) for entry in logprobs] == [1 + max(s.num_logprobs, 0) for s in specs]
        want = logits.log_softmax(-1)
        for row, entry in enumerate(logprobs):
            assert entry[0][0] == tokens[row]
            assert entry[0][1] == pytest.approx(float(want[row, tokens[row]]), abs=1e-5)
    else:
        assert logprobs is None


def test_greedy_rows_and_logprobs_equal_the_cpu_sampler() -> None:
    specs = [SamplingSpec(), SamplingSpec(num_logprobs=2)]
    logits = torch.randn(2, 5000)
    cpu = Sampler(torch.device("cpu"))(logits, ["a", "b"], specs)
    gpu = Sampler(torch.device("cuda"))(logits.cuda(), ["a", "b"], specs)
    assert cpu[0] == gpu[0]
    assert cpu[1] is not None and gpu[1] is not None
    for c, g in zip(cpu[1], gpu[1]):
        assert [t for t, _ in c] == [t for t, _ in g]
        assert [v for _, v in c] == pytest.approx([v for _, v in g], abs=1e-5)
