"""What every benchmark records about the machine and the code: the CPU model, cores and load average (BENCHMARKS.md
says nothing else about the machine), and the commit its rows ran. Underscored so that run_all.py does not take it for a benchmark."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> tuple[float, float, float]:
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def commit() -> str | None:
    """The short hash of this checkout's HEAD (None outside a git checkout)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev or None


def rss() -> int:
    """This process's resident set size in bytes. /proc on Linux (standard library only, so that scripts running in
    another project's environment, llm-compressor's, measure it the same way), psutil elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples this process's RSS in a thread while the block runs; `peak` is the maximum seen, the values at
    entry and exit included (a spike shorter than `interval` between two samples can be missed)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak = interval, rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
