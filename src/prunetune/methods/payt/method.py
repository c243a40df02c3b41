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

import time
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from prunetune.data.sources import TextSource
from prunetune.errors import PrunetuneError
from prunetune.methods.payt.spec import PaytSpec  # the one schema of PAYT's settings (the recipe's `payt` section)
from prunetune.models.arch import get_adapter, unwrap
from prunetune.pruning.api import prune
from prunetune.pruning.calibrate import calibration_ids
from prunetune.pruning.criteria import criterion_names, get_criterion
from prunetune.pruning.granularity import global_masks, structured_mask
from prunetune.pruning.masks import MaskSet, sparsity_report
from prunetune.tuning.callbacks import broadcast_masks
from prunetune.tuning.lifecycle import Method, MethodContext

# PAYT's criteria are entries of the pruning criterion registry (`prunetune.pruning.criteria`); "magnitude" keeps
# its PAYT meaning (one global L1 threshold, the seed's L1Unstructured) through the registry's "payt" context.


def canonical_criterion(name: str) -> str:
    try:
        return get_criterion(name, "payt").name
    except PrunetuneError:
        raise PrunetuneError(f"unknown pruning criterion '{name}'; choose one of: {', '.join(criterion_names())} "
                             "(aliases: L1Unstructured, LnStructured)") from None


# ------------------------------------------------------------------------------------------------ criteria
def _prunable(model: nn.Module) -> dict[str, nn.Linear]:
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
        self.masks = masks
        self.model_ref = model_ref
        self.tokenizer = tokenizer
        self.calib_text = calib_text
        self.plan: list = []
        self.events: list[dict] = []
        self.resumed_from: int | None = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
        spe = max(1, len(train_dataloader) // max(1, args.gradient_accumulation_steps)) if train_dataloader else 1
        self.plan = self.spec.plan(state.max_steps, spe)  # a PaytSpec is its own pruning schedule
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
            if get_criterion(canonical_criterion(self.spec.criterion)).needs_calibration:
                self.calib_text = calibration_ids(TextSource(self.calib_text, "train-text", "task"), self.tokenizer,
                                                  self.spec.nsamples, self.spec.seqlen, seed=0)
        return self.calib_text

    def _prune(self, ev, state) -> None:
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
