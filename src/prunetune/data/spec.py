"""The recipe's `data` section: where text comes from (its owner, the data layer, keeps its schema)."""

from __future__ import annotations

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
