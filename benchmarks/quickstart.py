"""The quickstart a new user runs first (`prunetune run quickstart`): wall time, CPU seconds and peak RSS of the
whole command, with the perplexities it reports, in one JSON.

Issue 17's target is ≤ 3 minutes and ≤ 2 GB on a 2-core machine. Wall time depends on what else the machine runs,
so the JSON also keeps the load-independent CPU seconds (user + system of the command and its children) and the
load average at the start and the end; peak RSS is the largest resident set of the command's process tree
(`ru_maxrss` of the reaped children, which is what `/usr/bin/time -v` reports).

    PRUNETUNE_DATA_DIR=../shared/data/wikitext-2 python benchmarks/quickstart.py --out runs/qs-bench \
        --json benchmarks/results/quickstart_quiet.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import commit, cpu_model, load_average  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/qs-bench"), help="run directory (replaced)")
    ap.add_argument("--json", type=Path, default=None, help="write the measurement here")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the run (default: torch's)")
    a = ap.parse_args()

    if a.out.exists():
        shutil.rmtree(a.out)
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    prunetune = shutil.which("prunetune") or str(Path(sys.executable).with_name("prunetune"))
    cmd = [prunetune, "run", "quickstart", "--out", str(a.out)]
    load0, t0 = load_average(), time.perf_counter()
    rc = subprocess.call(cmd, env=env)
    wall = time.perf_counter() - t0
    load1 = load_average()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        sys.exit(f"prunetune run quickstart failed with exit code {rc}")
    manifest = json.loads((a.out / "manifest.json").read_text())
    ppl = {stage: {k: v["value"] for k, v in metrics.items() if k.startswith("ppl/")}
           for stage, metrics in manifest["metrics"].items()}
    result = {
        "command": "python benchmarks/quickstart.py " + " ".join(sys.argv[1:]),
        "runs": " ".join(["prunetune", *cmd[1:]]),
        "commit": commit() or "unknown",
        "machine": f"{cpu_model()}, {os.cpu_count()} cores; load average (1/5/15 min) "
                   f"{tuple(round(x, 2) for x in load0)} at the start, {tuple(round(x, 2) for x in load1)} at the end",
        "threads": a.threads or "torch default",
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "stage_seconds": manifest.get("timings", {}),
        "perplexity": {s: v for s, v in ppl.items() if v},
        "targets": {"wall_le_180_s": wall <= 180, "peak_rss_le_2_gb": usage.ru_maxrss * 1024 <= 2e9},
    }
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
