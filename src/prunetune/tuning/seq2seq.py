"""Sequence-to-sequence fine-tuning (T5 translation): pairs, collator, `Seq2SeqTrainer`, BLEU.

Kept apart from the classification / causal-LM driver so that the driver needs only a small hook: a task
type `seq2seq` whose data are (source, target) pairs, whose loss is the model's own label cross-entropy, and
whose metric is corpus BLEU from sacrebleu (`evaluation.task.bleu`) over greedy generations.

Pairs come from a `.jsonl`/`.csv` file with `source` and `target` columns (an optional `prefix`, e.g.
"translate English to German: ", is put before every source as T5 expects), from `synthetic` (an offline,
deterministic toy translation used by the tests), or, for online users, from a HF dataset such as
`bentrevett/multi30k` or `wmt16:de-en` through `datasets`. Masks, when given, are enforced after every
optimizer step exactly as in the classification driver (`trainer.MaskEnforcer`).

The options are the `finetune` driver's own (`tuning.spec.TuneSpec`, full fine-tuning): `seqlen` bounds the
source, the target and, unless `generation_max_length` says otherwise, the generation; `steps` (or `n_samples` x
`epochs`) is the budget, `lr`, `batch_size` and `eval_samples` mean what they mean there. A run adds the pairs
(`DataSpec.train`), the seed and, optionally, the source prefix.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.data.spec import DataSpec
from prunetune.errors import PrunetuneError, optional_import
from prunetune.evaluation.task import bleu
from prunetune.models.loading import load_model
from prunetune.pruning.masks import MaskSet
from prunetune.tuning.callbacks import CsvLogger, MaskEnforcer
from prunetune.tuning.spec import TuneSpec

SYNTHETIC_WORDS = {"one": "eins", "two": "zwei", "three": "drei", "red": "rot", "blue": "blau", "green": "gruen",
                   "house": "haus", "dog": "hund", "cat": "katze", "tree": "baum", "big": "gross",
                   "small": "klein", "the": "das", "and": "und", "is": "ist", "old": "alt"}


# ------------------------------------------------------------------------------------------------ data
def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Word-by-word toy translation (English -> German-like words): learnable by a tiny model, fully offline."""
    rng = random.Random(seed)
    words = sorted(SYNTHETIC_WORDS)
    out = []
    for _ in range(n):
        src = [rng.choice(words) for _ in range(rng.randint(2, 5))]
        out.append({"source": " ".join(src), "target": " ".join(SYNTHETIC_WORDS[w] for w in src)})
    return out


def load_pairs(source: str, seed: int = 0, n: int = 400) -> list[dict]:
    """(source, target) pairs from `synthetic`, a .jsonl/.csv file, or a HF dataset `name[:config]`."""
    if source == "synthetic":
        return synthetic_pairs(n, seed)
    p = Path(source).expanduser()
    if p.suffix in (".jsonl", ".csv"):
        if not p.is_file():
            raise PrunetuneError(f"pair file {p} does not exist")
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        else:
            import csv

            with p.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
        if not rows or not all("source" in r and "target" in r for r in rows):
            raise PrunetuneError(f"{p}: every row needs 'source' and 'target'")
        return [{"source": str(r["source"]), "target": str(r["target"])} for r in rows]
    return _hf_pairs(source)


def _hf_pairs(name: str) -> list[dict]:  # pragma: no cover - needs the network
    load_dataset = optional_import("datasets", "hub", "an HF-hub dataset").load_dataset
    ds_name, _, cfg = name.partition(":")
    try:
        ds = load_dataset(ds_name, cfg or None, split="train")
    except Exception as exc:
        raise PrunetuneError(f"cannot load dataset '{name}': {type(exc).__name__}") from None
    if "translation" in ds.column_names:
        a, b = (cfg.split("-") + ["", ""])[:2] if cfg else ("en", "de")
        return [{"source": r["translation"][b if b != "en" else a], "target": r["translation"]["en" if b != "en" else b]}
                for r in ds]
    cols = ds.column_names
    src, tgt = ("en", "de") if {"en", "de"} <= set(cols) else (cols[0], cols[1])
    return [{"source": r[src], "target": r[tgt]} for r in ds]


