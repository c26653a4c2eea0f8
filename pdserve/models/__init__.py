"""Models and weight loading. `build_model` is the one entry point workers use."""

from __future__ import annotations

import torch

from pdserve.layers.linear import prepack_for_cpu
from pdserve.models.arch import ModelArch
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import ModelSource, iter_safetensors

__all__ = ["ModelArch", "ModelSource", "build_model"]


def build_model(
    arch: ModelArch,
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    attention_backend: str = "torch",
    seed: int = 0,
) -> LlamaForCausalLM:
    """Build this rank's shard of the model on `device` and load its weights."""
    with torch.device(device):
        model = LlamaForCausalLM(arch, attention_backend, dtype, max_position)
    if source.kind == "dummy":
        _init_dummy(model, seed)
    else:
        assert source.hf_dir is not None
        model.load_weights(iter_safetensors(source.hf_dir, progress=True))
    prepack_for_cpu(model)
    return model.eval()


def _init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights in real shapes: N(0, 0.02) matrices, unit norms, zero biases."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
