"""`conveyor serve`: load every model, warm each up, then listen, and say so at each stage.

Guarantees: the port opens only after every model has loaded and answered one warm-up request;
a model that fails to load ends the command with a non-zero exit and the reason, unless the
config marks it `optional = true`, in which case it is reported unavailable (logs, /health) and
the others are served; LoRA adapters of `--lora-modules` (or the config's `lora` tables) are
loaded before the port opens, and one that fails to load ends the command the same way; one
`ready: ...` line names what is served once the port accepts connections."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import socket
import threading
import time
from dataclasses import dataclass

from conveyor.cli import engine_config

logger = logging.getLogger("conveyor")


@dataclass
class Loading:
    """One model being loaded: its config-file name (None without a config) and engine."""

    name: str | None
    optional: bool
    engine: object = None  # AsyncEngine, or None when the model failed before its engine started
    error: str | None = None


def _lora(args: argparse.Namespace, production):
    """The single model's LoRA settings: the config's `[lora]` with the flags on top (None:
    off). With the config's [[models]], LoRA is set per model and the flags are refused."""
    from server.lora_modules import merge

    flags = dict(enable_lora=args.enable_lora, modules=args.lora_modules, max_loras=args.max_loras,
                 max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras)
    if production.models:
        if any(v not in (None, False) for v in flags.values()):
            raise ValueError("--enable-lora, --lora-modules and --max-*lora* apply to --model; with the "
                             "config's [[models]], set LoRA in each model's `lora` table (docs/lora.md)")
        return None
    return merge(production.lora, **flags)


def _adapters_to_load(production, lora) -> list[tuple[str, str, str | None]]:
    """(name, path, base model name or None for the default) of every start-up adapter."""
    if not production.models:
        return [(a.name, a.path, a.base_model_name) for a in (lora.lora_modules if lora else [])]
    return [(a.name, a.path, a.base_model_name or m.name) for m in production.models if m.lora is not None
            for a in m.lora.lora_modules]


def _load_adapters(app, adapters: list[tuple[str, str, str | None]], unavailable: dict[str, str]) -> str | None:
    """Loads the start-up adapters through the server's own LoRAAdmin; the first failure's reason."""
    from server.errors import APIError

    for name, path, base in adapters:
        if base in unavailable:
            logger.warning("LoRA adapter %s is not served: its model %s is unavailable", name, base)
            continue
        try:
            asyncio.run(app.state.lora.load(name, path, base))
        except APIError as exc:
            return f"LoRA adapter {name} ({path}): {exc.message}"
    return None


def _start_engines(args: argparse.Namespace, production, lora=None) -> list[Loading]:
    """Checks every model's path and options (ValueError naming the model, before any loading,
    unless it is optional), then starts one AsyncEngine per model: each loads on its own thread,
    concurrently."""
    from engine.async_engine import AsyncEngine
    from engine.models.loader import resolve_model
    from server.lora_modules import engine_overrides

    # Import the engine and resolve transformers' lazy names here, once: engines built on
    # several threads at once raced in transformers' lazy module.
    import transformers

    import engine.llm_engine  # noqa: F401

    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        getattr(transformers, name)
    if not production.models:
        try:
            resolve_model(args.model)
        except RuntimeError as exc:  # the default model's package is missing: says how to install it
            raise ValueError(str(exc)) from None
        logger.info("loading model %s", args.model or "SmolLM2-135M-Instruct (default)")
        return [Loading(None, False, AsyncEngine(engine_config(args, **engine_overrides(lora))))]
    loads, configs = [], []
    for i, m in enumerate(production.models):
        load, config = Loading(m.name, m.optional), None
        try:
            resolve_model(m.path)
            config = engine_config(args, model=m.path, dtype=m.dtype, **{**engine_overrides(m.lora), **m.engine})
        except (ValueError, RuntimeError) as exc:
            if not m.optional:
                raise ValueError(f"models[{i}] ({m.name}): {exc}") from None
            load.error = str(exc)
        loads.append(load)
        configs.append(config)
    for load, config in zip(loads, configs):
        if config is not None:
            logger.info("loading model %s from %s", load.name, config.model or "the default SmolLM2-135M-Instruct")
            load.engine = AsyncEngine(config)
    return loads


