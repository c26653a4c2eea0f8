"""Engine configuration: frozen dataclasses, one per concern, validated on creation.

This is one of the two places (with cli.py) that read environment variables.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "torch", "triton")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """'2GiB', '512M', '1.5G', 4096 -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"cannot read size {text!r}; write it like '2GiB', '512MiB' or a byte count")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "")[:1].upper()])


def cache_dir() -> Path:
    """Where converted weights are cached (PDSERVE_CACHE_DIR, default ~/.cache/pdserve)."""
    root = os.environ.get("PDSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pdserve"
    )
    return Path(root)


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and how. `model=None` means the default model. sampled_vocab_size: sample only
    token ids below it (set by the server when its --tokenizer knows fewer tokens than the model has rows,
    so that every generated token has text; None: the whole vocabulary)."""

    model: str | None = None
    load_format: str = "auto"
    dtype: str = "float32"
    max_model_len: int | None = None
    seed: int = 0
    sampled_vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format {self.load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.sampled_vocab_size is not None and self.sampled_vocab_size < 1:
            raise ValueError(f"sampled_vocab_size must be at least 1, got {self.sampled_vocab_size}")


STORE_KINDS = ("mooncake", "file", "memory")
DEFAULT_STAGING_HOST_MEMORY = 256 << 20  # host tier given to a pool when --host-kv-cache-memory is not set


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache tiers. Sizes are per rank; a block count wins over a memory size.

    device: num_blocks | kv_cache_memory; host: num_host_blocks | host_kv_cache_memory
    (0 = no host tier); pool: kv_store ("mooncake", "file", "memory") with its options.
    A pool reads and writes through host blocks, so it gets a host tier of
    DEFAULT_STAGING_HOST_MEMORY when none is configured.
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    num_host_blocks: int | None = None
    host_kv_cache_memory: int | None = None
    kv_store: str | None = None
    kv_store_options: dict[str, Any] = field(default_factory=dict)
    preempt_save: bool = True
    cache_output: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {self.num_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.num_host_blocks is not None and self.num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be 0 or more, got {self.num_host_blocks}")
        if self.host_kv_cache_memory is not None and self.host_kv_cache_memory < 0:
            raise ValueError(f"host_kv_cache_memory must be 0 or more, got {self.host_kv_cache_memory}")
        if self.kv_store is not None and self.kv_store not in STORE_KINDS:
            raise ValueError(f"kv_store {self.kv_store!r} is not one of {', '.join(STORE_KINDS)}")
        if self.kv_store is not None and self.num_host_blocks == 0:
            raise ValueError("a KV store reads and writes through host blocks; give num_host_blocks > 0")
        if self.kv_store_options and self.kv_store is None:
            raise ValueError("kv_store_options given without kv_store; add --kv-store mooncake|file|memory")

    def host_blocks(self, bytes_per_block: int) -> int:
        """Host tier blocks per rank for blocks of `bytes_per_block` bytes."""
        if self.num_host_blocks is not None:
            return self.num_host_blocks
        memory = self.host_kv_cache_memory
        if memory is None:
            memory = DEFAULT_STAGING_HOST_MEMORY if self.kv_store else 0
        num_blocks = memory // bytes_per_block
        if memory and num_blocks < 1:
            raise ValueError(f"host_kv_cache_memory {memory} bytes holds no block of {bytes_per_block} bytes")
        return num_blocks


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits per step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ParallelConfig:
    """Where and how the model runs. attention_backend "auto": Triton paged attention on CUDA when Triton is
    installed, else the torch reference backend. enforce_eager: no CUDA graphs for decode steps (they are
    captured on CUDA with one rank and the Triton backend). gpu_ids: the CUDA device of each rank (rank r
    on gpu_ids[r]); empty: rank r on device r."""

    tensor_parallel_size: int = 1
    device: str = "auto"
    attention_backend: str = "auto"
    enforce_eager: bool = False
    gpu_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention backend {self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.gpu_ids:
            ids = list(self.gpu_ids)
            if len(ids) != self.tensor_parallel_size or len(set(ids)) != len(ids) or min(ids) < 0:
                raise ValueError(
                    f"--gpu-ids needs {self.tensor_parallel_size} distinct device indices >= 0 (one "
                    f"per tensor-parallel rank), got {','.join(map(str, ids))}"
                )
            if self.device == "cpu":
                raise ValueError("--gpu-ids places ranks on CUDA devices; it does not go with --device cpu")

    def gpu_id(self, rank: int) -> int:
        """The CUDA device index of tensor-parallel rank `rank`."""
        return self.gpu_ids[rank] if self.gpu_ids else rank

    def resolved_attention_backend(self) -> str:
        device = self.resolved_device()
        if self.attention_backend == "triton" and device != "cuda":
            raise ValueError("--attention-backend triton needs a CUDA device; use torch on the CPU")
        if self.attention_backend != "auto":
            return self.attention_backend
        if device != "cuda":
            return "torch"
        import importlib.util

        return "triton" if importlib.util.find_spec("triton") is not None else "torch"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


ROLES = ("prefill", "decode", "mixed")  # the order instances start in and are listed
KV_TRANSFER_MODES = ("direct", "storage")
TRANSFER_ENGINES = ("auto", "shm", "cuda_ipc", "mooncake")
LOAD_FAILURE_POLICIES = ("fail", "recompute")


@dataclass(frozen=True)
class DisaggConfig:
    """Prefill/decode disaggregation (docs/disaggregation.md).

    role: what a request with transfer parameters becomes here ("prefill": compute the prompt and
    send its KV, "decode": receive the KV and decode). Any role serves plain requests end to end.
    control_port 0 picks a free port; the control address is announced in /v1/pd/info.
    transfer_timeout: D's receive deadline from block allocation, and P's wait for D's KVDest.
    admission_timeout: how long D may wait for blocks before answering 503 no_capacity.
    kv_dest_wait: how long P holds a request back for D's KVDest, so that its blocks can go layer by layer
    during the prefill (after that it prefills anyway; blocks done before KVDest are caught up).
    The reserve D keeps for the future decode tokens of its running requests (and of the one it admits) is,
    over those requests r,
    sum(max(0, ceil((len(r) + min(tokens_left(r), reserve_clip) * ratio) / block_size) - blocks held by r));
    ratio starts at reserve_ratio_init,
    decays by reserve_ratio_decay each step down to reserve_ratio_min and goes back up on a preemption.
    kv_load_failure_policy (storage mode, D): when prompt blocks are missing from the pool or P could not
    write them, "fail" answers 502 kv_load_failed, "recompute" prefills the missing part here.
    fault_delay_ms, send_trace_dir: testing only (random delays before each send batch and KVDest;
    a per-rank log of send batches).
    """

    role: str = "mixed"
    kv_transfer: str = "direct"
    transfer_engine: str = "auto"
    control_host: str = "127.0.0.1"
    control_port: int = 0
    transfer_timeout: float = 60.0
    admission_timeout: float = 30.0
    kv_dest_wait: float = 0.05
    reserve_ratio_init: float = 1.0
    reserve_ratio_min: float = 0.1
    reserve_ratio_decay: float = 0.998
    reserve_clip: int = 1024
    kv_load_failure_policy: str = "fail"
    fault_delay_ms: int = 0
    send_trace_dir: str | None = None
    cluster_secret: str | None = None  # control messages carry it and are refused without it (docs/security.md)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {', '.join(ROLES)}")
        if self.kv_transfer not in KV_TRANSFER_MODES:
            raise ValueError(f"kv_transfer {self.kv_transfer!r} is not one of {', '.join(KV_TRANSFER_MODES)}")
        if self.transfer_engine not in TRANSFER_ENGINES:
            raise ValueError(f"kv transfer engine {self.transfer_engine!r} is not one of {', '.join(TRANSFER_ENGINES)}")
        if not 0 <= self.control_port < 65536:
            raise ValueError(f"control_port must be in [0, 65535], got {self.control_port}")
        if self.kv_dest_wait < 0:
            raise ValueError(f"--kv-dest-wait must be 0 or more seconds, got {self.kv_dest_wait}")
        if self.transfer_timeout <= 0 or self.admission_timeout <= 0:
            raise ValueError("--kv-transfer-timeout and --admission-timeout must be positive seconds")
        if not 0 < self.reserve_ratio_min <= self.reserve_ratio_init <= 4:
            raise ValueError("reserve ratios must satisfy 0 < min <= init <= 4")
        if not 0 < self.reserve_ratio_decay <= 1:
            raise ValueError(f"reserve_ratio_decay must be in (0, 1], got {self.reserve_ratio_decay}")
        if self.reserve_clip < 1:
            raise ValueError(f"reserve_clip must be at least 1 token, got {self.reserve_clip}")
        if self.fault_delay_ms < 0:
            raise ValueError("fault_delay_ms must be 0 or more")
        if self.kv_load_failure_policy not in LOAD_FAILURE_POLICIES:
            raise ValueError(
                f"--kv-load-failure-policy {self.kv_load_failure_policy!r} is not one of "
                f"{', '.join(LOAD_FAILURE_POLICIES)}"
            )
        if self.role != "mixed" and not self.cluster_secret and not self.is_loopback(self.control_host):
            raise ValueError(
                f"--control-host {self.control_host} opens the KV control socket beyond loopback; anyone who "
                "reaches it could send KVDone/KVAbort, so give every instance of the deployment the same "
                "--cluster-secret (or PDSERVE_CLUSTER_SECRET), or bind 127.0.0.1 (docs/security.md)"
            )

    @staticmethod
    def is_loopback(host: str) -> bool:
        """Whether `host` names this machine's loopback only (127.x.y.z, ::1, localhost); names are not resolved."""
        import ipaddress

        if host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            return False

    @property
    def writes_output_to_pool(self) -> bool:
        """Storage-mode D writes prompt + output at finish, so a conversation's next turn hits on P."""
        return self.is_storage and self.role == "decode"

    @property
    def is_storage(self) -> bool:
        """A prefill or decode instance that moves KV through the pool."""
        return self.role != "mixed" and self.kv_transfer == "storage"


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    disagg: DisaggConfig = field(default_factory=DisaggConfig)

    def __post_init__(self) -> None:
        if self.disagg.is_storage and self.cache.kv_store in (None, "memory"):
            raise ValueError(
                f"--kv-transfer storage moves KV through a pool that P and D share; --kv-store "
                f"{self.cache.kv_store or '(none)'} is not one. Add --kv-store mooncake --kv-store-config "
                "'{\"master\": ...}' (pdserve store start runs a master; pdserve launch --kv-transfer storage "
                "does it all), or --kv-store file with a shared directory"
            )


