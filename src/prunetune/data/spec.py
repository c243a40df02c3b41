"""The recipe's `data` section: where text comes from (its owner, the data layer, keeps its schema); and
`MixSpec`, data mixing's options (the `tune.mix` section), the one schema `data.mixing` takes."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from prunetune.schema import Spec


class DataSpec(Spec):
    """Where text comes from: calibration, fine-tuning text or labelled task, perplexity sets."""

    calib: str = Field("bbc-news", description="calibration text source (bbc-news | wikitext2 | FILE | HF name)")
    calib_split: str = "train"
    train: str = Field("bbc-news", description="fine-tuning source: text for causal LM, labelled data for seq-cls")
    train_split: str = "train"
    ppl: list[str] = Field(default_factory=lambda: ["wikitext2", "bbc-news"], description="perplexity sources")
    ppl_split: str = "test"
    data_dir: str | None = Field(None, description="local WikiText-2 dir (else PRUNETUNE_DATA_DIR or the hub)")
    split_seed: int = Field(0, description="seed of the fixed train/validation/test split of task data; the same "
                            "in every stage, command and training seed, so every run is scored on the same test set")


class MixSpec(Spec):
    """Data mixing (PAYT): general text, labelled by the teacher, mixed into the task's training examples.

    The recipe's `tune.mix` section and what `data.mixing.build_mixed` takes (library callers too). Its seed is
    the run's training seed, passed beside it, so that one seed decides a run's randomness.
    """

    fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of the training set added as general text")
    source: str = Field("wikitext2", description="text source of the general samples")
    split: str = "valid"
    strategy: Literal["random", "old_first"] = "random"
    sampling: Literal["first", "random"] = "first"

    def count(self, n_train: int) -> int:
        """General examples added to `n_train` task examples (rounded up: any fraction > 0 adds one)."""
        return int(math.ceil(self.fraction * n_train)) if self.fraction > 0 else 0

    def record(self, seed: int) -> dict:
        """What a manifest records of the mixing: the options and the seed it ran with."""
        return {**self.model_dump(), "seed": seed}
