"""LoSparse vs PAYT and Wanda→LoRA at the same parameter count on MiniLM / BBC News; dense full FT as ceiling.

At each budget B (fraction of the original linear parameters kept: 20 %, 15 %, 10 %), LoSparse keeps a rank
worth `rank_ratio` of each matrix plus the kept entries of S (B − the actual low-rank fraction, so the two
together are B); PAYT and Wanda→LoRA prune the same linears to sparsity 1 − B (their LoRA update is merged
under the mask, so it adds no parameter). Every method runs with the same training seeds on the same fixed
split (split seed 0: the seeds change the initialisation and data order, never the test set). Means ± sd over
seeds; a difference counts as a win only where the mean of the per-seed paired differences exceeds their sd.

Each row (method, budget, seed) writes OUT/rows/<key>.json and is skipped when that file exists, so a stopped
run resumes. The summary (all rows, aggregates, the markdown table, machine, sizes) goes to --results.

    nice python benchmarks/losparse.py --out /tmp/bench_losparse --results benchmarks/results/losparse_minilm.json
    nice python benchmarks/losparse.py --smollm --out /tmp/bench_losparse --results benchmarks/results/losparse_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SPLIT_SEED = 0
# budget -> rank ratio (the rest of the budget is kept S)
RANK_SPLIT = {0.20: 0.10, 0.15: 0.075, 0.10: 0.05}


def machine() -> dict:
    import torch

    from _machine import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg": os.getloadavg(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def tune_config(args, seed: int, **kw):
    """The shared budget of every row (one place, so the methods differ only in what they are)."""
    from prunetune.data.mixing import MixSpec
    from prunetune.tuning.config import TuneConfig

    base = dict(task="seq-cls", data="bbc-news", n_samples=args.n_samples, eval_samples=args.eval_samples,
                epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=seed,
                retention=False, export=False, mix=MixSpec(fraction=0.0))
    base.update(kw)
    cfg = TuneConfig(**base)
    if hasattr(cfg, "split_seed"):
        cfg.split_seed = SPLIT_SEED
    return cfg


def _clean(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_") and k not in ("layer_sparsity",)}


# ------------------------------------------------------------------------------------------------ rows
def row_dense(args, seed, out):
    from prunetune.tuning.finetune import finetune

    cfg = tune_config(args, seed, lora=False, kd=False, lr=args.full_lr, export=True)
    r = finetune(args.model, cfg, out, overwrite=True, kind="dense-full")
    return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "predictions": r["predictions"],
            "linear_kept_fraction": 1.0, "global_step": r["global_step"], "train_s": r["timings"]["train_s"],
            "teacher_dir": str(Path(out) / "model")}


def _payt_like(args, seed, out, budget, schedule):
    from prunetune.data.mixing import MixSpec
    from prunetune.methods.payt import PaytMethod, PaytSpec
    from prunetune.tuning.finetune import finetune

    cfg = tune_config(args, seed, lora=True, kd=True, kd_alpha=0.3, lr=args.lora_lr,
                      mix=MixSpec(fraction=args.payt_mix))
    if schedule == "oneshot":
        spec = PaytSpec(sparsity=round(1 - budget, 6), schedule="oneshot", start=0.0, every=1, unit="step",
                        criterion="wanda")
    else:
        spec = PaytSpec(sparsity=round(1 - budget, 6), schedule="agp", start=0.2, every=args.payt_every, unit="step",
                        criterion="wanda")
    r = finetune(args.model, cfg, out, overwrite=True, method=PaytMethod(spec), kind="payt" if schedule != "oneshot" else "prune-lora")
    return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "predictions": r["predictions"],
            "sparsity": r["sparsity"], "linear_kept_fraction": 1 - r["sparsity"], "global_step": r["global_step"],
            "train_s": r["timings"]["train_s"], "merge_changed_predictions": r.get("merge_changed_predictions")}


def row_payt(args, seed, out, budget):
    return _payt_like(args, seed, out, budget, "agp")


def row_wanda_lora(args, seed, out, budget):
    return _payt_like(args, seed, out, budget, "oneshot")


def row_losparse(args, seed, out, budget, distill_from: str | None = None, structured: str | None = "default"):
    from prunetune.methods.losparse import Losparse, LosparseSpec

    cfg = tune_config(args, seed, lora=False, kd=False, lr=args.losparse_lr)
    rank_ratio = RANK_SPLIT[budget]
    # keep of S = budget − the actual low-rank fraction (ranks are rounded up), so U·V + kept S = the budget
    probe = _lowrank_fraction(args.model, rank_ratio)
    keep = round(budget - probe, 6)
    spec = LosparseSpec(rank_ratio=rank_ratio, keep=keep, warmup_steps=args.warmup_unit, initial_warmup=1,
                        final_warmup=args.final_warmup, deltaT=args.delta_t,
                        structured_method=args.structured if structured == "default" else structured,
                        structured_direction=args.direction)
    if distill_from:
        spec.teacher, spec.kd_weight, spec.layer_weight, spec.kd_temp = distill_from, 1.0, 1.0, 2.0
    method = Losparse(spec)
    plain, tok, test, label_names, info = run_method(args.model, cfg, method, Path(out))
    counts = method.counts  # measured on the factorised model, before finalize materialised it
    res = {**info, "rank_ratio": rank_ratio, "keep_of_S": keep, "counts": counts,
           "linear_kept_fraction": counts["linear_kept_fraction"], "lowrank_fraction": counts["lowrank_fraction"],
           "sparse_fraction": counts["sparse_fraction"],
           "ranks": {n: d["rank"] for n, d in method.layer_info.items()}, "events": method.events,
           "schedule": method.summary()["losparse_schedule"], "spec": spec.to_dict()}
    if args.exports and seed == 0 and budget == min(args.budgets):
        res["exports"] = export_and_time(plain, tok, test, label_names, cfg, Path(out), res["predictions"])
    return res


def run_method(model_spec: str, cfg, method, out: Path):
    """The method through `tuning.finetune(..., method=)` (prepare, extra_loss, after_step after each optimizer
    step, finalize: the factorised export goes to OUT/factorized). Returns (materialised model, tokenizer, test
    examples, label names, row facts incl. predictions)."""
    from prunetune.tuning.finetune import finetune

    r = finetune(model_spec, cfg, out, method=method, overwrite=True, kind="losparse")
    info = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "predictions": r["predictions"],
            "global_step": r["global_step"], "train_s": r["timings"]["train_s"]}
    return r["_model"], r["_tokenizer"], r["_test"], None, info


def _lowrank_fraction(model_spec: str, rank_ratio: float) -> float:
    from prunetune.models.loading import load_model

    return _lowrank_fraction_of_model(load_model(model_spec, "seq-cls", num_labels=2).model, rank_ratio)


def export_and_time(plain, tok, test, label_names, cfg, out: Path, preds) -> dict:
    """Both exports, reloaded: same predictions, parameter counts, size on disk and CPU latency against the
    dense original (alternating, median of `repeats`). The factorised export is the one finalize wrote."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from prunetune.evaluation.speed import size_on_disk
    from prunetune.methods.losparse import parameter_counts
    from prunetune.models.arch import parameter_count
    from prunetune.models.export import save_hf_dir
    from prunetune.models.loading import load_model
    from prunetune.evaluation.task import predict_classes

    fac_dir, plain_dir = out / "factorized", out / "export-materialized"
    save_hf_dir(plain, tok, plain_dir)
    fac = load_model(str(fac_dir)).model
    mat = AutoModelForSequenceClassification.from_pretrained(plain_dir).eval()
    n_labels = mat.config.num_labels
    dense = load_model(cfg_model(None), "seq-cls", num_labels=n_labels).model.eval()
    texts = [e["text"] for e in test]
    p_fac = predict_classes(fac, tok, texts, cfg.max_length, progress=False)
    p_mat = predict_classes(mat, tok, texts, cfg.max_length, progress=False)
    enc = tok([e["text"] for e in test[:8]], truncation=True, max_length=cfg.max_length,
              padding="max_length", return_tensors="pt")
    times: dict[str, list[float]] = {"dense original": [], "materialized": [], "factorized": []}
    models = {"dense original": dense, "materialized": mat, "factorized": fac}
    with torch.inference_mode():
        for m in models.values():
            m(**enc)
        for _ in range(7):
            for k, m in models.items():
                t = time.perf_counter()
                m(**enc)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {"predictions_equal": {"factorized": p_fac == preds, "materialized": p_mat == preds},
            "params": {"dense original": parameter_count(dense), "materialized": parameter_count(mat),
                       "factorized": parameter_counts(fac)},
            "disk": {"materialized": size_on_disk(plain_dir), "factorized": size_on_disk(fac_dir)},
            "latency_ms": med, "latency_input": f"batch 8 x {cfg.max_length} tokens (padded)",
            "linears_only": linears_only(model_layers_dense(dense), fac, cfg.max_length),
            "latency_ratio_vs_dense": {k: v / med["dense original"] for k, v in med.items()},
            "latency_all_ms": {k: [x * 1000 for x in v] for k, v in times.items()}, "repeats": 7,
            "loadavg": os.getloadavg()}


