"""Reading model architectures from HF configs and GGUF metadata; tensor-parallel checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pdserve.models.arch import (
    DUMMY_SHAPES,
    ModelArch,
    arch_from_gguf,
    arch_from_hf_config,
    arch_to_hf_config,
)

LLAMA31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}

QWEN25_7B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

MISTRAL_7B: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}

LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def test_llama3_with_rope_scaling() -> None:
    arch = arch_from_hf_config(LLAMA31_8B)
    assert arch == ModelArch(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        sliding_window=None,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    )
    assert arch.kv_bytes_per_token(2) == 32 * 2 * 8 * 128 * 2
    assert arch.kv_bytes_per_token(2, tp_size=2) == 32 * 2 * 4 * 128 * 2


def test_input_config_is_not_mutated() -> None:
    cfg = {**LLAMA31_8B, "rope_scaling": {"type": "linear", "factor": 2.0}}
    arch = arch_from_hf_config(cfg)
    assert arch.rope_scaling == {"type": "linear", "factor": 2.0, "rope_type": "linear"}
    assert cfg["rope_scaling"] == {"type": "linear", "factor": 2.0}


def test_llama_attention_bias_sets_qkv_and_o_bias() -> None:
    arch = arch_from_hf_config({**LLAMA31_8B, "attention_bias": True, "mlp_bias": True})
    assert (arch.qkv_bias, arch.o_bias, arch.mlp_bias) == (True, True, True)


def test_qwen2_has_qkv_bias_and_no_sliding_window() -> None:
    arch = arch_from_hf_config(QWEN25_7B)
    assert arch.architecture == "Qwen2ForCausalLM"
    assert (arch.qkv_bias, arch.o_bias, arch.mlp_bias) == (True, False, False)
    assert arch.sliding_window is None  # qwen2's sliding_window is off (use_sliding_window false)
    assert arch.rope_scaling is None
    assert arch.rope_theta == 1000000.0
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (28, 4, 128)
    assert arch.rms_norm_eps == 1e-6
    assert arch.eos_token_ids == (151645,)
    assert arch == dataclasses.replace(DUMMY_SHAPES["qwen2.5-7b"], bos_token_id=151643)


def test_mistral_keeps_its_sliding_window() -> None:
    arch = arch_from_hf_config(MISTRAL_7B)
    assert arch.architecture == "MistralForCausalLM"
    assert arch.sliding_window == 4096
    assert (arch.qkv_bias, arch.o_bias) == (False, False)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (32, 8, 128)
    assert arch.eos_token_ids == (2,)


def test_explicit_head_dim_wins_and_missing_kv_heads_means_mha() -> None:
    # Mistral-Nemo: hidden 5120 / 32 heads would be 160, the config says 128
    arch = arch_from_hf_config({**MISTRAL_7B, "hidden_size": 5120, "head_dim": 128})
    assert arch.head_dim == 128
    cfg = {k: v for k, v in LLAMA31_8B.items() if k != "num_key_value_heads"}
    assert arch_from_hf_config(cfg).num_kv_heads == 32
    assert arch_from_hf_config({**MISTRAL_7B, "head_dim": None}).head_dim == 128


def test_transformers5_rope_parameters() -> None:
    cfg = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_scaling", "rope_theta")}
    cfg["rope_parameters"] = {"rope_theta": 500000.0, **LLAMA3_SCALING}
    arch = arch_from_hf_config(cfg)
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling == LLAMA3_SCALING
    assert arch == arch_from_hf_config(LLAMA31_8B)


def test_transformers5_default_rope_parameters_mean_no_scaling() -> None:
    cfg = {k: v for k, v in QWEN25_7B.items() if k not in ("rope_scaling", "rope_theta")}
    cfg["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default"}
    arch = arch_from_hf_config(cfg)
    assert (arch.rope_theta, arch.rope_scaling) == (1000000.0, None)
    # theta may also stay at the top level
    cfg = {**QWEN25_7B, "rope_parameters": {"rope_type": "default"}}
    assert arch_from_hf_config(cfg).rope_theta == 1000000.0


@pytest.mark.parametrize(
    ("scaling", "expected"),
    [
        (None, None),
        ({}, None),
        ({"type": "default"}, None),
        ({"rope_type": "default", "factor": 1.0}, None),
        ({"type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0, "rope_type": "linear"}),
        ({"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}),
    ],
)
def test_rope_scaling_forms(scaling: dict | None, expected: dict | None) -> None:
    assert arch_from_hf_config({**LLAMA31_8B, "rope_scaling": scaling}).rope_scaling == expected


def test_defaults_for_missing_optional_keys() -> None:
    required = (
        "architectures",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    arch = arch_from_hf_config({k: LLAMA31_8B[k] for k in required})
    assert (arch.rms_norm_eps, arch.rope_theta, arch.rope_scaling) == (1e-5, 10000.0, None)
    assert (arch.max_position_embeddings, arch.tie_word_embeddings) == (4096, False)
    assert (arch.bos_token_id, arch.eos_token_ids) == (None, ())


@pytest.mark.parametrize(
    "architectures",
    [["GPT2LMHeadModel"], [], None, ["MixtralForCausalLM", "Phi3ForCausalLM"]],
)
def test_unsupported_architecture_is_named(architectures: list[str] | None) -> None:
    cfg = {**LLAMA31_8B, "architectures": architectures}
    with pytest.raises(
        ValueError,
        match=r"architectures .* are not supported; pdserve serves "
        r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
    ):
        arch_from_hf_config(cfg)


def test_first_supported_architecture_is_used() -> None:
    arch = arch_from_hf_config({**LLAMA31_8B, "architectures": ["Foo", "MistralForCausalLM"]})
    assert arch.architecture == "MistralForCausalLM"


# ---- HF round trip and GGUF --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DUMMY_SHAPES))
def test_hf_config_round_trip(name: str) -> None:
    arch = DUMMY_SHAPES[name]
    assert arch_from_hf_config(arch_to_hf_config(arch)) == arch


def test_hf_config_round_trip_of_real_configs() -> None:
    for cfg in (LLAMA31_8B, QWEN25_7B):
        arch = arch_from_hf_config(cfg)
        assert arch_from_hf_config(arch_to_hf_config(arch)) == arch


def test_hf_config_round_trip_keeps_mistral_sliding_window() -> None:
    arch = arch_from_hf_config(MISTRAL_7B)
    assert arch_from_hf_config(arch_to_hf_config(arch)) == arch


def gguf_fields(family: str = "llama", **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "general.architecture": family,
        f"{family}.attention.head_count": 9,
        f"{family}.attention.head_count_kv": 3,
        f"{family}.embedding_length": 576,
        f"{family}.feed_forward_length": 1536,
        f"{family}.block_count": 30,
        f"{family}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{family}.rope.freq_base": 100000.0,
        f"{family}.context_length": 8192,
        "tokenizer.ggml.tokens": range(49152),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    fields.update(extra)
    return fields


def test_arch_from_gguf_llama() -> None:
    arch = arch_from_gguf(gguf_fields(), has_output_weight=False)
    assert arch == dataclasses.replace(DUMMY_SHAPES["smollm2-135m"], bos_token_id=1)
    assert arch_from_gguf(gguf_fields(), has_output_weight=True).tie_word_embeddings is False


def test_arch_from_gguf_qwen2_and_linear_rope() -> None:
    fields = gguf_fields(
        "qwen2", **{"qwen2.rope.scaling.type": "linear", "qwen2.rope.scaling.factor": 4, "qwen2.vocab_size": 1000}
    )
    arch = arch_from_gguf(fields, has_output_weight=True)
    assert arch.architecture == "Qwen2ForCausalLM"
    assert arch.qkv_bias is True
    assert arch.vocab_size == 1000
    assert arch.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_arch_from_gguf_unsupported() -> None:
    with pytest.raises(
        ValueError,
        match=r"GGUF architecture 'gpt2' is not supported; pdserve serves llama, "
        r"mistral, qwen2",
    ):
        arch_from_gguf(gguf_fields("gpt2"), has_output_weight=True)


# ---- tensor parallel ----------------------------------------------------------------


def test_check_tensor_parallel_accepts_divisors() -> None:
    smol = DUMMY_SHAPES["smollm2-135m"]  # 9 heads, 3 KV heads, intermediate 1536
    smol.check_tensor_parallel(1)
    smol.check_tensor_parallel(3)
    llama = DUMMY_SHAPES["llama3-8b"]
    for tp in (1, 2, 4, 8):
        llama.check_tensor_parallel(tp)


def test_check_tensor_parallel_names_heads_and_fix() -> None:
    smol = DUMMY_SHAPES["smollm2-135m"]
    with pytest.raises(ValueError) as info:
        smol.check_tensor_parallel(2)
    assert str(info.value) == (
        "this model has 9 attention heads, which tensor_parallel_size=2 does not divide; "
        "pick a tensor parallel size that divides 9 attention heads, 3 KV heads and the intermediate size 1536"
    )
    with pytest.raises(ValueError, match=r"this model has 3 KV heads, which tensor_parallel_size=9 does not divide"):
        smol.check_tensor_parallel(9)
    with pytest.raises(
        ValueError,
        match=r"this model has 8 KV heads, which tensor_parallel_size=16 does not divide; "
        r"pick a tensor parallel size that divides 32 attention heads, 8 KV heads and the intermediate size 14336",
    ):
        DUMMY_SHAPES["llama3-8b"].check_tensor_parallel(16)


def test_check_tensor_parallel_intermediate_size() -> None:
    arch = ModelArch(
        "LlamaForCausalLM",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=30,
        num_layers=1,
        num_heads=4,
        num_kv_heads=4,
        head_dim=4,
    )
    with pytest.raises(ValueError, match=r"this model has 30 intermediate size, which tensor_parallel_size=4"):
        arch.check_tensor_parallel(4)
    arch.check_tensor_parallel(2)
