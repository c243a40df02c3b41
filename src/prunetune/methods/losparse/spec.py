"""LoSparse's settings: the recipe's `losparse` section and the one schema `Losparse` takes (library callers
build it too: `LosparseSpec(rank_ratio=0.1, keep=0.1)`); the seed's names are accepted as aliases."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from prunetune.methods.losparse.platon import LosparseSchedule
from prunetune.schema import Spec

#: the seed's option names -> ours
SEED_NAMES = {"low_rank_parameter_ratio": "rank_ratio", "final_threshold": "keep", "delta_t": "deltaT"}


class LosparseSpec(Spec):
    """LoSparse (`prunetune.methods.losparse`): W ≈ U·V + S, S pruned by PLATON on a cubic schedule.

    The seed's names are accepted: `low_rank_parameter_ratio` is `rank_ratio`, `final_threshold` is `keep`;
    `initial_warmup` / `final_warmup` count in units of `warmup_steps` as in the seed, or give plain step counts
    in `initial_warmup_steps` / `final_warmup_steps`. Training is full fine-tuning of U, V, S and the rest
    (`tune.mode` must be full), with the `tune` section's budget.
    """

    rank_ratio: float = Field(0.1, gt=0.0, lt=1.0, description="low_rank_parameter_ratio: share of each matrix in U and V")
    keep: float = Field(0.1, gt=0.0, lt=1.0, description="final_threshold: fraction of S's entries kept at the end")
    initial_threshold: float = Field(1.0, gt=0.0, le=1.0, description="kept fraction of S before pruning starts")
    warmup_steps: int = Field(10, ge=0, description="the unit of initial_warmup / final_warmup (seed's warmup_steps)")
    initial_warmup: float = Field(1.0, ge=0.0, description="plain fine-tuning before pruning, in warmup_steps")
    final_warmup: float = Field(5.0, ge=0.0, description="steps with the mask fixed at the end, in warmup_steps")
    initial_warmup_steps: int | None = Field(None, ge=0, description="plain step count; overrides initial_warmup")
    final_warmup_steps: int | None = Field(None, ge=0, description="plain step count; overrides final_warmup")
    deltaT: int = Field(10, ge=1, description="PLATON's window: |θ·∇θ| is averaged over deltaT steps, the mean "
                        "folded into both EMAs once a window, and the mask recomputed every deltaT steps while the "
                        "schedule runs (the LoSparse code's default is 10)")
    beta1: float = Field(0.85, ge=0.0, lt=1.0, description="EMA of the sensitivity |θ·∇θ| (once per window)")
    beta2: float = Field(0.95, ge=0.0, le=1.0, description="EMA of its uncertainty; 1 switches the uncertainty off "
                         "(score = the sensitivity EMA alone: the LoSparse code's default)")
    final_mask: Literal["recompute", "fixed"] = Field(
        "recompute", description="the final warm-up (keep = final_threshold): recompute: the mask is recomputed "
        "from the scores that keep updating, as the method does (the last one is exported); fixed: computed once "
        "at its first step and frozen, the scores no longer updated")
    structured_method: Literal["mean", "sum", "max", "min", "none"] = Field(
        "none", description="pool S's scores per row/column (structured) or none (unstructured)")
    structured_direction: Literal["row", "col", "row_col"] = "row"
    roles: list[str] = Field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"],
                             description="projections factorised (never embeddings, norms, pooler, classifier)")
    teacher: str | None = Field(None, description="dense fine-tuned model dir to distil from (None: no distillation)")
    kd_weight: float = Field(0.0, ge=0.0, description="weight of T²·KL on the logits")
    kd_temp: float = Field(2.0, gt=0.0)
    layer_weight: float = Field(0.0, ge=0.0, description="weight of the mean layer-output MSE")

    @model_validator(mode="before")
    @classmethod
    def _seed_names(cls, v: Any) -> Any:
        """The seed's names are aliases; None (or "unstructured") for structured_method means "none"."""
        if isinstance(v, dict):
            v = dict(v)
            for old, new in SEED_NAMES.items():
                if old in v:
                    v[new] = v.pop(old)
            if v.get("structured_method", "none") in (None, "", "unstructured"):
                v["structured_method"] = "none"
        return v

    @model_validator(mode="after")
    def _consistent(self) -> LosparseSpec:
        if self.initial_threshold < self.keep:
            raise ValueError(f"initial_threshold ({self.initial_threshold}) must be >= keep ({self.keep})")
        if (self.kd_weight > 0 or self.layer_weight > 0) and not self.teacher:
            raise ValueError("kd_weight / layer_weight need a teacher (a dense fine-tuned model dir)")
        return self

    @property
    def pooling(self) -> str | None:
        """How S's scores are pooled per row/column: None when unstructured (`structured_method: none`)."""
        return None if self.structured_method == "none" else self.structured_method

    def schedule(self, total_steps: int) -> LosparseSchedule:
        """The kept fraction of S at each step; warm-ups in plain steps or in units of `warmup_steps`."""
        iw = self.initial_warmup_steps if self.initial_warmup_steps is not None else \
            int(round(self.initial_warmup * self.warmup_steps))
        fw = self.final_warmup_steps if self.final_warmup_steps is not None else \
            int(round(self.final_warmup * self.warmup_steps))
        return LosparseSchedule(total_steps, iw, fw, self.keep, self.initial_threshold, self.deltaT)

    def to_dict(self) -> dict:
        """What the manifest and the factorised export record (unstructured as `structured_method: None`)."""
        return {**self.model_dump(), "structured_method": self.pooling}
