"""1P1D through the router equals the mixed path token for token (greedy), on the default model:
completions and chat, streaming and not, with chunked prefill on P; then TP=2 on both P and D.
Afterwards every block is free on P and D and the transfer metrics add up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.register_assert_rewrite("server_fixtures", "pd_fixtures")

from pd_fixtures import MAX_TOKENS, answers, start_pd, stop_all, tp2_pd_equals_mixed, wait_all_free  # noqa: E402
from server_fixtures import API_KEY, ServerProcess, metrics  # noqa: E402

pytest_plugins = ["server_fixtures"]


def check_after(p: ServerProcess, d: ServerProcess, num_requests: int) -> None:
    wait_all_free(p.url)
    wait_all_free(d.url)
    mp, md = metrics(p.url), metrics(d.url)
    sent = mp['pdserve_kv_transfer_bytes_total{direction="send"}']
    assert sent > 0 and sent == md['pdserve_kv_transfer_bytes_total{direction="recv"}']
    assert mp["pdserve_kv_transfer_seconds_count"] == md["pdserve_kv_transfer_seconds_count"] == num_requests
    assert md["pdserve_prompt_tokens_total"] == 0  # D computed no prompt token: all of it came from P
    assert md["pdserve_preemptions_total"] == 0


def test_1p1d_equals_mixed(server: ServerProcess, tmp_path: Path) -> None:
    p, d, router = start_pd(
        tmp_path, ["--max-num-batched-tokens", "32", "--max-model-len", "2048"], ["--max-model-len", "2048"]
    )
    try:
        want = asyncio.run(answers(server.url, {"Authorization": f"Bearer {API_KEY}"}))
        got = asyncio.run(answers(router.url, {}))
        assert got == want
        assert all(tokens for _, tokens in want) and any(len(t) == MAX_TOKENS for _, t in want)
        check_after(p, d, len(want))
    finally:
        stop_all(router, p, d)


@pytest.mark.slow
def test_1p1d_tp2_equals_mixed_tp2(tmp_path: Path, default_hf_dir: Path) -> None:
    tp2_pd_equals_mixed(tmp_path, default_hf_dir, [], check_after)
