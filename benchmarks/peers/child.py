"""Runs one in-process system on one workload in this (fresh) process and writes its
`RunResult` as JSON, with the process's peak resident memory.

    python -m benchmarks.peers.child SYSTEM MODEL_DIR WORKLOAD_JSON OUT_JSON --threads 2 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import sys

from benchmarks.workloads import Workload

SYSTEMS = ("conveyor", "conveyor-static", "conveyor-blas", "conveyor-onednn", "hf-static", "hf-continuous")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: that survives exec, so a
    child would inherit the high-water mark of the parent it was forked from."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def run_system(system: str, model_dir: str, workload: Workload, threads: int, dtype: str, opts: dict):
    if system in ("conveyor", "conveyor-static", "conveyor-blas", "conveyor-onednn"):
        from benchmarks.peers import conveyor

        # conveyor-blas: the linear layers through torch's BLAS GEMM instead of packed oneDNN
        # conveyor-onednn: every projection through oneDNN (auto picks the own "cpu" GEMM where it builds)
        linear = {"conveyor-blas": "torch", "conveyor-onednn": "onednn"}.get(system, "auto")
        return conveyor.run(model_dir, workload, threads, dtype, static=system == "conveyor-static",
                            linear_backend=linear, **opts)
    if system == "hf-static":
        from benchmarks.peers import hf_static

        return hf_static.run(model_dir, workload, threads, dtype, **opts)
    if system == "hf-continuous":
        from benchmarks.peers import hf_continuous

        return hf_continuous.run(model_dir, workload, threads, dtype, **opts)
    raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("system", choices=SYSTEMS)
    p.add_argument("model_dir", help="checkpoint dir, or 'default' for the engine's default model (Conveyor only)")
    p.add_argument("workload_json")
    p.add_argument("out_json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--opts", default="{}", help="JSON dict of extra keyword arguments for the system")
    a = p.parse_args(argv)
    with open(a.workload_json) as f:
        workload = Workload.from_json(f.read())
    model_dir = None if a.model_dir == "default" else a.model_dir
    result = run_system(a.system, model_dir, workload, a.threads, a.dtype, json.loads(a.opts))
    result.peak_mem_bytes = peak_rss_bytes()
    with open(a.out_json, "w") as f:
        json.dump(result.to_dict(), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
