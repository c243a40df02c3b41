"""Task data for fine-tuning: the fixed split, LM pieces, and encoding for the Trainer's collators.

The train/validation/test split depends on `split_seed` only, so no training seed changes the test set;
`seed` picks the training subsample.
"""

from __future__ import annotations

import random

import torch

from prunetune.data.sources import load_labelled, load_text
from prunetune.data.tasks import split_labelled, subsample
from prunetune.errors import PrunetuneError
from prunetune.tuning.config import TuneConfig


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def encode_cls(tokenizer, examples: list[dict], max_length: int) -> ListDataset:
    enc = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
    return ListDataset([{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                         "labels": int(e["label"])} for i, e in enumerate(examples)])


def encode_lm(tokenizer, texts: list[str], max_length: int) -> ListDataset:
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return ListDataset([{"input_ids": ids, "attention_mask": am} for ids, am in zip(enc["input_ids"], enc["attention_mask"])
                        if len(ids) >= 2])


def lm_chunks(tokenizer, text: str, max_length: int) -> list[str]:
    """Cut text into pieces of about `max_length` tokens on line boundaries (each an LM example)."""
    out, cur, cur_len = [], [], 0
    for line in (ln for ln in text.splitlines() if ln.strip()):
        n = len(tokenizer(line, add_special_tokens=False)["input_ids"])
        cur.append(line)
        cur_len += n
        if cur_len >= max_length:
            out.append("\n".join(cur))
            cur, cur_len = [], 0
    if cur:
        out.append("\n".join(cur))
    return out


def load_task_data(cfg: TuneConfig, tokenizer=None) -> dict:
    """train/validation/test examples and label names (a fixed seeded split: same test set for every run)."""
    if cfg.task == "seq-cls":
        data = load_labelled(cfg.data)
        parts = split_labelled(data, seed=cfg.split_seed)
        if not parts["train"] or not parts["test"]:
            raise PrunetuneError(f"task data '{cfg.data}' is too small to split into train/validation/test")
        return {"train": subsample(parts["train"], cfg.n_samples, cfg.seed),
                "validation": subsample(parts["validation"] or parts["test"], cfg.eval_samples, cfg.split_seed),
                "test": subsample(parts["test"], cfg.test_samples, cfg.split_seed), "label_names": data.label_names,
                "name": data.name}
    src = load_text(cfg.data, "train" if cfg.data != "wikitext2" else "valid", data_dir=cfg.data_dir)
    if tokenizer is None:
        raise PrunetuneError("causal-LM data needs the tokenizer")
    chunks = lm_chunks(tokenizer, src.text, cfg.max_length)
    if len(chunks) < 3:
        raise PrunetuneError(f"text '{src.name}' is too short: {len(chunks)} pieces of {cfg.max_length} tokens")
    rng = random.Random(cfg.split_seed)
    rng.shuffle(chunks)
    n_test = max(1, len(chunks) // 10)
    test, val, train = chunks[:n_test], chunks[n_test : 2 * n_test], chunks[2 * n_test :]
    train = train[: cfg.n_samples] if cfg.n_samples else train
    val = val[: cfg.eval_samples] if cfg.eval_samples else val
    test = test[: cfg.test_samples] if cfg.test_samples else test  # as for seq-cls: None = the whole split
    as_ex = lambda xs: [{"text": t} for t in xs]  # noqa: E731
    return {"train": as_ex(train), "validation": as_ex(val), "test": as_ex(test), "label_names": None, "name": src.name}
