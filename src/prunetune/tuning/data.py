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
from prunetune.data.spec import DataSpec
from prunetune.tuning.spec import TuneSpec


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


def load_task_data(spec: TuneSpec, data: DataSpec, *, task: str = "seq-cls", seed: int = 0, tokenizer=None) -> dict:
    """train/validation/test examples and label names (a fixed seeded split: same test set for every run).

    `data.train` is the labelled task (`seq-cls`) or the text (`causal-lm`); `spec` sizes the parts; `seed`
    (the training seed) picks the training subsample of a labelled task, `data.split_seed` everything else."""
    n_train = spec.train_samples
    if task == "seq-cls":
        labelled = load_labelled(data.train)
        parts = split_labelled(labelled, seed=data.split_seed)
        if not parts["train"] or not parts["test"]:
            raise PrunetuneError(f"task data '{data.train}' is too small to split into train/validation/test")
        return {"train": subsample(parts["train"], n_train, seed),
                "validation": subsample(parts["validation"] or parts["test"], spec.eval_samples, data.split_seed),
                "test": subsample(parts["test"], spec.test_samples, data.split_seed),
                "label_names": labelled.label_names, "name": labelled.name}
    src = load_text(data.train, "train" if data.train != "wikitext2" else "valid", data_dir=data.data_dir)
    if tokenizer is None:
        raise PrunetuneError("causal-LM data needs the tokenizer")
    chunks = lm_chunks(tokenizer, src.text, spec.seqlen)
    if len(chunks) < 3:
        raise PrunetuneError(f"text '{src.name}' is too short: {len(chunks)} pieces of {spec.seqlen} tokens")
    rng = random.Random(data.split_seed)
    rng.shuffle(chunks)
    n_test = max(1, len(chunks) // 10)
    test, val, train = chunks[:n_test], chunks[n_test : 2 * n_test], chunks[2 * n_test :]
    train = train[:n_train] if n_train else train
    val = val[: spec.eval_samples] if spec.eval_samples else val
    test = test[: spec.test_samples] if spec.test_samples else test  # as for seq-cls: None = the whole split
    as_ex = lambda xs: [{"text": t} for t in xs]  # noqa: E731
    return {"train": as_ex(train), "validation": as_ex(val), "test": as_ex(test), "label_names": None, "name": src.name}
