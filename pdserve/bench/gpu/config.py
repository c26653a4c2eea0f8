"""`pdserve bench gpu`'s settings: the parts, their limits, GpuBenchConfig, and what each recorded figure means."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdserve.bench.common import LABEL_RE

PARTS = ("decode", "prefill", "transfer")
TARGET_BATCH1_OVER_ROOFLINE = 1.3  # decode at batch 1 with CUDA graphs, over the weight-read roofline
LEN_MARGIN = 16  # max_model_len = the longest prompt + this (room for the generated tokens)
PD_MAX_TOKENS = 2  # a PD request: P samples the first token, D decodes one more
CHILD_START_TIMEOUT_S = 180.0  # a spawned child imports torch and pdserve and creates a CUDA context
CHILD_REPLY_TIMEOUT_S = 60.0
PD_TIMEOUT_S = 300.0
OVERLAP_EXPOSED_SHARE = 0.5  # as in bench transfer: exposed below this share of busy = sends ran during the forward

NOTES = {
    "decode_ms": "engine.step() wall time per decode step (every running sequence decodes one token; host "
    "scheduling, the forward, logits and sampling; torch.cuda.synchronize() around each step), "
    "mean over the timed steps; each batch's prompts have decode_context tokens, so the context "
    "grows from context + warm-up steps during the timed steps",
    "roofline_ms": "weight_bytes (every parameter of the engine's model) / copy.gb_per_s_best: the least time a "
    "step can take if it reads every weight once from HBM at the bandwidth a device-to-device "
    "copy reached in this run. roofline_read_ms counts only the weights a step reads (not the "
    "input embedding table, of which a step reads one row per sequence); "
    "roofline_weights_kv_ms adds the KV cache bytes the batch reads (mean context)",
    "hf_ms": "HF transformers generate (DynamicCache, the model's default attention, greedy, no EOS) on a model "
    "built from the same shape with random weights, same dtype and device: (best time of "
    "generate(steps + 1 new tokens) - best time of generate(1 new token)) / steps, the same prompts' "
    "shape (batch x decode_context, no padding)",
    "copy": "a contiguous device-to-device copy of copy_bytes, best and median of the timed repeats after "
    "warm-up; gb_per_s counts bytes read + bytes written (HBM traffic), GB = 1e9 bytes",
    "matmul": "torch.matmul of two matmul_size x matmul_size matrices in the model dtype: 2 n^3 FLOPs per "
    "product, best and median of the timed repeats after warm-up",
    "prefill": "one request's prompt computed in one engine step (max_num_batched_tokens >= the prompt, "
    "max_tokens 1, a fresh random prompt per run, prefix caching off); seconds = the wall time of "
    "the engine step(s) that computed it, median of the repeats after one warm-up. FLOPs: "
    "2 x tokens x the linear layers' weights (q, k, v, o, gate, up, down of every layer) + causal "
    "attention 4 x layers x heads x head_dim x tokens (tokens + 1) / 2 (QK^T and PV over the "
    "keys each query sees) + 2 x hidden x vocab for the one sampled row's logits",
    "transfer_raw": "the cuda_ipc engine (CudaIpcEngine.write + flush) copying one prompt's KV blocks (every "
    "layer, K and V, contiguous block ids) from a cache in this process on P's GPU into a cache a "
    "spawned child process exported on D's GPU: all layers in one write, one write per layer as "
    "P's sender does, or all layers into every other block of D's (scattered: gather, peer copy, "
    "scatter); wall time from a synchronized start to flush(), median and best of the "
    "repeats after one untimed write whose copy is checked. device_copy: one contiguous "
    "copy of the same bytes from P's GPU to D's in this process (the peer copy); local_slices: "
    "the engine's pattern of copies, one per (layer, K|V) slice of the blocks, into a cache of this "
    "process (what the launches cost without IPC and without the engine's Python). GB/s here "
    "counts the bytes moved (once), not read + written",
    "transfer_pd": "P (role prefill) and D (role decode) are two EngineCores in ONE process, P on p_gpu and D on "
    "d_gpu, paired through their real control sockets; the KV goes through the cuda_ipc engine "
    "(in one process it copies into D's tensor directly, as it does into a mapped peer cache). "
    "ttft: from adding the request to D (then to P) until D emits its first token (P's prefill, "
    "layer-by-layer sends, KVDone), both cores stepped in turn, no HTTP; prefill_alone: a plain "
    "request of the same length on P (max_tokens 1) from add to its token. busy: P rank 0's "
    "sender thread time in write() (with cuda_ipc it queues the copies on a side stream, so "
    "this is host time, not copy time); exposed: time P's step waited for the sends after its "
    "forward (the copies left to finish): the transfer's share of TTFT is exposed / ttft. "
    "kv_dest_wait is 1 s so P prefills only once D's block ids came, sending layer by layer",
}


@dataclass(frozen=True)
class GpuBenchConfig:
    parts: tuple[str, ...] = PARTS
    model: str = "llama3-8b"
    load_format: str = "dummy"
    dtype: str = "bfloat16"
    block_size: int = 16
    seed: int = 0
    decode_batches: tuple[int, ...] = (1, 8, 32, 64)
    decode_context: int = 512
    decode_steps: int = 32
    decode_warmup: int = 3
    decode_max_model_len: int = 4096
    skip_hf: bool = False
    hf_repeats: int = 2
    prefill_lens: tuple[int, ...] = (2048, 8192)
    prefill_repeats: int = 5
    transfer_lens: tuple[int, ...] = (1024, 4096, 16384)
    transfer_gpus: tuple[int, ...] | None = None  # (P's, D's) CUDA devices; None: (0, 1) with two GPUs, else (0, 0)
    transfer_repeats: int = 5
    raw_repeats: int = 20
    copy_bytes: int = 4 << 30
    copy_repeats: int = 10
    matmul_size: int = 8192
    matmul_repeats: int = 20
    result_dir: Path = Path("bench/results")
    label: str | None = None
    allow_cpu: bool = False

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(
                f"--parts takes a comma-separated subset of {','.join(PARTS)}, got {','.join(self.parts)!r}"
            )
        for name in ("decode_batches", "prefill_lens", "transfer_lens"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"--{name.replace('_', '-')} takes positive integers, got {values}")
        for name in (
            "decode_context",
            "decode_steps",
            "hf_repeats",
            "prefill_repeats",
            "transfer_repeats",
            "raw_repeats",
            "copy_bytes",
            "copy_repeats",
            "matmul_size",
            "matmul_repeats",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.transfer_gpus is not None and (len(self.transfer_gpus) != 2 or min(self.transfer_gpus) < 0):
            raise ValueError(f"--transfer-gpus takes two device indices P,D (e.g. 0,1), got {self.transfer_gpus}")
        if self.decode_warmup < 0:
            raise ValueError(f"--decode-warmup must be 0 or more, got {self.decode_warmup}")
        if self.label is not None and not LABEL_RE.match(self.label):
            raise ValueError(f"--label {self.label!r} may hold only letters, digits, '.', '_' and '-'")
