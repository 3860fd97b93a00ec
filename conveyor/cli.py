"""The `conveyor` command: `conveyor serve` runs the OpenAI-compatible server, `conveyor generate`
prints one completion. With no --model, both use the default SmolLM2-135M-Instruct GGUF."""
from __future__ import annotations

import argparse
import logging
import re
import sys

from engine.config import EngineConfig

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB, 512MiB or a byte count)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None, help="e.g. 2GiB")
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--scheduling-policy", default="fcfs")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
        num_blocks=args.num_blocks, block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        scheduling_policy=args.scheduling_policy, attention_backend=args.attention_backend,
        seed=args.seed, num_threads=args.num_threads, enforce_eager=args.enforce_eager)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--max-tokens-cap", type=int, default=None)
    serve.add_argument("--max-prompt-tokens", type=int, default=None)
    serve.add_argument("--max-waiting-requests", type=int, default=1024)
    serve.add_argument("--max-waiting-tokens", type=int, default=None)
    serve.add_argument("--max-body-bytes", type=parse_bytes, default=4 << 20)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--config", default=None,
                       help="production config (.toml/.yaml): tenants, limits, models, routing, guards; "
                            "see docs/production.md")
    serve.add_argument("--redis-url", default=None,
                       help="shared state for replicas, e.g. redis://127.0.0.1:6379/0 (overrides the config's)")

    hk = sub.add_parser("hash-key", help="print the SHA-256 digest of an API key for the config file")
    hk.add_argument("key")

    gen = sub.add_parser("generate", help="print one completion")
    _engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    return parser


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    import dataclasses

    from engine.async_engine import AsyncEngine
    from server.app import build_app
    from server.config_file import ProductionConfig, load_config
    from server.settings import ServerSettings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(
        served_model_name=args.served_model_name, max_tokens_cap=args.max_tokens_cap,
        max_prompt_tokens=args.max_prompt_tokens, max_waiting_requests=args.max_waiting_requests,
        max_waiting_tokens=args.max_waiting_tokens, max_body_bytes=args.max_body_bytes)
    production = load_config(args.config) if args.config else ProductionConfig()
    if args.redis_url:
        production.redis_url = args.redis_url
    # Each engine loads on its own thread; /health answers 503 until the first is ready.
    engines = {m.name: AsyncEngine(dataclasses.replace(engine_config(args), model=m.path, dtype=m.dtype,
                                                       **m.engine)) for m in production.models}
    engine = engines.pop(production.models[0].name) if production.models else AsyncEngine(engine_config(args))
    app = build_app(engine, settings, production=production, engines=engines)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def hash_key(args: argparse.Namespace) -> None:
    from server.auth import hash_key as digest

    print(digest(args.key))


def generate(args: argparse.Namespace) -> None:
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(engine_config(args))
    prompt: str | list[int] = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                    tokenize=False, add_generation_prompt=True)
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    engine.add_request("cli-0", prompt, SamplingParams(max_tokens=args.max_tokens,
                                                       temperature=args.temperature))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    print(final.outputs[0].text if final is not None else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"serve": serve, "generate": generate, "hash-key": hash_key}[args.command](args)
    except ValueError as exc:  # configuration errors: a clear message, not a traceback
        print(f"conveyor: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