def model_layers_dense(model) -> dict:
    from prunetune.methods.losparse import targets

    return {n: lin for n, (_, lin) in targets(model).items()}


def linears_only(dense_layers: dict, fac_model, seqlen: int, repeats: int = 7) -> dict:
    """The targeted layers alone (the part LoSparse changes), dense vs factorised, alternating, median ms of
    one pass over all of them on a batch 8 x seqlen input."""
    import torch

    from prunetune.models.factorized import FactorizedLinear

    fac_layers = {n: m for n, m in fac_model.named_modules() if isinstance(m, FactorizedLinear)}
    xs = {n: torch.randn(8, seqlen, lin.in_features) for n, lin in dense_layers.items()}
    t = {"dense": [], "factorized": []}
    with torch.no_grad():
        for _ in range(repeats):
            for kind, layers in (("dense", dense_layers), ("factorized", fac_layers)):
                t0 = time.perf_counter()
                for n, x in xs.items():
                    layers[n](x)
                t[kind].append((time.perf_counter() - t0) * 1000)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"median_ms": med, "ratio_factorized_vs_dense": med["factorized"] / med["dense"], "all_ms": t}


def cfg_model(model) -> str:
    return os.environ.get("LOSPARSE_BENCH_MODEL", "minilm-l6")


# ------------------------------------------------------------------------------------------------ summary
def paired(a: list[float], b: list[float]) -> dict:
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(d)
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return {"mean_diff": mean, "sd_diff": sd, "win": mean > sd and mean > 0, "loss": -mean > sd and mean < 0}


