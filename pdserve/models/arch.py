"""Model architecture description for the Llama family, read from an HF config
dict, GGUF metadata, or a named dummy shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    def check_tensor_parallel(self, tp_size: int) -> None:
        for what, count in (
            ("attention heads", self.num_heads),
            ("KV heads", self.num_kv_heads),
            ("intermediate size", self.intermediate_size),
        ):
            if count % tp_size:
                raise ValueError(
                    f"this model has {count} {what}, which tensor_parallel_size={tp_size} does not divide; "
                    f"pick a tensor parallel size that divides {self.num_heads} attention heads, "
                    f"{self.num_kv_heads} KV heads and the intermediate size {self.intermediate_size}"
                )

    def kv_bytes_per_token(self, dtype_size: int, tp_size: int = 1) -> int:
        """Bytes of K and V per token per rank, all layers."""
        return self.num_layers * 2 * (self.num_kv_heads // tp_size) * self.head_dim * dtype_size


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Handles both the classic (rope_theta, rope_scaling) and transformers>=5 rope_parameters."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    scaling["rope_type"] = rope_type
    return theta, scaling


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    architectures = cfg.get("architectures") or []
    name = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if name is None:
        raise ValueError(
            f"architectures {architectures} are not supported; pdserve serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[name]
    num_heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    theta, scaling = _rope_from_hf(cfg)
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelArch(
        architecture=name,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=family == "llama" and attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=cfg.get("sliding_window") if family == "mistral" else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
    )


def arch_to_hf_config(arch: ModelArch) -> dict[str, Any]:
    """The inverse of arch_from_hf_config, for caching converted weights as an HF directory."""
    cfg: dict[str, Any] = {
        "architectures": [arch.architecture],
        "model_type": SUPPORTED_ARCHITECTURES[arch.architecture],
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": arch.rope_scaling,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "attention_bias": arch.qkv_bias,
        "mlp_bias": arch.mlp_bias,
        "sliding_window": arch.sliding_window,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": list(arch.eos_token_ids) if len(arch.eos_token_ids) != 1 else arch.eos_token_ids[0],
        "hidden_act": "silu",
    }
    return cfg


def arch_from_gguf(fields: dict[str, Any], has_output_weight: bool) -> ModelArch:
    """`fields`: GGUF metadata as plain values (see loader.read_gguf_metadata)."""
    family = fields.get("general.architecture")
    names = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    if family not in names:
        raise ValueError(f"GGUF architecture {family!r} is not supported; pdserve serves llama, mistral, qwen2")

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{family}.{key}", default)

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size") or len(fields.get("tokenizer.ggml.tokens", ()))
    eos = fields.get("tokenizer.ggml.eos_token_id")
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return ModelArch(
        architecture=names[family],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings=not has_output_weight,
        qkv_bias=family == "qwen2",
        sliding_window=get("attention.sliding_window") if family == "mistral" else None,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(eos),
    )


# Named real shapes for --load-format dummy (random weights, no tokenizer).
DUMMY_SHAPES: dict[str, ModelArch] = {
    "llama3-8b": ModelArch(
        "LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        eos_token_ids=(128001, 128009),
    ),
    "qwen2.5-7b": ModelArch(
        "Qwen2ForCausalLM",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        qkv_bias=True,
        eos_token_ids=(151645,),
    ),
    "llama2-7b": ModelArch(
        "LlamaForCausalLM",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        max_position_embeddings=4096,
        eos_token_ids=(2,),
    ),
    "smollm2-135m": ModelArch(
        "LlamaForCausalLM",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_ids=(2,),
    ),
    "tiny": ModelArch(
        "LlamaForCausalLM",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        eos_token_ids=(0,),
    ),
}
