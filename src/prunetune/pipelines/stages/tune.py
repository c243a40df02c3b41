"""The training stages: `finetune`, `payt`, PAYT's `full_evaluate` comparison, the ordering study."""

from __future__ import annotations

import json
from pathlib import Path

from prunetune.data.sources import load_text
from prunetune.errors import PrunetuneError
from prunetune.evaluation.task import examples_digest
from prunetune.pipelines.stages.common import TUNE_DIR, dump, save_model, sparsity_metric
from prunetune.pipelines.stages.evaluate import evaluate_model
from prunetune.pipelines.stages.prune import prune_model
from prunetune.pruning.masks import MaskSet
from prunetune.registry import StageKind, register_stage
from prunetune.rundir import atomic_write_json, atomic_write_text
from prunetune.tuning.spec import check_task

PACKAGE = "prunetune.pipelines.stages"  # stages are looked up on the package (tests patch them there)


def tune_run(recipe, seed: int, task: str | None = None, *, export: bool = False,
             train_text: Path | None = None) -> dict:
    """What `tuning.finetune.finetune` takes beside the recipe's `tune` spec: the recipe's `data` section (its
    `train` replaced by `train_text`, the sized training text of a causal LM, when given), the head (`task`,
    default the recipe model's), the seed, and whether the tuning module exports the model. Stages save the
    model themselves (`export=False`); the full-evaluate configurations let the tuning module export theirs.
    """
    data = recipe.data if train_text is None else recipe.data.model_copy(update={"train": str(train_text)})
    return {"data": data, "task": check_task(task or recipe.model.task), "seed": seed, "export": export}


def read_curves(log_csv: Path) -> dict:
    """Training / eval curves from the Trainer's CSV log: {series: [[step, value], ...]}."""
    import csv

    curves: dict[str, list] = {}
    if not log_csv.is_file():
        return curves
    with log_csv.open(newline="") as fh:
        for row in csv.DictReader(fh):
            for key in ("loss", "eval_loss", "eval_accuracy", "eval_macro_f1"):
                v = row.get(key)
                if v not in (None, ""):
                    curves.setdefault(key, []).append([int(float(row["step"])), float(v)])
    return curves


def sized_training_text(recipe, tokenizer, n_train: int | None, max_length: int, path: Path) -> Path:
    """The first documents of the training text, just enough for `n_train` pieces of `max_length` tokens.

    The tuning module cuts its text into pieces and keeps 10% for validation and 10% as a held-out test it
    scores in full; on a whole corpus that held-out scoring dwarfs a short recovery run, so the pipeline
    hands it only the text the run uses (plus the 20% held out). Documents are taken in the fixed order of
    the source's training split, so the text is a pure function of the recipe.
    """
    src = load_text(recipe.data.train, recipe.data.train_split, data_dir=recipe.data.data_dir)
    if n_train is None:
        atomic_write_text(path, src.text)
        return path
    need = int(n_train / 0.8) + 4  # pieces: the tuning module keeps 10% + 10% of them out of training
    kept, pieces, cur = [], 0, 0
    for line in src.text.splitlines():  # pieces close on line boundaries once they hold max_length tokens
        kept.append(line)
        if not line.strip():
            continue
        cur += len(tokenizer(line, add_special_tokens=False)["input_ids"])
        if cur >= max_length:
            pieces, cur = pieces + 1, 0
            if pieces >= need:
                break
    docs = ["\n".join(kept)]
    atomic_write_text(path, "\n\n".join(docs))  # every rank writes the same text: none reads a half-written file
    return path


def test_set_protocol(test: dict, res: dict, recipe) -> dict:
    """How a tuning run's held-out score was measured, with a fingerprint of the exact test set it used."""
    examples = res.get("_test") or []
    return {"what": test.get("protocol"), "model": "merged (the exported weights)", "n": len(examples),
            "split_seed": recipe.data.split_seed, "examples_sha256": examples_digest(examples)}


def finetune_model(model_spec: str, recipe, spec, masks, seed: int, work: Path, task: str | None = None,
                   tokenizer=None, resume: bool = False) -> dict:
    """Fine-tune `model_spec` with the tuning module; returns {model, tokenizer, curves, metrics}.

    `resume`: continue the tuning run in `work` from its last complete checkpoint."""
    # the training code (transformers' Trainer, peft, datasets: ~120 MiB) loads when a training stage runs, not
    # when the registry imports this module for a run without one (`prunetune prune`'s pruning peak)
    from prunetune.tuning.finetune import finetune
    run = tune_run(recipe, seed, task)
    if run["task"] == "causal-lm":
        run = tune_run(recipe, seed, task, train_text=sized_training_text(
            recipe, tokenizer, spec.train_samples, spec.seqlen, work.with_name(work.name + "-train.txt")))
    res = finetune(model_spec, spec, work, **run, masks=masks if masks is not None else MaskSet(), resume=resume)
    if "_model" not in res:  # a rank other than 0 of a multi-process launch: rank 0 evaluates and saves
        return {"model": None, "tokenizer": None, "curves": {}, "metrics": {}}
    test = res.get("test_after_merge", {})
    metrics: dict = {"train_loss": {"value": res["train_loss"], "protocol": {
        "steps": res["global_step"], "examples": res["train_examples"], "mode": spec.mode,
        "lora_rank": spec.lora_rank if spec.mode == "lora" else None,
        "lora_roles": (spec.lora_roles or "all prunable linears") if spec.mode == "lora" else None,
        "batch_size": spec.batch_size,
        "seqlen": spec.seqlen, "lr": spec.learning_rate, "data": res["data"], "teacher": res["teacher"]}}}
    for key in ("loss", "accuracy", "macro_f1"):
        if key in test:
            metrics[f"heldout_{key}"] = {"value": test[key], "protocol": test_set_protocol(test, res, recipe)}
    metrics["train_seconds"] = {"value": res["timings"].get("train_s"), "protocol": {"what": "Trainer.train wall time"}}
    return {"model": res["_model"], "tokenizer": res["_tokenizer"], "curves": read_curves(work / "train_log.csv"),
            "metrics": metrics}