LOSPARSE_VARIANTS = ("LoSparse", "LoSparse-unstructured", "LoSparse+KD")
BASELINES = ("PAYT", "Wanda->LoRA")


def summarise(rows: dict[str, dict], args=None) -> dict:
    """Mean ± sd per (method, budget); each LoSparse variant against each baseline by paired seeds."""
    def runs(method, budget):
        return sorted((r for r in rows.values() if r["method"] == method and r["budget"] == budget),
                      key=lambda r: r["seed"])

    lines = ["| kept of linear params | method | how the budget is spent | accuracy (mean ± sd) | macro-F1 | seeds |",
             "|---|---|---|---|---|---|"]
    pairs = ["| kept | LoSparse variant | baseline | paired diff (mean ± sd) | verdict |", "|---|---|---|---|---|"]
    agg: dict = {}
    budgets = sorted({r["budget"] for r in rows.values() if r["budget"] < 1.0}, reverse=True)
    for b in [1.0] + budgets:
        for method in (*LOSPARSE_VARIANTS, *BASELINES, "dense full FT"):
            rs = runs(method, b)
            if not rs:
                continue
            a = [r["accuracy"] for r in rs]
            f = [r["macro_f1"] for r in rs]
            key = f"{method} @ {b:.0%}"
            agg[key] = {"accuracy_mean": statistics.mean(a), "accuracy_sd": statistics.stdev(a) if len(a) > 1 else 0.0,
                        "macro_f1_mean": statistics.mean(f), "seeds": [r["seed"] for r in rs], "accuracy": a,
                        "linear_kept_fraction": statistics.mean(r["linear_kept_fraction"] for r in rs)}
            if method.startswith("LoSparse"):
                r0 = rs[0]
                how = (f"rank {r0['lowrank_fraction']:.1%} + S {r0['sparse_fraction']:.1%} "
                       f"({r0['spec']['structured_method'] or 'unstructured'}"
                       f"{' ' + r0['spec']['structured_direction'] + 's' if r0['spec']['structured_method'] else ''})")
            elif method == "dense full FT":
                how = "all weights"
            else:
                how = f"{1 - rs[0]['linear_kept_fraction']:.1%} zeros (Wanda), LoRA merged under the mask"
            lines.append(f"| {b:.0%} | {method} | {how} | {agg[key]['accuracy_mean']:.2%} ± {agg[key]['accuracy_sd']:.2%} | "
                         f"{agg[key]['macro_f1_mean']:.2%} | {len(a)} |")
        for var in LOSPARSE_VARIANTS:
            lv = {r["seed"]: r["accuracy"] for r in runs(var, b)}
            for base in BASELINES:
                bv = {r["seed"]: r["accuracy"] for r in runs(base, b)}
                common = sorted(set(lv) & set(bv))
                if len(common) < 2:
                    continue
                p = paired([lv[s] for s in common], [bv[s] for s in common])
                p["seeds"] = common
                agg.setdefault("paired", {})[f"{var} - {base} @ {b:.0%}"] = p
                verdict = f"{var} wins" if p["win"] else (f"{base} wins" if p["loss"] else "no win (|mean| <= sd)")
                pairs.append(f"| {b:.0%} | {var} | {base} | {p['mean_diff']:+.2%} ± {p['sd_diff']:.2%} | {verdict} |")
    targets = {}
    for b in (0.15, 0.10):
        for var in LOSPARSE_VARIANTS:
            lv = {r["seed"]: r["accuracy"] for r in runs(var, b)}
            base = {m: {r["seed"]: r["accuracy"] for r in runs(m, b)} for m in BASELINES}
            if not lv or not all(base.values()):
                continue
            best = max(base, key=lambda m: statistics.mean(base[m].values()))
            common = sorted(set(lv) & set(base[best]))
            entry = {"best_baseline": best, "seeds": common,
                     "met_on_means": statistics.mean(lv.values()) >= statistics.mean(base[best].values())}
            if len(common) >= 2:
                p = paired([lv[s] for s in common], [base[best][s] for s in common])
                entry.update(p, not_worse_by_paired_rule=not p["loss"])
            targets[f"{var} >= best baseline at {b:.0%}"] = entry
    return {"table": "\n".join(lines), "paired_table": "\n".join(pairs), "aggregates": agg, "targets": targets}


