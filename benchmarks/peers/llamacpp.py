"""llama.cpp's `llama-server` with parallel slots and continuous batching, driven over HTTP.

The HF checkpoint is converted once to a GGUF of the same dtype with llama.cpp's own
`convert_hf_to_gguf.py` (found beside the build: `<llama.cpp>/build/bin/llama-server`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from benchmarks.peers.openai_http import completion_request, run_http
from benchmarks.peers.server_proc import ServerProcess, free_port
from benchmarks.stats import RunResult
from benchmarks.workloads import Workload

ENV_VAR = "LLAMA_SERVER"
DEFAULT_PATH = "/opt/peers/llama.cpp/build/bin/llama-server"
CONVERT_PYTHON_ENV = "LLAMA_CONVERT_PYTHON"


def find_server(explicit: str | None = None) -> str | None:
    for cand in (explicit, os.environ.get(ENV_VAR), DEFAULT_PATH, shutil.which("llama-server")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def skip_reason(explicit: str | None = None) -> str | None:
    if find_server(explicit) is None:
        return (f"llama-server not found (pass --llama-server, set {ENV_VAR}, or build it at {DEFAULT_PATH}; "
                "see benchmarks/RESULTS.md)")
    return None


def convert_to_gguf(model_dir: str, server: str, out_path: str, dtype: str) -> str:
    """`out_path`, converting `model_dir` first when it does not exist yet."""
    if os.path.exists(out_path):
        return out_path
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(server))))
    script = os.path.join(root, "convert_hf_to_gguf.py")
    if not os.path.exists(script):
        raise FileNotFoundError(f"{script} not found: llama-server is expected at <llama.cpp>/build/bin/")
    outtype = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}[dtype]
    # the converter imports sentencepiece for Llama vocabularies: any Python that has it will do
    python = os.environ.get(CONVERT_PYTHON_ENV, sys.executable)
    proc = subprocess.run([python, script, model_dir, "--outfile", out_path + ".tmp", "--outtype", outtype],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({tail[0]}); set {CONVERT_PYTHON_ENV} to a Python "
                           "with sentencepiece and numpy (e.g. the vLLM venv's)")
    os.replace(out_path + ".tmp", out_path)
    return out_path


def run(model_dir: str, workload: Workload, threads: int, dtype: str, server: str, work_dir: str,
        parallel: int = 64) -> RunResult:
    """All requests at once to a server with `parallel` slots, each slot holding the longest
    request of the workload."""
    gguf = convert_to_gguf(model_dir, server, os.path.join(work_dir, f"model-{dtype}.gguf"), dtype)
    slots = min(parallel, len(workload.requests))
    per_slot = -(-workload.max_seq_len // 256) * 256 + 256
    port = free_port()
    cmd = [server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads),
           "-np", str(slots), "-cb", "-c", str(slots * per_slot), "--no-warmup"]
    base = f"http://127.0.0.1:{port}"
    with ServerProcess(cmd, base, log_path=os.path.join(work_dir, "llama-server.log"),
                       health_path="/health") as srv:
        warm = [completion_request("bench", list(workload.requests[0].prompt_ids[:16]), 4)]
        run_http(base, warm)
        reqs = [completion_request("bench", list(r.prompt_ids), r.output_len) for r in workload.requests]
        c0 = srv.cpu_seconds()
        records, wall = run_http(base, reqs)
        cpu = srv.cpu_seconds() - c0
        srv.sample_memory()
    return RunResult("llama.cpp-server", workload.name, wall, records, peak_mem_bytes=srv.peak_mem_bytes,
                     notes={"parallel": slots, "ctx": slots * per_slot, "startup_s": round(srv.startup_s, 1),
                            "cpu_s": round(cpu, 3)})