def _wait_and_warm_up(load: Loading) -> None:
    """Waits for the engine, then runs one short greedy request through it; sets `load.error`."""
    from engine.sampling_params import SamplingParams

    if load.engine is None:
        return
    engine = load.engine
    if not engine.wait_ready():
        exc = engine.errored
        load.error = f"{type(exc).__name__}: {exc}" if exc is not None else "the engine thread stopped"
        return
    prompt = engine.tokenizer.encode("Hello") if engine.tokenizer is not None else [1, 2, 3, 4]
    start = time.perf_counter()

    async def run() -> None:
        params = SamplingParams(max_tokens=2, temperature=0.0)
        async for _ in engine.generate(prompt, params, f"warmup-{load.name or 'model'}"):
            pass

    try:
        asyncio.run(run())
    except Exception as exc:  # noqa: BLE001 - any failure here means the model cannot serve
        load.error = f"warm-up request failed: {type(exc).__name__}: {exc}"
        return
    logger.info("warm-up%s: one %d-token prompt, 2 new tokens in %.2f s",
                f" ({load.name})" if load.name else "", len(prompt), time.perf_counter() - start)


def _describe(load: Loading, served_name: str | None) -> str:
    e = load.engine.engine
    blocks, block_size = e.num_blocks, e.config.block_size
    name = load.name or served_name or e.model_name
    return (f"model {name}, dtype {str(e.dtype).removeprefix('torch.')}, "
            f"{blocks} KV blocks ({blocks * block_size} tokens)")


def _announce_when_listening(host: str, port: int, line: str) -> None:
    """Logs `line` from a daemon thread once host:port accepts TCP connections."""
    target = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((target, port), timeout=0.5):
                    logger.info(line)
                    return
            except OSError:
                time.sleep(0.05)

    threading.Thread(target=watch, name="conveyor-ready", daemon=True).start()


def _check_port_free(host: str, port: int) -> None:
    """ValueError now, before minutes of loading, when host:port cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(args: argparse.Namespace) -> int:
    from server.app import build_app
    from server.config_file import ProductionConfig, load_config
    from server.settings import ServerSettings
    from server.shutdown import serve as run_server

    settings = ServerSettings(
        served_model_name=args.served_model_name, max_tokens_cap=args.max_tokens_cap,
        max_prompt_tokens=args.max_prompt_tokens, max_waiting_requests=args.max_waiting_requests,
        max_waiting_tokens=args.max_waiting_tokens, max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout, otlp_traces_endpoint=args.otlp_traces_endpoint,
        log_prompts=args.log_prompts, tool_call_parser=args.tool_call_parser,
        trace_file=args.trace_file)
    production = load_config(args.config) if args.config else ProductionConfig()
    stall = next((s for s in (args.health_stall_seconds, production.health_stall_seconds) if s is not None), None)
    if stall is not None:  # the flag wins over the config file, which wins over the default
        settings = dataclasses.replace(settings, health_stall_seconds=stall)
    if args.redis_url:
        production.redis_url = args.redis_url
    lora = _lora(args, production)
    _check_port_free(args.host, args.port)
    loads = _start_engines(args, production, lora)
    for load in loads:
        _wait_and_warm_up(load)
    failed = [ld for ld in loads if ld.error and not ld.optional]
    unavailable = {ld.name: ld.error for ld in loads if ld.error and ld.optional}
    for ld in loads:
        if ld.error and ld.optional:
            logger.warning("optional model %s is unavailable: %s", ld.name, ld.error)
            if ld.engine is not None:
                ld.engine.shutdown()
    available = [ld for ld in loads if not ld.error]
    if failed or not available:
        for ld in failed:
            logger.error("model %s failed to load: %s", ld.name or args.model or "SmolLM2-135M-Instruct", ld.error)
        if not failed:
            logger.error("no model could be loaded")
        for ld in loads:
            if ld.engine is not None:
                ld.engine.shutdown()
        return 1
    first, rest = available[0], available[1:]
    app = build_app(first.engine, settings, production=production,
                    engines={ld.name: ld.engine for ld in rest}, unavailable_models=unavailable)
    lora_error = _load_adapters(app, _adapters_to_load(production, lora), unavailable)
    if lora_error is not None:
        logger.error("%s", lora_error)
        for ld in loads:
            if ld.engine is not None:
                ld.engine.shutdown()
        return 1
    parts = "; ".join(_describe(ld, args.served_model_name) for ld in available)
    skipped = f"; unavailable: {', '.join(unavailable)}" if unavailable else ""
    if app.state.models.adapters:
        skipped += f"; LoRA adapters: {', '.join(app.state.models.adapters)}"
    _announce_when_listening(args.host, args.port,
                             f"ready: {parts}{skipped}, listening on http://{args.host}:{args.port}")
    run_server(app, host=args.host, port=args.port, log_level=args.log_level,
               json_logs=args.log_format == "json")
    return 0
