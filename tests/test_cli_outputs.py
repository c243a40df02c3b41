"""What the commands write and print: the headline metric, output directories, resume and offline messages."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cli_helpers import cli_error, cli_ok


@pytest.fixture(scope="module")
def task_csv(tmp_path_factory) -> Path:
    rng = random.Random(1)
    words = "alpha beta gamma delta river stone light paper green quick slow bright".split()
    rows = ["text,label"]
    for i in range(80):
        label = "music" if i % 4 == 0 else "sport"  # unbalanced: predicting only "music" scores 25%
        rows.append(f"doc{i:03d} {label} " + " ".join(rng.choice(words) for _ in range(8)) + f",{label}")
    p = tmp_path_factory.mktemp("task") / "task.csv"
    p.write_text("\n".join(rows) + "\n")
    return p


def test_headline_accuracy_is_the_exported_models(task_csv, tmp_path, monkeypatch):
    """metrics.json's `accuracy` is the merged (exported) model's, even when the merge changes predictions."""
    import torch

    import prunetune.models.export as export
    from prunetune.tuning.trainer import TuneConfig, finetune

    real_merge = export.merge_lora_keep_masks

    def flipping_merge(model, masks):  # a merge that flips every prediction of the binary classifier
        plain = real_merge(model, masks)
        with torch.no_grad():
            plain.classifier.weight.neg_()
            plain.classifier.bias.neg_()
        return plain

    monkeypatch.setattr(export, "merge_lora_keep_masks", flipping_merge)
    cfg = TuneConfig(data=str(task_csv), n_samples=32, eval_samples=4, epochs=2, batch_size=8, max_length=32, lr=1e-2,
                     kd=False, retention=False)
    r = finetune("tiny-bert", cfg, tmp_path / "ft")
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    after, before = saved["test_after_merge"], saved["test_before_merge"]
    assert after["accuracy"] == pytest.approx(1 - before["accuracy"]) and after["accuracy"] != before["accuracy"]
    assert saved["accuracy"] == after["accuracy"] and saved["macro_f1"] == after["macro_f1"]
    assert r["accuracy"] == after["accuracy"]
