"""Composable pruning's settings: the recipe's `compose` section, the one schema of the method's options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from prunetune.schema import Spec


class ComposeSpec(Spec):
    """Composable pruning (`prunetune.methods.composable`): configurations of (attention rate, linear rate),
    each unique pruned module fine-tuned once at module level, composed, then a short model-level fine-tuning
    per configuration (`tune` settings; full fine-tuning when tune.mode is full).

    The method's own checks (rates pair up, units and criterion exist) run before any run starts
    (`pipelines.compose.check_compose`, the stage's declared `check`). `run_composable` and `train_units` read
    it directly; what the module cache's key hashes of it is `cache.module_ft_settings`.
    """

    attention: list[float | str] = Field(default_factory=lambda: [0.25, 0.5], description=(
        "fraction of attention heads removed (q/k/v, head-wise), one per configuration; '0.1,0.2,...' = per block"))
    linear: list[float | str] = Field(default_factory=lambda: [0.3, 0.5], description=(
        "fraction of linear weights removed (o, FFN; unstructured), one per configuration or per block"))
    n: int | None = Field(None, ge=1, description="number of configurations (must match the lists; the seed's -n)")
    grid: bool = Field(False, description="every (attention, linear) combination instead of pairing the lists")
    attention_units: list[str] = Field(default_factory=lambda: ["attention", "cross-attention"],
                                       description="attention modules the attention rate applies to")
    linear_units: list[str] = Field(default_factory=lambda: ["o", "co", "gate", "up", "down"],
                                    description="linear roles the linear rate applies to")
    attention_criterion: Literal["l1", "l2"] = "l1"
    linear_criterion: str = Field("l1", description="l1 | wanda | a score criterion of the registry")
    linear_steps: int = Field(150, ge=1, description="module-level Adam steps per pruned linear (full batch)")
    linear_lr: float = Field(1e-3, gt=0)
    attention_steps: int = Field(60, ge=1, description="module-level steps per attention module (one batch each)")
    attention_lr: float = Field(5e-4, gt=0)
    module_texts: int | None = Field(128, ge=1, description="training texts captured for module-level FT")
    module_batch: int = Field(8, ge=1, description="texts per captured batch")
    baseline: bool = Field(True, description="also fine-tune each configuration from its pruned modules without "
                           "module-level FT (the control)")
    cache_dir: str | None = Field(None, description="module cache (default: under the stage's output directory)")

    @field_validator("attention", "linear", mode="after")
    @classmethod
    def _numbers(cls, v: list) -> list:
        out = []
        for x in v:
            try:
                out.append(float(x))
            except (TypeError, ValueError):
                out.append(x)  # per-block '0.1,0.2,...' stays text
        return out
