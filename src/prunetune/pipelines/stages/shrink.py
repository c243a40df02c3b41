"""The `structured` stage (VIB or a structure criterion, then surgery) and the `losparse` stage."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from prunetune.data.calibration import calibration_samples
from prunetune.data.sources import load_text
from prunetune.errors import PrunetuneError
from prunetune.methods.shrink import prune_structured
from prunetune.pipelines.stages.common import TUNE_DIR, dump, save_model
from prunetune.pipelines.stages.tune import read_curves, sized_training_text, test_set_protocol, tune_run
from prunetune.registry import StageKind, register_stage

PACKAGE = "prunetune.pipelines.stages"  # stages are looked up on the package (tests patch them there)


def run_structured(state, out_dir: Path) -> dict:
    """VIB or a baseline to a fraction of block parameters, then physical shrink; saves the smaller model."""
    spec = state.spec
    loaded = state.load()
    rec = state.recipe
    needs = spec.method in ("vib", "wanda", "flap") or spec.split == "measured"  # each split is scored on it
    ids = None
    if needs:
        src = load_text(rec.data.calib, rec.data.calib_split, data_dir=rec.data.data_dir)
        n = max(spec.nsamples, spec.vib_steps * spec.vib_batch) if spec.method == "vib" else spec.nsamples
        ids = calibration_samples(loaded.tokenizer, src.text, n, spec.seqlen, state.seed, src.name)
    t0 = time.perf_counter()
    model, facts = prune_structured(loaded.model, spec.method, spec.sparsity, structures=tuple(spec.structures),
                                    round_to=spec.round_to, ids=ids, vib=spec, vib_options={"seed": state.seed})
    seconds = time.perf_counter() - t0
    calib = (f"{ids.shape[0]} x {ids.shape[1]} tokens of {rec.data.calib}/{rec.data.calib_split}, seed {state.seed}"
             if ids is not None else "none")
    if spec.method == "vib":
        facts["vib"]["budget"] = f"{spec.vib_steps} steps x {spec.vib_batch} x {spec.seqlen} tokens"
    dump(out_dir / "structured.json", facts)
    save_model(state, out_dir, model, loaded.tokenizer, None, extra={"structured": facts})
    proto = {"method": spec.method, "structures": spec.structures, "round_to": spec.round_to, "calibration": calib,
             "what": "weights of the seven block projections; compute ratio = per-token weight FLOPs dense / pruned "
                     "(blocks + LM head)"}
    return {"metrics": {
        "block_sparsity": {"value": facts["block_sparsity"], "protocol": proto},
        "compute_ratio": {"value": facts["compute_ratio"], "protocol": proto},
        "widths": {"value": facts["widths"], "protocol": {"dense": facts["dense_widths"]}},
        "prune_seconds": {"value": seconds, "protocol": {"threads": torch.get_num_threads()}},
    }}


register_stage(StageKind("structured", f"{PACKAGE}:run_structured", "structured", produces_model=True,
                         reads=("data.calib",)))


def run_losparse(state, out_dir: Path) -> dict:
    """LoSparse fine-tuning (full FT of U, V, S and the rest); saves the materialised model as the stage's
    model and the factorised export beside it (`factorized/`, loaded by `prunetune.load_model`)."""
    # the training code (transformers' Trainer, peft, datasets: ~120 MiB) loads when a training stage runs, not
    # when the registry imports this module for a run without one (`prunetune prune`'s pruning peak)
    from prunetune.methods.losparse import Losparse
    from prunetune.tuning.finetune import finetune
    import shutil

    recipe, spec = state.recipe, state.spec
    if recipe.tune.mode != "full":
        raise PrunetuneError("losparse trains U, V and S itself: set tune.mode: full (the command's --full)")
    tune, seed = recipe.tune, state.seed + state.index
    run = tune_run(recipe, seed)
    work = out_dir / TUNE_DIR
    if run["task"] == "causal-lm":
        run = tune_run(recipe, seed, train_text=sized_training_text(recipe, state.tokenizer(), tune.train_samples,
                                                                     tune.seqlen, out_dir / "tune-train.txt"))
    res = finetune(state.model_spec(), tune, work, **run, method=Losparse(spec), kind="losparse", resume=state.resume)
    if not state.is_main:  # trained along; rank 0 saves
        return {}
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    if (work / "factorized").is_dir():
        shutil.move(str(work / "factorized"), str(out_dir / "factorized"))
    model, tok = res["_model"], res["_tokenizer"]
    dump(out_dir / "curves.json", read_curves(work / "train_log.csv"))
    facts = res.get("losparse", {})
    dump(out_dir / "losparse.json", {k: v for k, v in res.items() if k.startswith("losparse")})
    save_model(state, out_dir, model, tok, None, extra={"losparse": facts.get("parameters")})
    counts = facts.get("parameters", {})
    proto = {"losparse": spec.to_dict(), "tune": tune.record(**run), "steps": res["global_step"],
             "what": "targeted linears: U·V + kept entries of S, against the dense linears they replace"}
    test = res.get("test_after_merge", {})
    metrics: dict = {"linear_kept_fraction": {"value": counts.get("linear_kept_fraction"), "protocol": proto},
                     "lowrank_fraction": {"value": counts.get("lowrank_fraction"), "protocol": proto},
                     "sparse_fraction": {"value": counts.get("sparse_fraction"), "protocol": proto},
                     "train_loss": {"value": res["train_loss"], "protocol": {"steps": res["global_step"]}}}
    for key in ("accuracy", "macro_f1", "loss"):
        if key in test:
            metrics[f"losparse_test_{key}"] = {"value": test[key], "protocol": test_set_protocol(test, res, recipe)}
    metrics["train_seconds"] = {"value": res["timings"].get("train_s"), "protocol": {"what": "Trainer.train wall time"}}
    return {"metrics": metrics}


register_stage(StageKind("losparse", f"{PACKAGE}:run_losparse", "losparse", produces_model=True, resumable=True, ranks="all",
                         reads=("data.train", "losparse.teacher")))
