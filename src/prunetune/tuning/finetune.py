"""`finetune`: one fine-tuning run, from a model (spec or in memory) to an evaluated, exported result.

It serves plain fine-tuning (full or LoRA/rsLoRA), recovery after pruning (the input's masks are kept) and
every training-time method (`methods.base.Method`: PAYT, LoSparse, VIB, ...), whose hooks it drives:

    prepare(model, ctx)       after the model, masks and LoRA are built; its result is what trains
    callbacks(ctx)            appended to the Trainer's callbacks (before mask enforcement)
    extra_loss(...)           added to the training loss in `KDTrainer.compute_loss`, scalars logged
    after_step(model, ctx)    Trainer's on_optimizer_step: after optimizer.step(), before zero_grad(),
                              and before masks are enforced
    finalize(model, ctx)      after training, before evaluation and export
    summary()                 merged into metrics.json
    state_dict()              saved in every checkpoint (method_state.safetensors + .json); on resume
    load_state_dict(state)    gets it back after prepare and callbacks, before the first resumed step

It writes

    out/checkpoints/checkpoint-N/   Trainer checkpoints (+ masks.safetensors, so a resumed run re-applies them,
                                    the method's state: method_state.safetensors + .json, and
                                    prunetune_state.json, written last: the checkpoint is complete)
    out/train_log.csv, .jsonl, tb/  logs (fixed-column CSV, every key in JSONL, TensorBoard)
    out/model/                      plain HF dir (LoRA merged as W' = (W + s*BA) ⊙ M) + masks.safetensors
    out/adapter/                    (LoRA) sparse base + peft adapter
    out/metrics.json, out/manifest.json

Masks are enforced after every optimizer step (`MaskEnforcer`), so pruned weights are exactly zero at any
step in full fine-tuning too (AdamW momentum and weight decay would otherwise revive them); its cost is
measured and reported as a fraction of the step time.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, TrainingArguments

from prunetune.data.mixing import build_mixed
from prunetune.data.spec import DataSpec
from prunetune.errors import PrunetuneError
from prunetune.evaluation.retention import retention
from prunetune.manifest import build_manifest, write_manifest
from prunetune.models.export import merge_lora_keep_masks, prepare_out_dir, save_adapter_export, save_hf_dir
from prunetune.models.loading import load_model
from prunetune.progress import enabled as progress_enabled
from prunetune.pruning.masks import MASKS_FILE, MaskSet, sparsity_report
from prunetune.rundir import atomic_write_json
from prunetune.tuning.callbacks import (CsvLogger, EpochEndSave, MaskEnforcer, MethodStepHook, broadcast_masks,
                                        masks_digest, trim_logs)
from prunetune.tuning.data import encode_cls, encode_lm, load_task_data
from prunetune.tuning.evaluate import compute_metrics, task_eval
from prunetune.tuning.fsdp import (check_fsdp_run, fsdp_requested, gather_full_model, model_on_meta,
                                   weightless_copy)
from prunetune.tuning.kd_trainer import CHECKPOINT_STATE, KDTrainer
from prunetune.tuning.lifecycle import (METHOD_STATE_JSON, Method, MethodContext, load_method_state,
                                        method_state_problem)
from prunetune.tuning.distill import check_kd
from prunetune.tuning.lora import apply_lora, check_lora, mask_lora_updates
from prunetune.tuning.seq2seq import finetune_task
from prunetune.tuning.spec import TuneSpec, check_task

CHECKPOINTS = "checkpoints"  # out/checkpoints/checkpoint-N: what --resume continues from


# ------------------------------------------------------------------------------------------------ helpers
def _checkpoint_problem(last: Path) -> str | None:
    """Why checkpoint `last` cannot be resumed from (None: it is complete and readable)."""
    try:
        state = json.loads((last / "trainer_state.json").read_text())
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"checkpoint {last} is corrupt (unreadable trainer_state.json)"
    weights = list(last.glob("*.safetensors")) + list(last.glob("*.bin"))
    if not any(p.name != MASKS_FILE for p in weights):
        return f"checkpoint {last} is corrupt (no model or adapter weights)"
    try:
        marks = json.loads((last / CHECKPOINT_STATE).read_text())
        int(marks["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"checkpoint {last} is incomplete (no {CHECKPOINT_STATE}: the run stopped while saving it)"
    if marks.get("masks") and not (last / MASKS_FILE).is_file():
        return f"checkpoint {last} is corrupt (its masks are missing)"
    if marks.get("method_state") and not (last / METHOD_STATE_JSON).is_file():
        return f"checkpoint {last} is corrupt (its method state is missing)"
    problem = method_state_problem(last)
    if problem is not None:
        return problem
    for p in weights:
        if p.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(p), "pt") as fh:
                    list(fh.keys())
            except Exception:
                return f"checkpoint file {p} is corrupt"
    if (last / MASKS_FILE).exists():
        try:
            MaskSet.load(last / MASKS_FILE)
        except PrunetuneError as e:
            return str(e)
    return None


def checkpoints_newest_first(ckpt_dir: Path) -> list[Path]:
    """`checkpoint-N` directories, highest N first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)


