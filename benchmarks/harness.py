"""What every benchmark script needs: the machine's state, a quiet moment, a port, a database.

Each script measures its figure against a baseline in the same run; these
helpers record what the machine was doing meanwhile, so an odd figure can be
told apart from a busy machine.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from nurture.db import scratch_database

ROOT = Path(__file__).resolve().parents[1]
#: The servers every benchmark talks to; Redis database 12 is flushed.
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")


def machine() -> dict:
    """The machine, the code measured, and the load and CPU counters at the start."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "code": code_state(),
        "loadavg_start": os.getloadavg(),
        "_cpu_ticks_start": cpu_ticks(),
    }


def finish_machine(info: dict) -> None:
    """Load and CPU steal over the run: a busy or stolen-from VM explains odd absolutes."""
    info["loadavg_end"] = os.getloadavg()
    start, end = info.pop("_cpu_ticks_start"), cpu_ticks()
    if start and end:
        delta = [b - a for a, b in zip(start, end, strict=True)]
        total = sum(delta) or 1
        info["cpu_busy_share"] = round(1 - (delta[3] + delta[4]) / total, 3)  # not idle/iowait
        info["cpu_steal_share"] = round(delta[7] / total, 3)


def cpu_ticks() -> list[int]:
    """The machine's aggregate CPU ticks from /proc/stat (user ... steal)."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return []


def code_state() -> dict:
    """The commit measured, and product files that differed from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "modified": git("status", "--porcelain", "--", "nurture", "worker.py").splitlines(),
    }


def wait_for_quiet(max_load: float, timeout: float = 300) -> dict:
    """Wait until the 1-minute load average is below `max_load` (or give up)."""
    started = time.monotonic()
    load = os.getloadavg()[0]
    while load >= max_load and time.monotonic() - started < timeout:
        print(f"  load {load:.2f} >= {max_load}; waiting…", flush=True)
        time.sleep(15)
        load = os.getloadavg()[0]
    return {
        "load_1min": round(load, 2),
        "quiet": load < max_load,
        "waited_s": round(time.monotonic() - started, 1),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_database(base_url: str) -> tuple[str, callable]:
    """An empty PostgreSQL database next to `base_url`'s, and a function that drops it."""
    return scratch_database(base_url, "nurture_bench")


def delete_queue(queue: str) -> None:
    """Remove a benchmark's queue, and kombu's record of its bindings, from Redis."""
    redis.Redis.from_url(REDIS_URL).delete(
        queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
    )
