"""PAYT's settings: the recipe's `payt` section and the one schema `prunetune.methods.payt` takes (library
callers build it too: `PaytSpec(sparsity=0.5, schedule="linear")`); `FullEvaluateSpec`, one configuration of
PAYT's comparison (`prunetune payt --full-evaluate`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from prunetune.pruning.api import registered_name
from prunetune.pruning.schedules import Schedule
from prunetune.schema import Spec


class PaytSpec(Schedule):
    """Prune-As-You-Tune settings: the recipe's `payt` section and the one schema `prunetune.methods.payt` takes
    (library callers build it too: `PaytSpec(sparsity=0.5, schedule="linear")`). The schedule keys are
    `pruning.schedules.Schedule`'s own (a PaytSpec is the schedule its callback plans); PAYT starts later by
    default (a fifth of training first adapts the dense model) and adds what it prunes by."""

    start: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of training before the first pruning event")
    criterion: str = Field("l1-global", description="a registered pruning criterion: l1-global | l2-cols | wanda "
                           "| magnitude (= l1-global here) | sparsegpt; the seed's L1Unstructured / LnStructured too")
    nsamples: int = Field(16, ge=1, description="calibration windows of the training text (wanda criterion)")
    seqlen: int = Field(128, ge=2, description="tokens per calibration window (wanda criterion)")

    @field_validator("criterion", mode="before")
    @classmethod
    def _registered_criterion(cls, v: Any) -> Any:
        """Aliases (the seed's L1Unstructured, LnStructured) are accepted and stored canonically."""
        if not isinstance(v, str):
            return v
        return registered_name(v, "payt")

    def to_dict(self) -> dict:
        return self.model_dump()


class FullEvaluateSpec(Spec):
    """One stage of PAYT's comparison (`prunetune payt --full-evaluate`): a configuration trained with the recipe's
    `tune` and `payt` settings from the run's model, or `table`, the comparison of the configurations before it."""

    run: Literal["original", "dense-full", "dense-lora", "prune-only", "prune-full", "prune-lora", "payt",
                 "payt-nokd", "payt-other-scaling", "table"] = Field(
        "payt", description="original (untuned, retention only) | dense-full | dense-lora | prune-only | prune-full "
        "| prune-lora | payt | payt-nokd | payt-other-scaling | table")
    full_lr: float | None = Field(None, gt=0, description="learning rate of the full fine-tuning configurations "
                                  "(None: the full-FT default); tune.lr is the LoRA ones'")
    baselines: Literal["plain", "distilled"] = Field(
        "plain", description="plain: the baselines (dense full/LoRA FT, prune -> full/LoRA FT) train on the task "
        "alone, no KD and no data mixing, as in PAYT's own comparison; distilled: with the tune section's KD and "
        "mixing, as the PAYT rows")
