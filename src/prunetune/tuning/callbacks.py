"""Trainer callbacks of every fine-tuning run: the method's step hook, mask enforcement, logs, mask checkpoints."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from prunetune.pruning.masks import MaskSet


# ------------------------------------------------------------------------------------------------ masks across ranks
def _is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def broadcast_masks(masks: MaskSet) -> None:
    """Make every rank hold rank 0's masks (they are computed identically; this makes it a guarantee).

    The names and shapes come from rank 0 first, so a rank that could not derive a mask (under FSDP's
    RAM-efficient loading only rank 0 has real weights to read zeros from) receives it whole.
    accelerate's `broadcast` puts nothing on the wrong device by itself, so each mask travels as uint8 on
    the device of the process group's backend (NCCL accepts only CUDA tensors, gloo CPU ones) and comes back
    to the device it lived on (masks live on their weight's device; a new one on the CPU).
    """
    if not _is_dist() or torch.distributed.get_world_size() < 2:
        return
    from accelerate.utils import broadcast

    backend = torch.distributed.get_backend()
    comm = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    listing = [[(n, tuple(masks.masks.raw(n).shape)) for n in sorted(masks.names())]]
    torch.distributed.broadcast_object_list(listing, src=0, device=comm)
    for name, shape in listing[0]:
        home = masks[name].device if name in masks else torch.device("cpu")
        local = masks[name] if name in masks else torch.zeros(shape, dtype=torch.bool)
        t = broadcast(local.to(device=comm, dtype=torch.uint8).contiguous(), from_process=0)
        masks[name] = t.to(home).bool()
    for name in set(masks.names()) - {n for n, _ in listing[0]}:  # rank 0 has no such mask: neither do we
        del masks.masks[name]


def masks_digest(masks: MaskSet) -> str:
    h = hashlib.sha256()
    for name in sorted(masks.names()):
        h.update(name.encode())
        h.update(masks[name].to(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the method's step hook
class MethodStepHook(TrainerCallback):
    """Calls `method.after_step` after `optimizer.step()` and before `zero_grad()` (Trainer's on_optimizer_step).

    It must come before `MaskEnforcer` in the callback list: a method that prunes here has its new zeros
    enforced in the same step.
    """

    def __init__(self, method: Any, ctx: Any, model_ref: dict) -> None:
        self.method, self.ctx, self.model_ref = method, ctx, model_ref

    def on_step_begin(self, args, state, control, **kw):
        self.ctx.step = state.global_step

    def on_optimizer_step(self, args, state, control, **kw):
        self.ctx.step = state.global_step
        self.method.after_step(self.model_ref["model"], self.ctx)


# ------------------------------------------------------------------------------------------------ masks stay zero
class MaskEnforcer(TrainerCallback):
    """Re-zero pruned weights after every optimizer step and measure what that costs."""

    def __init__(self, masks: MaskSet, model_ref: dict) -> None:
        self.masks = masks
        self.model_ref = model_ref
        self.enforce_s = 0.0
        self.step_s = 0.0
        self.steps = 0
        self._t0 = None

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kw):
        if len(self.masks):
            t = time.perf_counter()
            self.masks.enforce(self.model_ref["model"])
            self.enforce_s += time.perf_counter() - t

    def on_step_end(self, args, state, control, **kw):
        if self._t0 is not None:
            self.step_s += time.perf_counter() - self._t0
            self.steps += 1
            self._t0 = None

    def summary(self) -> dict:
        return {"steps": self.steps, "enforce_ms_per_step": 1000 * self.enforce_s / max(self.steps, 1),
                "step_ms": 1000 * self.step_s / max(self.steps, 1),
                "overhead_fraction": self.enforce_s / self.step_s if self.step_s else 0.0}


# ------------------------------------------------------------------------------------------------ logs
#: the CSV's fixed columns: what the Trainer logs in training, evaluation and its final summary
CSV_COLUMNS = ("step", "epoch", "loss", "grad_norm", "learning_rate", "eval_loss", "eval_accuracy", "eval_macro_f1",
               "eval_runtime", "train_runtime", "train_loss")


class CsvLogger(TrainerCallback):
    """Every Trainer log line appended to `train_log.jsonl` (all keys) and `train_log.csv` (fixed columns).

    Appending keeps each log O(1): the old logger re-read and rewrote the whole CSV at every line to widen
    its header when a new key appeared. Now the CSV has a fixed header (`CSV_COLUMNS`, what plots and
    pipelines read) and keys outside it - a method's loss terms, throughput figures - are kept, with every
    other key, in the JSONL file, one object per line. A resumed run appends to both.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.jsonl = self.path.with_suffix(".jsonl")

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "epoch": state.epoch,
               **{k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}}
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def trim_logs(csv_path: Path, step: int) -> None:
    """Drop the CSV and JSONL log lines after `step` (a resumed run logs those steps again)."""
    for path in (Path(csv_path), Path(csv_path).with_suffix(".jsonl")):
        if not path.is_file():
            continue
        lines = path.read_text().splitlines(keepends=True)
        if path.suffix == ".jsonl":
            kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        else:
            rows = list(csv.DictReader(lines))
            kept = lines[:1] + [ln for ln, r in zip(lines[1:], rows) if int(float(r["step"])) <= step]
        path.write_text("".join(kept))


class EpochEndSave(TrainerCallback):
    """Checkpoint at each epoch end as well, when `save_steps` makes the Trainer save by steps only."""

    def on_epoch_end(self, args, state, control, **kw):
        control.should_save = True
        return control
