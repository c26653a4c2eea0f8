"""pdserve command line: launch, serve, router, generate, bench, store."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from pdserve.config import KV_TRANSFER_MODES, LOAD_FAILURE_POLICIES, ROLES, TRANSFER_ENGINES
from pdserve.launcher.engine_args import add_engine_args, engine_kwargs


def cmd_generate(args: argparse.Namespace) -> int:
    from pdserve import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.sampling_seed
    )
    with LLM(**engine_kwargs(args)) as llm:
        if args.chat:
            outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
        else:
            outputs = llm.generate([args.prompt], params, use_tqdm=False)
    print(outputs[0].outputs[0].text)
    return 0


def engine_config(args: argparse.Namespace, disagg=None):  # type: ignore[no-untyped-def]
    from pdserve.config import make_engine_config

    return make_engine_config(**engine_kwargs(args), disagg=disagg)


def disagg_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pdserve.config import DisaggConfig

    return DisaggConfig(
        role=args.role,
        kv_transfer=args.kv_transfer,
        transfer_engine=args.kv_transfer_engine,
        control_host=args.control_host,
        control_port=args.control_port,
        transfer_timeout=args.kv_transfer_timeout,
        admission_timeout=args.admission_timeout,
        kv_dest_wait=args.kv_dest_wait,
        fault_delay_ms=args.fault_delay_ms,
        kv_load_failure_policy=args.kv_load_failure_policy,
        send_trace_dir=args.kv_send_trace_dir,
        cluster_secret=args.cluster_secret or os.environ.get("PDSERVE_CLUSTER_SECRET") or None,
    )


def add_disagg_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("PD disaggregation (docs/disaggregation.md)")
    g.add_argument(
        "--role",
        choices=ROLES,
        default="mixed",
        help="prefill: compute prompts and send their KV; decode: receive KV and decode; mixed: both "
        "(any role also serves plain requests end to end)",
    )
    g.add_argument(
        "--kv-transfer",
        choices=KV_TRANSFER_MODES,
        default="direct",
        help="direct: P writes KV into D's blocks layer by layer; storage: through the KV pool",
    )
    g.add_argument(
        "--kv-transfer-engine",
        choices=TRANSFER_ENGINES,
        default="auto",
        help="auto: shared memory (CPU) or CUDA IPC (GPU) to a peer on this host, else the Mooncake Transfer Engine",
    )
    g.add_argument("--control-host", default="127.0.0.1", help="address of the KVDest/KVDone control socket")
    g.add_argument("--control-port", type=int, default=0, help="control socket port (default: a free one)")
    g.add_argument(
        "--kv-transfer-timeout",
        type=float,
        default=60.0,
        help="seconds D waits for the KV after allocating blocks (and P for D's block ids)",
    )
    g.add_argument(
        "--admission-timeout",
        type=float,
        default=30.0,
        help="seconds D may wait for free blocks before answering 503 no_capacity",
    )
    g.add_argument(
        "--kv-dest-wait",
        type=float,
        default=0.05,
        help="seconds P holds a request back for D's block ids so its KV can go layer by layer during "
        "the prefill (then it prefills anyway and catches the early blocks up)",
    )
    g.add_argument(
        "--kv-load-failure-policy",
        choices=LOAD_FAILURE_POLICIES,
        default="fail",
        help="storage mode, decode: when prompt blocks are missing from the pool, fail the request (502 "
        "kv_load_failed) or recompute the missing part here",
    )
    g.add_argument(
        "--register-with",
        default=None,
        metavar="ROUTER_URL",
        help="join this router (POST /register with heartbeats) instead of being listed on its command line",
    )
    g.add_argument(
        "--public-url", default=None, help="this server's URL as the router reaches it (default: http://HOST:PORT)"
    )
    g.add_argument(
        "--cluster-secret",
        default=None,
        help="a shared secret the deployment's control messages carry (KV control, registration); required "
        "when the control socket binds beyond loopback (or PDSERVE_CLUSTER_SECRET; docs/security.md)",
    )
    g.add_argument("--fault-delay-ms", type=int, default=0, help=argparse.SUPPRESS)  # testing only
    g.add_argument("--kv-send-trace-dir", default=None, help=argparse.SUPPRESS)  # testing only


def tokenizer_from(spec: str, vocab_size: int) -> Any:
    """The tokenizer named by --tokenizer, checked to fit a model of `vocab_size` tokens."""
    from pdserve.config import ModelConfig
    from pdserve.engine.tokenizer import load_tokenizer
    from pdserve.models.loader import load_arch, resolve_model

    source = resolve_model(ModelConfig(None if spec == "default" else spec))
    load_arch(source)  # converts a GGUF
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise ValueError(f"--tokenizer {spec}: {source.hf_dir} holds no tokenizer")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"--tokenizer {spec} has {len(tokenizer)} tokens, more than the model's {vocab_size}")
    return tokenizer


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pdserve.engine.async_client import AsyncEngineClient
    from pdserve.engine.tokenizer import load_tokenizer
    from pdserve.models.loader import load_arch, resolve_model
    from pdserve.server.api import ServerSettings, build_app

    if args.max_queue_len < 0:
        raise ValueError(f"--max-queue-len must be >= 0, got {args.max_queue_len}")
    if args.tokenizer_threads < 1:
        raise ValueError(f"--tokenizer-threads must be >= 1, got {args.tokenizer_threads}")
    config = engine_config(args, disagg_config(args))
    source = resolve_model(config.model)
    arch = load_arch(source)  # converts a GGUF once, before the engine process starts
    tokenizer = load_tokenizer(source) if args.tokenizer is None else tokenizer_from(args.tokenizer, arch.vocab_size)
    if tokenizer is not None and args.tokenizer is not None and len(tokenizer) < arch.vocab_size:
        # ids the tokenizer cannot decode would stream no text: sample below its size
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, sampled_vocab_size=len(tokenizer)))
    if tokenizer is None:
        raise ValueError(
            f"{source.name} has no tokenizer; the HTTP server needs one: pass --tokenizer (an HF "
            "directory, a .gguf file, or 'default' for pdserve's default model's)"
        )
    api_key = args.api_key or os.environ.get("PDSERVE_API_KEY") or None
    public_url = args.public_url or f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    settings = ServerSettings(
        args.served_model_name or source.name,
        api_key,
        args.max_queue_len,
        args.role,
        args.kv_transfer,
        args.register_with,
        public_url,
        max_request_bytes=args.max_request_bytes,
        stall_timeout_s=args.stall_timeout,
        num_tokenizer_threads=args.tokenizer_threads,
        tool_call_parser=args.tool_call_parser,
    )
    client = AsyncEngineClient(config, args.log_level.upper(), stall_timeout_s=args.stall_timeout)
    app = build_app(client, tokenizer, settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5
        )
    )
    client.on_start_failure = lambda _: setattr(server, "should_exit", True)  # a server with no engine is no use
    server.run()
    if client.start_failure is not None:
        print(f"pdserve: error: the engine failed to start: {client.start_failure}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="LLM serving with prefill/decode disaggregation")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default=os.environ.get("PDSERVE_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (PDSERVE_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt", parents=[common])
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (API process + engine core process)", parents=[common]
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or PDSERVE_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's)")
    serve.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer: an HF directory or .gguf file, or 'default' for pdserve's default model's "
        "(default: the model's own; needed for dummy shapes, which have none)",
    )
    serve.add_argument(
        "--max-queue-len",
        type=int,
        default=256,
        help="requests that may wait beyond --max-num-seqs before new ones get 503",
    )
    serve.add_argument(
        "--tool-call-parser",
        choices=("hermes", "none"),
        default="hermes",
        help="how tool calls are written and parsed: hermes (<tool_call> JSON blocks, as Hermes, Qwen2.5 and Qwen3 "
        "write them); none: requests with tools are a 400 (default: hermes)",
    )
    serve.add_argument(
        "--tokenizer-threads",
        type=int,
        default=1,
        help="threads that tokenize prompts and apply chat templates, off the event loop (default: 1; more only for a tokenizer safe to share between threads)",
    )
    from pdserve.http.limits import add_robustness_args

    add_robustness_args(serve)
    add_engine_args(serve)
    add_disagg_args(serve)
    serve.set_defaults(func=cmd_serve)

    add_bench_parser(sub, common)

    from pdserve.store.master import add_store_parser

    add_store_parser(sub)
    from pdserve.router.cli import add_router_parser

    add_router_parser(sub, [common])
    from pdserve.launcher import add_launch_parser

    add_launch_parser(sub, common)
    return parser


def add_bench_parser(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    """`pdserve bench <name>`: the one place outside pdserve.bench that imports it (here, not at module level)."""
    from pdserve.bench import gpu, kv_tiers, offline, pd, soak, storage, sweep, transfer
    from pdserve.bench import serve as bench_serve

    bench = sub.add_parser("bench", help="benchmarks (results under bench/results/)", parents=[common])
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for module in (offline, bench_serve, kv_tiers, transfer, storage, pd, sweep, gpu, soak):
        module.add_parser(bench_sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "bench_command", None) == "serve" and not args.api_key:
        args.api_key = os.environ.get("OPENAI_API_KEY")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