def run_finetune(state, out_dir: Path) -> dict:
    """LoRA (or full) fine-tuning that keeps the masks; the merged model (W + sBA) * M is saved."""
    import shutil

    # filled by the tuning module when the input is a pruned model directory (its masks.safetensors): the
    # stage's model then carries the masks on, as a pruned stage before it would have passed them
    masks = state.masks() or MaskSet()
    work = out_dir / TUNE_DIR
    res = finetune_model(state.model_spec(), state.recipe, state.spec, masks, state.seed + state.index, work,
                         tokenizer=state.tokenizer(), resume=state.resume)
    if not state.is_main:  # trained along; rank 0 saves
        return {}
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the stage is the checkpoint; keep logs only
    dump(out_dir / "curves.json", res["curves"])
    metric, layers = sparsity_metric(res["model"])
    dump(out_dir / "layer_sparsity.json", layers)
    save_model(state, out_dir, res["model"], res["tokenizer"], masks)
    return {"metrics": {"sparsity": metric, **res["metrics"]}}


register_stage(StageKind("finetune", f"{PACKAGE}:run_finetune", "tune", produces_model=True, resumable=True, ranks="all",
                         reads=("data.train", "tune.teacher")))


def run_payt(state, out_dir: Path) -> dict:
    """Prune-As-You-Tune through `prunetune.methods.payt`; saves the merged sparse model and its masks."""
    # the training code (transformers' Trainer, peft, datasets: ~120 MiB) loads when a training stage runs, not
    # when the registry imports this module for a run without one (`prunetune prune`'s pruning peak)
    from prunetune.methods.payt import run_payt as payt_run
    import shutil

    recipe, spec = state.recipe, state.spec
    tspec = recipe.tune
    seed = state.seed + state.index
    run = tune_run(recipe, seed)
    work = out_dir / TUNE_DIR
    if run["task"] == "causal-lm":
        run = tune_run(recipe, seed, train_text=sized_training_text(recipe, state.tokenizer(), tspec.train_samples,
                                                                     tspec.seqlen, out_dir / "tune-train.txt"))
    masks = state.masks() or MaskSet()
    pspec = spec  # the recipe's `payt` settings: the schema PAYT takes
    res = payt_run(state.model_spec(), tspec, pspec, work, **run, masks=masks, resume=state.resume)
    if not state.is_main:  # trained along; rank 0 saves
        return {}
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    model, tok = res["_model"], res["_tokenizer"]
    dump(out_dir / "curves.json", read_curves(work / "train_log.csv"))
    metric, layers = sparsity_metric(model)
    dump(out_dir / "layer_sparsity.json", layers)
    save_model(state, out_dir, model, tok, masks)
    test = res.get("test_after_merge", {})
    metrics = {"sparsity": metric, "train_loss": {"value": res["train_loss"], "protocol": {
        "steps": res["global_step"], "examples": res["train_examples"], "teacher": res["teacher"],
        "payt": pspec.to_dict(), "tune": tspec.record(**run)}}}
    for key in ("accuracy", "macro_f1", "loss"):
        if key in test:
            metrics[f"payt_test_{key}"] = {"value": test[key], "protocol": test_set_protocol(test, res, recipe)}
    metrics["train_seconds"] = {"value": res["timings"].get("train_s"), "protocol": {"what": "Trainer.train wall time"}}
    return {"metrics": metrics}


register_stage(StageKind("payt", f"{PACKAGE}:run_payt", "payt", produces_model=True, resumable=True, ranks="all",
                         reads=("data.train", "tune.teacher")))


def run_order_study(state, out_dir: Path) -> dict:
    """Prune/fine-tune orderings from the current model; rows of metrics after every step."""
    # the training code (transformers' Trainer, peft, datasets: ~120 MiB) loads when a training stage runs, not
    # when the registry imports this module for a run without one (`prunetune prune`'s pruning peak)
    from prunetune.methods.ordering import OrderingSteps, run_orderings
    rows = run_orderings(state, out_dir, OrderingSteps(prune=prune_model, finetune=finetune_model,
                                                       evaluate=evaluate_model, save=save_model))
    dump(out_dir / "ordering.json", rows)
    metrics = {}
    for r in rows:
        if r.get("final"):
            for k, v in r["metrics"].items():
                metrics[f"{r['ordering']}/{k}"] = v
    return {"metrics": metrics, "artifacts": {"rows": "ordering.json"}}


