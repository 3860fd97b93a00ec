"""`conveyor serve` with no model (the default SmolLM2 GGUF): /health, then one completion;
`conveyor generate` prints a completion. Run as `python -m engine.cli`, the console script's
entry point, so the test does not depend on the package being pip-installed."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from tests.test_server_harness import free_port, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serve_default_model_smoke():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", str(port),
                             "--max-num-seqs", "4", "--kv-cache-memory", "64MiB", "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(base + "/health", timeout=5).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, proc.stdout.read().decode() if proc.poll() is not None else "not healthy in time"
        models = httpx.get(base + "/v1/models", timeout=10).json()["data"]
        assert models[0]["id"] == "SmolLM2-135M-Instruct"
        r = httpx.post(base + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "SmolLM2-135M-Instruct"
        assert "Paris" in body["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_generate_prints_completion(tmp_path):
    config = tiny_config(str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--model", config.model,
                          "--prompt", "Hello", "--max-tokens", "4", "--dtype", "float32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()


def test_bad_option_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--prompt", "x",
                          "--kv-cache-memory", "lots"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "kv-cache-memory" in out.stderr and "Traceback" not in out.stderr
