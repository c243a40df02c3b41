"""Data mixing for PAYT: general-text samples, labelled by the teacher, added to the task data.

Why: fine-tuning on the task alone drifts the backbone away from what it knew; a small share (default 5% of
the training set) of general text (WikiText-2 lines, or any text source) on which the student must match the
teacher keeps that knowledge in play. For classification the sample gets the teacher's argmax as its hard
label (for the CE term) while the KD term uses the teacher's soft outputs computed during training.

Choices (all seeded): `sampling` = `first` (the first suitable lines, reproducible across sources) or `random`;
`strategy` = `random` (shuffled in with the task data every epoch) or `old_first` (general "old" text first,
then the task data, in a fixed order: the trainer then iterates sequentially).
"""

from __future__ import annotations

import random

import torch

from prunetune.data.sources import load_text
from prunetune.data.spec import MixSpec
from prunetune.errors import PrunetuneError

MIN_CHARS = 40  # WikiText headings and blank lines carry no content worth matching


def general_lines(text: str, n: int, sampling: str = "first", seed: int = 0, min_chars: int = MIN_CHARS) -> list[str]:
    """`n` content lines of a text (headings and short lines skipped), first ones or a seeded random choice."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if len(ln) >= min_chars and not ln.startswith("=")]
    if n > len(lines):
        raise PrunetuneError(f"general text has {len(lines)} usable lines, {n} are needed for mixing")
    if sampling == "random":
        return random.Random(seed).sample(lines, n)
    return lines[:n]


@torch.no_grad()
def teacher_labels(teacher, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 16) -> list[int]:
    """Hard pseudo-labels: the teacher's argmax class for each text."""
    was = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    out: list[int] = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s : s + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)
        out += teacher(**enc).logits.argmax(-1).tolist()
    teacher.train(was)
    return out


def mix_examples(train: list[dict], extra: list[dict], strategy: str = "random", seed: int = 0) -> list[dict]:
    """Task + general examples in the order the strategy asks (`old_first` keeps general ones in front)."""
    rng = random.Random(seed)
    if strategy == "old_first":
        old, new = list(extra), list(train)
        rng.shuffle(old)
        rng.shuffle(new)
        return old + new
    both = list(train) + list(extra)
    rng.shuffle(both)
    return both


def build_mixed(train: list[dict], spec: MixSpec, teacher, tokenizer, task: str, max_length: int = 128,
                data_dir: str | None = None, seed: int = 0) -> tuple[list[dict], dict]:
    """Training examples with general text mixed in; returns them and a summary for the manifest.

    `spec` is the recipe's `tune.mix` section (`data.spec.MixSpec`); `seed` (the run's training seed) draws the
    random sampling of lines and the shuffle."""
    n = spec.count(len(train))
    if n == 0:
        return list(train), {"mixed": 0}

    src = load_text(spec.source, spec.split, data_dir=data_dir)
    texts = general_lines(src.text, n, spec.sampling, seed)
    if task == "seq-cls":
        if teacher is None:
            raise PrunetuneError("data mixing for classification needs a teacher to pseudo-label the general text")
        labels = teacher_labels(teacher, tokenizer, texts, max_length)
        extra = [{"text": t, "label": int(y), "mixed": 1} for t, y in zip(texts, labels)]
    else:  # causal LM: the text is its own target; the KD term matches the teacher's next-token distribution
        extra = [{"text": t, "mixed": 1} for t in texts]
    summary = {"mixed": n, "source": src.name, "variant": src.variant, "strategy": spec.strategy,
               "sampling": spec.sampling, "fraction": spec.fraction}
    if task == "seq-cls":
        summary["pseudo_label_counts"] = {str(k): sum(1 for e in extra if e["label"] == k)
                                          for k in sorted({e["label"] for e in extra})}
    return mix_examples(train, extra, spec.strategy, seed), summary
