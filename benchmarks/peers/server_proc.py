"""Starts an HTTP server as a child process, waits until it answers, tracks its peak memory
and stops it (with every process it spawned).

`ServerProcess(cmd, base_url, env=...)` is a context manager. Peak memory is the sum of the
peak resident set sizes (`VmHWM` in /proc) of the server and all its descendants, read just
before the server is stopped: an upper bound when children share pages, the same rule for every
system.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import psutil


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm_hwm_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ServerProcess:
    """A server child process. Guarantees: on exit from the `with` block the whole process
    group is gone; `peak_mem_bytes` holds the tree's peak RSS seen at the last `sample_memory`."""

    def __init__(self, cmd: list[str], base_url: str, env: dict | None = None, log_path: str | None = None,
                 health_path: str = "/v1/models", startup_timeout: float = 600.0):
        self.cmd, self.base_url, self.health_path = cmd, base_url.rstrip("/"), health_path
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or os.devnull
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.peak_mem_bytes = 0
        self.startup_s = 0.0

    def __enter__(self) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        # own process group, so stopping it reaches workers the server spawned
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                self._close()
                raise RuntimeError(f"server exited with code {self.proc.returncode} during startup; "
                                   f"log: {self.log_path}")
            try:
                if httpx.get(self.base_url + self.health_path, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                self._close()
                raise TimeoutError(f"server not ready after {self.startup_timeout:.0f}s; log: {self.log_path}")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - t0
        return self

    def sample_memory(self) -> int:
        """Updates and returns `peak_mem_bytes` (sum of VmHWM over the process tree)."""
        if self.proc is None:
            return 0
        try:
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return self.peak_mem_bytes
        self.peak_mem_bytes = max(self.peak_mem_bytes, sum(_vm_hwm_bytes(p.pid) for p in procs))
        return self.peak_mem_bytes

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server and its live descendants so far."""
        if self.proc is None:
            return 0.0
        try:
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def __exit__(self, *exc) -> None:
        self.sample_memory()
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self._log.close()