def render(data: dict) -> str:
    """BENCHMARKS.md block from the committed JSON (run_all.py --check rebuilds it from the raw rows)."""
    rows = data["rows"]
    summ = summarise(rows, None)
    sz = data["sizes"]
    lines = [f"- command (one process per seed, run in parallel): `{data['command']}`",
             f"- code: {data.get('code', '-')}",
             f"- machine: {data['machine_line']}",
             f"- sizes: {sz['n_samples']} training articles, {sz['epochs']:g} epoch(s), batch {sz['batch_size']}, "
             f"{sz['max_length']} tokens, test = the whole fixed test split (split seed {data['split_seed']}); "
             f"seeds {', '.join(str(s) for s in data['seeds'])}; LoSparse lr {sz['losparse_lr']}, warm-ups "
             f"{sz['warmup_unit']} + {sz['final_warmup'] * sz['warmup_unit']:g} steps, deltaT {sz['delta_t']}; "
             f"PAYT / Wanda->LoRA: LoRA r8, lr {sz['lora_lr']}, KD alpha 0.3 from the initial model, Wanda "
             f"criterion, PAYT every {sz['payt_every']} steps from 20% of training; dense full FT lr {sz['full_lr']}",
             "", summ["table"], "", "Paired differences (same seeds; a win needs mean > sd):", "", summ["paired_table"],
             "", "Targets (LoSparse >= the best baseline at 15% and 10% kept):", ""]
    for k, v in summ["targets"].items():
        verdict = "met" if v["met_on_means"] and v.get("not_worse_by_paired_rule", True) else "missed"
        extra = (f", paired {v['mean_diff']:+.2%} ± {v['sd_diff']:.2%} on seeds {v['seeds']}"
                 if "mean_diff" in v else "")
        lines.append(f"- {k}: {verdict} (best baseline {v['best_baseline']}{extra})")
    ex = next((r["exports"] for r in rows.values() if r.get("exports")), None)
    if ex:
        fac = ex["params"]["factorized"]
        lat = ex["latency_ms"]
        lin = ex["linears_only"]["median_ms"]
        lines += ["", f"Exports of the LoSparse row with exports (seed 0, 10% kept, {ex['latency_input']}, medians of "
                  f"{ex['repeats']} alternating repeats, load average {ex['loadavg'][0]:.1f}):", "",
                  "| export | parameters stored | size on disk | forward latency | targeted linears only | "
                  "reloaded predictions = trained |", "|---|---|---|---|---|---|",
                  f"| dense original | {ex['params']['dense original']:,} | - | {lat['dense original']:.0f} ms | "
                  f"{lin['dense']:.0f} ms | - |",
                  f"| materialised (plain HF, W' = U·V + S⊙M) | {ex['params']['materialized']:,} | "
                  f"{ex['disk']['materialized']['bytes'] / 1e6:.1f} MB | {lat['materialized']:.0f} ms | "
                  f"{lin['dense']:.0f} ms (dense shapes) | {ex['predictions_equal']['materialized']} |",
                  f"| factorised (U, V, kept S) | {fac['model_params']:,} (linears {fac['linear_kept']:,} of "
                  f"{fac['linear_dense']:,}) | {ex['disk']['factorized']['bytes'] / 1e6:.1f} MB | "
                  f"{lat['factorized']:.0f} ms | {lin['factorized']:.0f} ms | {ex['predictions_equal']['factorized']} |"]
    sm = data.get("smollm2")
    if sm:
        c = sm["counts"]
        st = sm["spec"].get("structured_method") or "unstructured"
        st = st if st == "unstructured" else f"structured {sm['spec']['structured_direction']}s, {st}"
        lines += ["", f"SmolLM2-135M at {c['linear_kept_fraction']:.1%} of its linear parameters (rank "
                  f"{c['lowrank_fraction']:.1%} + S {c['sparse_fraction']:.1%}, S {st}), {sm['steps']} recovery "
                  f"steps of {sm['batch']} x {sm['seqlen']} tokens (lr {sm['lr']}): perplexity {sm['protocol']}", "",
                  "| model | perplexity |", "|---|---|",
                  f"| dense | {sm['dense']['value']:.2f} |",
                  f"| LoSparse at init (U·V + S = W) | {sm['losparse_init']['value']:.2f} |",
                  f"| LoSparse after recovery | {sm['losparse_after']['value']:.2f} |"]
    return "\n".join(lines)


