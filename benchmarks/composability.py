"""Composability: the time to recover several pruned configurations, with and without module-level fine-tuning.

Measured in one run, MiniLM-L6 on BBC News (offline):

0. the *original* model: MiniLM fine-tuned dense on BBC News (shared by both arms, outside both clocks);
1. baseline, per configuration: prune the original (head-wise L1 on q/k/v at the attention rate, L1 on
   o/up/down at the linear rate), then model-level full fine-tuning for a fixed budget of `--budget` steps;
   its final validation accuracy is that configuration's target;
2. composability: every unique pruned module fine-tuned once at module level (one capture of activations,
   shared by all configurations), then per configuration: compose, check validation accuracy before training
   and at steps 2, 4, 8, ... and stop as soon as it reaches the baseline's final validation accuracy.

Clocks (seconds of wall time on this machine): baseline = pruning + optimizer steps + its one final
validation check; composability = capture + module-level FT (once) + composing + optimizer steps + the checks
that decided when to stop. Checks taken only to draw the baseline's curve are timed apart and not counted.
The test split is evaluated once at the end for both arms. Resumable: every finished piece is a JSON file
under --work; rerun the same command to continue.

Seeds (`--seeds 0 1 2`): each seed repeats steps 1 and 2 with everything random drawn from it: the training
subsample (and so the articles captured for module-level FT), the data order and initialisation of both arms'
model-level FT, module-level FT's sampling, and the validation subset of the checks. The dense original (step 0,
trained once at seed 0) and the test split are the same for every seed, so the arms' test accuracies pair up.
Each seed's pieces are named with `-s<seed>`; the results JSON holds every seed's result (in the one-seed format)
and a summary across seeds (per-seed ratio, mean ratio, paired test-accuracy differences). Without `--seeds` the
script runs seed 0 with the one-seed names and format, as before.

    nice -n 5 python benchmarks/composability.py --work bench-work/composability \
        --out benchmarks/results/composability.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Before torch loads OpenMP (as the CLI does): spinning worker threads stall on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _load_json(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.is_file() else None


def _write_json(p: Path, d: dict) -> None:
    from prunetune.rundir import atomic_write_json

    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, d)


def main() -> int:
    from _machine import cpu_model  # benchmarks/ is on the path: this script's folder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--attention", nargs="+", default=["0.25", "0.5"])
    ap.add_argument("--linear", nargs="+", default=["0.3", "0.5"])
    ap.add_argument("--grid", action="store_true", default=True)
    ap.add_argument("--n-samples", type=int, default=256, help="training articles")
    ap.add_argument("--eval-samples", type=int, default=64, help="validation articles for the checks")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dense-epochs", type=float, default=2.0)
    ap.add_argument("--budget", type=int, default=40, help="baseline model-level FT steps per configuration")
    ap.add_argument("--lr", type=float, default=1e-4, help="model-level FT learning rate (both arms)")
    ap.add_argument("--dense-lr", type=float, default=2e-4, help="learning rate of the dense original's FT")
    ap.add_argument("--linear-steps", type=int, default=40)
    ap.add_argument("--linear-lr", type=float, default=1e-3)
    ap.add_argument("--attention-steps", type=int, default=16)
    ap.add_argument("--attention-lr", type=float, default=5e-4)
    ap.add_argument("--attention-batch", type=int, default=4)
    ap.add_argument("--module-texts", type=int, default=128, help="training articles captured for module FT")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run every seed in turn (pieces named -s<seed>; the JSON holds each seed and a summary "
                         "across them); without it: seed 0 in the one-seed format")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--work", default="bench-work/composability")
    ap.add_argument("--out", default="benchmarks/results/composability.json")
    ap.add_argument("--render", default=None, help="print the markdown table of this results JSON and exit")
    ap.add_argument("--plot", default=None, help="with --render: also draw loss / validation curves to this PNG")
    a = ap.parse_args()
    if a.render:
        data = json.loads(Path(a.render).read_text())
        print(render(data))
        if a.plot:
            plot(data, Path(a.plot))
        return 0
    if a.seeds is not None and len(set(a.seeds)) != len(a.seeds):
        ap.error(f"--seeds: a seed given twice ({a.seeds})")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("PRUNETUNE_PROGRESS", "0")

    from prunetune.data.tasks import subsample
    from prunetune.evaluation.task import evaluate_classification
    from prunetune.methods import composable as C
    from prunetune.models.arch import get_adapter
    from prunetune.models.loading import load_model
    from prunetune.data.spec import DataSpec
    from prunetune.tuning.data import load_task_data
    from prunetune.tuning.finetune import finetune
    from prunetune.tuning.spec import TuneSpec

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    load_start = os.getloadavg()
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    source = DataSpec(train=a.data)  # finetune's run arguments beside the spec: data, task, seed

    def cfg(epochs: float, lr: float | None = None) -> TuneSpec:
        return TuneSpec(mode="full", kd=False, steps=None, epochs=epochs, lr=lr or a.lr, batch_size=a.batch_size,
                        seqlen=a.max_length, n_samples=a.n_samples, eval_samples=a.eval_samples, test_samples=4,
                        retention=False)

    # the test split (whole, fixed by the split seed) and the whole validation split; each seed draws its
    # validation subset from the latter (seed 0's is the subset the one-seed runs used)
    splits = load_task_data(TuneSpec(eval_samples=None, test_samples=None), source)
    test, all_val = splits["test"], splits["validation"]

    def val_subset(seed: int) -> list[dict]:
        return subsample(all_val, a.eval_samples, seed)

    def test_eval(model, tok) -> dict:
        r = evaluate_classification(model, tok, test, a.max_length, dataset=a.data, progress=False)
        return {k: r[k] for k in ("accuracy", "macro_f1", "n", "seconds")}

    from transformers import TrainerCallback

    class NoCheckpoints(TrainerCallback):
        """Neither arm saves checkpoints or runs the Trainer's epoch-end evaluation: the clocks' own
        validation checks are the only evaluation, and the benchmark keeps no checkpoints."""

        def on_step_end(self, args, state, control, **kw):
            control.should_save = False
            control.should_evaluate = False
            return control

        on_epoch_end = on_step_end

    # -- 0. the original: dense MiniLM fine-tuned on the task (seed 0; shared by both arms and every seed;
    #       outside both clocks) -------------------------------------------------------------------------
    orig_dir = work / "original" / "model"
    dense = _load_json(work / "original.json")
    val0 = val_subset(0)
    if dense is None:
        log("fine-tuning the dense original")
        r = finetune(a.model, cfg(a.dense_epochs, lr=a.dense_lr), work / "original", data=source, task="seq-cls",
                     seed=0, export=True, overwrite=True, callbacks=(NoCheckpoints(),))
        t = test_eval(r["_model"], r["_tokenizer"])
        clock = C.ValidationClock(r["_tokenizer"], val0, a.max_length, [])
        dense = {"val_accuracy": clock.accuracy(r["_model"]), "val_n": len(val0), "test": t,
                 "train_s": r["timings"]["train_s"], "steps": r["global_step"], "lr": a.dense_lr,
                 "epochs": a.dense_epochs}
        _write_json(work / "original.json", dense)
    label_names = splits["label_names"]
    loaded = load_model(str(orig_dir), "seq-cls", label_names=label_names)
    original, tok = loaded.model, loaded.tokenizer
    if dense.get("val_n") != len(val0):  # an original reused with another validation size: score it on this one
        dense.update(val_accuracy=C.ValidationClock(tok, val0, a.max_length, []).accuracy(original), val_n=len(val0))
        _write_json(work / "original.json", dense)
    log(f"original: val {dense['val_accuracy']:.3f} test {dense['test']['accuracy']:.3f}")

    configs = C.parse_configurations(a.attention, a.linear, grid=a.grid)
    adapter = get_adapter(original)
    pl = C.plan(configs, adapter, attention_units=("attention",), linear_units=("o", "up", "down"))
    log(f"{len(configs)} configurations -> {len(pl.units)} unique units ({pl.unit_count_without_dedup} without dedup)")

    def run_seed(seed: int, tag: str) -> dict:
        """Steps 1-3 at one seed; every piece's name carries `tag` ('' for the one-seed layout, else -s<seed>)."""
        data = load_task_data(cfg(1.0), source, seed=seed)  # the seed's training subsample
        val = val_subset(seed)
        steps_per_epoch = -(-len(data["train"]) // a.batch_size)
        run = {"data": source, "task": "seq-cls", "seed": seed}
        orig = dict(dense)
        if tag:  # the shared original scored on this seed's validation subset (outside both clocks)
            orig.update(val_accuracy=C.ValidationClock(tok, val, a.max_length, []).accuracy(original),
                        val_n=len(val), shared_across_seeds=True, trained_at_seed=0)
            log(f"seed {seed}: original val {orig['val_accuracy']:.3f} on this seed's {len(val)} articles")

        def model_ft(name: str, model, masks, target: float | None, checks: list[int]) -> dict:
            d = work / "models" / name
            C.save_composed(model, tok, masks, d)
            clock = C.ValidationClock(tok, val, a.max_length, checks, target)
            t0 = time.perf_counter()
            start_acc = clock.accuracy(model)
            start_eval_s = time.perf_counter() - t0
            if target is not None:  # check 0: a composed model may already be there
                clock.eval_s += start_eval_s
                clock.points.append({"step": 0, "accuracy": start_acc, "clock_s": clock.clock()})
            if target is not None and start_acc >= target - 1e-9:
                clock.reached_at = 0
                final = model
                log_rows: list = []
            else:
                r = finetune(str(d), cfg(a.budget / steps_per_epoch), work / "runs" / name, **run, export=False,
                             overwrite=True, callbacks=(clock, NoCheckpoints()))
                final = r["_model"]
                log_rows = _read_log(work / "runs" / name / "train_log.csv")
            s = clock.summary()
            return {"start_val_accuracy": start_acc, "start_eval_s": start_eval_s, **s,
                    "final_val_accuracy": s["points"][-1]["accuracy"] if s["points"] else start_acc,
                    "test": test_eval(final, tok), "train_log": log_rows}

        # -- 1. baseline ------------------------------------------------------------------------------
        base: dict = {}
        for c in configs:
            name = f"baseline{tag}-{c.name}"
            p = work / f"{name}.json"
            r = _load_json(p)
            if r is None:
                log(f"{name}: prune + {a.budget} steps")
                t0 = time.perf_counter()
                res = C.train_units(original, [], pl.members[c.name], C.ComposeSpec(), None, seed=seed,
                                    finetune=False)
                model, masks = C.compose(original, pl.members[c.name], res)
                prune_s = time.perf_counter() - t0
                checks = [a.budget // 4, a.budget // 2, 3 * a.budget // 4, a.budget]
                r = model_ft(name, model, masks, None, checks)
                final_check = next(pt for pt in r["points"] if pt["step"] == a.budget)
                r.update({"prune_s": prune_s, "sparsity": masks.sparsity(),
                          "final_check_s": r["eval_s"] / max(len(r["points"]), 1),
                          "clock_total_s": prune_s + r["step_s"] + r["eval_s"] / max(len(r["points"]), 1),
                          "target": final_check["accuracy"]})
                _write_json(p, r)
            base[c.name] = r
            log(f"{name}: start {r['start_val_accuracy']:.3f} -> val {r['target']:.3f}, "
                f"test {r['test']['accuracy']:.3f}, clock {r['clock_total_s']:.0f}s")

        # -- 2. composability -------------------------------------------------------------------------
        mod_path = work / f"modules{tag}.json"
        mod = _load_json(mod_path)
        settings = C.ComposeSpec(linear_steps=a.linear_steps, linear_lr=a.linear_lr,
                                 attention_steps=a.attention_steps, attention_lr=a.attention_lr,
                                 module_batch=a.attention_batch)
        texts = [e["text"] for e in data["train"][: a.module_texts]]
        batches = C.text_batches(tok, texts, a.max_length, a.attention_batch)
        cache = C.ModuleCache(work / f"module-cache{tag}")  # one per seed: its first run pays the real cost
        t0 = time.perf_counter()
        results = C.train_units(original, batches, pl.units, settings, cache, seed=seed, progress=log)
        if mod is None:  # the first run that trained them holds the real cost
            mod = {"wall_s": time.perf_counter() - t0, **results.summary(),
                   "settings": C.module_ft_settings(settings, seed),
                   "texts": len(texts), "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches))}
            _write_json(mod_path, mod)
        log(f"module-level FT{tag}: {mod['wall_s']:.0f}s for {len(pl.units)} units")
        comp: dict = {}
        for c in configs:
            name = f"compose{tag}-{c.name}"
            p = work / f"{name}.json"
            r = _load_json(p)
            if r is None:
                target = base[c.name]["target"]
                log(f"{name}: target {target:.3f}")
                t0 = time.perf_counter()
                model, masks = C.compose(original, pl.members[c.name], results)
                compose_s = time.perf_counter() - t0
                r = model_ft(name, model, masks, target, C.geometric_checks(a.budget))
                r.update({"compose_s": compose_s, "sparsity": masks.sparsity(),
                          "clock_total_s": compose_s + r["clock_s"]})
                _write_json(p, r)
            comp[c.name] = r
            log(f"{name}: start {r['start_val_accuracy']:.3f}, reached at {r['reached_at_step']}, "
                f"val {r['final_val_accuracy']:.3f} test {r['test']['accuracy']:.3f}, clock {r['clock_total_s']:.0f}s")

        # -- 3. this seed's summary -------------------------------------------------------------------
        base_total = sum(base[c.name]["clock_total_s"] for c in configs)
        comp_total = mod["wall_s"] + sum(comp[c.name]["clock_total_s"] for c in configs)
        rows = []
        for c in configs:
            b, m = base[c.name], comp[c.name]
            rows.append({"config": c.name, "attention": c.attention, "linear": c.linear, "sparsity": b["sparsity"],
                         "baseline_start_val": b["start_val_accuracy"], "baseline_val": b["target"],
                         "baseline_test": b["test"]["accuracy"], "baseline_clock_s": b["clock_total_s"],
                         "composed_start_val": m["start_val_accuracy"], "composed_val": m["final_val_accuracy"],
                         "composed_reached_at_step": m["reached_at_step"], "composed_test": m["test"]["accuracy"],
                         "composed_clock_s": m["clock_total_s"],
                         "holds": m["reached_at_step"] is not None})
        out = {
            "benchmark": "composability", "model": a.model, "data": a.data,
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_end": os.getloadavg(),
                        "torch_threads": torch.get_num_threads()},
            "settings": {k: v for k, v in vars(a).items() if k not in ("work", "out", "seeds")},
            "protocol": (f"train {len(data['train'])} articles, validation {len(val)} (checks), test {len(test)} "
                         f"(whole split, once per arm), max_length {a.max_length}, batch {a.batch_size}, full FT lr "
                         f"{a.lr}, no KD; baseline budget {a.budget} steps; composability stops at the first check "
                         f"(steps 0, 2, 4, 8, ...) reaching the baseline's final validation accuracy"),
            "original": orig, "plan": pl.to_dict(), "module_ft": {k: v for k, v in mod.items() if k != "units"},
            "module_units": mod.get("units"),
            "rows": rows, "baseline": base, "composed": comp,
            "totals": {"baseline_s": base_total, "composability_s": comp_total, "module_ft_s": mod["wall_s"],
                       "ratio": base_total / comp_total if comp_total else None,
                       "target_2x_holds": bool(comp_total and base_total / comp_total >= 2.0
                                               and all(r["holds"] for r in rows))},
            "wall_s": time.perf_counter() - t_run,
        }
        if tag:
            out["seed"] = seed
        log(f"seed {seed}: baseline {base_total:.0f}s, composability {comp_total:.0f}s "
            f"(module FT {mod['wall_s']:.0f}s): ratio {out['totals']['ratio']:.2f}x")
        return out

    if a.seeds is None:
        out = run_seed(0, "")
    else:
        per_seed: dict[str, dict] = {}
        for seed in a.seeds:
            per_seed[str(seed)] = run_seed(seed, f"-s{seed}")
            out = {
                "benchmark": "composability-seeds", "model": a.model, "data": a.data,
                "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_start": load_start,
                            "loadavg_end": os.getloadavg(), "torch_threads": torch.get_num_threads()},
                "settings": {k: v for k, v in vars(a).items() if k not in ("work", "out")},
                "seeds_requested": a.seeds, "seeds_done": [int(s) for s in per_seed],
                "original_note": ("one dense original (fine-tuned at seed 0) is shared by both arms and every "
                                  "seed, outside both clocks; each seed scores it on its own validation subset"),
                "per_seed": per_seed, "summary": summarize(per_seed),
                "wall_s": time.perf_counter() - t_run,
            }
            _write_json(Path(a.out), out)  # after every seed: a run cut short keeps the seeds it finished
    _write_json(Path(a.out), out)
    print(render(out))
    return 0


def _t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t (scipy when present, else the normal's 1.96)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return 1.96


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(per_seed: dict[str, dict]) -> dict:
    """Across seeds: each seed's totals and ratio, the mean ratio, and the paired test-accuracy differences
    (composed minus baseline, same configuration and seed, same test split) over every pair and per configuration."""
    seeds = list(per_seed)
    totals = {s: per_seed[s]["totals"] for s in seeds}
    ratios = [totals[s]["ratio"] for s in seeds]
    r_mean, r_sd = _mean_sd(ratios)
    pairs = [(s, r["config"], r["composed_test"] - r["baseline_test"]) for s in seeds for r in per_seed[s]["rows"]]
    diffs = [d for _, _, d in pairs]
    d_mean, d_sd = _mean_sd(diffs)
    half = _t975(len(diffs) - 1) * d_sd / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    configs: dict[str, dict] = {}
    for s in seeds:
        for r in per_seed[s]["rows"]:
            c = configs.setdefault(r["config"], {"attention": r["attention"], "linear": r["linear"],
                                                 "sparsity": r["sparsity"], "seeds": []})
            c["seeds"].append({"seed": int(s), "baseline_test": r["baseline_test"], "composed_test": r["composed_test"],
                               "diff": r["composed_test"] - r["baseline_test"], "baseline_clock_s": r["baseline_clock_s"],
                               "composed_clock_s": r["composed_clock_s"], "reached_at_step": r["composed_reached_at_step"],
                               "baseline_val": r["baseline_val"], "composed_start_val": r["composed_start_val"]})
    for c in configs.values():
        ds = [x["diff"] for x in c["seeds"]]
        c["diff_mean"], c["diff_sd"] = _mean_sd(ds)
        c["baseline_clock_mean_s"] = _mean_sd([x["baseline_clock_s"] for x in c["seeds"]])[0]
        c["composed_clock_mean_s"] = _mean_sd([x["composed_clock_s"] for x in c["seeds"]])[0]
        c["reached"] = sum(x["reached_at_step"] is not None for x in c["seeds"])
    n_test = per_seed[seeds[0]]["baseline"][next(iter(per_seed[seeds[0]]["baseline"]))]["test"]["n"]
    base_sum = sum(totals[s]["baseline_s"] for s in seeds)
    comp_sum = sum(totals[s]["composability_s"] for s in seeds)
    return {
        "seeds": [int(s) for s in seeds],
        "per_seed": {s: {"baseline_s": totals[s]["baseline_s"], "composability_s": totals[s]["composability_s"],
                         "module_ft_s": totals[s]["module_ft_s"], "ratio": totals[s]["ratio"],
                         "reached": sum(r["holds"] for r in per_seed[s]["rows"]), "configs": len(per_seed[s]["rows"]),
                         "diff_mean": _mean_sd([r["composed_test"] - r["baseline_test"]
                                                for r in per_seed[s]["rows"]])[0],
                         "loadavg_end": per_seed[s]["machine"]["loadavg_end"]} for s in seeds},
        "ratio_mean": r_mean, "ratio_sd": r_sd, "ratio_of_sums": base_sum / comp_sum if comp_sum else None,
        "seeds_at_2x": sum(r >= 2.0 for r in ratios),
        "paired_test_diff": {"n": len(diffs), "mean": d_mean, "sd": d_sd, "ci95_half": half,
                             "ci95": [d_mean - half, d_mean + half], "test_n": n_test,
                             "zero_in_ci95": bool(d_mean - half <= 0.0 <= d_mean + half)},
        "configs": configs,
        "all_reached": all(r["holds"] for s in seeds for r in per_seed[s]["rows"]),
    }


def render(data: dict) -> str:
    """The BENCHMARKS.md table from the raw JSON this script writes (`--render FILE` prints it)."""
    if "per_seed" in data:
        return render_seeds(data)
    t, o, m = data["totals"], data["original"], data["module_ft"]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = [
        f"- machine: {data['machine']['cores']} cores, {data['machine']['cpu']}; load average at the end "
        f"{' / '.join(f'{x:.1f}' for x in data['machine']['loadavg_end'])} (1 / 5 / 15 min)",
        f"- protocol: {data['protocol']}",
        f"- original (dense MiniLM fine-tuned on the task, shared, outside both clocks): validation "
        f"{pct(o['val_accuracy'])}, test {pct(o['test']['accuracy'])}",
        f"- module-level FT settings: {', '.join(f'{k} {v}' for k, v in m['settings'].items())}",
        f"- module-level FT: {data['plan']['unique_units']} unique modules ({data['plan']['units_without_dedup']} "
        f"without deduplication), {m['texts']} articles / {m['tokens']} tokens captured once, "
        f"{m['wall_s']:.0f} s",
        "",
        "| configuration (heads / linear removed) | sparsity of the pruned layers | baseline: start → final val acc "
        "| baseline test acc | baseline clock | composed: start val acc | reached at step | composed test acc "
        "| composed clock (excl. module FT) | target reached |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['attention']:g} / {r['linear']:g} | {pct(r['sparsity'])} | {pct(r['baseline_start_val'])} → "
            f"{pct(r['baseline_val'])} | {pct(r['baseline_test'])} | {r['baseline_clock_s']:.0f} s | "
            f"{pct(r['composed_start_val'])} | {r['composed_reached_at_step'] if r['holds'] else 'not reached'} | "
            f"{pct(r['composed_test'])} | {r['composed_clock_s']:.0f} s | {'yes' if r['holds'] else 'no'} |")
    lines += ["", f"**Total wall time: baseline {t['baseline_s']:.0f} s, with composability {t['composability_s']:.0f} s "
              f"(module-level FT {t['module_ft_s']:.0f} s once + {t['composability_s'] - t['module_ft_s']:.0f} s "
              f"model-level) → {t['ratio']:.2f}× lower; target ≥ 2×: {'met' if t['target_2x_holds'] else 'missed'}.**"]
    return "\n".join(lines)


def render_seeds(data: dict) -> str:
    """The tables of a `--seeds` run: totals and ratio per seed, test accuracies per configuration, the summary."""
    sm, mach, st = data["summary"], data["machine"], data["settings"]
    seeds = [str(s) for s in sm["seeds"]]
    first = data["per_seed"][seeds[0]]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    pp = lambda v: f"{100 * v:+.1f}"  # noqa: E731  (percentage points)
    la = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    m = first["module_ft"]["settings"]
    pd = sm["paired_test_diff"]
    lines = [
        f"- machine: {mach['cores']} cores, {mach['cpu']}, {mach['torch_threads']} torch threads; load average "
        f"{la(mach['loadavg_start'])} at the start, {la(mach['loadavg_end'])} at the end (1 / 5 / 15 min)",
        f"- seeds: {', '.join(seeds)}" + ("" if data["seeds_done"] == data["seeds_requested"] else
                                          f" (of {', '.join(map(str, data['seeds_requested']))} requested)")
        + "; per seed the training subsample (so the module-level capture), both arms' data order and init, "
          "module-level FT's sampling and the validation subset follow the seed",
        f"- protocol (seed {seeds[0]}): {first['protocol']}",
        f"- original: {data['original_note']}; test {pct(first['original']['test']['accuracy'])}, validation "
        + ", ".join(f"{pct(data['per_seed'][s]['original']['val_accuracy'])} (seed {s})" for s in seeds),
        f"- module-level FT settings: {', '.join(f'{k} {v}' for k, v in m.items() if k != 'seed')}; "
        f"{first['plan']['unique_units']} unique modules ({first['plan']['units_without_dedup']} without "
        f"deduplication) for {len(first['rows'])} configurations, {first['module_ft']['texts']} articles captured "
        f"once per seed",
        "",
        "| seed | baseline total | with composability total | of which module-level FT | ratio | configurations "
        "reaching the target | mean test acc difference (composed − baseline) | load average at the seed's end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in seeds:
        r = sm["per_seed"][s]
        lines.append(f"| {s} | {r['baseline_s']:.0f} s | {r['composability_s']:.0f} s | {r['module_ft_s']:.0f} s | "
                     f"**{r['ratio']:.2f}×** | {r['reached']} / {r['configs']} | {pp(r['diff_mean'])} pp | "
                     f"{la(r['loadavg_end'])} |")
    lines += [
        "",
        "| configuration (heads / linear removed) | sparsity | baseline test acc (per seed) | composed test acc "
        "(per seed) | difference, mean ± sd over seeds | reached at step (per seed) | baseline clock (mean) "
        "| composed clock excl. module FT (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in sm["configs"].items():
        xs = c["seeds"]
        lines.append(
            f"| {c['attention']:g} / {c['linear']:g} | {pct(c['sparsity'])} | "
            f"{' / '.join(pct(x['baseline_test']) for x in xs)} | {' / '.join(pct(x['composed_test']) for x in xs)} | "
            f"{pp(c['diff_mean'])} ± {100 * c['diff_sd']:.1f} pp | "
            f"{' / '.join('–' if x['reached_at_step'] is None else str(x['reached_at_step']) for x in xs)} | "
            f"{c['baseline_clock_mean_s']:.0f} s | {c['composed_clock_mean_s']:.0f} s |")
    lines += [
        "",
        f"**Ratio (baseline total / with-composability total, module-level FT included): "
        + ", ".join(f"{sm['per_seed'][s]['ratio']:.2f}× (seed {s})" for s in seeds)
        + f"; mean {sm['ratio_mean']:.2f}× ± {sm['ratio_sd']:.2f} (sd), ratio of the summed clocks "
          f"{sm['ratio_of_sums']:.2f}×; ≥ 2× in {sm['seeds_at_2x']} of {len(seeds)} seeds.**",
        f"**Paired test accuracy, composed − baseline over {pd['n']} (seed, configuration) pairs on the same "
        f"{pd['test_n']}-article test split: {pp(pd['mean'])} ± {100 * pd['sd']:.1f} pp (mean ± sd), "
        + (f"95% CI of the mean [{pp(pd['ci95'][0])}, {pp(pd['ci95'][1])}] pp "
           f"({'contains' if pd['zero_in_ci95'] else 'excludes'} 0; " if pd["n"] > 1 else "(one pair: no CI; ")
        + f"one test article = {100 / pd['test_n']:.2f} pp); every configuration reached its target: "
        f"{'yes' if sm['all_reached'] else 'no'}.**",
    ]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> Path:
    """Training loss and validation accuracy against optimizer step, both arms of every configuration (one-seed
    JSON), or per-seed totals and per-configuration clocks and test-accuracy differences (a `--seeds` JSON)."""
    if "per_seed" in data:
        return plot_seeds(data, path)
    from prunetune.reporting.plots import curves

    series: dict[str, list[list[float]]] = {}
    for name in data["baseline"]:
        for arm, r in (("baseline", data["baseline"][name]), ("composed", data["composed"][name])):
            series[f"{name} {arm} loss"] = [[row["step"], row["loss"]] for row in r.get("train_log", [])
                                            if "loss" in row]
            pts = r["points"] if arm == "composed" else [{"step": 0, "accuracy": r["start_val_accuracy"]}] + r["points"]
            series[f"{name} {arm} val accuracy"] = [[p["step"], p["accuracy"]] for p in pts]
    return curves(series, path, title="MiniLM / BBC News: model-level FT with and without module-level FT")


def plot_seeds(data: dict, path: Path) -> Path:
    """Left: each seed's total clock per arm (module-level FT stacked under the composed arm's model-level FT).
    Right: per configuration, composed vs baseline clock (mean over seeds) and the paired test-accuracy difference."""
    from prunetune.reporting import plots  # sets the Agg backend

    plt = plots.plt
    sm = data["summary"]
    seeds = [str(s) for s in sm["seeds"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2.2]})
    x = range(len(seeds))
    per = sm["per_seed"]
    ax1.bar([i - 0.2 for i in x], [per[s]["baseline_s"] for s in seeds], 0.4, label="baseline (fixed budget)")
    ax1.bar([i + 0.2 for i in x], [per[s]["module_ft_s"] for s in seeds], 0.4, label="module-level FT")
    ax1.bar([i + 0.2 for i in x], [per[s]["composability_s"] - per[s]["module_ft_s"] for s in seeds], 0.4,
            bottom=[per[s]["module_ft_s"] for s in seeds], label="composed: model-level FT to target")
    for i, s in enumerate(seeds):
        ax1.text(i, max(per[s]["baseline_s"], per[s]["composability_s"]) * 1.02, f"{per[s]['ratio']:.2f}×",
                 ha="center", fontsize=8)
    ax1.set_ylim(0, 1.5 * max(max(per[s]["baseline_s"], per[s]["composability_s"]) for s in seeds))
    ax1.set_xticks(list(x), [f"seed {s}" for s in seeds])
    ax1.set_ylabel("wall seconds, all configurations")
    ax1.legend(fontsize=7, loc="upper left")
    names = list(sm["configs"])
    cx = range(len(names))
    cs = sm["configs"]
    ax2.bar([i - 0.2 for i in cx], [cs[n]["baseline_clock_mean_s"] for n in names], 0.4, label="baseline clock")
    ax2.bar([i + 0.2 for i in cx], [cs[n]["composed_clock_mean_s"] for n in names], 0.4,
            label="composed clock (excl. module FT)")
    ax2.set_ylim(0, 1.4 * max(max(cs[n]["baseline_clock_mean_s"], cs[n]["composed_clock_mean_s"]) for n in names))
    ax2.set_xticks(list(cx), [f"{cs[n]['attention']:g}/{cs[n]['linear']:g}" for n in names], fontsize=8)
    ax2.set_xlabel("heads / linear removed")
    ax2.set_ylabel("wall seconds (mean over seeds)")
    ax3 = ax2.twinx()
    ax3.errorbar(list(cx), [100 * cs[n]["diff_mean"] for n in names], yerr=[100 * cs[n]["diff_sd"] for n in names],
                 fmt="ks", capsize=3, label="test acc: composed − baseline (pp, mean ± sd)")
    ax3.axhline(0, color="k", lw=0.5, ls=":")
    ax3.set_ylabel("test accuracy difference (pp)")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    fig.suptitle(f"{data['model']} / {data['data']}: {len(names)} configurations, seeds {', '.join(seeds)}")
    return plots._save(fig, path)


def _read_log(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


if __name__ == "__main__":
    sys.exit(main())