DEFAULT_CPU_KV_CACHE_MEMORY = 2 << 30


def parse_store_options(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """--kv-store-config: a JSON object, or the path of a file holding one."""
    import json

    if text is None:
        return {}
    if isinstance(text, dict):
        return dict(text)
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"--kv-store-config {text!r} is neither a JSON object nor a file")
        source = path.read_text()
    try:
        options = json.loads(source)
    except json.JSONDecodeError as e:
        raise ValueError(
            f'--kv-store-config is not valid JSON ({e}); write it like \'{{"master": "127.0.0.1:50051"}}\''
        ) from e
    if not isinstance(options, dict):
        raise ValueError("--kv-store-config must be a JSON object")
    return options


def parse_gpu_ids(text: str) -> tuple[int, ...]:
    """'2,3' -> (2, 3): CUDA device indices on the command line."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated device indices like 0 or 2,3, got {text!r}"
        ) from None


def make_engine_config(
    model: str | None = None,
    *,
    dtype: str = "float32",
    load_format: str = "auto",
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    block_size: int = 16,
    num_blocks: int | None = None,
    kv_cache_memory: str | int | None = None,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    seed: int = 0,
    device: str = "auto",
    attention_backend: str = "auto",
    enforce_eager: bool = False,
    gpu_ids: tuple[int, ...] = (),
    sampled_vocab_size: int | None = None,
    enable_prefix_caching: bool = True,
    num_host_blocks: int | None = None,
    host_kv_cache_memory: str | int | None = None,
    kv_store: str | None = None,
    kv_store_config: str | dict[str, Any] | None = None,
    preempt_save: bool = True,
    cache_output: bool = False,
    disagg: DisaggConfig | None = None,
) -> EngineConfig:
    """The one place keyword arguments (LLM, the command line) become an EngineConfig."""
    return EngineConfig(
        model=ModelConfig(model, load_format, dtype, max_model_len, seed, sampled_vocab_size),
        cache=CacheConfig(
            block_size,
            num_blocks,
            None if kv_cache_memory is None else parse_size(kv_cache_memory),
            enable_prefix_caching=enable_prefix_caching,
            num_host_blocks=num_host_blocks,
            host_kv_cache_memory=None if host_kv_cache_memory is None else parse_size(host_kv_cache_memory),
            kv_store=kv_store,
            kv_store_options=parse_store_options(kv_store_config),
            preempt_save=preempt_save,
            cache_output=cache_output,
        ),
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens),
        parallel=ParallelConfig(tensor_parallel_size, device, attention_backend, enforce_eager, tuple(gpu_ids)),
        disagg=disagg or DisaggConfig(),
    )