def run_minilm(args) -> dict:
    rows_dir = Path(args.out) / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    plan = []
    for seed in args.seeds:
        plan.append(("dense full FT", 1.0, seed))
    for b in args.budgets:
        for seed in args.seeds:
            for method in args.methods:
                plan.append((method, b, seed))
    rows: dict[str, dict] = {}
    for method, b, seed in plan:
        key = f"{method.replace('->', '-').replace(' ', '_').replace('+', '_')}_{int(round(b * 100))}_s{seed}"
        path = rows_dir / f"{key}.json"
        if path.is_file():
            rows[key] = json.loads(path.read_text())
            continue
        if args.summarise_only:
            continue
        t0 = time.perf_counter()
        out = Path(args.out) / "runs" / key
        print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
        if method == "dense full FT":
            r = row_dense(args, seed, out)
        elif method == "PAYT":
            r = row_payt(args, seed, out, b)
        elif method == "Wanda->LoRA":
            r = row_wanda_lora(args, seed, out, b)
        elif method == "LoSparse":
            r = row_losparse(args, seed, out, b)
        elif method == "LoSparse-unstructured":
            r = row_losparse(args, seed, out, b, structured=None)
        elif method == "LoSparse+KD":
            teacher = rows_dir / f"dense_full_FT_100_s{seed}.json"
            r = row_losparse(args, seed, out, b, distill_from=json.loads(teacher.read_text())["teacher_dir"])
        else:
            raise SystemExit(f"unknown method {method}")
        r.update({"method": method, "budget": b, "seed": seed, "split_seed": SPLIT_SEED, "wall_s": time.perf_counter() - t0,
                  "loadavg": os.getloadavg()})
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(r, indent=2, default=str))
        tmp.rename(path)
        rows[key] = r
        print(f"    accuracy {r['accuracy']:.4f}  kept {r['linear_kept_fraction']:.4f}  {r['wall_s']:.0f}s", flush=True)
    return rows


