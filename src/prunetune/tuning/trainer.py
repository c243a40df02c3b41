"""Compatibility names for code written before `tuning/trainer.py` was split (benchmarks and methods of other
branches still import them from here). New code imports from where each now lives:

    tuning.config      TuneConfig              tuning.finetune    finetune, find_resume_checkpoint
    tuning.data        load_task_data          tuning.callbacks   MaskEnforcer, CsvLogger, MaskSaver,
    tuning.kd_trainer  KDTrainer                                  broadcast_masks, masks_digest
    tuning.evaluate    lm_loss, task_eval      evaluation.task    predict_classes (takes texts)
"""

from __future__ import annotations

from torch import nn

from prunetune.tuning.callbacks import CsvLogger, MaskEnforcer, MaskSaver, broadcast_masks, masks_digest
from prunetune.tuning.config import TuneConfig
from prunetune.tuning.data import load_task_data
from prunetune.tuning.evaluate import lm_loss, task_eval
from prunetune.tuning.finetune import find_resume_checkpoint, finetune
from prunetune.tuning.kd_trainer import KDTrainer

__all__ = ["CsvLogger", "KDTrainer", "MaskEnforcer", "MaskSaver", "TuneConfig", "broadcast_masks",
           "find_resume_checkpoint", "finetune", "lm_loss", "load_task_data", "masks_digest", "predict_classes",
           "task_eval"]


def predict_classes(model: nn.Module, tokenizer, examples: list[dict], max_length: int, batch_size: int = 16) -> list[int]:
    """The old signature (examples with a "text" key) over the package's one `evaluation.task.predict_classes`."""
    from prunetune.evaluation.task import predict_classes as predict

    return predict(model, tokenizer, [e["text"] for e in examples], max_length, batch_size, progress=False)
