"""What the machine was doing during a benchmark run: load and CPU shares from /proc."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_ticks() -> list[int]:
    """The machine's aggregate CPU ticks from /proc/stat (user ... steal)."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return []


def finish_machine(info: dict) -> None:
    """Load and CPU steal over the run: a busy or stolen-from VM explains odd absolutes."""
    info["loadavg_end"] = os.getloadavg()
    start, end = info.pop("_cpu_ticks_start"), cpu_ticks()
    if start and end:
        delta = [b - a for a, b in zip(start, end, strict=True)]
        total = sum(delta) or 1
        info["cpu_busy_share"] = round(1 - (delta[3] + delta[4]) / total, 3)  # not idle/iowait
        info["cpu_steal_share"] = round(delta[7] / total, 3)
