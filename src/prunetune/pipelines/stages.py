"""The stages a recipe strings together. Each is `fn(state, out_dir) -> {"metrics", "artifacts"}`.

A stage writes only into `out_dir` (a `.partial` directory the runner renames when the stage returns).
Stages that change the model save it as `out_dir/model/` (plain HF safetensors dir + `masks.safetensors`);
the next stage loads from there. Every metric carries its protocol.

What each stage kind is (its recipe section, whether it produces a model, resumes, and how it runs under
several processes) is declared once, in `prunetune.registry`. Under a multi-process launcher the training
stages (`ranks="all"`: finetune, payt, losparse, full_evaluate) run on every rank, which train together; after
training, rank 0 alone evaluates, saves and returns the metrics (`state.is_main`), the other ranks return
nothing. Every other stage runs on rank 0 only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
import time
from pathlib import Path

import torch

from prunetune.errors import PrunetuneError
from prunetune.registry import stage_kind
from prunetune.rundir import atomic_write_text

TUNE_DIR = "tune"  # a training stage's tuning run: out_dir/tune (logs, metrics, checkpoints/)


def resumable_checkpoint(stage_type: str, out_dir: Path) -> tuple[Path | None, list[str]]:
    """The last complete checkpoint of an interrupted stage's training in `out_dir` (None: the stage starts
    over) and why newer checkpoints were passed over. A resumable stage (`StageKind.resumable`) saves its
    method's own state, such as LoSparse's PLATON averages, in each checkpoint through the method lifecycle."""
    if not stage_kind(stage_type).resumable:
        return None, []
    from prunetune.tuning.finetune import CHECKPOINTS, last_good_checkpoint

    return last_good_checkpoint(out_dir / TUNE_DIR / CHECKPOINTS)


def _dump(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str))


def zeros_metric(zeros: int, numel: int) -> dict:
    """The `sparsity` metric from counted zeros (in memory or, for a streamed model, tensor by tensor)."""
    return {"value": zeros / numel if numel else 0.0, "protocol": {
        "what": "share of exact zeros in the weights of the prunable linear layers (attention + MLP)",
        "zeros": zeros, "numel": numel}}


def sparsity_metric(model) -> tuple[dict, dict]:
    """Real-zero sparsity of the prunable linears (the metric) and the per-layer report (for plots)."""
    from prunetune.pruning.masks import sparsity_report

    rep = sparsity_report(model)
    metric = zeros_metric(rep["zeros"], rep["numel"])
    layers = {n: {"role": r["role"], "sparsity": r["sparsity"]} for n, r in rep["layers"].items()}
    return metric, layers


def card_info(recipe, upto: int, model=None) -> dict:
    """What the model card of a model made by stages 0..`upto` of `recipe` says: the original model, the
    methods in order ("wanda+payt-l1-global"), N:M pattern, whether structures were removed, the real-zero
    sparsity of `model` (when given). Derived from the recipe, so every export of a run describes it alike."""
    methods: list[str] = []
    tags: list[str] = []
    pattern = None
    structured = False
    for i, st in enumerate(recipe.stages[: upto + 1]):
        spec = recipe.stage_spec(i)
        if st.type == "prune":
            methods.append(spec.method)
            pattern = spec.pattern or pattern
            structured |= (spec.granularity or "") in ("rows", "cols", "heads", "neurons")
        elif st.type == "structured":
            methods.append(f"{spec.method}-structured")
            structured = True
            tags.append("shrunk")
        elif st.type == "payt":
            methods.append(f"payt-{spec.criterion}")
        elif st.type == "losparse":
            methods.append("losparse")
        elif st.type == "compose":
            methods.append("composable")
            structured = True
        elif st.type == "finetune":
            tags.append("lora" if spec.mode == "lora" else "fine-tuned")
    card = {"base_model": recipe.model.name, "method": "+".join(methods) or None, "pattern": pattern,
            "structured": structured, "tags": tags, "title": f"{recipe.name}: {recipe.model.name}",
            "details": {"recipe": recipe.name, "stages": [st.name or st.type for st in recipe.stages[: upto + 1]]}}
    if model is not None:
        from prunetune.pruning.masks import sparsity_report

        card["sparsity"] = sparsity_report(model)["sparsity"]
    return card


def save_model(state, out_dir: Path, model, tokenizer, masks, extra: dict | None = None,
               metrics: dict | None = None) -> Path:
    """The stage's model as a plain HF dir with its masks and model card beside the weights (all atomic)."""
    from prunetune.manifest import build_manifest
    from prunetune.models.export import save_hf_dir

    target = out_dir / "model"
    man = build_manifest(f"stage:{state.name}", {"recipe": state.recipe.name, "stage": state.name},
                         seed=state.seed + state.index, extra=extra,
                         metrics={h["stage"]: h["metrics"] for h in getattr(state, "history", [])} | (metrics or {}))
    keep = masks if masks is not None and len(masks) else None
    save_hf_dir(model, tokenizer, target, man, extra=(lambda tmp: keep.save(tmp)) if keep is not None else None,
                card=card_info(state.recipe, state.index, model))
    return target


