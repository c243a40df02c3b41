"""The recipe's `tune` section (`TuneSpec`, with PAYT's data mixing `data.spec.MixSpec`): fine-tuning's one
schema of options and defaults, kept beside the code it configures; `config.Recipe` composes it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from prunetune.data.spec import MixSpec
from prunetune.schema import Spec


def default_learning_rate(mode: str) -> float:
    """LoRA 1e-3: on MiniLM / BBC News (400 articles, 106 steps) 5e-4 left dense LoRA at 89.7% accuracy,
    1e-3 reached 95.1% and 2e-3 96.4% (BENCHMARKS.md); full fine-tuning 1e-4 (97.3% there)."""
    return 1e-3 if mode == "lora" else 1e-4


class TuneSpec(Spec):
    """LoRA (or full) fine-tuning; for a causal LM on text, for seq-cls on the labelled task.

    The one definition of every fine-tuning option and its default: recipes, the `finetune`/`payt` commands
    and the tuning module's config (built from this by `pipelines.stages.tune_config`) all read it.
    """

    mode: Literal["lora", "full"] = "lora"
    steps: int | None = Field(12, ge=1, description="optimizer steps (steps x batch_size examples, 1 epoch); "
                              "None = n_samples x epochs")
    batch_size: int = Field(4, ge=1)
    seqlen: int = Field(256, ge=8, description="tokens per training sequence")
    lr: float | None = Field(None, gt=0, description="None: 1e-3 for LoRA, 1e-4 for full fine-tuning (measured "
                             "on MiniLM/BBC News: see learning_rate)")
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="default: 2 x rank")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="0: the exact one-product masked LoRA path "
                                "(tuning.lora); > 0 adds a second full-size product")
    lora_roles: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] | None = Field(
        None, description="roles LoRA is put on; None = every prunable linear")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r) instead of alpha/r")
    gradient_checkpointing: bool = Field(False, description="recompute each block's activations in backward "
                                         "instead of storing them: less memory, about one more forward of compute")
    kd: bool = Field(False, description="distil from a teacher: kd_alpha*CE + (1-kd_alpha)*T^2*KL")
    kd_alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the task loss when kd is on")
    kd_temp: float = Field(4.0, gt=0)
    teacher: str = Field("initial", description="KD teacher: initial | dense | PATH")
    n_samples: int | None = Field(None, ge=2, description="training examples when steps is None; None = all")
    eval_samples: int | None = Field(8, ge=1, description="held-out examples scored after each epoch")
    test_samples: int | None = Field(None, ge=1, description="test examples scored (None = the whole test split)")
    epochs: float = Field(1.0, gt=0)
    mix: MixSpec = Field(default_factory=MixSpec)
    retention: bool = Field(False, description="also measure knowledge retention against the untuned model")
    retention_windows: int = Field(8, ge=1)
    save_steps: int | None = Field(None, ge=1, description="also checkpoint every N optimizer steps, so a killed "
                                   "run resumed with --resume continues from its last checkpoint inside the "
                                   "stage; None = at each epoch end only")

    @model_validator(mode="before")
    @classmethod
    def _kd_from_alpha(cls, v: Any) -> Any:
        """`kd_alpha: 0.3` alone switches KD on (as recipes always wrote it); `kd_alpha: null` switches it off."""
        if isinstance(v, dict) and "kd_alpha" in v and "kd" not in v:
            v = dict(v)
            if v["kd_alpha"] is None:
                v.pop("kd_alpha")
                v["kd"] = False
            else:
                v["kd"] = True
        return v

    @property
    def learning_rate(self) -> float:
        """`lr`, else the mode's default (`default_learning_rate`)."""
        return self.lr if self.lr is not None else default_learning_rate(self.mode)

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank
