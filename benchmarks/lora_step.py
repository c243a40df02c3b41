"""Mask-aware LoRA step against a plain peft LoRA step (issue 17), on the same 50%-pruned SmolLM2-135M.

The baseline (`_lora_step_baseline.py`, committed first and unchanged since) is peft's own LoRA: it trains
W + s·BA, so its merge (W + s·BA) ⊙ M is not the model it trained. prunetune trains (W + s·BA) ⊙ M exactly
(`tuning.lora.mask_lora_updates`). Same model, batch (4 x 256 tokens), rank 8, alpha 16, seven projections,
LoRA dropout `--dropout` on both sides, same loss (the model's causal-LM loss with full logits).

Time: both models live in one process and their steps alternate (baseline first on even repetitions,
prunetune first on odd ones) after one warm-up step each; medians of wall and CPU seconds, spread as
min..max. Memory: each variant's step runs in its own fresh subprocess (alternating, `--rss-reps` each);
peak RSS is sampled every 10 ms during load + one forward/backward, and also reported above the RSS held
just before the step.

    OMP_NUM_THREADS=1 PRUNETUNE_DATA_DIR=../shared/data/wikitext-2 nice -n 5 python benchmarks/lora_step.py \\
        --reps 5 --rss-reps 2 --dropout 0 --json benchmarks/results/lora_step_dropout0.json
    # --dropout 0.1 (the payt-paper preset's): the two-product path, reported separately

At dropout 0 (the default) prunetune takes its exact one-product path; with dropout > 0 the masked update is a
second product on the dropped-out input.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _lora_step_baseline as base  # noqa: E402
from _machine import PeakRSS, commit, cpu_model, load_average, rss  # noqa: E402

VARIANTS = ("peft", "prunetune")


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg": list(load_average()), "commit": commit()}


def build(variant: str, pruned, dropout: float):
    """The trainable model of one side, from a private copy of the pruned model."""
    import torch

    model = copy.deepcopy(pruned)
    if variant == "peft":
        return base.peft_lora(model, dropout=dropout)
    from prunetune.pruning.masks import MaskSet
    from prunetune.tuning.lora import apply_lora, mask_lora_updates

    masks = MaskSet.from_model(model)
    torch.manual_seed(0)
    peft = apply_lora(model, "causal-lm", rank=base.RANK, alpha=base.ALPHA, dropout=dropout)
    mask_lora_updates(peft, masks)
    return peft


def timed(model, ids) -> tuple[float, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    loss = base.step(model, ids)
    return time.perf_counter() - w0, time.process_time() - c0, loss


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def run_time(reps: int, dropout: float, data_dir: str | None) -> dict:
    import torch

    pruned, tok = base.pruned_smollm2()
    ids = base.batch(tok, data_dir)
    models = {v: build(v, pruned, dropout) for v in VARIANTS}
    for v in VARIANTS:  # warm-up (allocator, first-call overheads)
        timed(models[v], ids)
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(reps):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            torch.manual_seed(r)  # the same dropout draws for both sides of a repetition
            w, c, loss = timed(models[v], ids)
            wall[v].append(w)
            cpu[v].append(c)
            losses[v].append(loss)
    ratio_each = [p / b for p, b in zip(wall["prunetune"], wall["peft"])]
    return {"wall_s": {v: stats(wall[v]) for v in VARIANTS}, "cpu_s": {v: stats(cpu[v]) for v in VARIANTS},
            "loss": losses, "ratio_wall_median": statistics.median(wall["prunetune"]) / statistics.median(wall["peft"]),
            "ratio_cpu_median": statistics.median(cpu["prunetune"]) / statistics.median(cpu["peft"]),
            "ratio_per_rep": stats(ratio_each)}


def rss_child(variant: str, dropout: float, data_dir: str | None) -> dict:
    """In a fresh process: peak RSS over load + build + one step, and the rise during the step."""
    import gc

    with PeakRSS(interval=0.01) as setup:
        pruned, tok = base.pruned_smollm2()
        ids = base.batch(tok, data_dir)
        model = build(variant, pruned, dropout)
        del pruned
        gc.collect()
        before = rss()
    peak_before = setup.peak
    with PeakRSS(interval=0.01) as step:
        base.step(model, ids)
    step_peak = step.peak
    return {"variant": variant, "rss_before_step_mb": before / 2**20, "step_peak_mb": step_peak / 2**20,
            "step_rise_mb": (step_peak - before) / 2**20, "setup_peak_mb": peak_before / 2**20,
            "process_peak_mb": max(step_peak, peak_before) / 2**20}


def run_rss(reps: int, dropout: float, data_dir: str | None) -> dict:
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(reps):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            cmd = [sys.executable, __file__, "--rss-child", v, "--dropout", str(dropout)]
            if data_dir:
                cmd += ["--data-dir", data_dir]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[v].append(json.loads(out.strip().splitlines()[-1]))
    med = {v: {k: statistics.median(r[k] for r in rows[v]) for k in rows[v][0] if k != "variant"} for v in VARIANTS}
    return {"runs": rows, "median": med,
            "ratio_step_peak": med["prunetune"]["step_peak_mb"] / med["peft"]["step_peak_mb"],
            "ratio_step_rise": med["prunetune"]["step_rise_mb"] / med["peft"]["step_rise_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rss-reps", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--data-dir", default=os.environ.get("PRUNETUNE_DATA_DIR"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rss-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.dropout, args.data_dir)))
        return
    m0 = machine()
    t0 = time.perf_counter()
    res = {"setting": {"model": "smollm2-135m fp32, 50% magnitude per layer on q k v o gate up down",
                       "batch": [base.BATCH, base.SEQLEN], "rank": base.RANK, "alpha": base.ALPHA,
                       "dropout": args.dropout, "loss": "model's causal-LM loss (full logits), both sides",
                       "reps": args.reps, "rss_reps": args.rss_reps},
           "time": run_time(args.reps, args.dropout, args.data_dir)}
    res["rss"] = run_rss(args.rss_reps, args.dropout, args.data_dir)
    res["machine"] = {**m0, "loadavg_end": list(os.getloadavg()), "wall_s": time.perf_counter() - t0}
    t, r = res["time"], res["rss"]
    print(f"dropout {args.dropout}: step wall median peft {t['wall_s']['peft']['median']:.2f}s, prunetune "
          f"{t['wall_s']['prunetune']['median']:.2f}s -> ratio {t['ratio_wall_median']:.3f} (CPU-s ratio "
          f"{t['ratio_cpu_median']:.3f}; per-rep ratios {t['ratio_per_rep']['min']:.3f}..{t['ratio_per_rep']['max']:.3f})")
    print(f"peak RSS during the step: peft {r['median']['peft']['step_peak_mb']:.0f} MB, prunetune "
          f"{r['median']['prunetune']['step_peak_mb']:.0f} MB -> ratio {r['ratio_step_peak']:.3f}; rise "
          f"{r['ratio_step_rise']:.3f}")
    print(f"machine: {m0['cpu']}, {m0['cores']} cores, load average {m0['loadavg']} -> {res['machine']['loadavg_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