# --------------------------------------------------------------------------------------------- evaluate
def run_evaluate(state, out_dir: Path) -> dict:
    """Perplexity on each source, real-zero sparsity, and optionally task accuracy / lm-eval tasks."""
    loaded = state.load()
    metrics, layers = evaluate_model(loaded, state.recipe, state.spec, state.seed)
    _dump(out_dir / "layer_sparsity.json", layers)
    return {"metrics": metrics}


def evaluate_model(loaded, recipe, spec, seed: int = 0) -> tuple[dict, dict]:
    """All metrics an `evaluate` stage records (each with its protocol) and the per-layer sparsity."""
    from prunetune.data.sources import load_text
    from prunetune.evaluation.perplexity import perplexity

    metrics: dict = {}
    metric, layers = sparsity_metric(loaded.model)
    metrics["sparsity"] = metric
    task = getattr(loaded, "task", recipe.model.task)  # model.task auto: the head the checkpoint has
    if task == "causal-lm":
        for src_name in recipe.data.ppl:
            src = load_text(src_name, recipe.data.ppl_split, data_dir=recipe.data.data_dir)
            r = perplexity(loaded.model, loaded.tokenizer, src, seqlen=spec.ppl_seqlen, max_windows=spec.max_windows,
                           batch_size=spec.batch_size)
            key = Path(src_name).name if ("/" in src_name or "\\" in src_name) else src_name
            metrics[f"ppl/{key}"] = {"value": r["value"], "seconds": r["seconds"], "protocol": r["protocol"]}
    if spec.task or task == "seq-cls":
        metrics.update(_task_metrics(recipe, loaded))
    if spec.harness:
        from prunetune.evaluation.harness import harness_evaluate

        res = harness_evaluate(loaded.model, loaded.tokenizer, spec.harness, limit=spec.harness_limit, seed=seed)
        for task in spec.harness:
            r = res[task]
            for k, v in r.items():
                if k != "protocol":
                    metrics[f"harness/{task}/{k}"] = {"value": v, "protocol": r["protocol"]}
    return metrics, layers


def _task_metrics(recipe, loaded) -> dict:
    from prunetune.data.sources import load_labelled
    from prunetune.data.tasks import split_labelled
    from prunetune.evaluation.task import evaluate_classification

    if getattr(loaded, "task", recipe.model.task) != "seq-cls":
        raise PrunetuneError("eval.task needs model.task: seq-cls (a classification head)")
    data = load_labelled(recipe.data.train)
    test = split_labelled(data, seed=recipe.data.split_seed)["test"]
    r = evaluate_classification(loaded.model, loaded.tokenizer, test, max_length=recipe.tune.seqlen,
                                dataset=data.name)
    r["protocol"]["split_seed"] = recipe.data.split_seed
    return {f"task/{k}": {"value": r[k], "protocol": r["protocol"]} for k in ("accuracy", "macro_f1")}


# --------------------------------------------------------------------------------------------- prune
HIST_BINS = 60