def last_good_checkpoint(ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint (None if there is none) and why each newer one was passed over: a run
    killed while writing checkpoint N resumes from the one before it."""
    skipped: list[str] = []
    for ckpt in checkpoints_newest_first(ckpt_dir):
        problem = _checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, skipped
        skipped.append(problem)
    return None, skipped


def find_resume_checkpoint(ckpt_dir: Path) -> Path:
    """The last complete checkpoint; none at all, or only corrupt ones -> one-line error."""
    last, skipped = last_good_checkpoint(ckpt_dir)
    if last is not None:
        return last
    if skipped:
        raise PrunetuneError(f"--resume: {skipped[0]}")
    raise PrunetuneError(f"--resume: no checkpoint in {ckpt_dir} (run without --resume first)")


def existing_masks(model_spec: str | None, model: nn.Module) -> MaskSet:
    """Masks a pruned input model carries: its masks.safetensors, else its zeros when it is clearly sparse."""
    if model_spec is not None:
        p = Path(os.path.expanduser(model_spec))
        if p.is_dir() and (p / MASKS_FILE).is_file():
            return MaskSet.load(p / MASKS_FILE)
    if model_on_meta(model):  # no weights on this rank yet (FSDP): rank 0 shares its masks (broadcast_masks)
        return MaskSet()
    if sparsity_report(model)["sparsity"] > 0.01:
        return MaskSet.from_model(model)
    return MaskSet()


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def training_args(out: Path, spec: TuneSpec, steps_per_epoch: int, task: str, show: bool, world: int, *,
                  seed: int, weight_decay: float = 0.0) -> TrainingArguments:
    """The Trainer's arguments for `spec`'s budget: no gradient accumulation and no warm-up (fixed choices of the
    tuning module, recorded as such by `TuneSpec.record`)."""
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=spec.train_epochs,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=max(spec.batch_size, 16),
        gradient_accumulation_steps=1,
        learning_rate=spec.learning_rate,
        weight_decay=weight_decay,
        warmup_steps=0,
        eval_strategy="epoch",
        save_strategy="steps" if spec.save_steps else "epoch",
        **({"save_steps": spec.save_steps} if spec.save_steps else {}),
        save_total_limit=2,
        metric_for_best_model="accuracy" if task == "seq-cls" else "loss",
        greater_is_better=task == "seq-cls",
        logging_strategy="steps",
        logging_steps=max(1, steps_per_epoch // 4),
        logging_first_step=True,
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else [],  # the optional extra
        disable_tqdm=not show,
        remove_unused_columns=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        ddp_backend=None if torch.cuda.is_available() or world == 1 else "gloo",
        use_cpu=not torch.cuda.is_available(),
        **_checkpointing_args(spec.gradient_checkpointing),
    )


def _checkpointing_args(on: bool) -> dict:
    """Activation (gradient) checkpointing, non-reentrant (LoRA's frozen inputs need no grad hooks), under the
    argument name of the installed transformers (renamed `activation_checkpointing` during v5)."""
    name = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing")
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def _load(model: str | nn.Module, tokenizer: Any, spec: TuneSpec, source: DataSpec, task: str,
          seed: int) -> tuple[nn.Module, Any, dict]:
    """The model, its tokenizer and the task data; an in-memory model must fit the task's labels."""
    if isinstance(model, str):
        if task == "causal-lm":
            loaded = load_model(model, "causal-lm")
            return loaded.model, loaded.tokenizer, load_task_data(spec, source, task=task, seed=seed,
                                                                  tokenizer=loaded.tokenizer)
        data = load_task_data(spec, source, task=task, seed=seed)
        loaded = load_model(model, "seq-cls", label_names=data["label_names"])
        return loaded.model, loaded.tokenizer, data
    if tokenizer is None:
        raise PrunetuneError("finetune: an in-memory model needs its tokenizer (tokenizer=...)")
    data = load_task_data(spec, source, task=task, seed=seed, tokenizer=tokenizer)
    if task == "seq-cls":
        n = int(getattr(model.config, "num_labels", 0) or 0)
        if n != len(data["label_names"]):
            raise PrunetuneError(f"finetune: the model has {n} classes but task data '{source.train}' has "
                                 f"{len(data['label_names'])}")
    return model, tokenizer, data


def _teacher(spec: TuneSpec, run: dict, model: nn.Module, original: dict, data: dict, out: Path, resume: bool,
             teacher_model: nn.Module | None, changes_base: bool) -> tuple[Any, str]:
    """KD's teacher: a given model, the initial model (shared frozen base when LoRA leaves it intact), a dense
    fine-tuned copy (trained with `run`: the run's data, task, seed, export and weight decay), or a model
    directory."""
    if not spec.kd:
        return None, "none"
    if teacher_model is not None:
        return _freeze(teacher_model), "given"
    if spec.teacher == "initial":
        if spec.lora and not changes_base:
            return "shared", "initial (frozen base shared, adapters disabled)"
        return _freeze(copy.deepcopy(model)), "initial (frozen copy)"
    if spec.teacher == "dense":
        dense = spec.model_copy(update={"kd": False, "retention": False,
                                        "mix": spec.mix.model_copy(update={"fraction": 0.0})})
        t_dir = out / "teacher-dense"
        if not (resume and (t_dir / "model" / "config.json").is_file()):
            finetune(original["model"], dense, t_dir, **run, tokenizer=original["tokenizer"], overwrite=True,
                     kind="teacher-dense")
        teacher = _freeze(load_model(str(t_dir / "model"), run["task"], label_names=data["label_names"]).model)
        return teacher, f"dense (fine-tuned without pruning: {t_dir / 'model'})"
    p = Path(os.path.expanduser(spec.teacher))
    if not p.exists():
        raise PrunetuneError(f"--teacher must be 'initial', 'dense' or a model directory; '{spec.teacher}' is none")
    return _freeze(load_model(str(p), run["task"], label_names=data["label_names"]).model), f"path {p.resolve()}"


# ------------------------------------------------------------------------------------------------ main
def finetune(model: str | nn.Module, spec: TuneSpec, out: Path | str, *, data: DataSpec | None = None,
             task: str = "seq-cls", seed: int = 0, export: bool = True, weight_decay: float = 0.0,
             tokenizer: Any = None, model_name: str | None = None, method: Method | None = None, resume: bool = False,
             overwrite: bool = False, callbacks: tuple = (), masks: MaskSet | None = None, kind: str = "finetune",
             teacher_model: nn.Module | None = None) -> dict:
    """Fine-tune `model` (a spec such as "tiny-llama" or a directory, or an nn.Module with its `tokenizer`)
    with the options of `spec` (the recipe's `tune` section, the one schema) on `data.train` (the recipe's
    `data` section; None: its defaults), driving `method` (a `methods.base.Method`) through its hooks.

    `task` is the head trained (seq-cls | causal-lm | seq2seq) and `seed` the training seed (adapter init, data
    order, training subsample, data mixing); `export` writes `out/model` (and `out/adapter`); these, the data
    and `weight_decay` are what a run adds to the spec, and the manifest records them with it (`TuneSpec.record`).

    An in-memory model is trained in place (LoRA is injected into it, the merge folds into its weights): pass
    a copy to keep the original. `model_name` names it in the manifest and is the original model that
    retention compares against (needed for an in-memory model when `spec.retention`). `masks`, when given, is
    filled in place, so the caller sees the run's final masks (a method's pruning included).

    Returns the metrics dict that is also written to `out/metrics.json`, plus `_model` (the plain, merged,
    finalized model), `_tokenizer` and `_test`.
    """
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    source = data if data is not None else DataSpec()
    check_task(task)
    check_kd(spec.kd_alpha, spec.kd_temp)  # a spec edited by model_copy(update=...) skipped pydantic's checks
    if spec.lora:
        check_lora(spec.lora_rank, spec.alpha, spec.lora_dropout)
    run = {"data": source, "task": task, "seed": seed, "export": export, "weight_decay": weight_decay}
    check_fsdp_run(method=method, kd=spec.kd, lora=spec.lora, teacher=spec.teacher, teacher_model=teacher_model,
                   mix=spec.mix.fraction, task=task)
    if task == "seq2seq":  # (source, target) pairs: Seq2SeqTrainer, generation and BLEU live in tuning.seq2seq
        if method is not None:
            raise PrunetuneError(f"method '{method.name}' does not support seq2seq fine-tuning yet")
        if spec.kd:
            raise PrunetuneError("seq2seq fine-tuning trains on the label cross-entropy only: turn KD off (--no-kd)")

        return finetune_task(model, spec, out, data=source, seed=seed, tokenizer=tokenizer, masks=masks,
                             callbacks=callbacks)
    in_memory = not isinstance(model, str)
    model_id = model if not in_memory else model_name
    if in_memory and spec.retention and model_name is None:
        raise PrunetuneError("finetune: retention compares with the original model: pass model_name= for an "
                             "in-memory model, or set retention off")
    label = model_id if model_id is not None else f"{type(model).__name__} (in memory)"
    out = Path(out)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if resume:
        ckpt = find_resume_checkpoint(out / CHECKPOINTS)
        for newer in checkpoints_newest_first(out / CHECKPOINTS):  # incomplete ones after it: redone
            if newer == ckpt:
                break
            if rank0:
                shutil.rmtree(newer, ignore_errors=True)
        if rank0:  # log lines written after the checkpoint are written again by the resumed steps
            trim_logs(out / "train_log.csv", int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"]))
    else:
        ckpt = None
        if rank0:
            prepare_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    # -- model and data ---------------------------------------------------------------------------
    original = ({"model": copy.deepcopy(model), "tokenizer": tokenizer}  # what a dense teacher starts from
                if in_memory and spec.kd and spec.teacher == "dense" else {"model": model, "tokenizer": None})
    model, tok, data = _load(model, tokenizer, spec, source, task, seed)
    if masks is None:
        masks = MaskSet()
    if not len(masks):  # filled in place: callers holding this MaskSet see a method's final masks
        masks.update(existing_masks(model_id if not in_memory else None, model))
    if fsdp_requested():
        broadcast_masks(masks)
    if len(masks):
        masks.apply(model)

    # -- teacher and data mixing (pseudo-labelled by the teacher) -----------------------------------
    changes_base = bool(method is not None and method.changes_base_weights)
    teacher, teacher_desc = _teacher(spec, run, model, original, data, out, resume, teacher_model, changes_base)
    train_examples, mix_summary = data["train"], {"mixed": 0}
    if spec.mix.fraction > 0:
        labeller = model if teacher == "shared" or teacher is None else teacher
        train_examples, mix_summary = build_mixed(data["train"], spec.mix, labeller, tok, task, spec.seqlen,
                                                  source.data_dir, seed=seed)

    # -- LoRA, then the method's prepare ---------------------------------------------------------------
    # Adapter init draws from the global RNG: seed it here, or a run's result would depend on what ran
    # before it in the same process (the --full-evaluate rows differed from the same runs made alone).
    torch.manual_seed(seed)
    if spec.lora:
        model = apply_lora(model, task, rank=spec.lora_rank, alpha=spec.alpha, dropout=spec.lora_dropout,
                           rslora=spec.rslora, **({"roles": tuple(spec.lora_roles)} if spec.lora_roles else {}))
        mask_lora_updates(model, masks)  # the update is masked in the forward: the export is the trained model

    if task == "seq-cls":
        train_ds = encode_cls(tok, train_examples, spec.seqlen)
        val_ds = encode_cls(tok, data["validation"], spec.seqlen)
        collator = DataCollatorWithPadding(tok)
    else:
        train_ds = encode_lm(tok, [e["text"] for e in train_examples], spec.seqlen)
        val_ds = encode_lm(tok, [e["text"] for e in data["validation"]], spec.seqlen)
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = max(1, math.ceil(len(train_ds) / (spec.batch_size * world)))
    ctx = MethodContext(task=task, tokenizer=tok, masks=masks, train_texts=[e["text"] for e in data["train"]],
                        max_steps=math.ceil(spec.train_epochs * steps_per_epoch), steps_per_epoch=steps_per_epoch,
                        out=out, seed=seed)
    if ckpt is not None:
        ctx.resumed_from = int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"])
    if method is not None:
        model = method.prepare(model, ctx)
    model.train()
    model_ref = {"model": model}

    # -- trainer ----------------------------------------------------------------------------------
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb")
    args = training_args(out, spec, steps_per_epoch, task, progress_enabled(), world, seed=seed,
                         weight_decay=weight_decay)
    enforcer = MaskEnforcer(masks, model_ref)
    cbs: list = []
    if method is not None:  # the method's own callbacks, then its step hook: both act before masks are enforced
        cbs += list(method.callbacks(ctx)) + [MethodStepHook(method, ctx, model_ref)]
    cbs += [enforcer, CsvLogger(out / "train_log.csv"), *([EpochEndSave()] if spec.save_steps else []), *callbacks]
    trainer = KDTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, data_collator=collator,
                        processing_class=tok, compute_metrics=compute_metrics if task == "seq-cls" else None,
                        callbacks=cbs, teacher=teacher, kd_alpha=spec.kd_alpha, kd_temp=spec.kd_temp,
                        causal=task == "causal-lm", method=method, method_ctx=ctx,
                        sequential_train=spec.mix.strategy == "old_first" and mix_summary.get("mixed", 0) > 0,
                        masks=masks)
    if not progress_enabled():  # the CSV and TensorBoard logs hold what PrinterCallback would print
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if ckpt is not None:
        trainer.resume_state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
        if (ckpt / MASKS_FILE).is_file():
            masks.update(MaskSet.load(ckpt / MASKS_FILE))
            masks.apply(model)
        if method is not None:  # after prepare and callbacks, before the first resumed step
            load_method_state(method, ckpt, ctx.resumed_from)
    # under FSDP the model is sharded in place when training starts: rank 0 keeps a weightless copy to load
    # the gathered weights into afterwards
    skeleton = (weightless_copy(model, share=(masks,)) if trainer.is_fsdp_enabled and rank0 else None)
    t0 = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    timings["train_s"] = time.perf_counter() - t0
    model = trainer.model
    if len(masks):
        broadcast_masks(masks)
        masks.apply(model)
    if trainer.is_fsdp_enabled:  # every rank sends its shards; rank 0 continues with the whole plain model
        t0 = time.perf_counter()
        model = gather_full_model(model, skeleton) or model  # (the other ranks keep their shards)
        timings["gather_s"] = time.perf_counter() - t0
        if len(masks):
            masks.apply(model)

    result: dict = {"kind": kind, "model": label, "task": task, "data": data["name"],
                    "train_examples": len(train_ds), "mixing": mix_summary, "teacher": teacher_desc,
                    "global_step": trainer.state.global_step, "steps_per_epoch": steps_per_epoch,
                    "world_size": world, "fsdp": bool(trainer.is_fsdp_enabled),
                    "train_loss": float(train_out.training_loss), "mask_enforcement": enforcer.summary(),
                    "resumed_from": str(ckpt) if ckpt else None,
                    "best_checkpoint": trainer.state.best_model_checkpoint}
    if method is not None:
        model = method.finalize(model, ctx)
        if len(masks):
            masks.apply(model)
        summary = method.summary()
        clash = sorted(set(summary) & set(result))
        if clash:
            raise PrunetuneError(f"method '{method.name}' summary reuses the run's keys: {', '.join(clash)}")
        result["method"] = method.name
        result.update(summary)
    result["masks_digest"] = masks_digest(masks) if len(masks) else None
    atomic_write_json(out / f"rank{int(os.environ.get('RANK', '0'))}.json",
                      {"global_step": trainer.state.global_step, "masks_digest": result["masks_digest"]}, indent=None)
    if not trainer.is_world_process_zero():
        return result

    # -- evaluate, export, retention ---------------------------------------------------------------
    t0 = time.perf_counter()
    scoring = {"task": task, "max_length": spec.seqlen, "split_seed": source.split_seed}
    before = task_eval(model, tok, data, **scoring)
    timings["eval_s"] = time.perf_counter() - t0
    result["test_before_merge"] = {k: v for k, v in before.items() if k != "predictions"}
    manifest_cfg = {"model": label,
                    "tune": spec.record(source, task=task, seed=seed, export=export, weight_decay=weight_decay),
                    "method": method.name if method is not None else None}
    if method is not None:
        manifest_cfg[method.name] = method.to_dict()
    card = {"base_model": model_id, "method": method.name if method is not None else None,
            "tags": ["lora" if spec.lora else "fine-tuned"], "title": f"{kind}: {label}"}
    if spec.lora:
        if export:
            save_adapter_export(model, tok, out / "adapter", masks,
                                build_manifest(f"{kind}-adapter", manifest_cfg, seed=seed), card=card)
        plain = merge_lora_keep_masks(model, masks)
    else:
        plain = model
        if len(masks):
            masks.apply(plain)
    plain.eval()
    after = task_eval(plain, tok, data, **scoring)
    result["test_after_merge"] = {k: v for k, v in after.items() if k != "predictions"}
    if task == "seq-cls":  # the headline is the exported (merged) model's score: that is what a user ships
        result["accuracy"], result["macro_f1"] = after["accuracy"], after["macro_f1"]
        result["predictions"] = after["predictions"]
        result["merge_changed_predictions"] = sum(a != b for a, b in zip(before["predictions"], after["predictions"]))
    rep = sparsity_report(plain)
    result["sparsity"] = rep["sparsity"]
    result["layer_sparsity"] = {k: v["sparsity"] for k, v in rep["layers"].items()}
    if spec.retention:
        t0 = time.perf_counter()
        result["retention"] = retention(plain, model_id, tok, data_dir=source.data_dir,
                                        max_windows=spec.retention_windows, max_length=spec.seqlen)
        timings["retention_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    result["timings"] = timings
    man = build_manifest(kind, manifest_cfg, seed=seed, metrics={k: v for k, v in result.items()
                                                                        if k not in ("predictions", "layer_sparsity")},
                         timings=timings)
    if export:  # masks and model card inside the atomic write: all appear or none
        save_hf_dir(plain, tok, out / "model", man, extra=(lambda tmp: masks.save(tmp / MASKS_FILE)) if len(masks)
                    else None, card={**card, "sparsity": rep["sparsity"]})
    atomic_write_json(out / "metrics.json", result)
    write_manifest(out / "manifest.json", man)
    result["_model"] = plain
    result["_tokenizer"] = tok
    result["_test"] = data["test"]
    return result