register_stage(StageKind("order_study", f"{PACKAGE}:run_order_study", "order", ranks="single", reads=("data.train",)))


def run_full_evaluate(state, out_dir: Path) -> dict:
    """One configuration of PAYT's comparison (`prunetune payt --full-evaluate`, `methods.payt.CONFIGURATIONS`),
    or (`run: table`) the comparison table of the configuration stages before it.

    The stage does not produce a model for the next one, so every configuration starts from the same model,
    the run's current one (the recipe's model in the command's recipe). Every configuration trains with the
    recipe's `tune` and `payt` sections at the recipe's seed (not the stage's: the rows are compared at one
    seed, as the command's own driver ran them), and the tuning module exports its model into `tune/model`.
    Its result is kept in `result.json`; the table stage reads them and writes `full_evaluate.md` and
    `full_evaluate.json` into the run directory (and its own stage directory).

    Under a multi-process launcher the trained configurations run on every rank; the untrained ones
    ("original", "prune-only": evaluation only) and the table on rank 0.
    """
    # the training code (transformers' Trainer, peft, datasets: ~120 MiB) loads when a training stage runs, not
    # when the registry imports this module for a run without one (`prunetune prune`'s pruning peak)
    from prunetune.methods.payt import configuration_label, run_configuration, table_row
    import shutil

    recipe, spec = state.recipe, state.spec
    run = tune_run(recipe, recipe.seed, export=True)
    pspec = recipe.payt
    if spec.run == "table":
        return _full_evaluate_table(state, out_dir, run, pspec) if state.is_main else {}
    if not state.is_main and spec.run in ("original", "prune-only"):
        return {}
    work = out_dir / TUNE_DIR
    res = run_configuration(spec.run, state.model_spec(), recipe.tune, pspec, work, **run, full_lr=spec.full_lr,
                            resume=state.resume, baselines=spec.baselines)
    if not state.is_main:  # trained along; rank 0 evaluates and saves
        return {}
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the stage is the checkpoint
    label = configuration_label(spec.run, recipe.tune)
    row = table_row(res)
    dump(out_dir / "result.json", {"configuration": spec.run, "label": label, "result": row})
    proto = {"configuration": spec.run, "label": label, "kind": row.get("kind"), "seed": run["seed"],
             "steps": row.get("global_step"), "teacher": row.get("teacher"), "model": "merged (the exported weights)"}
    metrics: dict = {}
    for key, name in (("accuracy", "task/accuracy"), ("macro_f1", "task/macro_f1"), ("sparsity", "sparsity"),
                      ("train_loss", "train_loss")):
        if row.get(key) is not None:
            metrics[name] = {"value": row[key], "protocol": proto}
    if row.get("retention"):
        ret = row["retention"]
        metrics["retention"] = {"value": ret.get("value"), "protocol": {k: v for k, v in ret.items() if k != "value"}}
    if row.get("timings", {}).get("train_s") is not None:
        metrics["train_seconds"] = {"value": row["timings"]["train_s"], "protocol": {"what": "Trainer.train wall time"}}
    return {"metrics": metrics, "artifacts": {"result": "result.json"}}


# every configuration of PAYT's comparison starts from one model: none is handed on
register_stage(StageKind("full_evaluate", f"{PACKAGE}:run_full_evaluate", "full_evaluate", resumable=True, ranks="all",
                         reads=("data.train", "tune.teacher")))


def _full_evaluate_table(state, out_dir: Path, run: dict, pspec) -> dict:
    """The comparison of the configuration stages run so far, from their results (nothing is recomputed)."""
    # the training code (transformers' Trainer, peft, datasets: ~120 MiB) loads when a training stage runs, not
    # when the registry imports this module for a run without one (`prunetune prune`'s pruning peak)
    from prunetune.methods.payt import comparison_payload
    runs: dict[str, dict] = {}
    for h in state.history:
        if h["type"] == "full_evaluate" and h["stage_config"]["settings"].get("run") != "table":
            done = json.loads((state.out / "stages" / h["stage"] / "result.json").read_text())
            runs[done["label"]] = done["result"]
    if not runs:
        raise PrunetuneError(f"stage {state.name}: the full-evaluate table needs configuration stages before it")
    payload = comparison_payload(state.model_spec(), state.recipe.tune, pspec, runs, state.spec.full_lr,
                                 state.spec.baselines, **run)
    for where in (out_dir, state.out):
        atomic_write_json(where / "full_evaluate.json", payload)
        atomic_write_text(where / "full_evaluate.md", payload["table"]["markdown"])
    return {"metrics": {"configurations": {"value": len(runs), "protocol": {"rows": list(runs)}}},
            "artifacts": {"table": str(state.out / "full_evaluate.md"), "json": str(state.out / "full_evaluate.json")}}
