"""What this machine's CPU is, from /proc/cpuinfo: its model name and ISA flags (read by the training's precision
choice, the decoding step's per-host tuning and the benchmarks' machine record)."""

import platform
from typing import Optional


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_flags(path: str = "/proc/cpuinfo") -> Optional[set]:
    """The CPU's feature flags (x86 "flags", Arm "Features"), or None where they cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None
