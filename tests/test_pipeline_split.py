"""One train/validation/test split for every stage, command and training seed (no train/test leakage).

evaluate -> payt (with data mixing) -> evaluate on a tiny-bert classifier: every training example the
Trainer sees (task examples and mixed-in general text) is compared with the test set, and the test set's
fingerprint is compared across stages and training seeds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from cli_helpers import labelled_csv

from prunetune.config import validate_recipe
from prunetune.data.sources import load_labelled
from prunetune.data.tasks import split_labelled
from prunetune.evaluation.task import examples_digest
from prunetune.pipelines.runner import run_recipe

CLASSES = ("sport", "music", "money", "space")


@pytest.fixture(scope="module")
def task_csv(tmp_path_factory) -> Path:
    """160 distinct labelled texts; each starts with its own id so truncated token sequences stay distinct."""
    labels = [CLASSES[i % 4] for i in range(160)]
    return labelled_csv(tmp_path_factory.mktemp("task") / "task.csv", labels, seed=0, words_per_text=12)


def recipe(csv: Path, seed: int, split_seed: int = 0):
    return validate_recipe({
        "name": "split", "seed": seed,
        "model": {"name": "tiny-bert", "task": "seq-cls"},
        "data": {"train": str(csv), "ppl": [], "split_seed": split_seed},
        "tune": {"steps": None, "n_samples": 64, "epochs": 1, "batch_size": 8, "seqlen": 48, "lr": 0.01,
                 "lora_rank": 4, "kd_alpha": 0.5, "eval_samples": 8, "mix": {"fraction": 0.25}},
        "payt": {"sparsity": 0.5, "schedule": "linear", "start": 0.0, "every": 2, "unit": "step"},
        "eval": {"task": True},
        "stages": ["evaluate", "payt", "evaluate"],
    })


@pytest.fixture(scope="module")
def runs(task_csv, tmp_path_factory) -> dict:
    """Two training seeds; for each, the token ids of every example the Trainer trained on."""
    out = {}
    for seed in (0, 5):
        seen: list[tuple[int, ...]] = []
        orig = transformers.Trainer.train

        def spy(self, *a, **kw):
            seen.extend(tuple(row["input_ids"]) for row in self.train_dataset)
            return orig(self, *a, **kw)

        transformers.Trainer.train = spy
        try:
            man = run_recipe(recipe(task_csv, seed), tmp_path_factory.mktemp(f"seed{seed}") / "run",
                             log=lambda *_: None)
        finally:
            transformers.Trainer.train = orig
        out[seed] = {"manifest": man, "train_ids": seen}
    return out


def _test_ids(csv: Path, split_seed: int = 0) -> tuple[list[dict], set[tuple[int, ...]]]:
    from prunetune.models.loading import load_model

    data = load_labelled(str(csv))
    test = split_labelled(data, seed=split_seed)["test"]
    tok = load_model("tiny-bert", "seq-cls", label_names=data.label_names).tokenizer
    enc = tok([e["text"] for e in test], truncation=True, max_length=48)["input_ids"]
    return test, {tuple(x) for x in enc}


def test_no_test_example_is_trained_on(runs, task_csv):
    test, test_ids = _test_ids(task_csv)
    assert len(test) == 16 and len(test_ids) == 16
    for seed, r in runs.items():
        train = r["train_ids"]
        mixed = r["manifest"]["metrics"]["02-payt"]["train_loss"]["protocol"]["examples"] - 64
        assert mixed == 16, "a quarter of the 64 task examples is mixed-in general text"
        assert len(train) == 64 + 16
        leaked = [t for t in train if t in test_ids]
        assert leaked == [], f"seed {seed}: {len(leaked)} training examples are in the test set"


def test_same_test_set_in_every_stage_and_seed(runs, task_csv):
    test, _ = _test_ids(task_csv)
    expected = examples_digest(test)
    for seed, r in runs.items():
        m = r["manifest"]["metrics"]
        for stage in ("01-evaluate", "03-evaluate"):
            p = m[stage]["task/accuracy"]["protocol"]
            assert p["examples_sha256"] == expected and p["n"] == 16 and p["split_seed"] == 0
        p = m["02-payt"]["payt_test_accuracy"]["protocol"]
        assert p["examples_sha256"] == expected and p["n"] == 16 and p["split_seed"] == 0
    # the scored model is the same in the payt stage (merged) and the evaluate stage after it
    for r in runs.values():
        m = r["manifest"]["metrics"]
        assert m["02-payt"]["payt_test_accuracy"]["value"] == pytest.approx(m["03-evaluate"]["task/accuracy"]["value"])


def test_split_seed_is_a_data_option(task_csv):
    """The split moves only with data.split_seed, and then for every stage alike."""
    r0, r1 = recipe(task_csv, 0), recipe(task_csv, 0, split_seed=1)
    assert r0.data.split_seed == 0 and r1.data.split_seed == 1 and recipe(task_csv, 7).data.split_seed == 0
    a, _ = _test_ids(task_csv, 0)
    b, _ = _test_ids(task_csv, 1)
    assert examples_digest(a) != examples_digest(b)


def test_training_seed_does_not_move_the_test_set(task_csv):
    """What `finetune --seed N` / `payt --seed N` use: the training seed picks train examples, never the test set."""
    from prunetune.data.spec import DataSpec
    from prunetune.tuning.data import load_task_data
    from prunetune.tuning.spec import TuneSpec

    tune, data = TuneSpec(steps=None, n_samples=32), DataSpec(train=str(task_csv))
    parts = {s: load_task_data(tune, data, seed=s) for s in (0, 1, 2)}
    digests = {examples_digest(p["test"]) for p in parts.values()}
    assert digests == {examples_digest(split_labelled(load_labelled(str(task_csv)), seed=0)["test"])}
    assert len({examples_digest(p["train"]) for p in parts.values()}) == 3  # the seed still varies training
    test_texts = {e["text"] for e in parts[0]["test"]}
    assert all(e["text"] not in test_texts for p in parts.values() for e in p["train"] + p["validation"])