def run_smollm(args) -> dict:
    """SmolLM2 at 50 % of its linear parameters (rank 25 % + S 25 %) after a short causal-LM recovery on
    WikiText-2 valid; perplexity on WikiText-2 test before (dense), at init (U·V + S = W, so dense), after."""
    import torch

    from prunetune.data.sources import load_text
    from prunetune.evaluation.perplexity import perplexity
    from prunetune.methods.base import MethodContext
    from prunetune.methods.losparse import Losparse, LosparseSpec, parameter_counts
    from prunetune.models.loading import load_model
    from prunetune.tuning.config import TuneConfig
    from prunetune.tuning.data import load_task_data

    out = Path(args.out) / "smollm2"
    res_path = out / "result.json"
    if res_path.is_file():
        return json.loads(res_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m", "causal-lm")
    model, tok = loaded.model, loaded.tokenizer
    test = load_text("wikitext2", "test", data_dir=os.environ.get("PRUNETUNE_DATA_DIR"))
    ppl = lambda m: perplexity(m, tok, test, seqlen=args.sm_seqlen, max_windows=args.sm_windows)  # noqa: E731
    t0 = time.perf_counter()
    dense_ppl = ppl(model)
    cfg = TuneConfig(task="causal-lm", data="wikitext2", lora=False, kd=False, epochs=1, lr=args.sm_lr,
                        batch_size=4, max_length=args.sm_seqlen, n_samples=args.sm_steps * 4, eval_samples=4, seed=0,
                        retention=False, export=False, data_dir=os.environ.get("PRUNETUNE_DATA_DIR"))
    data = load_task_data(cfg, tok)
    from prunetune.tuning.data import encode_lm

    train = encode_lm(tok, [e["text"] for e in data["train"]], cfg.max_length)
    steps = math.ceil(len(train) / cfg.batch_size)
    spec = LosparseSpec(rank_ratio=0.25, keep=round(0.5 - _lowrank_fraction_of_model(model, 0.25), 6),
                        initial_warmup_steps=args.sm_iw, final_warmup_steps=args.sm_fw, deltaT=args.sm_delta_t,
                        structured_method=args.structured, structured_direction=args.direction)
    method = Losparse(spec)
    ctx = MethodContext(task="causal-lm", tokenizer=tok, max_steps=steps, steps_per_epoch=steps, seed=0)
    model = method.prepare(model, ctx)
    init_ppl = ppl(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    from transformers import DataCollatorForLanguageModeling

    coll = DataCollatorForLanguageModeling(tok, mlm=False)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=g).tolist()
    losses = []
    t_train = time.perf_counter()
    for s in range(steps):
        batch = coll([train[i] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]])
        outp = model(**batch)
        outp.loss.backward()
        opt.step()
        sched.step()
        ctx.step = s + 1
        method.after_step(model, ctx)
        if len(ctx.masks):
            ctx.masks.apply(model)
        opt.zero_grad()
        losses.append(float(outp.loss))
        print(f"    smollm2 step {s + 1}/{steps} loss {losses[-1]:.3f}", flush=True)
    train_s = time.perf_counter() - t_train
    model = method.finalize(model, ctx)
    model.eval()
    after_ppl = ppl(model)
    counts = method.counts  # of the factorised model, measured by finalize before it materialised
    res = {"model": "smollm2-135m", "dense": dense_ppl, "losparse_init": init_ppl, "losparse_after": after_ppl,
           "counts": counts, "spec": spec.to_dict(), "steps": steps, "batch": cfg.batch_size, "seqlen": cfg.max_length,
           "lr": cfg.learning_rate, "train_losses": losses, "train_s": train_s, "events": method.events,
           "wall_s": time.perf_counter() - t0, "loadavg": os.getloadavg(),
           "protocol": f"WikiText-2 test, windows of {args.sm_seqlen} tokens, first {args.sm_windows} windows; "
                       "recovery on WikiText-2 valid pieces"}
    res_path.write_text(json.dumps(res, indent=2, default=str))
    return res


