"""Config dataclasses, parse_size, SamplingParams validation, model resolution errors."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from pdserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    cache_dir,
    parse_gpu_ids,
    parse_size,
)
from pdserve.engine.core import resolve_max_model_len, resolve_num_blocks
from pdserve.models.arch import DUMMY_SHAPES, ModelArch
from pdserve.models.loader import resolve_model
from pdserve.request import SamplingParams

# ---- parse_size -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 << 30),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("1.5G", 3 << 29),
        ("1k", 1024),
        ("0.5K", 512),
        ("10B", 10),
        ("4096", 4096),
        (" 2 gib ", 2 << 30),
        ("1T", 1 << 40),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1", "2XB", "2 G B", "1e3", "two gigs", "2GiBs"])
def test_parse_size_rejects_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"cannot read size .*; write it like '2GiB', '512MiB' or a byte count"):
        parse_size(text)


# ---- config dataclasses -----------------------------------------------------------


def test_defaults_are_valid_and_frozen() -> None:
    config = EngineConfig()
    assert config.model == ModelConfig(None, "auto", "float32", None, 0)
    assert config.cache == CacheConfig(16, None, None)
    assert config.scheduler == SchedulerConfig(64, 2048)
    assert config.parallel == ParallelConfig(1, "auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache.block_size = 32  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ModelConfig(load_format="pt"), r"load_format 'pt' is not one of auto, safetensors, gguf, dummy"),
        (lambda: ModelConfig(dtype="fp8"), r"dtype 'fp8' is not one of float32, bfloat16, float16"),
        (lambda: ModelConfig(max_model_len=1), r"max_model_len must be at least 2, got 1"),
        (lambda: CacheConfig(block_size=0), r"block_size must be a power of two, got 0"),
        (lambda: CacheConfig(block_size=24), r"block_size must be a power of two, got 24"),
        (lambda: CacheConfig(block_size=-16), r"block_size must be a power of two, got -16"),
        (lambda: CacheConfig(num_blocks=0), r"num_blocks must be at least 1, got 0"),
        (lambda: CacheConfig(kv_cache_memory=0), r"kv_cache_memory must be positive, got 0"),
        (lambda: SchedulerConfig(max_num_seqs=0), r"max_num_seqs must be at least 1, got 0"),
        (lambda: SchedulerConfig(max_num_batched_tokens=0), r"max_num_batched_tokens must be at least 1, got 0"),
        (lambda: ParallelConfig(tensor_parallel_size=0), r"tensor_parallel_size must be at least 1, got 0"),
        (lambda: ParallelConfig(device="tpu"), r"device 'tpu' is not one of auto, cpu, cuda"),
        (lambda: ParallelConfig(2, gpu_ids=(1,)), r"--gpu-ids needs 2 distinct device indices >= 0 .*got 1$"),
        (lambda: ParallelConfig(2, gpu_ids=(3, 3)), r"--gpu-ids needs 2 distinct .*got 3,3"),
        (lambda: ParallelConfig(1, gpu_ids=(-1,)), r"--gpu-ids needs 1 distinct device indices >= 0"),
        (lambda: ParallelConfig(1, "cpu", gpu_ids=(0,)), r"--gpu-ids places ranks on CUDA devices"),
    ],
)
def test_config_validation_messages(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        make()


def test_gpu_ids_place_ranks() -> None:
    assert [ParallelConfig(2).gpu_id(r) for r in (0, 1)] == [0, 1]
    assert [ParallelConfig(2, gpu_ids=(3, 1)).gpu_id(r) for r in (0, 1)] == [3, 1]
    assert parse_gpu_ids("2,3") == (2, 3)
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated device indices like 0 or 2,3"):
        parse_gpu_ids("0;1")


@pytest.mark.parametrize("block_size", [1, 2, 16, 128])
def test_power_of_two_block_sizes_are_accepted(block_size: int) -> None:
    assert CacheConfig(block_size=block_size).block_size == block_size


def test_resolved_device() -> None:
    assert ParallelConfig(device="cpu").resolved_device() == "cpu"
    assert ParallelConfig(device="cuda").resolved_device() == "cuda"
    assert ParallelConfig().resolved_device() in ("cpu", "cuda")


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "pd"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "pd"
    monkeypatch.delenv("PDSERVE_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "pdserve"


# ---- SamplingParams ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, r"max_tokens must be an integer >= 1, got 0"),
        ({"max_tokens": -5}, r"max_tokens must be an integer >= 1, got -5"),
        ({"max_tokens": 2.5}, r"max_tokens must be an integer >= 1, got 2.5"),
        ({"max_tokens": "8"}, r"max_tokens must be an integer >= 1, got '8'"),
        ({"temperature": -0.1}, r"temperature must be >= 0 \(0 means greedy\), got -0.1"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_p": -0.2}, r"top_p must be in \(0, 1\], got -0.2"),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\], got nan"),
        ({"top_k": -2}, r"top_k must be -1 \(off\) or >= 1, got -2"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\], got -0.1"),
        ({"min_p": 1.1}, r"min_p must be in \[0, 1\], got 1.1"),
        ({"logprobs": -1}, r"logprobs must be in \[0, 20\], got -1"),
        ({"logprobs": 21}, r"logprobs must be in \[0, 20\], got 21"),
        ({"stop": [""]}, r"stop strings must not be empty"),
        ({"stop": ["ok", ""]}, r"stop strings must not be empty"),
        ({"stop": ""}, r"stop strings must not be empty"),
    ],
)
def test_sampling_params_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"temperature": float("nan")}, id="nan-temperature"),
        pytest.param({"top_k": 2.5}, id="fractional-top_k"),
        pytest.param({"logprobs": 2.5}, id="fractional-logprobs"),
    ],
)
def test_sampling_params_rejects_non_numbers_and_fractions(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_normalization() -> None:
    sp = SamplingParams(stop="###", stop_token_ids=None, top_k=0)
    assert sp.stop == ["###"]
    assert sp.stop_token_ids == []
    assert sp.top_k == -1
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams().is_greedy
    # boundary values are accepted
    SamplingParams(max_tokens=1, temperature=0, top_p=1, top_k=1, min_p=1, logprobs=20)
    SamplingParams(top_p=1e-9, min_p=0, logprobs=0)


# ---- engine sizing ----------------------------------------------------------------

TINY = DUMMY_SHAPES["tiny"]  # 2 layers, 2 KV heads, head_dim 16, max_position_embeddings 2048


def test_resolve_max_model_len() -> None:
    assert resolve_max_model_len(EngineConfig(), TINY) == 2048
    assert resolve_max_model_len(EngineConfig(model=ModelConfig(max_model_len=100)), TINY) == 100
    with pytest.raises(
        ValueError,
        match=r"max_model_len 4096 is more than this model supports \(2048\); "
        r"lower --max-model-len",
    ):
        resolve_max_model_len(EngineConfig(model=ModelConfig(max_model_len=4096)), TINY)
    windowed = dataclasses.replace(TINY, architecture="MistralForCausalLM", sliding_window=512)
    assert resolve_max_model_len(EngineConfig(), windowed) == 512


def test_resolve_num_blocks() -> None:
    # tiny, float32: 2 layers * 2 (K, V) * 2 heads * 16 dims * 4 bytes = 512 bytes per token
    assert TINY.kv_bytes_per_token(4) == 512
    block_bytes = 512 * 16
    config = EngineConfig(cache=CacheConfig(kv_cache_memory=100 * block_bytes + 5))
    assert resolve_num_blocks(config, TINY, 1024) == 100
    assert resolve_num_blocks(EngineConfig(cache=CacheConfig(num_blocks=7, kv_cache_memory=1 << 30)), TINY, 112) == 7
    with pytest.raises(
        ValueError,
        match=r"the KV cache holds 96 tokens \(6 blocks of 16\), fewer than "
        r"max_model_len 100; raise --num-blocks / --kv-cache-memory",
    ):
        resolve_num_blocks(EngineConfig(cache=CacheConfig(num_blocks=6)), TINY, 100)


# ---- model resolution -------------------------------------------------------------


def test_resolve_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"model path '{missing}' does not exist; pass an HF model directory"):
        resolve_model(ModelConfig(model=str(missing)))


def test_resolve_dummy_shapes_and_errors(tmp_path: Path) -> None:
    source = resolve_model(ModelConfig(model="tiny", load_format="dummy"))
    assert (source.kind, source.name, source.path, source.hf_dir) == ("dummy", "tiny", None, None)
    with pytest.raises(ValueError, match=r"--load-format dummy needs a shape name \(llama3-8b, .*tiny\)"):
        resolve_model(ModelConfig(model="gpt5", load_format="dummy"))
    (tmp_path / "config.json").write_text("{}")
    source = resolve_model(ModelConfig(model=str(tmp_path), load_format="dummy"))
    assert (source.kind, source.path) == ("dummy", tmp_path)


def test_resolve_directory_without_config_or_with_unknown_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no config.json and 0 .gguf files; point --model at one file"):
        resolve_model(ModelConfig(model=str(tmp_path)))
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"has no config.json and 2 .gguf files"):
        resolve_model(ModelConfig(model=str(tmp_path)))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"cannot tell the format of .*weights.bin"):
        resolve_model(ModelConfig(model=str(weights)))


def test_resolve_hf_directory_and_gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    hf = tmp_path / "my-model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    source = resolve_model(ModelConfig(model=str(hf)))
    assert (source.kind, source.name, source.path, source.hf_dir) == ("hf", "my-model", hf, hf)
    gguf = tmp_path / "small.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_model(ModelConfig(model=str(gguf)))
    assert (source.kind, source.name, source.path) == ("gguf", "small.Q4", gguf)
    assert source.converted_dir is not None and source.hf_dir == source.converted_dir
    assert source.converted_dir.parent == tmp_path / "cache" / "models"
    assert source.converted_dir.name.startswith("small.Q4-")


def test_model_arch_rejects_uneven_heads() -> None:
    with pytest.raises(ValueError, match="num_heads 9 is not a multiple of num_kv_heads 2"):
        ModelArch("LlamaForCausalLM", 10, 8, 8, 1, num_heads=9, num_kv_heads=2, head_dim=4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_host_blocks": -1}, "num_host_blocks must be 0 or more, got -1"),
        ({"host_kv_cache_memory": -5}, "host_kv_cache_memory must be 0 or more"),
        ({"kv_store": "redis"}, "kv_store 'redis' is not one of mooncake, file, memory"),
        ({"kv_store": "memory", "num_host_blocks": 0}, "reads and writes through host blocks"),
        ({"kv_store_options": {"path": "/x"}}, "kv_store_options given without kv_store"),
    ],
)
def test_cache_tier_validation(kwargs: dict, message: str) -> None:
    from pdserve.config import CacheConfig

    with pytest.raises(ValueError, match=message):
        CacheConfig(**kwargs)


def test_host_tier_size() -> None:
    from pdserve.config import DEFAULT_STAGING_HOST_MEMORY, CacheConfig

    assert CacheConfig().host_blocks(1000) == 0  # no host tier unless asked for
    assert CacheConfig(num_host_blocks=7, host_kv_cache_memory=10**9).host_blocks(1000) == 7  # the count wins
    assert CacheConfig(host_kv_cache_memory=10_500).host_blocks(1000) == 10
    assert CacheConfig(kv_store="memory").host_blocks(1 << 20) == DEFAULT_STAGING_HOST_MEMORY >> 20
    with pytest.raises(ValueError, match="holds no block of 1000 bytes"):
        CacheConfig(host_kv_cache_memory=999).host_blocks(1000)


def test_store_options_from_json_or_file(tmp_path: Path) -> None:
    from pdserve.config import make_engine_config, parse_store_options

    assert parse_store_options(None) == {}
    assert parse_store_options('{"master": "127.0.0.1:50051"}') == {"master": "127.0.0.1:50051"}
    path = tmp_path / "store.json"
    path.write_text('{"path": "/tmp/kv"}')
    assert parse_store_options(str(path)) == {"path": "/tmp/kv"}
    with pytest.raises(ValueError, match="is neither a JSON object nor a file"):
        parse_store_options(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="is not valid JSON"):
        parse_store_options("{master: 1}")
    with pytest.raises(ValueError, match="must be a JSON object"):
        path.write_text("[1, 2]")
        parse_store_options(str(path))
    config = make_engine_config(
        kv_store="file", kv_store_config=f'{{"path": "{tmp_path}"}}', host_kv_cache_memory="1GiB"
    )
    assert config.cache.kv_store_options == {"path": str(tmp_path)} and config.cache.host_kv_cache_memory == 1 << 30


def test_weights_id_is_stable_and_content_based(tmp_path: Path) -> None:
    from pdserve.models.loader import ModelSource, weights_id

    a, b = tmp_path / "a", tmp_path / "b"
    for d, byte in ((a, b"\x01"), (b, b"\x02")):
        d.mkdir()
        (d / "config.json").write_text('{"x": 1}')
        (d / "model.safetensors").write_bytes(byte * 1000)
    id_a = weights_id(ModelSource("hf", "a", a), seed=0)
    assert id_a == weights_id(ModelSource("hf", "other-name", a), seed=5)  # the files decide, not the name or seed
    assert id_a != weights_id(ModelSource("hf", "b", b), seed=0)
    assert weights_id(ModelSource("dummy", "tiny", None), 0) != weights_id(ModelSource("dummy", "tiny", None), 1)