def split_pairs(pairs: list[dict], seed: int = 0) -> dict[str, list[dict]]:
    """Fixed seeded 80/10/10 split (the split seed never depends on the training seed)."""
    rows = list(pairs)
    random.Random(seed).shuffle(rows)
    n = len(rows)
    n_test = max(1, n // 10)
    return {"test": rows[:n_test], "validation": rows[n_test: 2 * n_test], "train": rows[2 * n_test:]}


class PairDataset(torch.utils.data.Dataset):
    """Tokenised pairs; labels are the target ids (the collator pads them with -100)."""

    def __init__(self, tokenizer, pairs: list[dict], prefix: str, max_source: int, max_target: int) -> None:
        src = tokenizer([prefix + p["source"] for p in pairs], truncation=True, max_length=max_source)
        tgt = tokenizer(text_target=[p["target"] for p in pairs], truncation=True, max_length=max_target)
        self.rows = [{"input_ids": s, "attention_mask": m, "labels": t}
                     for s, m, t in zip(src["input_ids"], src["attention_mask"], tgt["input_ids"])]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def collator(tokenizer, model: nn.Module):
    """Pads sources with the pad id and labels with -100; the model builds its decoder inputs from labels."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, padding=True)


# ------------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def generate(model: nn.Module, tokenizer, sources: list[str], prefix: str = "", max_length: int = 64,
             max_source_length: int = 64, batch_size: int = 16) -> list[str]:
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for s in range(0, len(sources), batch_size):
        enc = tokenizer([prefix + x for x in sources[s: s + batch_size]], truncation=True,
                        max_length=max_source_length, padding=True, return_tensors="pt").to(device)
        ids = model.generate(**enc, max_new_tokens=max_length, do_sample=False, num_beams=1)
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    model.train(was)
    return out


def evaluate_bleu(model: nn.Module, tokenizer, pairs: list[dict], prefix: str = "", max_length: int = 64,
                  generation_max_length: int = 64) -> dict:
    """Corpus BLEU of greedy generations against the references (sacrebleu, signature recorded); sources are
    truncated to `max_length` tokens, generations to `generation_max_length` new tokens."""
    hyps = generate(model, tokenizer, [p["source"] for p in pairs], prefix, generation_max_length, max_length)
    r = bleu(hyps, [p["target"] for p in pairs])
    return {"bleu": r["value"], "protocol": {**r["protocol"], "n": len(pairs), "decoding": "greedy"},
            "examples": [{"source": p["source"], "hyp": h, "ref": p["target"]} for p, h in list(zip(pairs, hyps))[:3]]}


@torch.no_grad()
def eval_loss(model: nn.Module, tokenizer, pairs: list[dict], prefix: str = "", max_length: int = 64) -> float:
    """Mean token cross-entropy of the references (teacher forcing), sources and targets cut at `max_length`."""
    was = model.training
    model.eval()
    ds = PairDataset(tokenizer, pairs, prefix, max_length, max_length)
    col = collator(tokenizer, model)
    tot, n = 0.0, 0
    for s in range(0, len(ds), 16):
        b = col([ds[i] for i in range(s, min(s + 16, len(ds)))])
        tokens = int((b["labels"] != -100).sum())
        tot += float(model(**b).loss) * tokens
        n += tokens
    model.train(was)
    return tot / max(n, 1)


# ------------------------------------------------------------------------------------------------ training
def record(spec: TuneSpec, data: DataSpec, seed: int, prefix: str = "",
           generation_max_length: int | None = None) -> dict:
    """What a seq2seq run's metrics record of its settings (`config`): the spec's options resolved (the budget
    as examples and epochs, the learning rate with its default) with the run's pairs, seed and prefix, under the
    keys these records have always had (`max_steps` is always None: `steps` becomes examples x one epoch)."""
    return {"data": data.train, "prefix": prefix, "epochs": spec.train_epochs, "max_steps": None,
            "lr": spec.learning_rate, "batch_size": spec.batch_size, "max_source_length": spec.seqlen,
            "max_target_length": spec.seqlen, "n_samples": spec.train_samples, "eval_samples": spec.eval_samples,
            "generation_max_length": generation_max_length or spec.seqlen, "seed": seed}


def finetune_seq2seq(model: nn.Module, tokenizer, spec: TuneSpec, out: Path | str, *, data: DataSpec,
                     seed: int = 0, prefix: str = "", generation_max_length: int | None = None,
                     masks: MaskSet | None = None, callbacks: tuple = ()) -> dict:
    """Full fine-tuning of an in-memory encoder-decoder on the pairs `data.train` names; pruned weights stay zero
    (masks enforced). `prefix` is put before every source; generations stop after `generation_max_length` new
    tokens (default: `spec.seqlen`).

    Returns metrics (loss and BLEU on the test pairs before and after, train loss, steps, timings) and the
    model under `_model`; writes `out/metrics.json` and `out/train_log.csv`.
    """
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    if spec.lora:
        raise PrunetuneError("seq2seq fine-tuning is full fine-tuning here; use --full")
    config = record(spec, data, seed, prefix, generation_max_length)
    length, gen_length, n_samples = spec.seqlen, config["generation_max_length"], spec.train_samples
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = load_pairs(data.train, seed, n=max(50, int((n_samples or 400) / 0.8) + 2))
    parts = split_pairs(pairs, seed=0)
    train = parts["train"][: n_samples] if n_samples else parts["train"]
    val = parts["validation"][: spec.eval_samples] if spec.eval_samples else parts["validation"]
    test = parts["test"]
    masks = masks if masks is not None else MaskSet()
    if len(masks):
        masks.apply(model)

    def scores(m: nn.Module) -> dict:
        return {"loss": eval_loss(m, tokenizer, test, prefix, length),
                **evaluate_bleu(m, tokenizer, test, prefix, length, gen_length)}

    before = scores(model)
    train_ds = PairDataset(tokenizer, train, prefix, length, length)
    val_ds = PairDataset(tokenizer, val, prefix, length, length)
    args = Seq2SeqTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=spec.train_epochs, max_steps=-1,
        per_device_train_batch_size=spec.batch_size, per_device_eval_batch_size=max(spec.batch_size, 16),
        learning_rate=spec.learning_rate, logging_strategy="steps", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=True, seed=seed, data_seed=seed,
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        predict_with_generate=False)
    model_ref = {"model": model}
    enforcer = MaskEnforcer(masks, model_ref)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                             data_collator=collator(tokenizer, model), processing_class=tokenizer,
                             callbacks=[enforcer, CsvLogger(out / "train_log.csv"), *callbacks])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    tr = trainer.train()
    train_s = time.perf_counter() - t0
    model = trainer.model
    if len(masks):
        masks.apply(model)
    after = scores(model)
    result: dict[str, Any] = {
        "kind": "finetune-seq2seq", "config": config, "train_examples": len(train_ds),
        "test_examples": len(test), "global_step": trainer.state.global_step, "train_loss": float(tr.training_loss),
        "before": before, "after": after, "bleu": after["bleu"], "loss": after["loss"],
        "mask_enforcement": enforcer.summary(), "timings": {"train_s": train_s}}
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    result["_model"] = model
    return result


def finetune_task(model: str | nn.Module, spec: TuneSpec, out: Path | str, *, data: DataSpec, seed: int = 0,
                  tokenizer: Any = None, masks: MaskSet | None = None, callbacks: tuple = ()) -> dict:
    """The `finetune` driver's seq2seq branch: a spec or an in-memory model, a `TuneSpec` (full fine-tuning)."""
    if isinstance(model, str):
        loaded = load_model(model, "seq2seq")
        model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise PrunetuneError("seq2seq fine-tuning of an in-memory model needs its tokenizer")
    return finetune_seq2seq(model, tokenizer, spec, out, data=data, seed=seed, masks=masks, callbacks=callbacks)