def _lowrank_fraction_of_model(model, rank_ratio: float) -> float:
    from prunetune.methods.losparse import rank_for, targets

    dense = lowrank = 0
    for _, (_, lin) in targets(model).items():
        m, n = lin.weight.shape
        dense += m * n
        lowrank += rank_for(m, n, rank_ratio) * (m + n)
    return lowrank / dense


def main(argv=None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--out", default="/tmp/bench_losparse")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/losparse_minilm.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.20, 0.15, 0.10])
    p.add_argument("--methods", nargs="+", default=["LoSparse", "PAYT", "Wanda->LoRA"],
                   help="LoSparse | LoSparse-unstructured | LoSparse+KD | PAYT | Wanda->LoRA")
    p.add_argument("--n-samples", type=int, default=400)
    p.add_argument("--eval-samples", type=int, default=100)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--full-lr", type=float, default=1e-4)
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--payt-mix", type=float, default=0.0)
    p.add_argument("--payt-every", type=int, default=2, help="PAYT prunes every N optimizer steps")
    p.add_argument("--losparse-lr", type=float, default=3e-4)
    p.add_argument("--warmup-unit", type=int, default=10, help="LoSparse warmup_steps (unit of the warm-ups)")
    p.add_argument("--final-warmup", type=float, default=3.0)
    p.add_argument("--delta-t", type=int, default=5)
    p.add_argument("--structured", default="mean", help="mean|sum|max|min|none")
    p.add_argument("--direction", default="row")
    p.add_argument("--exports", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--summarise-only", action="store_true", help="aggregate the rows that exist; run none")
    p.add_argument("--threads", type=int, default=None, help="torch threads (several seeds in parallel: 1)")
    p.add_argument("--smollm", action="store_true", help="run the SmolLM2 50%% perplexity part instead")
    p.add_argument("--sm-steps", type=int, default=40)
    p.add_argument("--sm-seqlen", type=int, default=256)
    p.add_argument("--sm-windows", type=int, default=40)
    p.add_argument("--sm-lr", type=float, default=2e-4)
    p.add_argument("--sm-iw", type=int, default=4)
    p.add_argument("--sm-fw", type=int, default=12)
    p.add_argument("--sm-delta-t", type=int, default=4)
    args = p.parse_args(argv)
    if args.structured in ("none", ""):
        args.structured = None
    os.environ.setdefault("PRUNETUNE_PROGRESS", "0")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sizes = {k: v for k, v in vars(args).items() if k not in ("results",)}
    payload: dict = {"command": "python benchmarks/losparse.py " + " ".join(sys.argv[1:]), "machine": machine(),
                     "sizes": sizes, "split_seed": SPLIT_SEED}
    if args.smollm:
        payload["smollm2"] = run_smollm(args)
    else:
        os.environ["LOSPARSE_BENCH_MODEL"] = args.model
        rows = run_minilm(args)
        payload["rows"] = {k: {kk: vv for kk, vv in r.items() if kk != "predictions"} for k, r in rows.items()}
        payload["summary"] = summarise(rows, args)
        print(payload["summary"]["table"])
        print(payload["summary"]["paired_table"])
        print(json.dumps(payload["summary"]["targets"], indent=2))
    payload["wall_s"] = time.perf_counter() - t0
    payload["machine"]["loadavg_end"] = os.getloadavg()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(payload, indent=2, default=str))
    print(f"written {args.results}")


if __name__ == "__main__":
    main()
