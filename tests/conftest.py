from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import make_tiny_model  # noqa: E402

TINY_KINDS = ("llama", "llama-tied", "llama3-rope", "qwen2", "mistral")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: make_tiny_model(root / kind, kind) for kind in TINY_KINDS}


@pytest.fixture(scope="session")
def default_hf_dir() -> Path:
    """The default model's converted HF directory (converted once, then cached)."""
    from pdserve.config import ModelConfig
    from pdserve.models.loader import ensure_converted, resolve_model

    source = resolve_model(ModelConfig())
    ensure_converted(source)
    assert source.hf_dir is not None
    return source.hf_dir


@pytest.fixture(scope="session")
def default_llm():
    """One fp32 engine on the default model, shared by the tests that only read from it."""
    from pdserve import LLM

    llm = LLM(dtype="float32")
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def default_hf_model(default_hf_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_hf_dir, dtype=torch.float32).eval()
