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
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("PRUNETUNE_PROGRESS", "0")

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
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    run = {"data": DataSpec(train=a.data), "task": "seq-cls"}  # finetune's run arguments beside the spec

    def cfg(epochs: float, lr: float | None = None) -> TuneSpec:
        return TuneSpec(mode="full", kd=False, steps=None, epochs=epochs, lr=lr or a.lr, batch_size=a.batch_size,
                        seqlen=a.max_length, n_samples=a.n_samples, eval_samples=a.eval_samples, test_samples=4,
                        retention=False)

    data = load_task_data(cfg(1.0), run["data"])
    val, test = data["validation"], load_task_data(TuneSpec(test_samples=None), run["data"])["test"]
    steps_per_epoch = -(-len(data["train"]) // a.batch_size)

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

    # -- 0. the original: dense MiniLM fine-tuned on the task (shared; outside both clocks) --------------
    orig_dir = work / "original" / "model"
    dense = _load_json(work / "original.json")
    if dense is None:
        log("fine-tuning the dense original")
        r = finetune(a.model, cfg(a.dense_epochs, lr=a.dense_lr), work / "original", **run, export=True,
                     overwrite=True, callbacks=(NoCheckpoints(),))
        t = test_eval(r["_model"], r["_tokenizer"])
        clock = C.ValidationClock(r["_tokenizer"], val, a.max_length, [])
        dense = {"val_accuracy": clock.accuracy(r["_model"]), "val_n": len(val), "test": t,
                 "train_s": r["timings"]["train_s"], "steps": r["global_step"], "lr": a.dense_lr,
                 "epochs": a.dense_epochs}
        _write_json(work / "original.json", dense)
    loaded = load_model(str(orig_dir), "seq-cls", label_names=data["label_names"])
    original, tok = loaded.model, loaded.tokenizer
    if dense.get("val_n") != len(val):  # an original reused with another validation size: score it on this one
        dense.update(val_accuracy=C.ValidationClock(tok, val, a.max_length, []).accuracy(original), val_n=len(val))
        _write_json(work / "original.json", dense)
    log(f"original: val {dense['val_accuracy']:.3f} test {dense['test']['accuracy']:.3f}")

    configs = C.parse_configurations(a.attention, a.linear, grid=a.grid)
    adapter = get_adapter(original)
    pl = C.plan(configs, adapter, attention_units=("attention",), linear_units=("o", "up", "down"))
    log(f"{len(configs)} configurations -> {len(pl.units)} unique units ({pl.unit_count_without_dedup} without dedup)")

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

    # -- 1. baseline ----------------------------------------------------------------------------------
    base: dict = {}
    for c in configs:
        p = work / f"baseline-{c.name}.json"
        r = _load_json(p)
        if r is None:
            log(f"baseline {c.name}: prune + {a.budget} steps")
            t0 = time.perf_counter()
            res = C.train_units(original, [], pl.members[c.name], C.ModuleFTSettings(), None, finetune=False)
            model, masks = C.compose(original, pl.members[c.name], res)
            prune_s = time.perf_counter() - t0
            checks = [a.budget // 4, a.budget // 2, 3 * a.budget // 4, a.budget]
            r = model_ft(f"baseline-{c.name}", model, masks, None, checks)
            final_check = next(pt for pt in r["points"] if pt["step"] == a.budget)
            r.update({"prune_s": prune_s, "sparsity": masks.sparsity(),
                      "final_check_s": r["eval_s"] / max(len(r["points"]), 1),
                      "clock_total_s": prune_s + r["step_s"] + r["eval_s"] / max(len(r["points"]), 1),
                      "target": final_check["accuracy"]})
            _write_json(p, r)
        base[c.name] = r
        log(f"baseline {c.name}: start {r['start_val_accuracy']:.3f} -> val {r['target']:.3f}, "
            f"test {r['test']['accuracy']:.3f}, clock {r['clock_total_s']:.0f}s")

    # -- 2. composability -----------------------------------------------------------------------------
    mod = _load_json(work / "modules.json")
    settings = C.ModuleFTSettings(linear_steps=a.linear_steps, linear_lr=a.linear_lr,
                                  attention_steps=a.attention_steps, attention_lr=a.attention_lr,
                                  attention_batch=a.attention_batch)
    texts = [e["text"] for e in data["train"][: a.module_texts]]
    batches = C.text_batches(tok, texts, a.max_length, a.attention_batch)
    cache = C.ModuleCache(work / "module-cache")
    t0 = time.perf_counter()
    results = C.train_units(original, batches, pl.units, settings, cache, progress=log)
    if mod is None:  # the first run that trained them holds the real cost
        mod = {"wall_s": time.perf_counter() - t0, **results.summary(), "settings": settings.to_dict(),
               "texts": len(texts), "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches))}
        _write_json(work / "modules.json", mod)
    log(f"module-level FT: {mod['wall_s']:.0f}s for {len(pl.units)} units")
    comp: dict = {}
    for c in configs:
        p = work / f"compose-{c.name}.json"
        r = _load_json(p)
        if r is None:
            target = base[c.name]["target"]
            log(f"compose {c.name}: target {target:.3f}")
            t0 = time.perf_counter()
            model, masks = C.compose(original, pl.members[c.name], results)
            compose_s = time.perf_counter() - t0
            r = model_ft(f"compose-{c.name}", model, masks, target, C.geometric_checks(a.budget))
            r.update({"compose_s": compose_s, "sparsity": masks.sparsity(),
                      "clock_total_s": compose_s + r["clock_s"]})
            _write_json(p, r)
        comp[c.name] = r
        log(f"compose {c.name}: start {r['start_val_accuracy']:.3f}, reached at {r['reached_at_step']}, "
            f"val {r['final_val_accuracy']:.3f} test {r['test']['accuracy']:.3f}, clock {r['clock_total_s']:.0f}s")

    # -- 3. summary -----------------------------------------------------------------------------------
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
        "settings": {k: v for k, v in vars(a).items() if k not in ("work", "out")},
        "protocol": (f"train {len(data['train'])} articles, validation {len(val)} (checks), test {len(test)} "
                     f"(whole split, once per arm), max_length {a.max_length}, batch {a.batch_size}, full FT lr "
                     f"{a.lr}, no KD; baseline budget {a.budget} steps; composability stops at the first check "
                     f"(steps 0, 2, 4, 8, ...) reaching the baseline's final validation accuracy"),
        "original": dense, "plan": pl.to_dict(), "module_ft": {k: v for k, v in mod.items() if k != "units"},
        "module_units": mod.get("units"),
        "rows": rows, "baseline": base, "composed": comp,
        "totals": {"baseline_s": base_total, "composability_s": comp_total, "module_ft_s": mod["wall_s"],
                   "ratio": base_total / comp_total if comp_total else None,
                   "target_2x_holds": bool(comp_total and base_total / comp_total >= 2.0
                                           and all(r["holds"] for r in rows))},
        "wall_s": time.perf_counter() - t_run,
    }
    _write_json(Path(a.out), out)
    log(f"baseline {base_total:.0f}s, composability {comp_total:.0f}s (module FT {mod['wall_s']:.0f}s): "
        f"ratio {out['totals']['ratio']:.2f}x")
    print(render(out))
    return 0


def render(data: dict) -> str:
    """The BENCHMARKS.md table from the raw JSON this script writes (`--render FILE` prints it)."""
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


def plot(data: dict, path: Path) -> Path:
    """Training loss and validation accuracy against optimizer step, both arms of every configuration."""
    from prunetune.reporting.plots import curves

    series: dict[str, list[list[float]]] = {}
    for name in data["baseline"]:
        for arm, r in (("baseline", data["baseline"][name]), ("composed", data["composed"][name])):
            series[f"{name} {arm} loss"] = [[row["step"], row["loss"]] for row in r.get("train_log", [])
                                            if "loss" in row]
            pts = r["points"] if arm == "composed" else [{"step": 0, "accuracy": r["start_val_accuracy"]}] + r["points"]
            series[f"{name} {arm} val accuracy"] = [[p["step"], p["accuracy"]] for p in pts]
    return curves(series, path, title="MiniLM / BBC News: model-level FT with and without module-level FT")


def _read_log(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


if __name__ == "__main__":
    sys.exit(main())
