"""The Trainer subclass: task loss with knowledge distillation, plus the method's extra loss terms."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.modeling_outputs import CausalLMOutputWithPast

from prunetune.errors import PrunetuneError
from prunetune.evaluation.perplexity import causal_lm_loss
from prunetune.pruning.masks import MASKS_FILE
from prunetune.rundir import atomic_write_json
from prunetune.tuning.distill import kd_loss
from prunetune.tuning.fsdp import fsdp_requested
from prunetune.tuning.lifecycle import save_method_state

#: written last into every checkpoint: its presence marks the checkpoint complete; it holds what the Trainer
#: does not save but a resumed run needs to end exactly like an uninterrupted one (the running loss sums)
CHECKPOINT_STATE = "prunetune_state.json"


class KDTrainer(Trainer):
    """Trainer whose training loss is alpha*CE + (1-alpha)*T^2*KL against a frozen teacher, + method terms.

    The method's `extra_loss` is added in training only (evaluation losses stay comparable across methods);
    its scalars are averaged between two log lines and logged as `method/<name>`.
    """

    loss_is_scaled_for_ga = False  # our loss is a per-batch mean

    def __init__(self, *a, teacher: Any = None, kd_alpha: float = 0.5, kd_temp: float = 4.0,
                 causal: bool = False, method: Any = None, method_ctx: Any = None,
                 sequential_train: bool = False, masks: Any = None, **kw) -> None:
        super().__init__(*a, **kw)
        self.masks = masks  # saved inside each checkpoint: a resumed run re-applies them
        self.resume_state: dict | None = None  # a checkpoint's CHECKPOINT_STATE, restored at train begin
        self.add_callback(_RestoreLossSums(self))
        self.teacher = teacher  # nn.Module, "shared" (LoRA base with adapters disabled) or None
        self.kd_alpha, self.kd_temp, self.causal = kd_alpha, kd_temp, causal
        self.method, self.method_ctx = method, method_ctx
        self.sequential_train = sequential_train
        self.kd_parts: dict[str, float] = {}
        self._method_sums: dict[str, float] = {}
        self._method_n = 0

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; an FSDP launch that accelerate did not turn into FSDP stops here.

        accelerate enables FSDP only on accelerators (GPUs and the like): on CPU processes it silently runs
        data parallel instead, whose ranks other than 0 hold no weights under FSDP's RAM-efficient loading.
        """
        super().create_accelerator_and_postprocess()

        if fsdp_requested() and not self.is_fsdp_enabled:
            raise PrunetuneError(f"the launch asks for FSDP but accelerate runs it as "
                                 f"{self.accelerator.distributed_type.value} (FSDP needs GPUs): launch CPU "
                                 "processes with torchrun or `accelerate launch --multi_gpu` instead")

    @torch.no_grad()
    def _teacher_logits(self, inputs: dict) -> torch.Tensor:
        if self.teacher == "shared":
            peft = self.model
            was = peft.training
            peft.eval()
            try:
                with peft.disable_adapter():
                    return peft(**inputs).logits
            finally:
                peft.train(was)
        return self.teacher(**inputs).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        feats = {k: v for k, v in inputs.items() if k != "labels"}
        use_kd = self.teacher is not None and model.training and self.kd_alpha < 1.0
        # A data-parallel wrapper (DDP) must run the forward itself, or the ranks' gradients are not reduced:
        # the chunked path calls the backbone and head directly, so a wrapped model (which does not pass
        # `get_output_embeddings` through) takes the full-logits path, the same loss at more memory. So does an
        # FSDP model: its outer module gathers the embeddings and head only when its own forward runs.
        if (self.causal and not use_kd and self.method is None and not self.is_fsdp_enabled
                and hasattr(model, "get_output_embeddings")):
            # next-token CE with the LM head applied in token chunks: the full-vocabulary logits (and their
            # log-softmax and gradient) are never held at once; the loss is the same (tests/test_tuning.py)
            loss, _ = causal_lm_loss(model, labels=labels, **feats)
            if model.training:
                self.kd_parts = {"ce": float(loss.detach()), "kl": 0.0}
            return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss
        outputs = model(**feats)
        t_logits = self._teacher_logits(feats) if use_kd else None
        loss, parts = kd_loss(outputs.logits, t_logits, labels, self.kd_alpha if use_kd else 1.0,
                              self.kd_temp, causal=self.causal)
        if model.training:
            self.kd_parts = parts
            if self.method is not None:
                extra, scalars = self.method.extra_loss(model, inputs, outputs, self.method_ctx)
                if extra is not None:
                    loss = loss + extra
                for k, v in scalars.items():
                    self._method_sums[k] = self._method_sums.get(k, 0.0) + float(v)
                self._method_n += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kw) -> None:
        if "loss" in logs and self._method_n:  # a training log line: add the method's terms since the last one
            logs.update({f"method/{k}": v / self._method_n for k, v in self._method_sums.items()})
            self._method_sums, self._method_n = {}, 0
        super().log(logs, *args, **kw)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then the masks and the method's state, then CHECKPOINT_STATE (last: the
        completeness mark).

        The loss sums are the Trainer's own running totals (`_total_loss_scalar`, the not yet logged
        `_tr_loss`, the step of the last log line): restored at resume, the final `train_loss` and every
        logged loss equal the uninterrupted run's to the bit (transformers only averages a resumed call's
        own steps).
        """
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        ckpt = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.masks is not None and len(self.masks):
            self.masks.save(os.path.join(ckpt, MASKS_FILE), {"step": self.state.global_step})
        if self.method is not None:  # what the method keeps between steps (lifecycle.save_method_state)
            save_method_state(self.method, ckpt, self.state.global_step)
        atomic_write_json(os.path.join(ckpt, CHECKPOINT_STATE), {
            "global_step": self.state.global_step, "total_loss_scalar": self._total_loss_scalar,
            "tr_loss": float(self._tr_loss.item()), "globalstep_last_logged": self._globalstep_last_logged,
            "masks": bool(self.masks is not None and len(self.masks)),
            "method_state": self.method.name if self.method is not None else None})

    def _restore_loss_sums(self) -> None:
        st = self.resume_state
        if st is None or int(st["global_step"]) != self.state.global_step:
            return
        self._total_loss_scalar = float(st["total_loss_scalar"])
        self._tr_loss = torch.tensor(float(st["tr_loss"]), device=self._tr_loss.device, dtype=self._tr_loss.dtype)
        self._globalstep_last_logged = int(st["globalstep_last_logged"])
        self._initial_global_step = 0  # train_loss = all steps' loss sum / all steps, as without the interruption

    def _get_train_sampler(self, train_dataset=None):
        if self.sequential_train:
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)
        return super()._get_train_sampler(train_dataset)


class _RestoreLossSums(TrainerCallback):
    """At train begin (after transformers zeroes its loss sums for this call), put back a checkpoint's."""

    def __init__(self, trainer: KDTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kw):
        self.trainer._restore_loss_sums()
