"""The lifecycle every training-time method shares (PAYT, LoSparse, VIB, composable, ...).

`tuning.finetune` drives a `Method` through one fine-tuning run; a method never subclasses the Trainer and
never re-implements data, logging, checkpoints or export. The hooks, in the order they run:

    prepare(model, ctx)         once, after the model (and LoRA) are built: may swap modules (U·V + S),
                                add gates, register parameters; returns the model to train
    callbacks(ctx)              extra `transformers.TrainerCallback`s (schedules that act on step begin, ...)
    extra_loss(model, inputs, outputs, ctx)
                                added to the task/KD loss at every training step (KL of gates, Lagrangian,
                                layer MSE); returns (loss or None, scalars to log)
    after_step(model, ctx)      after `optimizer.step()` and before `zero_grad()`: gradients and the updated
                                weights are both visible (PLATON scores and prunes here; run before the step,
                                Adam would revive what was just pruned). Masks are enforced right after it.
    finalize(model, ctx)        after training, before evaluation and export: fold gates, materialise U·V + S,
                                shrink; returns the plain model that is evaluated and exported
    summary()                   JSON-able facts for metrics.json (events, kept fractions, ...)

The interface lives in `tuning` because `tuning.finetune` is what drives it: the tuning layer defines the
hooks, the methods layer above implements them, and no import points upward. `prunetune.methods.base`
re-exports both classes; methods import them from there.

Everything has a no-op default, so a method implements only what it needs. `ctx` is a `MethodContext`: what the
run knows that a method may need (tokenizer, the shared MaskSet, training text, step counts, output dir).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.pruning.masks import MaskSet


@dataclass
class MethodContext:
    """What a fine-tuning run hands to its method (filled in by `tuning.finetune`)."""

    task: str = "seq-cls"
    tokenizer: Any = None
    masks: MaskSet = field(default_factory=MaskSet)
    train_texts: list[str] = field(default_factory=list)
    max_steps: int = 0
    steps_per_epoch: int = 1
    out: Path | None = None
    seed: int = 0
    step: int = 0  # global step, kept current by the driver
    resumed_from: int | None = None
    extra: dict = field(default_factory=dict)


class Method:
    """A training-time method: override the hooks it needs (see the module docstring for their order)."""

    name: str = "method"
    #: whether the method prunes during training (then KD's teacher must be a frozen copy, not the shared base)
    changes_base_weights: bool = False

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        return model

    def callbacks(self, ctx: MethodContext) -> list:
        return []

    def extra_loss(self, model: nn.Module, inputs: dict, outputs: Any,
                   ctx: MethodContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        return None, {}

    def after_step(self, model: nn.Module, ctx: MethodContext) -> None:
        return None

    def finalize(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        return model

    def summary(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        """The method's settings, recorded in the manifest."""
        return {"name": self.name}
