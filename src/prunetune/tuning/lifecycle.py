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
    state_dict() / load_state_dict(state)
                                what the method keeps between steps (moving averages, schedule position,
                                masks, events): saved in every checkpoint, put back on resume (see below)

The interface lives in `tuning` because `tuning.finetune` is what drives it: the tuning layer defines the
hooks, the methods layer above implements them, and no import points upward. `prunetune.methods.base`
re-exports both classes; methods import them from there.

Method state and resume: the Trainer's checkpoint holds the weights, the optimizer, the LR schedule and the RNG,
not what a method keeps between steps. So the driver saves `state_dict()` into every `checkpoint-N/` (tensors
in `method_state.safetensors`, everything else in `method_state.json`; never pickle) before the checkpoint's
completion mark, and on resume calls `load_state_dict` after `prepare` and `callbacks`, before training
continues: a resumed run then ends exactly like an uninterrupted one. A method without such state keeps the
defaults (an empty state).

Everything has a no-op default, so a method implements only what it needs. `ctx` is a `MethodContext`: what the
run knows that a method may need (tokenizer, the shared MaskSet, training text, step counts, output dir).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.pruning.masks import MaskSet
from prunetune.rundir import atomic_write_json

#: a method's state inside a checkpoint directory: its tensors, and its other values with the tensors' names
METHOD_STATE_TENSORS = "method_state.safetensors"
METHOD_STATE_JSON = "method_state.json"
METHOD_STATE_FORMAT = "prunetune-method-state"


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

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly where this one stopped (called at every checkpoint).

        Flat: each value is a `torch.Tensor` (saved as safetensors) or JSON-able (saved as JSON). Empty (the
        default): nothing beyond the Trainer's own checkpoint.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what `state_dict` returned at the checkpoint (after `prepare` and `callbacks`; tensors
        arrive on the CPU)."""
        if state:
            raise PrunetuneError(f"method '{self.name}' has no state to restore, but the checkpoint holds some "
                                 f"({', '.join(sorted(state)[:3])}, ...)")

    def to_dict(self) -> dict:
        """The method's settings, recorded in the manifest."""
        return {"name": self.name}


# ------------------------------------------------------------------------------------------------ state on disk
def save_method_state(method: Method, ckpt: Path | str, step: int) -> None:
    """`method.state_dict()` into checkpoint directory `ckpt`: tensors as safetensors, the rest as JSON (the JSON
    names the tensors, so a checkpoint missing them is seen as incomplete). Written before the checkpoint's
    completion mark; nothing of it is pickled."""
    from safetensors.torch import save_file

    ckpt = Path(ckpt)
    state = method.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    try:
        json.dumps(values)
    except (TypeError, ValueError) as e:
        raise PrunetuneError(f"method '{method.name}': its state must be tensors or JSON-able values ({e})") from None
    if tensors:
        save_file(tensors, str(ckpt / METHOD_STATE_TENSORS),
                  metadata={"format": METHOD_STATE_FORMAT, "method": method.name, "step": str(step)})
    atomic_write_json(ckpt / METHOD_STATE_JSON, {"format": METHOD_STATE_FORMAT, "method": method.name, "step": step,
                                                 "tensors": sorted(tensors), "values": values})


def method_state_problem(ckpt: Path | str) -> str | None:
    """Why the method state in checkpoint `ckpt` cannot be read back (None: it can, or there is none)."""
    ckpt = Path(ckpt)
    if not (ckpt / METHOD_STATE_JSON).exists():
        return None
    try:
        meta = json.loads((ckpt / METHOD_STATE_JSON).read_text())
        names = list(meta["tensors"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"checkpoint {ckpt} is corrupt (unreadable {METHOD_STATE_JSON})"
    if not names:
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(ckpt / METHOD_STATE_TENSORS), "pt") as fh:
            missing = set(names) - set(fh.keys())
    except Exception:
        return f"checkpoint {ckpt} is corrupt (unreadable {METHOD_STATE_TENSORS})"
    if missing:
        return f"checkpoint {ckpt} is corrupt ({METHOD_STATE_TENSORS} lacks {sorted(missing)[0]})"
    return None


def load_method_state(method: Method, ckpt: Path | str, step: int) -> None:
    """Give `method` back the state saved in checkpoint `ckpt` (that of optimizer step `step`).

    A checkpoint without method state resumes only a method that keeps none: anything else would continue
    with reset state (restarted averages, a schedule from its start) and end differently from the run it resumes.
    """
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    if not (ckpt / METHOD_STATE_JSON).is_file():
        if method.state_dict():
            raise PrunetuneError(f"--resume: checkpoint {ckpt} holds no state of method '{method.name}' (written "
                                 "by an older prunetune?): it cannot continue exactly; start the run again without --resume")
        return
    problem = method_state_problem(ckpt)
    if problem is not None:
        raise PrunetuneError(f"--resume: {problem}")
    meta = json.loads((ckpt / METHOD_STATE_JSON).read_text())
    if meta.get("method") != method.name:
        raise PrunetuneError(f"--resume: checkpoint {ckpt} holds the state of method '{meta.get('method')}', "
                             f"not '{method.name}'")
    if int(meta.get("step", -1)) != step:
        raise PrunetuneError(f"--resume: checkpoint {ckpt} is corrupt (method state of step {meta.get('step')}, "
                             f"trainer state of step {step})")
    state = dict(meta["values"])
    if meta["tensors"]:
        state.update(load_file(str(ckpt / METHOD_STATE_TENSORS)))
    method.load_state_dict(state)
