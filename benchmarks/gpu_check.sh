#!/usr/bin/env bash
# One-shot GPU check for an H100/H200: kernel tests compiled for real, kernel timings, engine
# throughput. Run from anywhere: `bash benchmarks/gpu_check.sh`. Writes logs and JSON under
# ${OUT:-benchmarks/out} and prints a summary table last. Each part has its own time limit and
# a failing part does not stop the others. Total budget: under 8 minutes.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export OUT
unset TRITON_INTERPRET                  # real compilation, not the interpreter
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

part() {  # part NAME LIMIT_SECONDS CMD...: runs CMD with a timeout, logs to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local verdict=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then verdict="TIMEOUT"; elif [ "$rc" != 0 ]; then verdict="FAILED(rc=$rc)"; fi
    printf '%-14s %-14s %4ss\n' "$name" "$verdict" "$((SECONDS - start))" >>"$SUMMARY"
    [ "$verdict" = ok ] || echo "$name FAILED ($verdict)"
}

# 1. environment: install nothing; report what is there
part env 60 $PY - <<'PYEOF' || echo FAILED
import torch
print("python torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("TRITON MISSING:", e)
for mod in ("transformers", "pytest", "xdist"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "missing:", e)
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

# 2. kernel tests on CUDA (fp32/fp16/bf16, bigger cases); parallel compiles when xdist exists
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
if [ -z "${SKIP_TESTS:-}" ]; then  # SKIP_TESTS=1 when device time is short and the tests already passed
  part tests 150 $PY -m pytest tests/test_kernels.py tests/test_lora_kernels.py -q -p no:cacheprovider $XDIST || echo FAILED
fi

# 3. kernel timings
part kernels 120 $PY -m benchmarks.gpu_kernels --out "$OUT/gpu_kernels.json" || echo FAILED

# 3b. multi-LoRA kernels: Triton vs torch path, checked against a float32 reference, then timed
part lora 60 $PY -m benchmarks.gpu_lora --out "$OUT/gpu_lora.json" || echo FAILED

# 4. engine throughput (needs the engine API; fails with a clear message if absent)
part engine 180 $PY -m benchmarks.gpu_engine --out "$OUT/gpu_engine.json" || echo FAILED

# summary table
echo
echo "==================== summary ===================="
cat "$SUMMARY"
grep -E "passed|failed|error" "$OUT/tests.log" 2>/dev/null | tail -1
$PY - "$OUT" <<'PYEOF' || true
import json, os, sys
out = sys.argv[1]
try:
    k = json.load(open(os.path.join(out, "gpu_kernels.json")))
    c = k["ceilings"]
    print(f"ceilings: copy {c['bandwidth_GBps']:.0f} GB/s, bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    for r in k["results"]:
        print(f"  {r['name']:28s} {r['impl']:20s} {r['ms']:8.3f} ms {r['value']:8.1f} {r['metric']:7s} {100 * r['fraction_of_ceiling']:5.1f}%")
except Exception as e:
    print("no kernel results:", e)
try:
    for r in json.load(open(os.path.join(out, "gpu_lora.json")))["results"]:
        print(f"  lora {r['name']:18s} triton {r['triton_us']:8.1f} us  torch {r['torch_us']:8.1f} us  "
              f"{r['triton_GBps']:7.1f} GB/s  err {r['rel_err']:.1e}{'' if r['ok'] else '  MISMATCH'}")
except Exception as e:
    print("no lora kernel results:", e)
try:
    e = json.load(open(os.path.join(out, "gpu_engine.json")))
    for r in e["results"]:
        mode = "" if "enforce_eager" not in r else (" eager" if r["enforce_eager"] else " graphs")
        frac = f"  {100 * r['fraction_of_bandwidth_limit']:.1f}% of BW limit" if "fraction_of_bandwidth_limit" in r else ""
        print(f"  {r['impl'] + mode:20s} batch {r['batch']:4d}: {r['tokens_per_s']:9.1f} tok/s{frac}")
    for err in e["errors"]:
        print("  engine error:", err[:200])
except Exception as ex:
    print("no engine results:", ex)
PYEOF
