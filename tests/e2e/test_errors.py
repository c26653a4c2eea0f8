"""Bad input gets a clear exception naming the problem and the fix; the engine survives it.

Uses the real offline API on the default model (fp32, CPU). One module-scoped LLM with a
small KV cache and max_model_len 64 serves every prompt error.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdserve import LLM, SamplingParams
from pdserve.config import ModelConfig
from pdserve.models.loader import ModelSource, default_model_path, ensure_converted, resolve_model

MAX_MODEL_LEN = 64
VOCAB = 49152  # SmolLM2-135M
GREEDY = SamplingParams(temperature=0, max_tokens=8)
REFERENCE_PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def default_source() -> ModelSource:
    source = resolve_model(ModelConfig())
    ensure_converted(source)
    return source


@pytest.fixture(scope="module")
def llm_and_reference(default_source: ModelSource) -> Iterator[tuple[LLM, list[list[int]]]]:
    llm = LLM(max_model_len=MAX_MODEL_LEN, num_blocks=16, dtype="float32")
    reference = [o.outputs[0].token_ids for o in llm.generate(REFERENCE_PROMPTS, GREEDY, use_tqdm=False)]
    yield llm, reference
    llm.shutdown()


@pytest.fixture
def llm(llm_and_reference: tuple[LLM, list[list[int]]]) -> LLM:
    return llm_and_reference[0]


def assert_nothing_queued(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.scheduler.requests == {}
    assert engine.kv.num_free_blocks == engine.num_blocks
    engine.check_integrity()


# ---- prompts ------------------------------------------------------------------------


def test_empty_text_prompt(llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"^prompt 0 is empty; give at least one character$"):
        llm.generate("", GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)


@pytest.mark.parametrize("prompt", [[[]], {"prompt_token_ids": []}], ids=["token-list", "dict"])
def test_empty_token_prompt(llm: LLM, prompt: Any) -> None:
    with pytest.raises(ValueError, match=r"^prompt 0: the prompt is empty; give at least one token$"):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)


def test_text_prompt_longer_than_max_model_len(llm: LLM) -> None:
    text = "one two three four five six seven eight nine ten " * 10
    num_tokens = len(llm.get_tokenizer().encode(text))
    assert num_tokens > MAX_MODEL_LEN
    with pytest.raises(ValueError) as info:
        llm.generate(text, GREEDY, use_tqdm=False)
    message = str(info.value)
    assert f"the prompt has {num_tokens} tokens" in message
    assert f"max_model_len {MAX_MODEL_LEN}" in message
    assert "--max-model-len" in message
    assert_nothing_queued(llm)


def test_token_prompt_at_max_model_len_is_rejected_one_below_is_served(llm: LLM) -> None:
    with pytest.raises(
        ValueError,
        match=(
            r"^prompt 0: the prompt has 64 tokens; this model accepts at most 63 prompt tokens "
            r"\(max_model_len 64, one left to generate\); shorten the prompt or raise --max-model-len$"
        ),
    ):
        llm.generate([[7] * MAX_MODEL_LEN], GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)
    (out,) = llm.generate([[7] * (MAX_MODEL_LEN - 1)], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 1
    assert out.outputs[0].finish_reason == "length"
    assert_nothing_queued(llm)


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1000, -1])
def test_token_ids_outside_the_vocabulary(llm: LLM, bad: int) -> None:
    with pytest.raises(ValueError, match=rf"^prompt 0: token id {bad} is outside the vocabulary \[0, {VOCAB}\)$"):
        llm.generate([[1, 2, bad, 3]], GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)


def test_last_vocabulary_id_is_accepted(llm: LLM) -> None:
    (out,) = llm.generate([[1, VOCAB - 1]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 1


def test_dict_prompt_without_token_ids(llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"prompt 0 is a dict without 'prompt_token_ids'"):
        llm.generate({"prompt": "hello"}, GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)


def test_sampling_params_count_mismatch(llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"got 2 prompts but 3 sampling params; give one or one each"):
        llm.generate(["a", "b"], [GREEDY] * 3, use_tqdm=False)
    assert_nothing_queued(llm)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("", r"^prompt 1 is empty; give at least one character$"),
        ([], r"^prompt 1: the prompt is empty; give at least one token$"),
        ([5] * 100, r"^prompt 1: the prompt has 100 tokens; .*max_model_len 64"),
        ([5, VOCAB], rf"^prompt 1: token id {VOCAB} is outside the vocabulary"),
    ],
    ids=["empty-text", "empty-ids", "too-long", "out-of-vocab"],
)
def test_rejected_batch_queues_nothing(llm: LLM, bad: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        llm.generate(["Hello, my name is", bad], GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)


# ---- sampling params -------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [0, -1])
def test_max_tokens_below_one(max_tokens: int) -> None:
    with pytest.raises(ValueError, match=rf"^max_tokens must be an integer >= 1, got {max_tokens}$"):
        SamplingParams(max_tokens=max_tokens)


@pytest.mark.parametrize("top_p", [0, 1.5])
def test_top_p_outside_zero_one(top_p: float) -> None:
    with pytest.raises(ValueError, match=rf"^top_p must be in \(0, 1\], got {top_p}$"):
        SamplingParams(top_p=top_p)


# ---- engine construction ------------------------------------------------------------------


def test_missing_model_path() -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"model path '/nonexistent/x' does not exist; pass an HF model "
        r"directory, a \.gguf file, or --load-format dummy",
    ):
        LLM(model="/nonexistent/x")


def test_corrupt_safetensors(tmp_path: Path, default_source: ModelSource) -> None:
    assert default_source.hf_dir is not None
    shutil.copy(default_source.hf_dir / "config.json", tmp_path / "config.json")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    with pytest.raises(
        ValueError,
        match=rf"could not read weights from {weights}: .*corrupt or truncated; "
        r"re-download or re-convert it",
    ):
        LLM(model=str(tmp_path), num_blocks=16, max_model_len=MAX_MODEL_LEN)


def test_truncated_safetensors(tmp_path: Path, default_source: ModelSource) -> None:
    assert default_source.hf_dir is not None
    shutil.copy(default_source.hf_dir / "config.json", tmp_path / "config.json")
    with open(default_source.hf_dir / "model.safetensors", "rb") as f:
        head = f.read(1 << 20)
    (tmp_path / "model.safetensors").write_bytes(head)
    with pytest.raises(ValueError, match=r"corrupt or truncated"):
        LLM(model=str(tmp_path), num_blocks=16, max_model_len=MAX_MODEL_LEN)


def test_directory_without_weights(tmp_path: Path, default_source: ModelSource) -> None:
    assert default_source.hf_dir is not None
    shutil.copy(default_source.hf_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} has no \*\.safetensors weights"):
        LLM(model=str(tmp_path), num_blocks=16, max_model_len=MAX_MODEL_LEN)


def test_invalid_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*; fix or re-download it"):
        LLM(model=str(tmp_path))


@pytest.mark.parametrize("num_bytes", [0, 1000, 100_000])
def test_truncated_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_bytes: int) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    with open(default_model_path(), "rb") as f:
        head = f.read(num_bytes)
    path = tmp_path / "model.gguf"
    path.write_bytes(head)
    with pytest.raises(
        ValueError,
        match=rf"could not read GGUF file {path}: .*The file is corrupt or truncated; "
        r"re-download it",
    ):
        LLM(model=str(path), num_blocks=16, max_model_len=MAX_MODEL_LEN)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_max_model_len_beyond_the_model() -> None:
    with pytest.raises(
        ValueError,
        match=r"max_model_len 100000 is more than this model supports \(8192\); "
        r"lower --max-model-len",
    ):
        LLM(max_model_len=100_000)


def test_tensor_parallel_size_that_does_not_divide_heads() -> None:
    with pytest.raises(
        ValueError,
        match=r"this model has 9 attention heads, which tensor_parallel_size=2 does not "
        r"divide; pick a tensor parallel size that divides 9 attention heads, 3 KV heads and the intermediate size 1536",
    ):
        LLM(tensor_parallel_size=2)


def test_kv_cache_smaller_than_max_model_len() -> None:
    with pytest.raises(
        ValueError,
        match=r"the KV cache holds 32 tokens \(2 blocks of 16\), fewer than max_model_len "
        r"64; raise --num-blocks / --kv-cache-memory or lower --max-model-len",
    ):
        LLM(num_blocks=2, max_model_len=MAX_MODEL_LEN)


def test_unreadable_kv_cache_memory_and_dtype() -> None:
    with pytest.raises(ValueError, match=r"cannot read size 'lots'"):
        LLM(kv_cache_memory="lots")
    with pytest.raises(ValueError, match=r"dtype 'fp8' is not one of float32, bfloat16, float16"):
        LLM(dtype="fp8")


# ---- the engine still works --------------------------------------------------------------


def test_still_works_after_errors(llm_and_reference: tuple[LLM, list[list[int]]]) -> None:
    llm, reference = llm_and_reference
    # one more rejected batch right before, to be sure
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.generate([REFERENCE_PROMPTS[0], ""], GREEDY, use_tqdm=False)
    assert_nothing_queued(llm)
    outputs = llm.generate(REFERENCE_PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert all(len(ids) == 8 for ids in reference)
    assert_nothing_queued(llm)
