"""GPU figures for /metrics, only where they exist: per CUDA device, the memory torch has
allocated (`conveyor_gpu_memory_used_bytes`), and through NVML (`nvidia-ml-py`, imported only
if it is installed; its module is `pynvml`) the device's utilization
(`conveyor_gpu_utilization_percent`) and memory used and total by every process
(`conveyor_gpu_device_memory_used_bytes`, `conveyor_gpu_device_memory_total_bytes`). Without
CUDA or NVML the series are simply absent; a scrape never fails because of them."""
from __future__ import annotations

import logging
from typing import Any

from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger("conveyor.server")


def _nvml() -> Any:
    """The initialised pynvml module, or None (not installed, no driver, no GPU)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        return pynvml if pynvml.nvmlDeviceGetCount() > 0 else None
    except Exception:  # noqa: BLE001 - NVML present without a usable driver or device
        return None


class GpuCollector:
    """A prometheus collector; NVML is initialised once, when the collector is built."""

    def __init__(self) -> None:
        self._nvml = _nvml()

    def collect(self):
        yield from _torch_memory()
        if self._nvml is None:
            return
        nv = self._nvml
        util = GaugeMetricFamily("conveyor_gpu_utilization_percent",
                                 "GPU utilization over the driver's last sample period (NVML).", labels=["device"])
        used = GaugeMetricFamily("conveyor_gpu_device_memory_used_bytes",
                                 "GPU memory in use by all processes (NVML).", labels=["device"])
        total = GaugeMetricFamily("conveyor_gpu_device_memory_total_bytes", "GPU memory (NVML).", labels=["device"])
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([str(i)], nv.nvmlDeviceGetUtilizationRates(handle).gpu)
                used.add_metric([str(i)], mem.used)
                total.add_metric([str(i)], mem.total)
        except Exception:  # noqa: BLE001 - a GPU that fell off the bus must not fail the scrape
            logger.warning("NVML query failed", exc_info=True)
            return
        yield from (util, used, total)


def _torch_memory():
    import torch

    if not torch.cuda.is_available():
        return
    mem = GaugeMetricFamily("conveyor_gpu_memory_used_bytes", "GPU memory allocated by torch.", labels=["device"])
    for i in range(torch.cuda.device_count()):
        mem.add_metric([str(i)], torch.cuda.memory_allocated(i))
    yield mem
