"""Prune-As-You-Tune (PAYT): prune the pre-trained weights *during* (LoRA) fine-tuning, guided by KD.

The pieces: a schedule (`pruning/schedules.py`) says how sparse at which step; a criterion scores the
base weights (L1 magnitude, global over all prunable linears — the default; L2 structured input columns;
or any engine criterion such as Wanda, calibrated on the training text); `MaskSet` is kept, enforced after
every optimizer step, saved in every checkpoint and next to the exported model. With LoRA the masks act on
the frozen base weights and the merge is W' = (W + s·BA) ⊙ M, so the export keeps the sparsity.

Fixes over the original implementation: the schedule reaches the target exactly at its last event with no
float comparisons (the linear schedule crashed on rounding), masks are saved, and merging keeps sparsity.

Masks only ever shrink: weights pruned at an earlier event score -inf at later ones, so each event's mask is
a superset of the pruned set before it and the sparsity is exactly the event's target.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from prunetune.config import PaytSpec  # the one schema of PAYT's settings (the recipe's `payt` section)
from prunetune.errors import PrunetuneError
from prunetune.pruning.masks import MaskSet
from prunetune.tuning.callbacks import broadcast_masks
from prunetune.tuning.finetune import finetune
from prunetune.tuning.lifecycle import Method, MethodContext

# PAYT's criteria are entries of the pruning criterion registry (`prunetune.pruning.criteria`); "magnitude" keeps
# its PAYT meaning (one global L1 threshold, the seed's L1Unstructured) through the registry's "payt" context.


def canonical_criterion(name: str) -> str:
    from prunetune.pruning.criteria import criterion_names, get_criterion

    try:
        return get_criterion(name, "payt").name
    except PrunetuneError:
        raise PrunetuneError(f"unknown pruning criterion '{name}'; choose one of: {', '.join(criterion_names())} "
                             "(aliases: L1Unstructured, LnStructured)") from None


# ------------------------------------------------------------------------------------------------ criteria
def _prunable(model: nn.Module) -> dict[str, nn.Linear]:
    from prunetune.models.arch import get_adapter

    # mask keys are module names of the plain model: drop peft's ".base_layer" suffix
    return {name.replace(".base_layer", ""): lin for name, (_, lin) in get_adapter(model).linears().items()}


@torch.no_grad()
def compute_masks(model: nn.Module, criterion: str, sparsity: float, previous: MaskSet | None = None,
                  tokenizer: Any = None, calib_text: str | torch.Tensor | None = None, nsamples: int = 16,
                  seqlen: int = 128) -> MaskSet:
    """Masks of exactly `sparsity` over the base weights; weights pruned before stay pruned.

    `calib_text` is the calibration text, or its token-id windows [n, seqlen] already cut (what PAYT's callback
    passes from its second pruning event on, so the training text is tokenised once per run, not per event).
    """
    from prunetune.pruning.criteria import get_criterion
    from prunetune.pruning.granularity import global_masks, structured_mask

    criterion = canonical_criterion(criterion)
    crit = get_criterion(criterion)
    layers = _prunable(model)
    prev = previous if previous is not None else MaskSet()

    def scored(name: str, s: torch.Tensor) -> torch.Tensor:
        if name in prev:
            s = s.masked_fill(~prev[name].to(s.device), float("-inf"))
        return s

    if not crit.needs_calibration and crit.default_granularity == "global":
        scores = {n: scored(n, crit.score(lin.weight)) for n, lin in layers.items()}
        return MaskSet(global_masks(scores, sparsity))
    if not crit.needs_calibration and crit.default_granularity == "cols":
        out = {}
        for n, lin in layers.items():
            s = crit.score(lin.weight)
            if n in prev:  # a column counts as pruned when its mask is all-false
                dead = ~prev[n].any(dim=0, keepdim=True).expand_as(s)
                s = s.masked_fill(dead.to(s.device), float("-inf"))
            out[n] = structured_mask(s, sparsity, "cols")
        return MaskSet(out)
    return _engine_masks(model, criterion, sparsity, prev, tokenizer, calib_text, nsamples, seqlen)


def _engine_masks(model, criterion, sparsity, prev, tokenizer, calib_text, nsamples, seqlen) -> MaskSet:
    """Any criterion of the pruning engine (`prunetune.pruning.api.prune`), calibrated on the training text."""
    try:
        from prunetune.pruning.api import prune
    except ImportError:
        raise PrunetuneError(f"criterion '{criterion}' needs the pruning engine (prunetune.pruning.api), "
                             "which this installation does not have; use l1-global or l2-cols") from None
    from prunetune.data.sources import TextSource
    from prunetune.models.arch import unwrap

    from prunetune.pruning.criteria import get_criterion

    needs_calib = get_criterion(criterion).needs_calibration
    if needs_calib and (calib_text is None or (isinstance(calib_text, str) and not calib_text)):
        raise PrunetuneError(f"criterion '{criterion}' needs calibration text")
    calib = calib_text if isinstance(calib_text, torch.Tensor) else TextSource(calib_text, "train-text", "task")
    target = unwrap(model)
    disable = getattr(model, "disable_adapter", None)
    ctx = disable() if callable(disable) else _null()
    with ctx:  # score the base model the masks act on
        masks = prune(target, criterion, sparsity, calib=calib if needs_calib else None,
                      tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen, previous=prev)
    masks = MaskSet({n.replace(".base_layer", ""): m for n, m in masks.items()})  # plain-model names
    if len(prev):
        for n in masks.names():
            if n in prev:
                masks[n] = masks[n] & prev[n].to(masks[n].device)
    return masks


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------------------------------ callback
class PaytCallback(TrainerCallback):
    """Prune on the schedule's events (before the optimizer step that follows), update the shared masks."""

    def __init__(self, spec: PaytSpec, masks: MaskSet, model_ref: dict, tokenizer: Any = None,
                 calib_text: str | None = None) -> None:
        self.spec = spec
        self.schedule = spec.as_schedule()
        self.masks = masks
        self.model_ref = model_ref
        self.tokenizer = tokenizer
        self.calib_text = calib_text
        self.plan: list = []
        self.events: list[dict] = []
        self.resumed_from: int | None = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
        spe = max(1, len(train_dataloader) // max(1, args.gradient_accumulation_steps)) if train_dataloader else 1
        self.plan = self.schedule.plan(state.max_steps, spe)
        self._done = {ev.step for ev in self.plan if self.resumed_from is not None and ev.step < self.resumed_from}

    def on_step_begin(self, args, state, control, **kw):
        for ev in self.plan:
            if ev.step == state.global_step and ev.step not in self._done:
                self._prune(ev, state)
                self._done.add(ev.step)

    def _calib(self) -> str | torch.Tensor | None:
        """The calibration windows, cut from the training text at the first event and reused by every later one.

        Tokenising the whole training text took most of a pruning event's time (7-9 s an event on MiniLM's
        400 BBC articles, most of it tokenisation); the windows are drawn with a fixed seed, so every event got
        the same ids anyway: caching them changes no mask.
        """
        if isinstance(self.calib_text, str) and self.calib_text and self.tokenizer is not None:
            from prunetune.data.sources import TextSource
            from prunetune.pruning.api import calibration_ids
            from prunetune.pruning.criteria import get_criterion

            if get_criterion(canonical_criterion(self.spec.criterion)).needs_calibration:
                self.calib_text = calibration_ids(TextSource(self.calib_text, "train-text", "task"), self.tokenizer,
                                                  self.spec.nsamples, self.spec.seqlen, seed=0)
        return self.calib_text

    def _prune(self, ev, state) -> None:
        from prunetune.pruning.masks import sparsity_report

        t = time.perf_counter()
        model = self.model_ref["model"]
        new = compute_masks(model, self.spec.criterion, ev.sparsity, self.masks, self.tokenizer, self._calib(),
                            self.spec.nsamples, self.spec.seqlen)
        broadcast_masks(new)
        self.masks.update(new)
        self.masks.apply(model)
        real = sparsity_report(model)["sparsity"]
        self.events.append({"step": ev.step, "event": f"{ev.index}/{ev.of}", "target": ev.sparsity,
                            "mask_sparsity": self.masks.sparsity(), "real_sparsity": real,
                            "seconds": time.perf_counter() - t})


# ------------------------------------------------------------------------------------------------ method
class PaytMethod(Method):
    """PAYT on the method lifecycle: its schedule acts at step begin (a `PaytCallback`), so the weights pruned
    at an event never take part in that step's forward pass; the driver enforces the masks after each step.

    It prunes the base weights during training, so KD's teacher is a frozen copy of the initial model.
    """

    name = "payt"
    changes_base_weights = True

    def __init__(self, spec: PaytSpec) -> None:
        self.spec = spec
        self.model_ref: dict = {}
        self.callback: PaytCallback | None = None

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self.model_ref["model"] = model
        return model

    def callbacks(self, ctx: MethodContext) -> list:
        self.callback = PaytCallback(self.spec, ctx.masks, self.model_ref, tokenizer=ctx.tokenizer,
                                     calib_text="\n\n".join(ctx.train_texts))
        self.callback.resumed_from = ctx.resumed_from
        return [self.callback]

    def summary(self) -> dict:
        return {"pruning_events": self.callback.events if self.callback is not None else []}

    def state_dict(self) -> dict:
        """The pruning events so far (the summary's record). The masks are the driver's, saved in each
        checkpoint with it, and the schedule's position is the step, so the events are all PAYT adds."""
        return {"pruning_events": self.callback.events if self.callback is not None else []}

    def load_state_dict(self, state: dict) -> None:
        if self.callback is not None:
            self.callback.events = [dict(e) for e in state.get("pruning_events", [])]

    def to_dict(self) -> dict:
        return self.spec.to_dict()


# ------------------------------------------------------------------------------------------------ runs
def run_payt(model: str | nn.Module, cfg, spec: PaytSpec, out: Path | str, **kw) -> dict:
    """Fine-tune with PAYT; see `tuning.finetune.finetune` for what is written."""
    return finetune(model, cfg, out, method=PaytMethod(spec), kind="payt", **kw)


ROWS = ("dense full FT", "dense LoRA FT", "prune (no FT)", "prune -> full FT", "prune -> LoRA FT", "PAYT",
        "PAYT without KD", "PAYT with the other LoRA scaling")


def _other_scaling(cfg) -> str:
    return "PAYT plain LoRA" if cfg.rslora else "PAYT rsLoRA"


def prune_only(model_spec: str, cfg, spec: PaytSpec) -> dict:
    """The pruned model without any fine-tuning: the PAYT criterion at the target sparsity, scored as is.

    For a classifier whose head is new this is chance level by construction; the row shows what pruning
    alone leaves, as the seed's comparison does.
    """
    from prunetune.models.loading import load_model
    from prunetune.pruning.masks import sparsity_report
    from prunetune.tuning.data import load_task_data
    from prunetune.tuning.evaluate import task_eval

    t0 = time.perf_counter()
    if cfg.task == "causal-lm":
        loaded = load_model(model_spec, "causal-lm")
        data = load_task_data(cfg, loaded.tokenizer)
    else:
        data = load_task_data(cfg)
        loaded = load_model(model_spec, "seq-cls", label_names=data["label_names"])
    model, tok = loaded.model.eval(), loaded.tokenizer
    masks = compute_masks(model, spec.criterion, spec.sparsity, None, tok,
                          "\n\n".join(e["text"] for e in data["train"]), spec.nsamples, spec.seqlen)
    masks.apply(model)
    test = task_eval(model, tok, data, cfg)
    out = {"kind": "prune-only", "test_after_merge": {k: v for k, v in test.items() if k != "predictions"},
           "sparsity": sparsity_report(model)["sparsity"], "teacher": "none", "mixing": {"mixed": 0},
           "timings": {"train_s": 0.0, "total_s": time.perf_counter() - t0}}
    if "accuracy" in test:
        out["accuracy"], out["macro_f1"] = test["accuracy"], test["macro_f1"]
    if cfg.retention:
        from prunetune.evaluation.retention import retention

        out["retention"] = retention(model, model_spec, tok, data_dir=cfg.data_dir,
                                     max_windows=cfg.retention_windows, max_length=cfg.max_length)
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


def configuration_label(run: str, cfg) -> str:
    """The configuration's row label in the table (the other-scaling row names the scaling it uses)."""
    return _other_scaling(cfg) if run == "payt-other-scaling" else _LABELS[run]


def _full_ft(cfg, full_lr: float | None):
    full_cfg = copy.deepcopy(cfg)
    full_cfg.lora = False
    full_cfg.lr = full_lr
    return full_cfg


def run_configuration(run: str, model_spec: str, cfg, spec: PaytSpec, out: Path | str,
                      full_lr: float | None = None, resume: bool = False) -> dict:
    """One configuration of the comparison, from `model_spec`; the tuning result (`finetune`'s dict).

    Every run uses `cfg`'s KD and data mixing unless its name says otherwise. `cfg.lr` is the LoRA runs'
    learning rate; the full-FT runs get `full_lr` (None: the full-FT default), since a rate that suits a
    rank-8 adapter would wreck every weight of the model at once. prune -> X FT is PAYT with a one-shot schedule
    at step 0 (same criterion, same teacher: the dense initial model), so the only difference to PAYT is *when*
    the pruning happens. "payt-other-scaling" is PAYT with plain LoRA when `cfg.rslora`, else rsLoRA.
    `resume`: a trained configuration continues from its last checkpoint in `out`.
    """
    if run not in CONFIGURATIONS:
        raise PrunetuneError(f"unknown full-evaluate configuration '{run}'; choose one of: {', '.join(CONFIGURATIONS)}")
    oneshot = PaytSpec(sparsity=spec.sparsity, schedule="oneshot", start=0.0, every=1, unit="step",
                       criterion=spec.criterion, nsamples=spec.nsamples, seqlen=spec.seqlen)
    if run == "original":
        return original_retention(model_spec, cfg)
    if run == "prune-only":
        return prune_only(model_spec, cfg, spec)
    if run in ("dense-full", "dense-lora"):
        run_cfg = _full_ft(cfg, full_lr) if run == "dense-full" else copy.deepcopy(cfg)
        run_cfg.lora = run == "dense-lora"
        return finetune(model_spec, run_cfg, out, kind=run, resume=resume)
    if run in ("prune-full", "prune-lora"):
        run_cfg = _full_ft(cfg, full_lr) if run == "prune-full" else cfg
        return finetune(model_spec, run_cfg, out, method=PaytMethod(oneshot), kind=run, resume=resume)
    run_cfg = copy.deepcopy(cfg)
    if run == "payt-nokd":
        run_cfg.kd = False
    elif run == "payt-other-scaling":
        run_cfg.rslora = not cfg.rslora
    return finetune(model_spec, run_cfg, out, method=PaytMethod(spec), kind=run, resume=resume)


def original_retention(model_spec: str, cfg) -> dict:
    """The untuned model's retention value: the reference point of the table's retention column."""
    from prunetune.evaluation.retention import retention
    from prunetune.models.loading import load_model

    ref = load_model(model_spec, "seq-cls" if cfg.task == "seq-cls" else "causal-lm", num_labels=2)
    return {"retention": retention(ref.model, model_spec, ref.tokenizer, data_dir=cfg.data_dir,
                                   max_windows=cfg.retention_windows, max_length=cfg.max_length), "sparsity": 0.0}


def table_row(result: dict) -> dict:
    """What the comparison keeps of a configuration's result (no model, predictions or per-layer detail)."""
    return {k: v for k, v in result.items() if not k.startswith("_") and k not in ("predictions", "layer_sparsity")}


def comparison_payload(model_spec: str, cfg, spec: PaytSpec, runs: dict[str, dict],
                       full_lr: float | None = None) -> dict:
    """full_evaluate.json: the settings, every configuration's result (label -> `table_row`) and the table."""
    return {"model": model_spec, "tune": cfg.to_dict(), "full_ft_learning_rate": _full_ft(cfg, full_lr).learning_rate,
            "payt": spec.to_dict(), "runs": runs, "table": comparison_table(runs)}


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
