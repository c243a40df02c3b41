"""The recipe's `tune` section (`TuneSpec`, with PAYT's data mixing `data.spec.MixSpec`): fine-tuning's one
schema of options and defaults, kept beside the code it configures; `config.Recipe` composes it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from prunetune.data.spec import DataSpec, MixSpec
from prunetune.errors import PrunetuneError
from prunetune.schema import Spec

TASKS = ("seq-cls", "causal-lm", "seq2seq")  # the heads the tuning module trains (`finetune(task=...)`)


def default_learning_rate(mode: str) -> float:
    """LoRA 1e-3: on MiniLM / BBC News (400 articles, 106 steps) 5e-4 left dense LoRA at 89.7% accuracy,
    1e-3 reached 95.1% and 2e-3 96.4% (BENCHMARKS.md); full fine-tuning 1e-4 (97.3% there)."""
    return 1e-3 if mode == "lora" else 1e-4


class TuneSpec(Spec):
    """LoRA (or full) fine-tuning; for a causal LM on text, for seq-cls on the labelled task.

    The one definition of every fine-tuning option and its default: recipes, the `finetune`/`payt` commands
    and the tuning module (`tuning.finetune.finetune(model, spec, out, data=..., task=..., seed=...)`, library
    callers included) all read it. What a run adds to it is not an option of the method: which head trains
    (`task`), on which data (the recipe's `data` section, `DataSpec`), with which seed.
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
        """`lora_alpha`, else 2 x rank."""
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def lora(self) -> bool:
        """LoRA adapters rather than full fine-tuning (the name the tuning module and its manifests use)."""
        return self.mode == "lora"

    @property
    def train_samples(self) -> int | None:
        """Training examples: `steps` x `batch_size` when `steps` is set (one epoch of them), else `n_samples`."""
        return self.steps * self.batch_size if self.steps is not None else self.n_samples

    @property
    def train_epochs(self) -> float:
        """Epochs over `train_samples`: one when `steps` sets the budget, else `epochs`."""
        return 1.0 if self.steps is not None else self.epochs

    def record(self, data: DataSpec, *, task: str, seed: int, export: bool, weight_decay: float = 0.0) -> dict:
        """What a run's manifest records of its fine-tuning: these options resolved (the budget as examples and
        epochs, LoRA's alpha and the learning rate with their defaults applied) with the run's data, head and
        seed. The keys are the ones manifests have always had, so runs recorded before and after compare key
        by key; `grad_accum`, `warmup_ratio` and `mask_lora` are the tuning module's fixed choices."""
        return {"task": task, "data": data.train, "lora": self.lora, "lora_rank": self.lora_rank,
                "lora_alpha": self.alpha, "lora_dropout": self.lora_dropout, "rslora": self.rslora,
                "gradient_checkpointing": self.gradient_checkpointing,
                "lora_roles": tuple(self.lora_roles) if self.lora_roles is not None else None, "kd": self.kd,
                "kd_alpha": self.kd_alpha, "kd_temp": self.kd_temp, "teacher": self.teacher,
                "epochs": self.train_epochs, "lr": self.lr, "batch_size": self.batch_size, "grad_accum": 1,
                "max_length": self.seqlen, "n_samples": self.train_samples, "eval_samples": self.eval_samples,
                "test_samples": self.test_samples, "seed": seed, "split_seed": data.split_seed,
                "weight_decay": weight_decay, "warmup_ratio": 0.0, "mix": self.mix.record(seed),
                "data_dir": data.data_dir, "retention": self.retention, "retention_windows": self.retention_windows,
                "save_steps": self.save_steps, "export": export, "mask_lora": True,
                "learning_rate": self.learning_rate}


def check_task(task: str) -> str:
    """`task` if the tuning module trains that head, else a one-line error naming the ones it does."""
    if task not in TASKS:
        raise PrunetuneError(f"unknown task type '{task}'; choose one of: {', '.join(TASKS)}")
    return task
