"""Fixed, seeded splits and tokenisation for task data.

The split is stratified per class (80/10/10 by default) with a fixed seed, so every method in a comparison
sees exactly the same test set; the split is a pure function of the examples and the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from prunetune.errors import PrunetuneError


@dataclass
class Labelled:
    """Labelled task data as loaded by `data.sources` (defined here so that splitting needs no loader)."""

    examples: list[dict]  # {"text": str, "label": int}
    label_names: list[str]
    name: str
    meta: dict = field(default_factory=dict)


def split_labelled(data: Labelled, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                   seed: int = 0) -> dict[str, list[dict]]:
    """Stratified split into train/validation/test: each class contributes its own share to each part.

    Identical texts are kept in the same part: BBC News holds 98 exact duplicate articles, and a copy in
    train with its twin in test would leak the answer. A part therefore receives whole groups until it has
    at least its share, so it may hold one example more than `round(n * fraction)` in a class.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise PrunetuneError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    by_class: dict[int, dict[str, list[dict]]] = {}
    for ex in data.examples:
        by_class.setdefault(ex["label"], {}).setdefault(ex["text"], []).append(ex)
    rng = random.Random(seed)
    parts: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for label in sorted(by_class):
        groups = list(by_class[label].values())
        rng.shuffle(groups)
        n = sum(len(g) for g in groups)
        targets = (("test", round(n * fractions[2])), ("validation", round(n * fractions[1])))
        it = iter(groups)
        for part, target in targets:
            got = 0
            while got < target:
                group = next(it, None)
                if group is None:
                    break
                parts[part] += group
                got += len(group)
        for group in it:
            parts["train"] += group
    for k in parts:
        rng.shuffle(parts[k])
    return parts


def subsample(examples: list[dict], n: int | None, seed: int = 0) -> list[dict]:
    """A seeded, class-balanced-as-possible subset of `n` examples (all when n is None or larger)."""
    if n is None or n >= len(examples):
        return list(examples)
    by_class: dict[int, list[dict]] = {}
    for ex in examples:
        by_class.setdefault(ex["label"], []).append(ex)
    rng = random.Random(seed)
    for items in by_class.values():
        rng.shuffle(items)
    out: list[dict] = []
    while len(out) < n:  # round-robin over classes keeps the subset stratified
        for label in sorted(by_class):
            if by_class[label] and len(out) < n:
                out.append(by_class[label].pop())
    rng.shuffle(out)
    return out


def tokenize_examples(tokenizer, examples: list[dict], max_length: int) -> dict:
    """Tokenise (truncating to `max_length`) into lists ready for a padding collator."""
    enc = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
    enc = dict(enc)
    enc["labels"] = [e["label"] for e in examples]
    return enc