def chosen_layers(model) -> list[str]:
    """Three layers shown in weight histograms: first block's q, a middle block's up, last block's down."""
    from prunetune.models.arch import get_adapter

    blocks = get_adapter(model).blocks()
    picks = [(blocks[0], ("q",)), (blocks[len(blocks) // 2], ("up", "gate", "o")), (blocks[-1], ("down", "o"))]
    out = []
    for b, roles in picks:
        for role in roles:
            if role in b.linears:
                out.append(f"{b.name}.{_attr_path(b, role)}")
                break
    return list(dict.fromkeys(out))


def _attr_path(block, role: str) -> str:
    target = block.linears[role]
    for name, mod in block.module.named_modules():
        if mod is target:
            return name
    raise PrunetuneError(f"layer of role {role} not found in block {block.name}")


@torch.no_grad()
def weight_histograms(model, names: list[str], edges: dict[str, list[float]] | None = None,
                      read: Callable[[str], torch.Tensor] | None = None) -> dict:
    """|w| histograms (exact zeros counted apart) of the named linears; `edges` reuses the dense bins.
    `read(name)` gives a layer's weight when the model is not in memory (streaming reads it from disk)."""
    from prunetune.pruning.masks import _module

    out = {}
    for n in names:
        w = (read(n) if read is not None else _module(model, n).weight).detach().abs().flatten().float()
        e = torch.tensor(edges[n]) if edges else torch.linspace(0, float(torch.quantile(w[:1_000_000], 0.999)) * 1.05,
                                                                 HIST_BINS + 1)
        nz = w[w != 0]
        counts = torch.histogram(nz.clamp(max=float(e[-1])), bins=e).hist
        out[n] = {"edges": e.tolist(), "counts": counts.tolist(), "zeros": int((w == 0).sum()), "numel": w.numel()}
    return out


def prune_model(loaded, recipe, spec, seed: int, previous=None) -> tuple:
    """Prune `loaded.model` in place with the engine; earlier masks stay pruned. Returns (masks, seconds, calib)."""
    from prunetune.data.calibration import calibration_samples
    from prunetune.data.sources import load_text
    from prunetune.pruning.api import prune

    from prunetune.pruning.criteria import get_criterion

    calib = None
    if get_criterion(spec.method).needs_calibration or spec.extras()["layer_sparsity"] == "owl":
        src = load_text(recipe.data.calib, recipe.data.calib_split, data_dir=recipe.data.data_dir)
        calib = calibration_samples(loaded.tokenizer, src.text, spec.nsamples, spec.seqlen, seed, src.name)
    t0 = time.perf_counter()
    masks = prune(loaded.model, spec.method, spec.sparsity, pattern=spec.pattern, granularity=spec.granularity,
                  calib=calib, tokenizer=loaded.tokenizer, nsamples=spec.nsamples, seqlen=spec.seqlen,
                  skip=spec.skip, seed=seed, previous=previous, device=spec.device, batch_size=spec.calib_batch,
                  **spec.extras())
    seconds = time.perf_counter() - t0
    if previous is not None:  # prune() kept what was pruned before; layers it skipped keep their masks too
        for k, m in previous.items():
            masks[k] = masks[k] & m.to(masks[k].device) if k in masks else m
        masks.apply(loaded.model)
    desc = (f"{spec.nsamples} x {spec.seqlen} tokens of {recipe.data.calib}/{recipe.data.calib_split}, seed {seed}"
            if calib is not None else f"none ({spec.method})")
    return masks, seconds, desc


def streaming_checkpoint(model_spec: str, recipe, spec, out: Path | None = None):
    """The checkpoint to stream when this prune stage streams (asked, or the model does not fit the budget),
    else None. Refuses, before any work, a budget below one block and (with `out`) a disk without room for
    the output."""
    from prunetune.models.loading import local_hf_dir, resolve_dtype
    from prunetune.pruning.criteria import get_criterion
    from prunetune.pruning.stream import check_disk, decide, open_checkpoint, output_bytes, parse_bytes, plan_memory

    if spec.stream is False:
        return None
    path = local_hf_dir(model_spec)
    if path is None:
        if spec.stream:
            raise PrunetuneError(f"--stream reads a local Hugging Face directory of safetensors; '{model_spec}' "
                                 "is not one (download it first, or prune in memory)")
        return None
    try:
        ckpt = open_checkpoint(path)
    except PrunetuneError:
        if spec.stream:
            raise
        return None  # auto: what streaming cannot read (.bin) loads in memory as before
    crit = get_criterion(spec.method)
    plan = plan_memory(ckpt, resolve_dtype(recipe.model.dtype, ckpt.dtype()), nsamples=spec.nsamples,
                       seqlen=spec.seqlen, calib_batch=spec.calib_batch, hessian=crit.statistics == "hessian")
    budget = parse_bytes(spec.max_memory) if spec.max_memory else None
    if not decide(ckpt, spec.stream, budget, plan):
        return None
    if out is not None:
        check_disk(out, output_bytes(ckpt, recipe.model.dtype))
    return ckpt


def _stream_prune(state, out_dir: Path, ckpt) -> dict:
    """Prune `ckpt` block by block into out_dir/model (the in-memory stage's outputs, from disk)."""
    from transformers import AutoTokenizer

    from prunetune.data.calibration import calibration_samples
    from prunetune.data.sources import load_text
    from prunetune.manifest import build_manifest
    from prunetune.pruning.api import resolve_granularity
    from prunetune.pruning.criteria import get_criterion
    from prunetune.pruning.stream import prune_checkpoint, read_tensor, skeleton
    from prunetune.rundir import atomic_dir

    spec, recipe, seed = state.spec, state.recipe, state.seed
    target = out_dir / "model"
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    calib = None
    if get_criterion(spec.method).needs_calibration or spec.extras()["layer_sparsity"] == "owl":
        src = load_text(recipe.data.calib, recipe.data.calib_split, data_dir=recipe.data.data_dir)
        calib = calibration_samples(tokenizer, src.text, spec.nsamples, spec.seqlen, seed, src.name)
    names = chosen_layers(skeleton(ckpt, torch.float32))
    dense_hist = weight_histograms(None, names, read=lambda n: read_tensor(ckpt.tensors[f"{n}.weight"]))
    man = build_manifest(f"stage:{state.name}", {"recipe": recipe.name, "stage": state.name}, seed=seed + state.index)
    t0 = time.perf_counter()
    with atomic_dir(target, man) as tmp:
        res = prune_checkpoint(ckpt.path, tmp, spec.method, spec.sparsity, dtype=recipe.model.dtype,
                               device=spec.device, calib=calib, tokenizer=tokenizer, nsamples=spec.nsamples,
                               seqlen=spec.seqlen, seed=seed, batch_size=spec.calib_batch, pattern=spec.pattern,
                               granularity=spec.granularity, skip=spec.skip, previous=state.masks(),
                               **spec.extras())
        from transformers import AutoConfig

        from prunetune.models.card import write_model_card

        write_model_card(tmp, man, {**card_info(recipe, state.index), "sparsity": res["sparsity"]},
                         AutoConfig.from_pretrained(tmp))
    seconds = time.perf_counter() - t0
    from prunetune.pruning.stream import open_checkpoint

    pruned = open_checkpoint(target)
    pruned_hist = weight_histograms(None, names, {n: h["edges"] for n, h in dense_hist.items()},
                                    read=lambda n: read_tensor(pruned.tensors[f"{n}.weight"]))
    _dump(out_dir / "histograms.json", {"dense": dense_hist, "pruned": pruned_hist,
                                        "label_before": "before pruning", "label_after": "after pruning"})
    _dump(out_dir / "layer_sparsity.json", res["layers"])
    desc = (f"{spec.nsamples} x {spec.seqlen} tokens of {recipe.data.calib}/{recipe.data.calib_split}, seed {seed}"
            if calib is not None else f"none ({spec.method})")
    return {"metrics": {
        "sparsity": zeros_metric(res["zeros"], res["numel"]),
        "prune_seconds": {"value": seconds, "protocol": {
            "method": spec.method, "pattern": spec.pattern,
            "granularity": resolve_granularity(spec.method, spec.granularity, spec.pattern),
            "calibration": desc, "device": spec.device or "cpu", "calib_batch": spec.calib_batch,
            "threads": torch.get_num_threads(), "streamed": True, "dtype": res["dtype"]}},
    }}


def run_prune(state, out_dir: Path) -> dict:
    """One-shot pruning through the engine; saves the pruned model, masks and dense/pruned histograms."""
    from prunetune.pruning.api import resolve_granularity

    spec = state.spec
    ckpt = streaming_checkpoint(state.model_spec(), state.recipe, spec, out_dir)
    if ckpt is not None:
        return _stream_prune(state, out_dir, ckpt)
    loaded = state.load()
    names = chosen_layers(loaded.model)
    dense_hist = weight_histograms(loaded.model, names)
    masks, seconds, calib_desc = prune_model(loaded, state.recipe, spec, state.seed, state.masks())
    pruned_hist = weight_histograms(loaded.model, names, {n: h["edges"] for n, h in dense_hist.items()})
    _dump(out_dir / "histograms.json", {"dense": dense_hist, "pruned": pruned_hist,
                                        "label_before": "before pruning", "label_after": "after pruning"})
    metric, layers = sparsity_metric(loaded.model)
    _dump(out_dir / "layer_sparsity.json", layers)
    save_model(state, out_dir, loaded.model, loaded.tokenizer, masks)
    return {"metrics": {
        "sparsity": metric,
        "prune_seconds": {"value": seconds, "protocol": {"method": spec.method, "pattern": spec.pattern,
                                                         "granularity": resolve_granularity(spec.method, spec.granularity, spec.pattern),
                                                         "calibration": calib_desc, "device": spec.device or "cpu",
                                                         "calib_batch": spec.calib_batch,
                                                         "threads": torch.get_num_threads(), "streamed": False,
                                                         "dtype": str(next(loaded.model.parameters()).dtype)
                                                         .removeprefix("torch.")}},
    }}


# --------------------------------------------------------------------------------------------- finetune
def tune_config(recipe, spec, seed: int, task: str | None = None, *, retention: bool | None = None,
                export: bool = False):
    """The tuning module's `TuneConfig` for a recipe's pydantic `tune` settings (`tuning.config.recipe_fields`,
    the one conversion, which also gives `TuneConfig` its defaults). Stages save the model themselves
    (`export=False`); the full-evaluate configurations let the tuning module export theirs.
    """
    from prunetune.tuning.config import TuneConfig, recipe_fields

    fields = recipe_fields(spec, recipe.data, seed)
    if retention is not None:
        fields["retention"] = retention
    cfg = TuneConfig(task=task or recipe.model.task, seed=seed, export=export, **fields)
    return cfg.validate()


def payt_spec(spec):
    """The PAYT method's spec from the recipe's pydantic `payt` settings (the same fields, one schema)."""
    from prunetune.methods.payt import PaytSpec

    return PaytSpec(**spec.model_dump())


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
    from prunetune.data.sources import load_text

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


def _test_protocol(test: dict, res: dict, recipe) -> dict:
    """How a tuning run's held-out score was measured, with a fingerprint of the exact test set it used."""
    from prunetune.evaluation.task import examples_digest

    examples = res.get("_test") or []
    return {"what": test.get("protocol"), "model": "merged (the exported weights)", "n": len(examples),
            "split_seed": recipe.data.split_seed, "examples_sha256": examples_digest(examples)}


def finetune_model(model_spec: str, recipe, spec, masks, seed: int, work: Path, task: str | None = None,
                   tokenizer=None, resume: bool = False) -> dict:
    """Fine-tune `model_spec` with the tuning module; returns {model, tokenizer, curves, metrics}.

    `resume`: continue the tuning run in `work` from its last complete checkpoint."""
    from prunetune.pruning.masks import MaskSet
    from prunetune.tuning.finetune import finetune

    cfg = tune_config(recipe, spec, seed, task)
    if cfg.task == "causal-lm":
        cfg.data = str(sized_training_text(recipe, tokenizer, cfg.n_samples, cfg.max_length,
                                           work.with_name(work.name + "-train.txt")))
    res = finetune(model_spec, cfg, work, masks=masks if masks is not None else MaskSet(), resume=resume)
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
            metrics[f"heldout_{key}"] = {"value": test[key], "protocol": _test_protocol(test, res, recipe)}
    metrics["train_seconds"] = {"value": res["timings"].get("train_s"), "protocol": {"what": "Trainer.train wall time"}}
    return {"model": res["_model"], "tokenizer": res["_tokenizer"], "curves": read_curves(work / "train_log.csv"),
            "metrics": metrics}


def run_finetune(state, out_dir: Path) -> dict:
    """LoRA (or full) fine-tuning that keeps the masks; the merged model (W + sBA) * M is saved."""
    import shutil

    from prunetune.pruning.masks import MaskSet

    # filled by the tuning module when the input is a pruned model directory (its masks.safetensors): the
    # stage's model then carries the masks on, as a pruned stage before it would have passed them
    masks = state.masks() or MaskSet()
    work = out_dir / TUNE_DIR
    res = finetune_model(state.model_spec(), state.recipe, state.spec, masks, state.seed + state.index, work,
                         tokenizer=state.tokenizer(), resume=state.resume)
    if not state.is_main:  # trained along; rank 0 saves
        return {}
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the stage is the checkpoint; keep logs only
    _dump(out_dir / "curves.json", res["curves"])
    metric, layers = sparsity_metric(res["model"])
    _dump(out_dir / "layer_sparsity.json", layers)
    save_model(state, out_dir, res["model"], res["tokenizer"], masks)
    return {"metrics": {"sparsity": metric, **res["metrics"]}}


# --------------------------------------------------------------------------------------------- payt
def run_payt(state, out_dir: Path) -> dict:
    """Prune-As-You-Tune through `prunetune.methods.payt`; saves the merged sparse model and its masks."""
    import shutil

    from prunetune.methods.payt import run_payt as payt_run
    from prunetune.pruning.masks import MaskSet

    recipe, spec = state.recipe, state.spec
    tspec = recipe.tune
    cfg = tune_config(recipe, tspec, state.seed + state.index)
    work = out_dir / TUNE_DIR
    if cfg.task == "causal-lm":
        cfg.data = str(sized_training_text(recipe, state.tokenizer(), cfg.n_samples, cfg.max_length,
                                           out_dir / "tune-train.txt"))
    masks = state.masks() or MaskSet()
    pspec = payt_spec(spec)
    res = payt_run(state.model_spec(), cfg, pspec, work, masks=masks, resume=state.resume)
    if not state.is_main:  # trained along; rank 0 saves
        return {}
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    model, tok = res["_model"], res["_tokenizer"]
    _dump(out_dir / "curves.json", read_curves(work / "train_log.csv"))
    metric, layers = sparsity_metric(model)
    _dump(out_dir / "layer_sparsity.json", layers)
    save_model(state, out_dir, model, tok, masks)
    test = res.get("test_after_merge", {})
    metrics = {"sparsity": metric, "train_loss": {"value": res["train_loss"], "protocol": {
        "steps": res["global_step"], "examples": res["train_examples"], "teacher": res["teacher"],
        "payt": pspec.to_dict(), "tune": cfg.to_dict()}}}
    for key in ("accuracy", "macro_f1", "loss"):
        if key in test:
            metrics[f"payt_test_{key}"] = {"value": test[key], "protocol": _test_protocol(test, res, recipe)}
    metrics["train_seconds"] = {"value": res["timings"].get("train_s"), "protocol": {"what": "Trainer.train wall time"}}
    return {"metrics": metrics}


# --------------------------------------------------------------------------------------------- export
def run_export(state, out_dir: Path) -> dict:
    """The final model as a plain HF dir (zeros in the weights, masks beside), plus size on disk."""
    from prunetune.evaluation.speed import size_on_disk
    from prunetune.manifest import build_manifest
    from prunetune.models.arch import nonzero_count, parameter_count
    from prunetune.models.export import save_hf_dir

    target = state.out / "model"
    man = build_manifest("export", {"recipe": state.recipe.name, "from": state.model_spec()},
                         seed=state.recipe.seed, metrics={h["stage"]: h["metrics"] for h in state.history})
    if _model_streamed(state):  # too large to load: the streamed stage's files are the export
        metric, counts = _export_files(state.model_dir, target, man, card_info(state.recipe, state.index))
    else:
        loaded = state.load()
        masks = state.masks()
        save_hf_dir(loaded.model, loaded.tokenizer, target, man,  # masks and card inside the atomic write
                    extra=(lambda tmp: masks.save(tmp)) if masks is not None else None,
                    card=card_info(state.recipe, state.index, loaded.model))
        metric, _ = sparsity_metric(loaded.model)
        counts = {"value": nonzero_count(loaded.model), "protocol": {"parameters": parameter_count(loaded.model)}}
    from prunetune.pruning.masks import MASKS_FILE

    size = size_on_disk(target)
    mask_bytes = (target / MASKS_FILE).stat().st_size if (target / MASKS_FILE).is_file() else 0
    (out_dir / "exported_to").write_text(str(target))
    return {"metrics": {
        "sparsity": metric,
        "size_on_disk_mb": {"value": (size["bytes"] - mask_bytes) / 2**20, "protocol": {
            "format": size["format"], "what": "model weights (dense safetensors holding the zeros)",
            "masks_mb": mask_bytes / 2**20}},
        "nonzero_parameters": counts,
    }, "artifacts": {"model": str(target)}}


def _model_streamed(state) -> bool:
    """Whether the current model was written by a streaming prune stage (so it is not loaded whole)."""
    for h in reversed(state.history):
        if h.get("produces_model"):
            return bool(h["metrics"].get("prune_seconds", {}).get("protocol", {}).get("streamed"))
    return False


@torch.no_grad()
def _export_files(src: Path, target: Path, manifest: dict, card: dict) -> tuple[dict, dict]:
    """Export a streamed model by linking (or copying) its files; zeros counted one tensor at a time."""
    import os
    import shutil

    from transformers import AutoConfig

    from prunetune.models.arch import get_adapter
    from prunetune.models.card import CARD_FILE, write_model_card
    from prunetune.pruning.stream import iter_row_chunks, open_checkpoint, skeleton
    from prunetune.rundir import atomic_dir

    ckpt = open_checkpoint(src)
    linears = {f"{n}.weight" for n in get_adapter(skeleton(ckpt, torch.float32)).linears()}
    params = nonzero = zeros = numel = 0
    for name, info in ckpt.tensors.items():  # in row chunks: an embedding table is never whole in memory
        for _, chunk in iter_row_chunks(info):
            nz = int(torch.count_nonzero(chunk))
            params, nonzero = params + chunk.numel(), nonzero + nz
            if name in linears:
                zeros, numel = zeros + chunk.numel() - nz, numel + chunk.numel()
    metric = zeros_metric(zeros, numel)
    with atomic_dir(target, manifest) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in ("manifest.json", CARD_FILE):
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        write_model_card(tmp, manifest, {**card, "sparsity": metric["value"]}, AutoConfig.from_pretrained(src))
    return metric, {"value": nonzero, "protocol": {"parameters": params}}


# --------------------------------------------------------------------------------------------- order study
def run_order_study(state, out_dir: Path) -> dict:
    """Prune/fine-tune orderings from the current model; rows of metrics after every step."""
    from prunetune.methods.ordering import OrderingSteps, run_orderings

    rows = run_orderings(state, out_dir, OrderingSteps(prune=prune_model, finetune=finetune_model,
                                                       evaluate=evaluate_model, save=save_model))
    _dump(out_dir / "ordering.json", rows)
    metrics = {}
    for r in rows:
        if r.get("final"):
            for k, v in r["metrics"].items():
                metrics[f"{r['ordering']}/{k}"] = v
    return {"metrics": metrics, "artifacts": {"rows": "ordering.json"}}


# --------------------------------------------------------------------------------------------- full evaluate (PAYT)
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
    import shutil

    from prunetune.methods.payt import configuration_label, run_configuration, table_row

    recipe, spec = state.recipe, state.spec
    cfg = tune_config(recipe, recipe.tune, recipe.seed, export=True)
    pspec = payt_spec(recipe.payt)
    if spec.run == "table":
        return _full_evaluate_table(state, out_dir, cfg, pspec) if state.is_main else {}
    if not state.is_main and spec.run in ("original", "prune-only"):
        return {}
    work = out_dir / TUNE_DIR
    res = run_configuration(spec.run, state.model_spec(), cfg, pspec, work, full_lr=spec.full_lr,
                            resume=state.resume)
    if not state.is_main:  # trained along; rank 0 evaluates and saves
        return {}
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the stage is the checkpoint
    label = configuration_label(spec.run, cfg)
    row = table_row(res)
    _dump(out_dir / "result.json", {"configuration": spec.run, "label": label, "result": row})
    proto = {"configuration": spec.run, "label": label, "kind": row.get("kind"), "seed": cfg.seed,
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


def _full_evaluate_table(state, out_dir: Path, cfg, pspec) -> dict:
    """The comparison of the configuration stages run so far, from their results (nothing is recomputed)."""
    from prunetune.methods.payt import comparison_payload
    from prunetune.rundir import atomic_write_json

    runs: dict[str, dict] = {}
    for h in state.history:
        if h["type"] == "full_evaluate" and h["stage_config"]["settings"].get("run") != "table":
            done = json.loads((state.out / "stages" / h["stage"] / "result.json").read_text())
            runs[done["label"]] = done["result"]
    if not runs:
        raise PrunetuneError(f"stage {state.name}: the full-evaluate table needs configuration stages before it")
    payload = comparison_payload(state.model_spec(), cfg, pspec, runs, state.spec.full_lr)
    for where in (out_dir, state.out):
        atomic_write_json(where / "full_evaluate.json", payload)
        atomic_write_text(where / "full_evaluate.md", payload["table"]["markdown"])
    return {"metrics": {"configurations": {"value": len(runs), "protocol": {"rows": list(runs)}}},
            "artifacts": {"table": str(state.out / "full_evaluate.md"), "json": str(state.out / "full_evaluate.json")}}


# --------------------------------------------------------------------------------------------- structured (owner: vib)
def run_structured(state, out_dir: Path) -> dict:
    """VIB or a baseline to a fraction of block parameters, then physical shrink; saves the smaller model."""
    from prunetune.data.calibration import calibration_samples
    from prunetune.data.sources import load_text
    from prunetune.methods.shrink import prune_structured

    spec = state.spec
    loaded = state.load()
    rec = state.recipe
    needs = spec.method in ("vib", "wanda", "flap")
    ids = None
    if needs:
        src = load_text(rec.data.calib, rec.data.calib_split, data_dir=rec.data.data_dir)
        n = max(spec.nsamples, spec.vib_steps * spec.vib_batch) if spec.method == "vib" else spec.nsamples
        ids = calibration_samples(loaded.tokenizer, src.text, n, spec.seqlen, state.seed, src.name)
    vib = {"steps": spec.vib_steps, "batch_size": spec.vib_batch, "vib_lr": spec.vib_lr,
           "lagrangian_lr": spec.lagrangian_lr, "lagrangian_warmup": spec.lagrangian_warmup, "att_mul": spec.att_mul,
           "kl_factor": spec.kl_factor, "init_log_sigma2": spec.init_log_sigma2, "seed": state.seed,
           "mu_lr": spec.vib_mu_lr, "loss": spec.vib_loss, "widths": spec.vib_widths, "center": spec.vib_center,
           "neuron_ranking": spec.vib_neuron_ranking}
    t0 = time.perf_counter()
    model, facts = prune_structured(loaded.model, spec.method, spec.sparsity, structures=tuple(spec.structures),
                                    round_to=spec.round_to, ids=ids, vib=vib)
    seconds = time.perf_counter() - t0
    calib = (f"{ids.shape[0]} x {ids.shape[1]} tokens of {rec.data.calib}/{rec.data.calib_split}, seed {state.seed}"
             if ids is not None else "none")
    if spec.method == "vib":
        facts["vib"]["budget"] = f"{spec.vib_steps} steps x {spec.vib_batch} x {spec.seqlen} tokens"
    _dump(out_dir / "structured.json", facts)
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


# --------------------------------------------------------------------------------------------- losparse
def losparse_spec(spec):
    """The LoSparse method's spec from the recipe's pydantic `losparse` settings (every field passed explicitly)."""
    from prunetune.methods.losparse import LosparseSpec

    return LosparseSpec(
        rank_ratio=spec.rank_ratio, keep=spec.keep, initial_threshold=spec.initial_threshold,
        warmup_steps=spec.warmup_steps, initial_warmup=spec.initial_warmup, final_warmup=spec.final_warmup,
        initial_warmup_steps=spec.initial_warmup_steps, final_warmup_steps=spec.final_warmup_steps,
        deltaT=spec.deltaT, beta1=spec.beta1, beta2=spec.beta2,
        structured_method=None if spec.structured_method == "none" else spec.structured_method,
        structured_direction=spec.structured_direction, roles=tuple(spec.roles), teacher=spec.teacher,
        kd_weight=spec.kd_weight, kd_temp=spec.kd_temp, layer_weight=spec.layer_weight).validate()


def run_losparse(state, out_dir: Path) -> dict:
    """LoSparse fine-tuning (full FT of U, V, S and the rest); saves the materialised model as the stage's
    model and the factorised export beside it (`factorized/`, loaded by `prunetune.load_model`)."""
    import shutil

    from prunetune.methods.losparse import Losparse
    from prunetune.tuning.finetune import finetune

    recipe, spec = state.recipe, state.spec
    if recipe.tune.mode != "full":
        raise PrunetuneError("losparse trains U, V and S itself: set tune.mode: full (the command's --full)")
    cfg = tune_config(recipe, recipe.tune, state.seed + state.index)
    work = out_dir / TUNE_DIR
    if cfg.task == "causal-lm":
        cfg.data = str(sized_training_text(recipe, state.tokenizer(), cfg.n_samples, cfg.max_length,
                                           out_dir / "tune-train.txt"))
    lspec = losparse_spec(spec)
    res = finetune(state.model_spec(), cfg, work, method=Losparse(lspec), kind="losparse", resume=state.resume)
    if not state.is_main:  # trained along; rank 0 saves
        return {}
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    if (work / "factorized").is_dir():
        shutil.move(str(work / "factorized"), str(out_dir / "factorized"))
    model, tok = res["_model"], res["_tokenizer"]
    _dump(out_dir / "curves.json", read_curves(work / "train_log.csv"))
    facts = res.get("losparse", {})
    _dump(out_dir / "losparse.json", {k: v for k, v in res.items() if k.startswith("losparse")})
    save_model(state, out_dir, model, tok, None, extra={"losparse": facts.get("parameters")})
    counts = facts.get("parameters", {})
    proto = {"losparse": lspec.to_dict(), "tune": cfg.to_dict(), "steps": res["global_step"],
             "what": "targeted linears: U·V + kept entries of S, against the dense linears they replace"}
    test = res.get("test_after_merge", {})
    metrics: dict = {"linear_kept_fraction": {"value": counts.get("linear_kept_fraction"), "protocol": proto},
                     "lowrank_fraction": {"value": counts.get("lowrank_fraction"), "protocol": proto},
                     "sparse_fraction": {"value": counts.get("sparse_fraction"), "protocol": proto},
                     "train_loss": {"value": res["train_loss"], "protocol": {"steps": res["global_step"]}}}
    for key in ("accuracy", "macro_f1", "loss"):
        if key in test:
            metrics[f"losparse_test_{key}"] = {"value": test[key], "protocol": _test_protocol(test, res, recipe)}
    metrics["train_seconds"] = {"value": res["timings"].get("train_s"), "protocol": {"what": "Trainer.train wall time"}}
    return {"metrics": metrics}
