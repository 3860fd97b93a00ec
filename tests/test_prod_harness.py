"""Helpers for the production-layer tests (no tests here): an echo engine whose output is
known in advance (so guardrails can be checked on exact text), a server running the
production layer over real HTTP, and a `redis-server` for the shared-store tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from server.app import build_app
from server.config_file import ProductionConfig
from server.settings import ServerSettings
from server.store import MemoryStore, Store, StoreUnavailable
from tests.test_server_harness import ServerThread, free_port


@dataclass
class _Echo:
    prompt: list[int]
    params: Any
    kwargs: dict
    generated: list[int] = field(default_factory=list)


class EchoEngine:
    """A stand-in for `LLMEngine` that generates its prompt back, one token per step (and
    cycles through it with `ignore_eos` until max_tokens). Records every request's kwargs."""

    def __init__(self, tokenizer: Any, name: str = "echo", max_model_len: int = 512,
                 step_delay: float = 0.01) -> None:
        self.tokenizer = tokenizer
        self.model_name = name
        self.max_model_len = max_model_len
        self.step_delay = step_delay
        self.requests: dict[str, _Echo] = {}
        self.added: list[tuple[str, dict]] = []  # (request id, kwargs) of every request

    def add_request(self, request_id: str, prompt: list[int], params: Any, **kwargs: Any) -> None:
        if any(t >= len(self.tokenizer) for t in prompt):  # refused before queueing, as LLMEngine does
            raise ValueError(f"prompt token ids must be in [0, {len(self.tokenizer)})")
        self.requests[request_id] = _Echo(list(prompt), params, kwargs)
        self.added.append((request_id, kwargs))

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.requests))

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_delay)
        outputs = []
        for rid, r in list(self.requests.items()):
            r.generated.append(r.prompt[len(r.generated) % len(r.prompt)])
            done_echo = len(r.generated) >= len(r.prompt) and not r.params.ignore_eos
            reason = "length" if len(r.generated) >= r.params.max_tokens else ("stop" if done_echo else None)
            text = self.tokenizer.decode(r.generated)
            choices = [CompletionOutput(i, text, list(r.generated), reason) for i in range(r.params.n)]
            outputs.append(RequestOutput(rid, None, r.prompt, choices, reason is not None,
                                         RequestMetrics(arrival_time=r.kwargs.get("arrival_time", time.time())),
                                         num_cached_tokens=0))
            if reason is not None:
                del self.requests[rid]
        return outputs


def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from tests.checkpoints import smollm2_tokenizer_dir

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())


def echo_engine(name: str = "echo", step_delay: float = 0.01) -> AsyncEngine:
    tok = smollm2_tokenizer()
    return AsyncEngine(engine_factory=lambda: EchoEngine(tok, name, step_delay=step_delay))


class ProdServer(ServerThread):
    """uvicorn on a free loopback port serving `build_app(..., production=...)`. `admin_key`
    (an admin tenant's key) lets `metric` read the tenant series of /admin/metrics too."""

    def __init__(self, engine: AsyncEngine, production: ProductionConfig,
                 engines: dict[str, AsyncEngine] | None = None, store: Store | None = None,
                 settings: ServerSettings | None = None, admin_key: str | None = None,
                 unavailable_models: dict[str, str] | None = None) -> None:
        app = build_app(engine, settings, production=production, engines=engines, store=store,
                        unavailable_models=unavailable_models)
        super().__init__(engine, app=app, engines=[engine, *(engines or {}).values()])
        self.admin_key = admin_key

    def metric(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (from /metrics, and from
        /admin/metrics when the server has an admin key)."""
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        if self.admin_key is not None:
            text += httpx.get(self.base_url + "/admin/metrics", timeout=10,
                              headers={"Authorization": f"Bearer {self.admin_key}"}).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                key, _, value = line.rpartition(" ")
                if all(f'{k}="{v}"' in key for k, v in labels.items()):
                    total += float(value)
        return total


class FlakyStore:
    """A MemoryStore whose every call raises StoreUnavailable while `down` (and whose
    `healthy` says so), for outage tests without Redis."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.observer = self.inner.observer
        self.down = False

    @property
    def healthy(self) -> bool:
        return not self.down

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                self.observer.on_error(name)  # as RedisStore does
                raise StoreUnavailable(name)
            return await method(*args, **kwargs)
        return call


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen | None = None
    workdir: str | None = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def redis_server() -> RedisServer:
    """The Redis at $CONVEYOR_TEST_REDIS_URL, else a `redis-server` started here on a free
    loopback port (no persistence). Without one: a failure on CI ($CI set), a skip elsewhere."""
    url = os.environ.get("CONVEYOR_TEST_REDIS_URL")
    if url:
        return RedisServer(url)
    binary = shutil.which("redis-server")
    if binary is None:
        message = ("redis-server is not installed and CONVEYOR_TEST_REDIS_URL is unset: install the "
                   "Debian package (apt-get install -y redis-server) or point the variable at a Redis")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="conveyor-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(f"redis://127.0.0.1:{port}/0", proc, workdir)
    import redis

    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis.from_url(server.url).ping()
            return server
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                server.stop()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
