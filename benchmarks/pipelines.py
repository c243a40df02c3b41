"""Pipelines benchmark: the quickstart run, the ordering study and the lm-eval bridge on SmolLM2-135M.

Protocol: `prunetune run quickstart` (sizes in its report), `prunetune run order-study` (Wanda + LoRA r=8 on
q,v to 50%, four orderings, same fine-tuning budget, perplexity after every step), and lm-eval's
`bbc_news_topic` (prunetune's offline task: BBC News test split, 5-way multiple choice by log-likelihood,
0-shot) for the dense model and the quickstart's pruned (before recovery) and recovered models. Runs are
resumable: a second invocation with the same --runs dir only recomputes what is missing.

    PRUNETUNE_DATA_DIR=../shared/data/wikitext-2 python benchmarks/pipelines.py [--only quickstart,order,harness]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"command failed with exit code {rc}: {' '.join(cmd)}")
    return time.perf_counter() - t0


def _prunetune() -> list[str]:
    return [sys.executable, "-m", "prunetune.cli"]


def _run_recipe(name: str, out: Path) -> float:
    resume = ["--resume"] if (out / "recipe.yaml").is_file() else []
    return _run(_prunetune() + ["run", name, "--out", str(out)] + resume)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def quickstart(runs: Path) -> str:
    out = runs / "quickstart"
    wall = _run_recipe("quickstart", out)
    man = json.loads((out / "manifest.json").read_text())
    rows = []
    for stage, m in man["metrics"].items():
        if "ppl/wikitext2" in m:
            rows.append([stage, f"{m['sparsity']['value']:.2%}", f"{m['ppl/wikitext2']['value']:.3f}",
                         f"{m['ppl/bbc-news']['value']:.3f}"])
    stage_s = sum(v for k, v in man["timings"].items() if k[:2].isdigit())
    proto = man["metrics"]["01-evaluate"]["ppl/wikitext2"]["protocol"]
    return (f"`prunetune run quickstart --out {out}`: stage time {stage_s / 60:.1f} min (this invocation "
            f"{wall / 60:.1f} min). Perplexity: {proto['windows']} windows x {proto['seqlen']} tokens of each test "
            f"set.\n\n" + _table(["stage", "sparsity", "ppl WikiText-2", "ppl BBC News"], rows)
            + f"\n\nReport and plots: `{out}/report.md`.")


def order_study(runs: Path) -> str:
    out = runs / "order-study"
    _run_recipe("order-study", out)
    rows = []
    for d in sorted((out / "stages").glob("[0-9]*")):
        for r in json.loads((d / "ordering.json").read_text()):
            if r.get("final"):
                m = r["metrics"]
                rows.append([r["ordering"], f"{r['sparsity']:.2%}", f"{m['ppl/wikitext2']['value']:.3f}",
                             f"{m['ppl/bbc-news']['value']:.3f}"])
    man = json.loads((out / "manifest.json").read_text())
    stage_s = sum(v for k, v in man["timings"].items() if k[:2].isdigit())
    return (f"`prunetune run order-study --out {out}` ({stage_s / 60:.0f} min). Final model of each ordering; "
            f"the path after every step is in `{out}/report.md`.\n\n"
            + _table(["ordering", "sparsity", "ppl WikiText-2", "ppl BBC News"], rows))


def harness(runs: Path, limit: int) -> str:
    qs = runs / "quickstart"
    models = {"dense": "smollm2-135m", "Wanda 50% (no recovery)": str(qs / "stages" / "02-prune" / "model"),
              "Wanda 50% + LoRA recovery": str(qs / "model")}
    rows = []
    for label, spec in models.items():
        js = runs / f"harness-{label.split()[0].lower()}{'-lora' if 'LoRA' in label else ''}.json"
        if not js.is_file():
            _run(_prunetune() + ["eval", spec, "--harness", "bbc_news_topic", "--harness-limit", str(limit),
                                 "--json", str(js)])
        r = json.loads(js.read_text())["metrics"]["harness"]["bbc_news_topic"]
        rows.append([label, f"{r['acc']:.4f}", f"{r['acc_norm']:.4f}", r["protocol"]["documents"]])
    return (f"`prunetune eval MODEL --harness bbc_news_topic --harness-limit {limit}` (lm-eval "
            f"{r['protocol']['harness'].split()[-1]}, 0-shot, first {limit} documents of the fixed BBC News test "
            "split; chance = 0.2).\n\n" + _table(["model", "acc", "acc_norm", "documents"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="quickstart,order,harness", help="comma-separated subset")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench"), help="where the runs are kept (resumable)")
    ap.add_argument("--harness-limit", type=int, default=100)
    args = ap.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    args.runs.mkdir(parents=True, exist_ok=True)
    sections = []
    if "quickstart" in parts or "harness" in parts:
        sections.append("**Quickstart** (SmolLM2-135M, Wanda 50% on BBC News, LoRA recovery)\n\n" + quickstart(args.runs))
    if "harness" in parts:
        sections.append("**lm-eval bridge**\n\n" + harness(args.runs, args.harness_limit))
    if "order" in parts:
        sections.append("**Ordering study** (Wanda + LoRA r=8 on q,v, target 50%)\n\n" + order_study(args.runs))
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
