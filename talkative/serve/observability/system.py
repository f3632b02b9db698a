"""Memory and utilisation figures of the machine the server runs on, for `/api/v2/models/memory` and
`/api/gpu_stats`.

On a GPU: per device, memory allocated and reserved by this process (torch's caching allocator), free and total
on the device (what nvidia-smi shows, all processes), utilisation from NVML when `pynvml` is installed (else
null). On a CPU: the process's resident memory and the machine's available and total RAM (psutil when installed,
else `/proc/meminfo` and `/proc/self/status`), and CPU utilisation since the previous call (`/proc/stat`).
Peak utilisation is the highest reading this server has taken (readings are taken on request).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

GB = 1024**3


def _gb(n: float | None) -> float | None:
    return None if n is None else round(n / GB, 3)


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def _process_rss() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ram() -> dict[str, int | None]:
    """total, available and used RAM of the machine, and this process's resident memory (bytes)."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        total: int | None = int(vm.total)
        available: int | None = int(vm.available)
    except ImportError:
        info = _meminfo()
        total = info.get("MemTotal")
        available = info.get("MemAvailable", info.get("MemFree"))
    used = None if total is None or available is None else total - available
    return {"total": total, "available": available, "used": used, "process": _process_rss()}


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies since boot, from the first line of /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


class SystemStats:
    """Keeps what a reading needs from the previous one (CPU times, peaks); one per app."""

    def __init__(self) -> None:
        self._cpu = _cpu_times()
        self._cpu_at = time.monotonic()
        self.peak: dict[str, float] = {}

    def _peak(self, name: str, value: float | None) -> float | None:
        if value is None:
            return self.peak.get(name)
        self.peak[name] = max(self.peak.get(name, 0.0), value)
        return self.peak[name]

    def cpu_percent(self) -> float | None:
        """CPU utilisation of the whole machine since the previous reading (or since start)."""
        now = _cpu_times()
        if now is None or self._cpu is None:
            return None
        busy, total = now[0] - self._cpu[0], now[1] - self._cpu[1]
        if total <= 0:
            return self.peak.get("cpu_last")
        self._cpu = now
        value = round(100.0 * busy / total, 1)
        self.peak["cpu_last"] = value
        return value

    # -- /api/v2/models/memory ----------------------------------------------------------------------------------
    def memory(self, devices: list[str]) -> dict[str, dict[str, float | None]]:
        """allocated / reserved / free / total GB for each serving device (CPU: the process and the machine)."""
        out: dict[str, dict[str, float | None]] = {}
        for name in devices:
            if name.startswith("cuda") and torch.cuda.is_available():
                index = torch.device(name).index or 0
                free, total = torch.cuda.mem_get_info(index)
                out[name] = {
                    "allocated_gb": _gb(torch.cuda.memory_allocated(index)),
                    "reserved_gb": _gb(torch.cuda.memory_reserved(index)),
                    "free_gb": _gb(free),
                    "total_gb": _gb(total),
                }
            else:
                r = ram()
                out[name] = {
                    "allocated_gb": _gb(r["process"]),
                    "reserved_gb": _gb(r["process"]),
                    "free_gb": _gb(r["available"]),
                    "total_gb": _gb(r["total"]),
                }
        return out

    # -- /api/gpu_stats -----------------------------------------------------------------------------------------
    def gpu_stats(self) -> dict[str, Any]:
        """The seed's shape (top-level figures = the first GPU, all GPUs under `devices`), or `available: false`
        with the CPU's figures."""
        cpu = self._cpu_figures()
        if not torch.cuda.is_available():
            return {"available": False, "devices": {}, "cpu": cpu}
        devices = {}
        for i in range(torch.cuda.device_count()):
            name = f"cuda:{i}"
            free, total = torch.cuda.mem_get_info(i)
            used = total - free
            try:
                util: float | None = float(torch.cuda.utilization(i))
            except Exception:  # needs pynvml (NVML); absent on many installs
                util = None
            devices[name] = {
                "name": torch.cuda.get_device_name(i),
                "utilization": util,
                "memory_used": _gb(used),
                "memory_total": _gb(total),
                "memory_percent": round(100.0 * used / total, 1) if total else None,
                "memory_allocated": _gb(torch.cuda.memory_allocated(i)),
                "memory_reserved": _gb(torch.cuda.memory_reserved(i)),
                "peak_utilization": self._peak(name, util),
            }
        first = devices["cuda:0"]
        return {
            "available": True,
            **{
                k: first[k]
                for k in ("utilization", "memory_used", "memory_total", "memory_percent", "peak_utilization")
            },
            "devices": devices,
            "cpu": cpu,
        }

    def _cpu_figures(self) -> dict[str, Any]:
        r = ram()
        percent = self.cpu_percent()
        try:
            load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            load = None
        return {
            "utilization": percent,
            "peak_utilization": self._peak("cpu", percent),
            "cpu_count": os.cpu_count(),
            "load_average": load,
            "memory_used": _gb(r["used"]),
            "memory_total": _gb(r["total"]),
            "memory_percent": round(100.0 * r["used"] / r["total"], 1) if r["used"] and r["total"] else None,
            "process_memory": _gb(r["process"]),
        }
