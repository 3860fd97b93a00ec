"""Builds and loads the C++ CPU kernels (`csrc/*.cpp`: paged attention, fused elementwise ops)
as one extension on first use.

The extension is compiled with `torch.utils.cpp_extension.load` for the host's ISA
(`-O3 -march=native`, OpenMP) into a cache folder keyed by the torch version, the source and the
CPU's model and flags, so a later process (or a machine with another CPU sharing the folder)
never loads code built for a different host. Compiling needs a C++ compiler and ninja (the
`ninja` PyPI package is enough); it takes ~20 s once on two cores, then loading takes milliseconds.

The sources are compiled as UNITY_GROUPS translation units that each `#include` a fixed share of
them (written into the build folder), not one unit per file: most of a unit's compile time is
parsing torch's headers, so nine units took 54 s on two cores and two take 20 s. The sources
therefore keep their file-local names distinct (every file can share a unit with every other).

Guarantees: `cpu_ops_available()` is True only when the ops are registered under
`torch.ops.conveyor_cpu`; on any failure it logs the reason once and returns False, and callers
use the plain-torch path instead.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "paged_attention.cpp", CSRC / "kv_cache_write.cpp", CSRC / "fused_ops.cpp", CSRC / "rms_norm.cpp",
           CSRC / "cpu_gemm.cpp", CSRC / "greedy_prepare.cpp", CSRC / "greedy_screen.cpp", CSRC / "cpu_gemm_gate_up.cpp",
           CSRC / "int8_gemm.cpp", CSRC / "q4_gemm.cpp")
HEADERS = (CSRC / "vec8.h", CSRC / "torch_sum_order.h", CSRC / "attention_vec.h", CSRC / "attention_tile.h",
           CSRC / "attention_scores_decode.h", CSRC / "attention_scores_prefill.h", CSRC / "silu8.h",
           CSRC / "cpu_gemm_tile.h")  # part of the build's cache key
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-Wno-unused-function")
UNITY_GROUPS = 2  # fixed, so the code built does not depend on the host's core count


def _cpu_fingerprint() -> str:
    """The CPU's model name and feature flags (what -march=native compiles for)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features", "CPU part") and key not in lines:
            lines[key] = value.strip()
    return repr(sorted(lines.items()))


def build_directory() -> Path:
    """Where the compiled extension lives: $CONVEYOR_KERNEL_CACHE, else ~/.cache/conveyor/kernels."""
    root = os.environ.get("CONVEYOR_KERNEL_CACHE") or Path.home() / ".cache" / "conveyor" / "kernels"
    return Path(root)


def _build_name(sources, cflags) -> str:
    digest = hashlib.sha256()
    for part in (torch.__version__, platform.machine(), _cpu_fingerprint(), " ".join(cflags)):
        digest.update(part.encode())
    for src in (*sources, *HEADERS):
        digest.update(Path(src).read_bytes())
    return f"conveyor_cpu_{digest.hexdigest()[:16]}"


def _ensure_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the PyPI wheel puts it next to the interpreter,
    which is not on PATH when the venv's python is run without activating the venv."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_and_load(sources=SOURCES, cflags=CFLAGS, root: Path | None = None) -> bool:
    """Compiles `sources` (or reuses the build cached under `root`) and loads the library into
    the process. Returns False, with the reason logged as a warning, if anything fails."""
    try:
        from torch.utils import cpp_extension

        _ensure_ninja_on_path()
        name = _build_name(sources, cflags)
        out_dir = (root or build_directory()) / name
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_lock(out_dir)
        if not any(out_dir.glob("*.so")):
            log.info("building the CPU kernels (attention, fused elementwise ops) for this host into %s "
                     "(once, ~30-60 s)", out_dir)
        cpp_extension.load(name=name, sources=_unity_sources(sources, out_dir), extra_cflags=list(cflags),
                           extra_ldflags=["-fopenmp"], build_directory=str(out_dir), is_python_module=False,
                           verbose=False)
    except Exception as exc:  # no compiler, ninja or headers; a build error
        lines = str(exc).strip().splitlines()
        log.warning("CPU kernels unavailable, using the plain-torch attention path and elementwise ops: %s",
                    lines[-1] if lines else type(exc).__name__)
        return False
    return True


def _unity_sources(sources, out_dir: Path) -> list[str]:
    """Writes UNITY_GROUPS files into `out_dir`, each including a share of `sources` (balanced by
    size, in a fixed order), and returns their paths."""
    groups: list[list[Path]] = [[] for _ in range(min(UNITY_GROUPS, len(sources)))]
    sizes = [0] * len(groups)
    for src in sorted((Path(s).resolve() for s in sources), key=lambda p: (-p.stat().st_size, p.name)):
        i = sizes.index(min(sizes))
        groups[i].append(src)
        sizes[i] += src.stat().st_size
    paths = []
    for i, group in enumerate(groups):
        unit = out_dir / f"unity_{i}.cpp"
        text = "".join(f'#include "{src}"\n' for src in group)
        if not unit.exists() or unit.read_text() != text:  # unchanged: ninja keeps its object
            # via a rename: a process building beside this one (a parallel test worker, a second
            # server) never compiles a half-written unit
            tmp = unit.with_name(f".{unit.name}.{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, unit)
        paths.append(str(unit))
    return paths


STALE_LOCK_S = 600.0


def _remove_stale_lock(out_dir: Path) -> None:
    """torch's builder serialises processes with a `lock` file and waits for it without a
    timeout; one left by a process killed mid-build would hang every later start."""
    lock = out_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            log.warning("removed a stale build lock %s", lock)
    except OSError:
        pass


@functools.lru_cache(maxsize=1)
def cpu_ops_available() -> bool:
    """True when the `torch.ops.conveyor_cpu` ops (paged attention, the fused elementwise ops of
    `fused_ops.cpp`) are usable, building them on first use on this host; False (logged once per
    process) when they cannot be built."""
    if not _registered() and not build_and_load():
        return False
    if not _registered():
        log.warning("CPU kernels built but their ops did not register; using the plain-torch path")
        return False
    return True


# Every op the sources register: a build cached from older sources lacks some of them.
OPS = ("paged_attention", "write_kv_cache", "rms_norm", "add_rms_norm", "rotary_", "silu_and_mul", "int8_gemm")


def _registered() -> bool:
    return all(hasattr(torch.ops.conveyor_cpu, op) for op in OPS)
