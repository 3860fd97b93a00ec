#!/usr/bin/env bash
# Simulator fidelity, the whole check in one command (issue 17): calibrate the cost model on
# this host, then run the real engine and the simulator on the same traces (4 workloads x 2
# policies) with the same thread count. Run it on an idle machine; both steps record the load
# detector's verdict (load average, reference matmul before/after), and the validation refuses
# to start on a loaded machine unless FORCE=1.
#   benchmarks/validate_idle.sh [OUT_DIR]        (THREADS=1 REQUESTS=20 FORCE=0 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/out}
threads=${THREADS:-1}
mkdir -p "$out"
python -m benchmarks.calibrate --num-threads "$threads" --repeats 3 --out "$out/cost_model.json"
python -m benchmarks.validate --num-threads "$threads" --cost-model "$out/cost_model.json" \
    --policies fcfs,slo --num-requests "${REQUESTS:-20}" --report "$out/validation.json" \
    $([ "${FORCE:-0}" = 1 ] && echo --force)
