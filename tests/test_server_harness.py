"""Helpers for the server tests (no tests here): a tiny real engine, and uvicorn serving a
Starlette app on a free loopback port in a background thread."""
from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import uvicorn

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from server.app import build_app
from server.settings import ServerSettings
from tests.checkpoints import make_tiny_checkpoint

TINY_MAX_MODEL_LEN = 256


def tiny_config(path: str, **overrides) -> EngineConfig:
    make_tiny_checkpoint(path, "llama")
    kwargs = dict(model=path, dtype="float32", device="cpu", num_blocks=512, block_size=16,
                  max_model_len=TINY_MAX_MODEL_LEN, attention_backend="torch")
    kwargs.update(overrides)
    return EngineConfig(**kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn on 127.0.0.1:<free port> in a daemon thread; `stop()` shuts it and the engines.
    By default it serves `build_app(engine, settings)`; pass `app` (and every engine it uses in
    `engines`) to serve something else."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings | None = None, *, app=None,
                 engines: list[AsyncEngine] | None = None) -> None:
        self.engine = engine
        self.engines = engines or [engine]
        self.app = app if app is not None else build_app(engine, settings)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 120.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        for e in self.engines:
            if not e.wait_ready(max(1.0, deadline - time.monotonic())):
                raise RuntimeError(f"engine did not become ready: {e.errored!r}")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        for e in self.engines:
            e.shutdown()

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value}."""
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def metric(self, name: str) -> float:
        """The sum of all samples of `name` (over its labels)."""
        return sum(v for k, v in self.metrics().items() if k == name or k.startswith(name + "{"))


def start_tiny_server(tmp_path: str, settings: ServerSettings | None = None, **engine_overrides) -> ServerThread:
    os.makedirs(tmp_path, exist_ok=True)
    engine = AsyncEngine(tiny_config(str(tmp_path), **engine_overrides))
    return ServerThread(engine, settings).start()
