"""PAYT's runs and its full comparison (`prunetune payt --full-evaluate`): every configuration of the seed's
table (dense full / LoRA FT, prune only, prune then FT, PAYT and its variants) trained from one model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from prunetune.data.spec import DataSpec
from prunetune.errors import PrunetuneError
from prunetune.evaluation.retention import retention
from prunetune.methods.payt.method import PaytMethod, compute_masks
from prunetune.methods.payt.spec import PaytSpec
from prunetune.models.loading import load_model
from prunetune.pruning.masks import sparsity_report
from prunetune.tuning.data import load_task_data
from prunetune.tuning.evaluate import task_eval
from prunetune.tuning.finetune import finetune
from prunetune.tuning.spec import TuneSpec


def run_payt(model: str | nn.Module, tune: TuneSpec, spec: PaytSpec, out: Path | str, **kw: Any) -> dict:
    """Fine-tune with PAYT: `tune` (the recipe's `tune` section) and `kw` (data, task, seed, masks, ...) as
    `tuning.finetune.finetune` takes them; see there for what is written."""
    return finetune(model, tune, out, method=PaytMethod(spec), kind="payt", **kw)


ROWS = ("dense full FT", "dense LoRA FT", "prune (no FT)", "prune -> full FT", "prune -> LoRA FT", "PAYT",
        "PAYT without KD", "PAYT with the other LoRA scaling")


def _other_scaling(tune: TuneSpec) -> str:
    return "PAYT plain LoRA" if tune.rslora else "PAYT rsLoRA"


def prune_only(model_spec: str, tune: TuneSpec, spec: PaytSpec, *, data: DataSpec | None = None,
               task: str = "seq-cls", seed: int = 0) -> dict:
    """The pruned model without any fine-tuning: the PAYT criterion at the target sparsity, scored as is.

    For a classifier whose head is new this is chance level by construction; the row shows what pruning
    alone leaves, as the seed's comparison does.
    """
    source = data if data is not None else DataSpec()
    t0 = time.perf_counter()
    if task == "causal-lm":
        loaded = load_model(model_spec, "causal-lm")
        examples = load_task_data(tune, source, task=task, seed=seed, tokenizer=loaded.tokenizer)
    else:
        examples = load_task_data(tune, source, task=task, seed=seed)
        loaded = load_model(model_spec, "seq-cls", label_names=examples["label_names"])
    model, tok = loaded.model.eval(), loaded.tokenizer
    masks = compute_masks(model, spec.criterion, spec.sparsity, None, tok,
                          "\n\n".join(e["text"] for e in examples["train"]), spec.nsamples, spec.seqlen)
    masks.apply(model)
    test = task_eval(model, tok, examples, task=task, max_length=tune.seqlen, split_seed=source.split_seed)
    out = {"kind": "prune-only", "test_after_merge": {k: v for k, v in test.items() if k != "predictions"},
           "sparsity": sparsity_report(model)["sparsity"], "teacher": "none", "mixing": {"mixed": 0},
           "timings": {"train_s": 0.0, "total_s": time.perf_counter() - t0}}
    if "accuracy" in test:
        out["accuracy"], out["macro_f1"] = test["accuracy"], test["macro_f1"]
    if tune.retention:
        out["retention"] = retention(model, model_spec, tok, data_dir=source.data_dir,
                                     max_windows=tune.retention_windows, max_length=tune.seqlen)
    return out


# ------------------------------------------------------------------------------------------------ full evaluation
#: the configurations `prunetune payt --full-evaluate` compares, in the table's order: the seed's eight runs on the
#: same data, split, seed and budget, preceded by the untuned model ("original", retention's reference point)
#: when retention is measured. Each is one stage of the command's recipe (`pipelines.stages.run_full_evaluate`).
CONFIGURATIONS = ("original", "dense-full", "dense-lora", "prune-only", "prune-full", "prune-lora", "payt",
                  "payt-nokd", "payt-other-scaling")
_LABELS = {"original": "original (no tuning)", "dense-full": "dense full FT", "dense-lora": "dense LoRA FT",
           "prune-only": "prune (no FT)", "prune-full": "prune -> full FT", "prune-lora": "prune -> LoRA FT",
           "payt": "PAYT", "payt-nokd": "PAYT without KD"}


def configuration_label(run: str, tune: TuneSpec) -> str:
    """The configuration's row label in the table (the other-scaling row names the scaling it uses)."""
    return _other_scaling(tune) if run == "payt-other-scaling" else _LABELS[run]


def _full_ft(tune: TuneSpec, full_lr: float | None) -> TuneSpec:
    return tune.model_copy(update={"mode": "full", "lr": full_lr})


BASELINES = ("dense-full", "dense-lora", "prune-full", "prune-lora")


def _plain(tune: TuneSpec) -> TuneSpec:
    """`tune` without KD and without data mixing: a baseline as PAYT's own comparison trains it, on the task alone."""
    return tune.model_copy(update={"kd": False, "mix": tune.mix.model_copy(update={"fraction": 0.0})})


def run_configuration(run: str, model_spec: str, tune: TuneSpec, spec: PaytSpec, out: Path | str, *,
                      data: DataSpec | None = None, task: str = "seq-cls", seed: int = 0, export: bool = True,
                      full_lr: float | None = None, resume: bool = False, baselines: str = "plain") -> dict:
    """One configuration of the comparison, from `model_spec`; the tuning result (`finetune`'s dict).

    Every configuration trains on `data` with head `task` at `seed` (the run's, as `finetune` takes them). The
    PAYT rows use `tune`'s KD and data mixing unless their name says otherwise. The baselines (dense full/LoRA
    FT, prune -> full/LoRA FT) train `plain` by default: no KD, no mixing, as in PAYT's own comparison, whose
    claim (better than fine-tuning and prune-then-fine-tune) is made against them; `baselines="distilled"` gives
    them `tune`'s KD and mixing too (the table's KD and mixing columns say which each row had). `tune.lr` is the
    LoRA runs' learning rate; the full-FT runs get `full_lr` (None: the full-FT default), since a rate that suits a
    rank-8 adapter would wreck every weight of the model at once. prune -> X FT is PAYT with a one-shot schedule
    at step 0 (same criterion, same teacher: the dense initial model), so the only difference to PAYT is *when*
    the pruning happens. "payt-other-scaling" is PAYT with plain LoRA when `tune.rslora`, else rsLoRA.
    `resume`: a trained configuration continues from its last checkpoint in `out`.
    """
    if run not in CONFIGURATIONS:
        raise PrunetuneError(f"unknown full-evaluate configuration '{run}'; choose one of: {', '.join(CONFIGURATIONS)}")
    if baselines not in ("plain", "distilled"):
        raise PrunetuneError(f"unknown full-evaluate baselines '{baselines}'; choose plain or distilled")
    if run in BASELINES and baselines == "plain":
        tune = _plain(tune)
    oneshot = PaytSpec(sparsity=spec.sparsity, schedule="oneshot", start=0.0, every=1, unit="step",
                       criterion=spec.criterion, nsamples=spec.nsamples, seqlen=spec.seqlen)
    source = data if data is not None else DataSpec()
    if run == "original":
        return original_retention(model_spec, tune, task=task, data=source)
    if run == "prune-only":
        return prune_only(model_spec, tune, spec, data=source, task=task, seed=seed)
    kw = {"data": source, "task": task, "seed": seed, "export": export, "kind": run, "resume": resume}
    if run in ("dense-full", "dense-lora"):
        run_tune = _full_ft(tune, full_lr) if run == "dense-full" else tune.model_copy(update={"mode": "lora"})
        return finetune(model_spec, run_tune, out, **kw)
    if run in ("prune-full", "prune-lora"):
        run_tune = _full_ft(tune, full_lr) if run == "prune-full" else tune
        return finetune(model_spec, run_tune, out, method=PaytMethod(oneshot), **kw)
    if run == "payt-nokd":
        tune = tune.model_copy(update={"kd": False})
    elif run == "payt-other-scaling":
        tune = tune.model_copy(update={"rslora": not tune.rslora})
    return finetune(model_spec, tune, out, method=PaytMethod(spec), **kw)


def original_retention(model_spec: str, tune: TuneSpec, *, task: str = "seq-cls", data: DataSpec | None = None) -> dict:
    """The untuned model's retention value: the reference point of the table's retention column."""
    ref = load_model(model_spec, "seq-cls" if task == "seq-cls" else "causal-lm", num_labels=2)
    return {"retention": retention(ref.model, model_spec, ref.tokenizer,
                                   data_dir=(data if data is not None else DataSpec()).data_dir,
                                   max_windows=tune.retention_windows, max_length=tune.seqlen), "sparsity": 0.0}


def table_row(result: dict) -> dict:
    """What the comparison keeps of a configuration's result (no model, predictions or per-layer detail)."""
    return {k: v for k, v in result.items() if not k.startswith("_") and k not in ("predictions", "layer_sparsity")}


def comparison_payload(model_spec: str, tune: TuneSpec, spec: PaytSpec, runs: dict[str, dict],
                       full_lr: float | None = None, baselines: str = "plain", *, data: DataSpec | None = None,
                       task: str = "seq-cls", seed: int = 0, export: bool = True) -> dict:
    """full_evaluate.json: the settings (`tune` recorded with the run's data, task and seed), every
    configuration's result (label -> `table_row`) and the table."""
    source = data if data is not None else DataSpec()
    return {"model": model_spec, "tune": tune.record(source, task=task, seed=seed, export=export),
            "full_ft_learning_rate": _full_ft(tune, full_lr).learning_rate,
            "baselines": baselines, "payt": spec.to_dict(), "runs": runs, "table": comparison_table(runs)}


def _kd_cell(r: dict) -> str | None:
    teacher = r.get("teacher")
    if teacher is None:
        return None
    return "no" if teacher == "none" else "yes"


def _mix_cell(r: dict) -> str | None:
    mix = r.get("mixing")
    if mix is None:
        return None
    n = mix.get("mixed", 0)
    return f"{n} ({mix['fraction']:.0%})" if n else "no"


def comparison_table(runs: dict[str, dict]) -> dict:
    """Rows per run: accuracy and macro-F1 of the exported model, real-zero sparsity, retention (metric named),
    train time, and whether the run distilled from a teacher (KD) and mixed general text in."""
    ret_name = next((r["retention"]["metric"] for r in runs.values() if r.get("retention")), "retention")
    head = ["run", "accuracy", "macro-F1", "sparsity (real zeros)", f"retention: {ret_name}", "train s", "KD",
            "mixing"]
    rows = []
    for label, r in runs.items():
        ret = r.get("retention", {}).get("value")
        rows.append([label, r.get("accuracy"), r.get("macro_f1"), r.get("sparsity"), ret,
                     r.get("timings", {}).get("train_s"), _kd_cell(r), _mix_cell(r)])

    def fmt(v, i):
        if v is None:
            return "-"
        if isinstance(v, str):
            return v
        return f"{v:.2%}" if i in (1, 2, 3) else (f"{v:.4f}" if i == 4 else f"{v:.0f}")

    md = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    md += "".join("| " + " | ".join(fmt(v, i) for i, v in enumerate(row)) + " |\n" for row in rows)
    return {"columns": head, "rows": rows, "markdown": md}
