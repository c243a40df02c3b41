"""Task metrics: classification accuracy and macro-F1 on the fixed test split, and corpus BLEU.

Accuracy and macro-F1 come from scikit-learn, with their conventions set explicitly (and tested) rather
than inherited from a library default:
- macro-F1 averages the per-class F1 over the classes that occur in the labels or the predictions
  (a class absent from both carries no information); a class with precision + recall = 0 scores 0.
- `num_labels`, when given, only validates that every id is in range.
BLEU is delegated to sacrebleu, whose signature (tokeniser, smoothing, version) is recorded with the score.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from prunetune.errors import PrunetuneError, optional_import
from prunetune.progress import track


def classification_metrics(preds: Sequence[int], labels: Sequence[int], num_labels: int | None = None) -> dict:
    """Accuracy and macro-F1 of integer predictions against integer labels."""
    preds = [int(p) for p in preds]
    labels = [int(y) for y in labels]
    if len(preds) != len(labels):
        raise PrunetuneError(f"{len(preds)} predictions for {len(labels)} labels")
    if not labels:
        raise PrunetuneError("no examples to score")
    if num_labels is not None:
        bad = [v for v in preds + labels if not 0 <= v < num_labels]
        if bad:
            raise PrunetuneError(f"class id {bad[0]} outside 0..{num_labels - 1}")
    from sklearn.metrics import accuracy_score, f1_score

    classes = sorted(set(labels) | set(preds))
    macro_f1 = f1_score(labels, preds, labels=classes, average="macro", zero_division=0.0)
    return {"accuracy": float(accuracy_score(labels, preds)), "macro_f1": float(macro_f1)}


@torch.no_grad()
def predict_classes(model, tokenizer, texts: Sequence[str], max_length: int = 128, batch_size: int = 16,
                    progress: bool | None = None, description: str = "classify") -> list[int]:
    """Argmax class per text. Texts are batched by length so that padding (wasted CPU) stays small."""
    if max_length < 2 or batch_size < 1:
        raise PrunetuneError(f"max_length must be >= 2 and batch_size >= 1, got {max_length} and {batch_size}")
    device = next(model.parameters()).device
    lengths = [len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    preds: list[int] = [0] * len(texts)
    was_training = model.training
    model.eval()
    starts = range(0, len(order), batch_size)
    for s in track(starts, description, total=len(starts), show=progress):
        idx = order[s : s + batch_size]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)
        logits = model(**enc).logits
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = int(p)
    model.train(was_training)
    return preds


def examples_digest(examples: Sequence[dict]) -> str:
    """A short fingerprint of an evaluation set (texts and labels, order-free): equal digests = same test set."""
    import hashlib

    h = hashlib.sha256()
    for row in sorted(f"{e.get('label', '')}\t{e['text']}" for e in examples):
        h.update(row.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def evaluate_classification(model, tokenizer, examples: Sequence[dict], max_length: int = 128,
                            batch_size: int = 16, *, split: str = "test", dataset: str | None = None,
                            progress: bool | None = None) -> dict:
    """Accuracy and macro-F1 of a sequence-classification model on `examples` ({"text", "label"}), with protocol."""
    if not examples:
        raise PrunetuneError(f"no examples in the {split} split to evaluate")
    num_labels = int(getattr(model.config, "num_labels", 0)) or None
    t0 = time.perf_counter()
    preds = predict_classes(model, tokenizer, [e["text"] for e in examples], max_length, batch_size, progress,
                            f"classify {dataset or split}")
    labels = [int(e["label"]) for e in examples]
    if num_labels is not None and max(labels) >= num_labels:
        raise PrunetuneError(f"labels go up to {max(labels)} but the model has {num_labels} classes")
    metrics = classification_metrics(preds, labels, num_labels)
    return {
        "metric": "classification",
        **metrics,
        "n": len(examples),
        "seconds": time.perf_counter() - t0,
        "predictions": preds,
        "protocol": {
            "dataset": dataset,
            "split": split,
            "n": len(examples),
            "examples_sha256": examples_digest(examples),
            "max_length": max_length,
            "truncation": "keep the first max_length tokens",
            "batch_size": batch_size,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "macro_f1": "mean per-class F1 over classes present in labels or predictions",
        },
    }


def bleu(hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU (sacrebleu defaults: 13a tokeniser, exp smoothing); `refs` is one reference per hypothesis
    or, for several references, one list per reference set (sacrebleu's layout)."""
    sacrebleu = optional_import("sacrebleu", "seq2seq", "BLEU")

    if not hyps:
        raise PrunetuneError("BLEU needs at least one hypothesis")
    ref_sets = [list(refs)] if refs and isinstance(refs[0], str) else [list(r) for r in refs]
    for r in ref_sets:
        if len(r) != len(hyps):
            raise PrunetuneError(f"{len(hyps)} hypotheses but a reference set of {len(r)}")
    metric = sacrebleu.BLEU()
    score = metric.corpus_score(list(hyps), ref_sets)
    return {"metric": "bleu", "value": score.score, "protocol": {"signature": str(metric.get_signature()),
                                                                 "n": len(hyps), "references": len(ref_sets)}}
