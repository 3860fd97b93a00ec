"""The `conveyor` command, run as `python -m conveyor` (what the console script calls), so the
tests do not depend on the package being pip-installed:
- `serve` with no model (the default SmolLM2 GGUF) logs its progress and one `ready:` line,
  then answers /health and a completion; no Python warnings at start;
- a model that cannot load ends `serve` with a non-zero exit and the reason; a config model
  marked `optional` that cannot load is reported, and the rest is served;
- `generate` prints a completion; bad options are clear errors; every flag has help text."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import httpx

from conveyor.cli import build_parser
from engine.startup import cpu_has_fast_bf16
from tests.test_server_harness import free_port, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Served:
    """`python -m conveyor serve ARGS` on a free port; its output lines are collected as they come."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "conveyor", "serve", "--port", str(self.port), *args],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> str:
        """The first output line holding `text`; fails with the output when the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            assert self.proc.poll() is None or self._reader.is_alive(), f"exited {self.proc.returncode}:\n{self.output}"
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_serve_default_model_says_what_it_does_then_answers():
    served = Served("--max-num-seqs", "4", "--kv-cache-memory", "64MiB")
    try:
        ready = served.wait_for("ready: ", timeout=300)
        dtype = "bfloat16" if cpu_has_fast_bf16()[0] else "float32"
        assert f"model SmolLM2-135M-Instruct, dtype {dtype}, " in ready
        assert f"listening on http://127.0.0.1:{served.port}" in ready and "KV blocks (" in ready
        out = served.output
        for progress in ("dtype: ", "CPU threads: ", "loading weights: ", "weights loaded: ", "KV cache: ",
                         "warm-up: "):
            assert progress in out, f"no {progress!r} line:\n{out}"
        assert out.index("weights loaded: ") < out.index("warm-up: ") < out.index("ready: ")
        assert "Warning:" not in out and "deprecated" not in out.lower() and "Traceback" not in out, out
        assert httpx.get(served.base + "/health", timeout=10).status_code == 200
        models = httpx.get(served.base + "/v1/models", timeout=10).json()["data"]
        assert models[0]["id"] == "SmolLM2-135M-Instruct"
        r = httpx.post(served.base + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        served.stop()


def test_serve_exits_nonzero_when_the_model_cannot_load(tmp_path):
    out = subprocess.run([sys.executable, "-m", "conveyor", "serve", "--model", str(tmp_path / "nope"),
                          "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "does not exist" in out.stderr and "nope" in out.stderr and "Traceback" not in out.stderr

    (tmp_path / "c.toml").write_text(f'[[models]]\nname = "gone"\npath = "{tmp_path / "nope"}"\n')
    out = subprocess.run([sys.executable, "-m", "conveyor", "serve", "--config", str(tmp_path / "c.toml"),
                          "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "gone" in out.stderr and "does not exist" in out.stderr, out.stderr


def test_optional_config_model_that_fails_is_reported_and_the_rest_served(tmp_path):
    tiny = tiny_config(str(tmp_path / "tiny")).model
    (tmp_path / "c.toml").write_text(
        f'[[models]]\nname = "tiny"\npath = "{tiny}"\ndtype = "float32"\n'
        f'engine = {{ num_blocks = 64, max_model_len = 256 }}\n\n'
        f'[[models]]\nname = "gone"\npath = "{tmp_path / "nope"}"\noptional = true\n')
    served = Served("--config", str(tmp_path / "c.toml"))
    try:
        ready = served.wait_for("ready: ", timeout=240)
        assert "model tiny, dtype float32, 64 KV blocks (1024 tokens)" in ready and "unavailable: gone" in ready
        assert "optional model gone is unavailable" in served.output and "does not exist" in served.output
        health = httpx.get(served.base + "/health", timeout=10).json()
        assert "gone" in str(health), health
        ids = [m["id"] for m in httpx.get(served.base + "/v1/models", timeout=10).json()["data"]]
        assert "tiny" in ids
    finally:
        served.stop()


def test_generate_prints_completion(tmp_path):
    config = tiny_config(str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "conveyor", "generate", "--model", config.model,
                          "--prompt", "Hello", "--max-tokens", "4", "--dtype", "float32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()
    assert "dtype: float32 (asked for)" in out.stderr


def test_bad_option_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "conveyor", "generate", "--prompt", "x",
                          "--kv-cache-memory", "lots"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "kv-cache-memory" in out.stderr and "Traceback" not in out.stderr


def test_every_flag_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"conveyor {name} {action.option_strings or action.dest} has no help text"
    serve = subparsers.choices["serve"]
    flags = {s for a in serve._actions for s in a.option_strings}
    assert {"--generation-config", "--shutdown-timeout", "--dtype", "--num-threads"} <= flags


def test_engine_does_not_import_server_or_the_cli():
    code = ("import sys, engine.llm_engine, engine.async_engine, engine.llm; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('server', 'conveyor')]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_example_config_starts_a_working_server():
    """docs/conveyor.example.toml as shipped: every model loads, its example keys work."""
    served = Served("--config", os.path.join(ROOT, "docs", "conveyor.example.toml"))
    try:
        ready = served.wait_for("ready: ", timeout=300)
        assert "model smollm2-135m, " in ready and "model smollm2-135m-long, " in ready
        assert "unavailable" not in ready and "Traceback" not in served.output
        r = httpx.post(served.base + "/v1/chat/completions", timeout=120,
                       headers={"Authorization": "Bearer sk-acme-example"},
                       json={"model": "auto", "max_tokens": 8, "temperature": 0,
                             "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        assert httpx.post(served.base + "/v1/completions", timeout=60,
                          headers={"Authorization": "Bearer sk-free-example"},
                          json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 2}).status_code == 200
        usage = httpx.get(served.base + "/v1/usage", timeout=30, headers={"Authorization": "Bearer sk-ops-example"})
        assert usage.status_code == 200 and usage.json()["data"], usage.text
    finally:
        served.stop()
