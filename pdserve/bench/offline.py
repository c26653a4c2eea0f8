"""`pdserve bench offline`: output tokens/s of pdserve vs HF transformers `generate`, same requests, same run.

Both systems get the same seeded random prompts, greedy decoding and an exact
output length per request (pdserve: max_tokens + ignore_eos; HF: padded batches,
left padding with an attention mask, each batch run until its longest request
is done). Output tokens are counted as the sum of requested output lengths for
both; tokens HF generates past a request's own length are wasted work, not
output. Writes offline-<dtype>.json and offline-<dtype>.png under --result-dir.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pdserve.bench.common import (
    BenchRequest,
    Stopwatch,
    check_len_range,
    code_version,
    machine_info,
    now_iso,
    random_requests,
    write_outputs,
)
from pdserve.bench.plot import bar_chart
from pdserve.launcher.engine_args import add_engine_args, engine_kwargs

TARGET_RATIO = 2.0  # pdserve output tok/s over HF's, from the issue


@dataclass(frozen=True)
class OfflineConfig:
    """The workload; engine settings travel separately as LLM(**engine_kwargs)."""

    num_prompts: int = 64
    input_len: tuple[int, int] = (32, 256)
    output_len: tuple[int, int] = (16, 128)
    hf_batch_size: int = 16
    dataset_seed: int = 0
    result_dir: Path = Path("bench/results")
    skip_hf: bool = False
    use_tqdm: bool = True
    torch_threads: int = 0  # 0: leave torch's default

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        check_len_range("input-len", *self.input_len)
        check_len_range("output-len", *self.output_len)
        if self.hf_batch_size < 1:
            raise ValueError(f"--hf-batch-size must be at least 1, got {self.hf_batch_size}")
        if self.torch_threads < 0:
            raise ValueError(f"--torch-threads must be 0 (torch's default) or more, got {self.torch_threads}")


@dataclass
class RunResult:
    """One system's timed pass over all requests."""

    timing: Stopwatch
    output_token_ids: list[list[int]]  # per request, at least its requested length
    computed_tokens: int  # output tokens the system actually computed, wasted ones included


def _sampling(output_len: int) -> Any:
    from pdserve import SamplingParams

    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)


def run_pdserve(llm: Any, requests: list[BenchRequest], use_tqdm: bool) -> RunResult:
    """Warm up on one tiny request, then time generate() over every request at once."""
    llm.generate([{"prompt_token_ids": requests[0].prompt_token_ids[:8]}], [_sampling(4)], use_tqdm=False)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [_sampling(r.output_len) for r in requests]
    with Stopwatch() as timing:
        outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    short = [(i, len(t), r.output_len) for i, (t, r) in enumerate(zip(token_ids, requests)) if len(t) != r.output_len]
    if short:
        i, got, want = short[0]
        raise RuntimeError(
            f"pdserve returned {got} tokens for request {i}, asked for {want} "
            f"({len(short)} requests differ); ignore_eos/max_tokens is not honoured by the engine"
        )
    return RunResult(timing, token_ids, sum(len(t) for t in token_ids))


