"""Where the prune stage's system time goes: one `prune()` call under a glibc malloc setting (issue 26).

Runs Wanda 50% on SmolLM2-135M (`runs/smollm2-hf` and `runs/calib_ids.safetensors`, made by
`benchmarks/pruning_peers.py`) with the `prunetune prune` command's calibration batch (4) at torch's default
threads, after applying MODE, and prints one JSON line: wall, user and system CPU seconds and page faults of
the call (getrusage, all threads) and its peak RSS (sampled every 20 ms). Page-fault counts do not depend on the
machine's load; wall and user seconds do. Underscored so that run_all.py does not take it for a benchmark.

MODE is comma-separated: `cli` (what the command does: `calibrate.bound_heap_growth`; the rows of
`pruning_sys_time_probe.json` named `cli` ran its earlier setting, a fixed 1 MiB mmap threshold, now `mmap=1`), `none` (glibc's defaults), `mmap=MIB` (fixed M_MMAP_THRESHOLD), `trim=MIB` (M_TRIM_THRESHOLD),
`notrim` (no `malloc_trim` between blocks).

    PYTHONPATH=src python benchmarks/_malloc_probe.py cli --nsamples 8 >> probe.jsonl
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import time
from pathlib import Path

from _machine import PeakRSS, rss

ROOT = Path(__file__).resolve().parents[1]
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--nsamples", type=int, default=32)
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    import prunetune.pruning.calibrate as cal
    from prunetune.models.loading import load_model
    from prunetune.pruning.api import prune

    libc = ctypes.CDLL("libc.so.6")
    for part in args.mode.split(","):
        if part == "cli":
            cal.bound_heap_growth()
        elif part.startswith("mmap="):
            libc.mallopt(M_MMAP_THRESHOLD, int(float(part[5:]) * 2**20))
        elif part.startswith("trim="):
            libc.mallopt(M_TRIM_THRESHOLD, int(float(part[5:]) * 2**20))
        elif part == "notrim":
            cal.release_freed_memory = lambda: None
        elif part != "none":
            raise SystemExit(f"unknown mode {part}")
    loaded = load_model(str(ROOT / "runs" / "smollm2-hf"), "causal-lm")
    ids = load_file(str(ROOT / "runs" / "calib_ids.safetensors"))["input_ids"][: args.nsamples]
    r0, before = resource.getrusage(resource.RUSAGE_SELF), rss()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        prune(loaded.model, args.method, 0.5, calib=ids, progress=False, batch_size=4)
        wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"mode": args.mode, "method": args.method, "nsamples": args.nsamples, "wall": round(wall, 2),
                      "user": round(r1.ru_utime - r0.ru_utime, 2), "sys": round(r1.ru_stime - r0.ru_stime, 2),
                      "minflt": r1.ru_minflt - r0.ru_minflt, "majflt": r1.ru_majflt - r0.ru_majflt,
                      "peak_mib": round(peak.peak / 2**20), "added_mib": round((peak.peak - before) / 2**20),
                      "threads": torch.get_num_threads(), "load_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
