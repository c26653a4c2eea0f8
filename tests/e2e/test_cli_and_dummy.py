"""The command line and the dummy (random-weight) load format."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.layers.parallel import get_tp_group
from pdserve.models.arch import DUMMY_SHAPES
from pdserve.models.llama import LlamaForCausalLM


def _pdserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_command(default_hf_dir):
    done = _pdserve("generate", "The capital of France is", "--max-tokens", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("Paris")


def test_generate_command_chat(default_hf_dir):
    done = _pdserve("generate", "Say hello.", "--chat", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_generate_command_errors_are_one_line():
    done = _pdserve("generate", "hi", "--model", "/nonexistent/model")
    assert done.returncode == 2
    assert "model path '/nonexistent/model' does not exist" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name, billions", [("llama3-8b", 8.03), ("qwen2.5-7b", 7.62), ("llama2-7b", 6.74)])
def test_dummy_shapes_are_the_real_ones(name, billions):
    assert get_tp_group().size == 1
    with torch.device("meta"):
        model = LlamaForCausalLM(DUMMY_SHAPES[name], "torch", torch.bfloat16, max_position=16)
    num_params = sum(p.numel() for p in model.parameters())
    assert abs(num_params / 1e9 - billions) < 0.01, num_params


def test_dummy_tiny_generates_reproducibly():
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": list(range(10, 60))}]
    with LLM("tiny", load_format="dummy", seed=1) as llm:
        first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.get_tokenizer() is None
        with pytest.raises(ValueError, match="no tokenizer"):
            llm.generate(["text"], params)
    with LLM("tiny", load_format="dummy", seed=1) as llm:
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with LLM("tiny", load_format="dummy", seed=2) as llm:
        other = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert first == again and all(len(t) == 12 for t in first)
    assert first != other


def test_dummy_needs_a_known_shape():
    with pytest.raises(ValueError, match="llama3-8b"):
        LLM("llama4-9000b", load_format="dummy")


def test_sampled_vocab_size_keeps_tokens_below_it() -> None:
    """A server given a --tokenizer smaller than the model's vocabulary samples only ids it can decode."""
    sampling = [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True),
    ]
    prompts = [{"prompt_token_ids": [3, 400, 17, 250]}, {"prompt_token_ids": [480, 2]}]
    with LLM("tiny", load_format="dummy", max_model_len=128, num_blocks=32) as llm:
        unlimited = [t for o in llm.generate(prompts, sampling, use_tqdm=False) for t in o.outputs[0].token_ids]
    assert max(unlimited) >= 40  # the unrestricted model does sample above the limit
    with LLM("tiny", load_format="dummy", max_model_len=128, num_blocks=32, sampled_vocab_size=40) as llm:
        limited = [t for o in llm.generate(prompts, sampling, use_tqdm=False) for t in o.outputs[0].token_ids]
    assert len(limited) == 48 and max(limited) < 40


def test_serve_tokenizer_flag_is_checked(default_hf_dir) -> None:
    from pdserve.cli import tokenizer_from

    assert len(tokenizer_from(str(default_hf_dir), 49152)) == 49152
    with pytest.raises(ValueError, match="has 49152 tokens, more than the model's 512"):
        tokenizer_from("default", 512)
