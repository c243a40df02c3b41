"""PAYT vs baselines on BBC News at 50% sparsity: the `prunetune payt --full-evaluate` table per model.

Runs the CLI (so the measured command is exactly what a user types), then checks the issue's targets:
PAYT accuracy >= dense full FT - 1 point and >= prune->LoRA; PAYT retention better than both pruned/dense
baselines. Sizes default to what a shared 2-core CPU finishes in well under an hour; pass bigger ones on a GPU.

    python benchmarks/payt.py --models minilm-l6 --seeds 0,1,2 --out runs/bench_payt \
        --results benchmarks/results/payt_minilm_3seeds.json

`--results` writes the compact raw JSON BENCHMARKS.md's PAYT block is rendered from (`run_all.py --check`);
with `--reuse` it is rebuilt from the runs' full_evaluate.json without training again.
"""

from __future__ import annotations

import argparse
import json
import os
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


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Mean and sample standard deviation over seeds of accuracy, macro-F1 and retention, per row.

    On 223 test articles one article is 0.45 pt, so single-seed differences of a point or two between rows are
    within what the adapter init and the seeded split alone move; the targets are checked on the means.
    """
    import statistics

    rows: dict[str, dict] = {}
    for res in per_seed.values():
        for label, r in res["runs"].items():
            d = rows.setdefault(label, {"accuracy": [], "macro_f1": [], "retention": [], "sparsity": []})
            for key in ("accuracy", "macro_f1", "sparsity"):
                if r.get(key) is not None:
                    d[key].append(r[key])
            if (r.get("retention") or {}).get("value") is not None:
                d["retention"].append(r["retention"]["value"])
                d["higher_is_better"] = r["retention"].get("higher_is_better", True)
    means: dict[str, dict] = {}
    lines = [f"| run (mean ± sd over {len(per_seed)} seeds) | accuracy | macro-F1 | sparsity | retention |",
             "|---|---|---|---|---|"]
    for label, d in rows.items():
        m = {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in d.items()
             if isinstance(v, list) and v}
        means[label] = {k: v[0] for k, v in m.items()}
        if "retention" in m:
            means[label]["retention"] = {"value": m["retention"][0], "higher_is_better": d["higher_is_better"]}

        def cell(k, pct):
            if k not in m:
                return "-"
            mu, sd = m[k]
            return f"{mu:.2%} ± {sd:.2%}" if pct else f"{mu:.4f} ± {sd:.4f}"

        lines.append(f"| {label} | {cell('accuracy', True)} | {cell('macro_f1', True)} | {cell('sparsity', True)} "
                     f"| {cell('retention', False)} |")
    return {"markdown": "\n".join(lines), "means": means, "targets": check_targets(means)}


def compact_run(r: dict) -> dict:
    """What BENCHMARKS.md shows of one run: scores of the exported model, sparsity, retention, KD, mixing."""
    me = r.get("mask_enforcement") or {}
    mix = r.get("mixing") or {}
    return {"accuracy": r.get("accuracy"), "macro_f1": r.get("macro_f1"), "sparsity": r.get("sparsity"),
            "retention": (r.get("retention") or {}).get("value"),
            "kd": None if r.get("teacher") is None else ("no" if r["teacher"] == "none" else "yes"),
            "mixing": None if not mix else (f"{mix['mixed']} ({mix['fraction']:.0%})" if mix.get("mixed") else "no"),
            "train_s": (r.get("timings") or {}).get("train_s"),
            "test_n": (r.get("test_after_merge") or {}).get("n"),
            "mask_enforcement": {k: me[k] for k in ("enforce_ms_per_step", "step_ms", "overhead_fraction")
                                 if k in me} or None}


def write_results(a, seeds: list[int], summary: dict) -> None:
    from _machine import commit as code_commit  # benchmarks/ is on sys.path (main)

    for model in a.models.split(","):
        per_seed = {}
        for seed in seeds:
            f = Path(a.out) / model / (f"seed{seed}" if len(seeds) > 1 else "") / "full_evaluate.json"
            if f.is_file():
                res = json.loads(f.read_text())
                per_seed[str(seed)] = {"runs": {k: compact_run(v) for k, v in res["runs"].items()},
                                       "tune": {k: res["tune"].get(k) for k in ("split_seed", "seed", "lr", "kd_alpha", "lora_dropout",
                                                                                 "n_samples", "epochs")}}
        ns = {r["test_n"] for s in per_seed.values() for r in s["runs"].values() if r.get("test_n")}
        commit = os.environ.get("PRUNETUNE_BENCH_COMMIT") or code_commit() or ""
        payload = {"model": model, "command": f"python benchmarks/payt.py --models {model} --seeds {a.seeds} "
                   f"--out {a.out} --results {a.results}", "commit": commit, "machine": a.machine,
                   "test_set": f"BBC News test split, split seed 0, the same {sorted(ns)} articles for every seed "
                               "and row", "seeds": per_seed,
                   "note": "one row per configuration of `prunetune payt --full-evaluate`; seeds = --seed"}
        out = a.results if len(a.models.split(",")) == 1 else a.results.with_name(f"{a.results.stem}_{model}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2))
        print(f"raw results: {out}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm-l6,smollm2-135m")
    ap.add_argument("--out", default="runs/bench_payt")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (adapter init, data order, "
                                                  "training subsample; never the test set); several: one table "
                                                  "per seed plus mean ± sd")
    ap.add_argument("--results", type=Path, default=None, help="write the compact raw JSON of all seeds here")
    ap.add_argument("--reuse", action="store_true", help="keep a seed's finished table instead of rerunning it")
    ap.add_argument("--extra", default="", help="extra flags for every run, e.g. '--epochs 3'")
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_all import machine

    # with --reuse the runs were measured earlier: PRUNETUNE_BENCH_MACHINE records the machine they ran on
    a.machine = os.environ.get("PRUNETUNE_BENCH_MACHINE") or machine() + " at the start"
    summary = {}
    for model in a.models.split(","):
        per_seed: dict[int, dict] = {}
        for seed in seeds:
            out = Path(a.out) / model / (f"seed{seed}" if len(seeds) > 1 else "")
            cmd = ["prunetune", "payt", model, "--task", "bbc-news", "--sparsity", "0.5", "--schedule", "agp",
                   "--full-evaluate", *SIZES.get(model, []), "--seed", str(seed), *shlex.split(a.extra),
                   "--out", str(out), "--overwrite"]
            key = f"{model} seed {seed}"
            if a.reuse and (out / "full_evaluate.json").is_file():
                print(f"{key}: reusing {out / 'full_evaluate.json'}", flush=True)
                wall = None
            else:
                print("$", " ".join(cmd), flush=True)
                t0 = time.perf_counter()
                rc = subprocess.call(cmd)
                wall = time.perf_counter() - t0
                if rc != 0:
                    print(f"{key}: exit code {rc} after {wall:.0f} s", flush=True)
                    summary[key] = {"command": " ".join(cmd), "rc": rc, "wall_s": wall}
                    continue
            res = json.loads((out / "full_evaluate.json").read_text())
            per_seed[seed] = res
            targets = check_targets(res["runs"])
            summary[key] = {"command": " ".join(cmd), "wall_s": wall, "table": res["table"]["markdown"],
                            "targets": targets}
            print(res["table"]["markdown"])
            print(f"{key}: wall {wall if wall is None else round(wall)} s; targets: {json.dumps(targets)}", flush=True)
        if len(per_seed) > 1:
            agg = aggregate(per_seed)
            summary[f"{model} mean"] = agg
            print(agg["markdown"])
            print(f"{model} over seeds {sorted(per_seed)}: targets on the means: {json.dumps(agg['targets'])}",
                  flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    if a.results is not None:
        write_results(a, seeds, summary)
    sys.exit(0 if all(s.get("rc", 0) == 0 for s in summary.values()) else 1)


if __name__ == "__main__":
    main()
