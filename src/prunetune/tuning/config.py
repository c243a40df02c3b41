"""`TuneConfig`: everything one fine-tuning run depends on (recorded in its manifest).

Its defaults are not written here: every option a recipe can set takes its default from the recipe schema
(`prunetune.tuning.spec.TuneSpec` and `prunetune.data.spec.DataSpec`) through `recipe_fields`, the same conversion that turns a
recipe's `tune` and `data` sections into a `TuneConfig`. So `TuneConfig()` is exactly what a recipe with an
empty `tune` section trains with, and a default changed in the schema changes both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from prunetune.data.spec import DataSpec, MixSpec
from prunetune.errors import PrunetuneError
from prunetune.tuning.distill import check_kd
from prunetune.tuning.lora import check_lora
from prunetune.tuning.spec import TuneSpec, default_learning_rate

TASKS = ("seq-cls", "causal-lm", "seq2seq")


def recipe_fields(spec: TuneSpec, data: DataSpec, seed: int = 0) -> dict[str, Any]:
    """The `TuneConfig` fields a recipe's `tune` and `data` sections decide: the ONE conversion.

    `steps` means steps x batch_size examples in one epoch; `lora_alpha` None means 2 x rank; `lr` None stays
    None (`TuneConfig.learning_rate` then applies the schema's per-mode default).
    """
    n_samples, epochs = spec.n_samples, spec.epochs
    if spec.steps is not None:
        n_samples, epochs = spec.steps * spec.batch_size, 1.0
    mix = spec.mix.model_copy()
    return dict(
        data=data.train, lora=spec.mode == "lora", lora_rank=spec.lora_rank, lora_alpha=spec.alpha,
        lora_dropout=spec.lora_dropout, rslora=spec.rslora, gradient_checkpointing=spec.gradient_checkpointing,
        lora_roles=tuple(spec.lora_roles) if spec.lora_roles is not None else None, kd=spec.kd,
        kd_alpha=spec.kd_alpha, kd_temp=spec.kd_temp, teacher=spec.teacher, epochs=epochs, lr=spec.lr,
        batch_size=spec.batch_size, max_length=spec.seqlen, n_samples=n_samples, eval_samples=spec.eval_samples,
        test_samples=spec.test_samples, split_seed=data.split_seed, mix=mix, data_dir=data.data_dir,
        retention=spec.retention, retention_windows=spec.retention_windows, save_steps=spec.save_steps,
    )


_D = recipe_fields(TuneSpec(), DataSpec())  # the schema's defaults, converted once


@dataclass
class TuneConfig:
    """Everything a fine-tuning run depends on (recorded in the manifest).

    Fields set from a recipe default to the schema's values (`recipe_fields`); the rest are the tuning
    module's own: what head to train (`task`: a classifier unless told), the training seed, and knobs no
    recipe exposes.
    """

    task: str = "seq-cls"  # the head trained (a recipe passes its model.task)
    data: str = _D["data"]
    lora: bool = _D["lora"]
    lora_rank: int = _D["lora_rank"]
    lora_alpha: float = _D["lora_alpha"]
    lora_dropout: float = _D["lora_dropout"]  # 0: the exact one-product masked LoRA path (tuning.lora)
    rslora: bool = _D["rslora"]
    gradient_checkpointing: bool = _D["gradient_checkpointing"]  # recompute block activations in backward
    lora_roles: tuple[str, ...] | None = _D["lora_roles"]  # None: every prunable linear (q k v o gate up down)
    kd: bool = _D["kd"]
    kd_alpha: float = _D["kd_alpha"]
    kd_temp: float = _D["kd_temp"]
    teacher: str = _D["teacher"]  # initial | dense | PATH
    epochs: float = _D["epochs"]
    lr: float | None = _D["lr"]  # None: the schema's default for the mode (see learning_rate)
    batch_size: int = _D["batch_size"]
    grad_accum: int = 1
    max_length: int = _D["max_length"]
    n_samples: int | None = _D["n_samples"]
    eval_samples: int | None = _D["eval_samples"]
    test_samples: int | None = _D["test_samples"]  # None = the whole test split (reported numbers)
    seed: int = 0  # training randomness (adapter init, data order, subsample of the train split)
    split_seed: int = _D["split_seed"]  # train/validation/test split: no training seed changes the test set
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    mix: MixSpec = field(default_factory=MixSpec)  # the recipe's `tune.mix` section; it mixes with `seed`
    data_dir: str | None = _D["data_dir"]
    retention: bool = _D["retention"]
    retention_windows: int = _D["retention_windows"]
    save_steps: int | None = _D["save_steps"]  # checkpoint every N steps too (None: each epoch end)
    export: bool = True
    mask_lora: bool = True  # mask the LoRA update in the forward pass (export == trained model)

    def validate(self) -> TuneConfig:
        if self.task not in TASKS:
            raise PrunetuneError(f"unknown task type '{self.task}'; choose one of: {', '.join(TASKS)}")
        if not self.epochs > 0:
            raise PrunetuneError(f"--epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise PrunetuneError("--batch-size and gradient accumulation must be >= 1")
        if self.max_length < 8:
            raise PrunetuneError(f"--max-length must be >= 8, got {self.max_length}")
        if self.n_samples is not None and self.n_samples < 2:
            raise PrunetuneError(f"--n-samples must be >= 2, got {self.n_samples}")
        if self.lr is not None and not self.lr > 0:
            raise PrunetuneError(f"--lr must be > 0, got {self.lr}")
        check_kd(self.kd_alpha, self.kd_temp)
        if self.lora:
            check_lora(self.lora_rank, self.lora_alpha, self.lora_dropout)
        return self

    @property
    def learning_rate(self) -> float:
        """`lr`, else the schema's default for LoRA or full fine-tuning (`tuning.spec.default_learning_rate`)."""
        return self.lr if self.lr is not None else default_learning_rate("lora" if self.lora else "full")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mix"] = self.mix.record(self.seed)
        d["learning_rate"] = self.learning_rate
        return d