def load_hf_model(hf_dir: Path, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    return model.eval()


def hf_batches(requests: list[BenchRequest], batch_size: int, pad_token_id: int) -> Iterator[tuple[Any, Any, int]]:
    """(input_ids, attention_mask, max_new_tokens) per batch, left-padded, in request order."""
    import torch

    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        width = max(r.input_len for r in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            input_ids[row, width - r.input_len :] = torch.tensor(r.prompt_token_ids)
            attention_mask[row, width - r.input_len :] = 1
        yield input_ids, attention_mask, max(r.output_len for r in batch)


def _hf_generate(model: Any, input_ids: Any, attention_mask: Any, num_tokens: int, pad_token_id: int) -> Any:
    """Greedy, exactly num_tokens new tokens per row -> [batch, num_tokens]."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
    return out[:, input_ids.shape[1] :]


def run_hf(model: Any, requests: list[BenchRequest], batch_size: int, pad_token_id: int, use_tqdm: bool) -> RunResult:
    """Warm up on a tiny padded batch, then time every batch of `batch_size`, one after another."""
    from tqdm import tqdm

    warm = [BenchRequest(requests[0].prompt_token_ids[:8], 4), BenchRequest(requests[0].prompt_token_ids[:5], 4)]
    for input_ids, mask, n in hf_batches(warm, 2, pad_token_id):
        _hf_generate(model, input_ids, mask, n, pad_token_id)
    token_ids: list[list[int]] = []
    computed = 0
    num_batches = -(-len(requests) // batch_size)
    batches = tqdm(
        hf_batches(requests, batch_size, pad_token_id),
        total=num_batches,
        desc="HF generate",
        unit="batch",
        disable=not use_tqdm,
    )
    with Stopwatch() as timing:
        for input_ids, mask, n in batches:
            new = _hf_generate(model, input_ids, mask, n, pad_token_id)
            token_ids += new.tolist()
            computed += new.numel()
    return RunResult(timing, token_ids, computed)


def greedy_agreement(requests: list[BenchRequest], pd: RunResult, hf: RunResult) -> dict[str, Any]:
    """How far pdserve's greedy tokens match HF's over each request's own length (a sanity check;
    fp32 ties and padded-batch numerics can flip a late token, so this need not be 100%)."""
    identical, first_match, prefix = 0, 0, 0.0
    for r, a, b in zip(requests, pd.output_token_ids, hf.output_token_ids):
        a, b = a[: r.output_len], b[: r.output_len]
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), r.output_len)
        identical += common == r.output_len
        first_match += common > 0
        prefix += common / r.output_len
    n = len(requests)
    return {
        "requests_identical": identical,
        "first_token_match": first_match,
        "num_requests": n,
        "mean_matching_prefix_frac": round(prefix / n, 4),
    }


def _system_figures(run: RunResult, output_tokens: int, total_tokens: int, num_requests: int) -> dict[str, Any]:
    import torch

    wall = run.timing.wall_s
    return {
        "output_tokens_per_s": round(output_tokens / wall, 2),
        "total_tokens_per_s": round(total_tokens / wall, 2),
        "requests_per_s": round(num_requests / wall, 4),
        "computed_output_tokens": run.computed_tokens,
        **run.timing.as_dict(),
        # ~1 when this process had its threads' CPUs to itself; well below 1: the CPUs were shared
        "cpu_utilization": round(run.timing.cpu_s / (wall * torch.get_num_threads()), 3),
    }


def build_result(
    config: OfflineConfig,
    engine: dict[str, Any],
    model_name: str,
    requests: list[BenchRequest],
    pd: RunResult,
    hf: RunResult | None,
    num_preemptions: int,
) -> dict[str, Any]:
    input_tokens = sum(r.input_len for r in requests)
    output_tokens = sum(r.output_len for r in requests)
    figures = {
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "num_requests": len(requests),
    }
    pd_figs = _system_figures(pd, **figures) | {"num_preemptions": num_preemptions}
    hf_figs = None if hf is None else _system_figures(hf, **figures) | {"batch_size": config.hf_batch_size}
    ratio = None if hf_figs is None else round(pd_figs["output_tokens_per_s"] / hf_figs["output_tokens_per_s"], 3)
    workload = asdict(config) | {"result_dir": str(config.result_dir)}
    del workload["use_tqdm"]
    return {
        "benchmark": "offline",
        "date": now_iso(),
        "pdserve_version": code_version(),
        "model": model_name,
        "dtype": engine["dtype"],
        "workload": workload,
        "engine": engine,
        "machine": machine_info(),
        "dataset": {
            "num_requests": len(requests),
            "total_input_tokens": input_tokens,
            "total_output_tokens": output_tokens,
            "mean_input_len": round(input_tokens / len(requests), 2),
            "mean_output_len": round(output_tokens / len(requests), 2),
        },
        "pdserve": pd_figs,
        "hf": hf_figs,
        "ratio_pdserve_over_hf": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": None if ratio is None else ratio >= TARGET_RATIO,
        "greedy_agreement": None if hf is None else greedy_agreement(requests, pd, hf),
    }


def plot(path: Path, result: dict[str, Any]) -> Path:
    """Output tokens/s of pdserve and (unless skipped) HF generate, one bar each."""
    labels, values = ["pdserve"], [result["pdserve"]["output_tokens_per_s"]]
    if result["hf"] is not None:
        labels.append(f"HF generate (batch {result['hf']['batch_size']})")
        values.append(result["hf"]["output_tokens_per_s"])
    ratio = result["ratio_pdserve_over_hf"]
    title = (
        f"{result['model']} {result['dtype']}, {result['dataset']['num_requests']} requests, "
        f"{result['machine']['torch_num_threads']} threads\n"
        + (f"pdserve / HF = {ratio:.2f}x (target {TARGET_RATIO:g}x)" if ratio is not None else "HF skipped")
    )
    return bar_chart(path, title, labels, values, "output tokens / s")


CONTENDED_UTILIZATION = 0.8


def summary(result: dict[str, Any], json_path: Path, png_path: Path) -> str:
    ds, pd, hf = result["dataset"], result["pdserve"], result["hf"]
    text = (
        f"pdserve bench offline ({result['model']}, {result['dtype']}, {result['machine']['torch_num_threads']} "
        f"torch threads on {result['machine']['cpu_count']} CPUs): {ds['num_requests']} requests, "
        f"{ds['total_input_tokens']} input and {ds['total_output_tokens']} output tokens. "
        f"pdserve took {pd['wall_s']:.1f} s: {pd['output_tokens_per_s']:.1f} output tok/s, "
        f"{pd['requests_per_s']:.2f} req/s. "
    )
    if hf is None:
        text += "HF transformers was skipped (--skip-hf). "
    else:
        agree = result["greedy_agreement"]
        text += (
            f"HF transformers generate (left-padded batches of {hf['batch_size']}) took {hf['wall_s']:.1f} s: "
            f"{hf['output_tokens_per_s']:.1f} output tok/s ({hf['computed_output_tokens']} tokens computed). "
            f"pdserve/HF = {result['ratio_pdserve_over_hf']:.2f}x, target {TARGET_RATIO:g}x "
            f"{'met' if result['meets_target'] else 'NOT met'}. Greedy outputs identical for "
            f"{agree['requests_identical']}/{agree['num_requests']} requests. "
        )
    shared = [
        name
        for name, figs in (("pdserve", pd), ("HF", hf))
        if figs is not None and figs["cpu_utilization"] < CONTENDED_UTILIZATION
    ]
    if shared:
        text += (
            f"WARNING: {' and '.join(shared)} got less than {CONTENDED_UTILIZATION:.0%} of "
            f"{result['machine']['torch_num_threads']} CPUs (cpu_utilization in the JSON): other processes "
            "shared the machine, so these figures are not comparable; rerun on a quiet machine. "
        )
    return text + f"Results: {json_path}, {png_path}."


def run_offline(config: OfflineConfig, engine: dict[str, Any]) -> dict[str, Any]:
    """Run both systems on one seeded workload, write the JSON and PNG, return the result dict."""
    import torch

    from pdserve import LLM

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    llm = LLM(**engine)
    try:
        max_len = config.input_len[1] + config.output_len[1]
        if max_len > llm.engine.max_model_len:
            raise ValueError(
                f"--input-len-max + --output-len-max is {max_len}, above max_model_len "
                f"{llm.engine.max_model_len}; lower them or raise --max-model-len"
            )
        requests = random_requests(
            config.num_prompts, config.input_len, config.output_len, llm.engine.arch.vocab_size, config.dataset_seed
        )
        pd = run_pdserve(llm, requests, config.use_tqdm)
        hf_dir, model_name, num_preemptions = llm.engine.source.hf_dir, llm.engine.source.name, llm.num_preemptions
        tokenizer = llm.get_tokenizer()
    finally:
        llm.shutdown()
    del llm
    gc.collect()
    hf = None
    if not config.skip_hf:
        if hf_dir is None:
            raise ValueError("this model has no HF-format directory (dummy weights?); pass --skip-hf")
        pad_id = _pad_token_id(tokenizer)
        hf = run_hf(load_hf_model(hf_dir, engine["dtype"]), requests, config.hf_batch_size, pad_id, config.use_tqdm)
    result = build_result(config, engine, model_name, requests, pd, hf, num_preemptions)
    stem = f"offline-{result['dtype']}"  # its JSON never named its files
    write_outputs(result, config.result_dir, stem, lambda path: plot(path, result), files_in_json=False)
    return result


def _pad_token_id(tokenizer: Any) -> int:
    for pad in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if pad is not None:
            return int(pad)
    return 0  # masked out by the attention mask, so any id works


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "offline",
        help="offline throughput: pdserve vs HF transformers generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--input-len-min", type=int, default=32)
    g.add_argument("--input-len-max", type=int, default=256)
    g.add_argument("--output-len-min", type=int, default=16)
    g.add_argument("--output-len-max", type=int, default=128)
    g.add_argument("--hf-batch-size", type=int, default=16, help="HF generate batch size (left-padded)")
    g.add_argument("--dataset-seed", type=int, default=0, help="seed of the random prompts and lengths")
    g.add_argument("--result-dir", type=Path, default=Path("bench/results"))
    g.add_argument("--skip-hf", action="store_true", help="time pdserve only")
    g.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads for both systems (default 0: torch's own choice)",
    )
    g.add_argument("--no-tqdm", dest="use_tqdm", action="store_false", help="no progress bars")
    add_engine_args(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> OfflineConfig:
    return OfflineConfig(
        num_prompts=args.num_prompts,
        input_len=(args.input_len_min, args.input_len_max),
        output_len=(args.output_len_min, args.output_len_max),
        hf_batch_size=args.hf_batch_size,
        dataset_seed=args.dataset_seed,
        result_dir=args.result_dir,
        skip_hf=args.skip_hf,
        use_tqdm=args.use_tqdm,
        torch_threads=args.torch_threads,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = run_offline(config, engine_kwargs(args))
    print(summary(result, Path(result["files"]["json"]), Path(result["files"]["png"])))
    return 0
