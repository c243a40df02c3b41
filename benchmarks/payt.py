"""PAYT vs baselines on BBC News at 50% sparsity: the `prunetune payt --full-evaluate` table per model.

Runs the CLI (so the measured command is exactly what a user types), then checks the issue's targets:
PAYT accuracy >= dense full FT - 1 point and >= prune->LoRA; PAYT retention better than both pruned/dense
baselines. Sizes default to what a shared 2-core CPU finishes in well under an hour; pass bigger ones on a GPU.

    python benchmarks/payt.py --models minilm-l6 --out /tmp/bench_payt
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # per model: CPU-sized budgets (n-samples, epochs, batch, max-length, retention windows)
    "minilm-l6": ["--n-samples", "400", "--epochs", "2", "--batch-size", "8", "--max-length", "128",
                  "--eval-samples", "100", "--lr", "2e-3", "--kd-alpha", "0.3", "--criterion", "wanda"],
    "smollm2-135m": ["--n-samples", "160", "--epochs", "1", "--batch-size", "8", "--max-length", "128",
                     "--eval-samples", "40", "--retention-windows", "4", "--start", "0.1", "--every-steps", "4",
                     "--lr", "1e-3", "--kd-alpha", "0.3", "--criterion", "wanda"],
}


def check_targets(runs: dict) -> dict:
    """The issue's targets, each True/False with the numbers compared."""
    p, full, lora, pl = (runs.get(k, {}) for k in ("PAYT", "dense full FT", "dense LoRA FT", "prune -> LoRA FT"))
    out: dict = {}
    if p.get("accuracy") is not None and full.get("accuracy") is not None:
        out["payt_acc_ge_full_minus_1pt"] = p["accuracy"] >= full["accuracy"] - 0.01
    if p.get("accuracy") is not None and pl.get("accuracy") is not None:
        out["payt_acc_ge_prune_lora"] = p["accuracy"] >= pl["accuracy"]
    ret = {k: r.get("retention", {}) for k, r in runs.items()}
    if ret.get("PAYT", {}).get("value") is not None:
        hib = ret["PAYT"].get("higher_is_better", True)
        better = (lambda a, b: a > b) if hib else (lambda a, b: a < b)
        for other in ("dense full FT", "prune -> LoRA FT"):
            if ret.get(other, {}).get("value") is not None:
                out[f"payt_retention_better_than_{other}"] = better(ret["PAYT"]["value"], ret[other]["value"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm-l6,smollm2-135m")
    ap.add_argument("--out", default="/tmp/bench_payt")
    ap.add_argument("--extra", default="", help="extra flags for every run, e.g. '--epochs 3'")
    a = ap.parse_args()
    summary = {}
    for model in a.models.split(","):
        out = Path(a.out) / model
        cmd = ["prunetune", "payt", model, "--task", "bbc-news", "--sparsity", "0.5", "--schedule", "agp",
               "--full-evaluate", *SIZES.get(model, []), *shlex.split(a.extra), "--out", str(out), "--overwrite"]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        wall = time.perf_counter() - t0
        if rc != 0:
            print(f"{model}: exit code {rc} after {wall:.0f} s", flush=True)
            summary[model] = {"command": " ".join(cmd), "rc": rc, "wall_s": wall}
            continue
        res = json.loads((out / "full_evaluate.json").read_text())
        targets = check_targets(res["runs"])
        summary[model] = {"command": " ".join(cmd), "wall_s": wall, "table": res["table"]["markdown"],
                          "targets": targets}
        print(res["table"]["markdown"])
        print(f"{model}: wall {wall:.0f} s; targets: {json.dumps(targets)}", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    sys.exit(0 if all(s.get("rc", 0) == 0 for s in summary.values()) else 1)


if __name__ == "__main__":
    main()
