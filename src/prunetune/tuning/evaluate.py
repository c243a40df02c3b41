"""Held-out scores of a fine-tuning run, measured the same way before and after the LoRA merge.

Classification goes through `evaluation.task` (the package's one `predict_classes` and macro-F1), so a run's
accuracy is the figure the `evaluate` stage would report for the same model and test set.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunetune.evaluation.perplexity import causal_lm_loss
from prunetune.evaluation.task import classification_metrics, predict_classes


def compute_metrics(eval_pred) -> dict:
    """Trainer's per-epoch validation metrics (accuracy, macro-F1) from its logits."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return classification_metrics(logits.argmax(-1).tolist(), labels.tolist())


@torch.no_grad()
def lm_loss(model: nn.Module, tokenizer, examples: list[dict], max_length: int) -> dict:
    """Mean next-token NLL over held-out pieces (each scored alone, no padding), and its exp."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    nll, n = 0.0, 0
    for e in examples:
        ids = tokenizer(e["text"], truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            continue
        total, count = causal_lm_loss(model, ids.to(device), reduction="sum")
        nll += float(total)
        n += count
    model.train(was)
    return {"loss": nll / max(n, 1), "perplexity": math.exp(nll / max(n, 1)), "tokens": n}


def task_eval(model: nn.Module, tokenizer, data: dict, *, task: str, max_length: int, split_seed: int) -> dict:
    """The run's test score: accuracy + macro-F1 (seq-cls) or held-out LM loss (causal-lm) on `data["test"]`
    (`tuning.data.load_task_data`); `split_seed` only names the split in the protocol."""
    if task == "seq-cls":
        preds = predict_classes(model, tokenizer, [e["text"] for e in data["test"]], max_length, progress=False)
        labels = [e["label"] for e in data["test"]]
        return {**classification_metrics(preds, labels), "predictions": preds, "n": len(labels),
                "protocol": f"{data['name']} test split (seeded stratified 80/10/10, split seed {split_seed}), "
                            f"max_length {max_length}"}
    r = lm_loss(model, tokenizer, data["test"], max_length)
    return {**r, "protocol": f"{data['name']} held-out pieces of ~{max_length} tokens, mean token NLL"}
