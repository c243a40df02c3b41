"""What the commands write and print: the headline metric, output directories, resume and offline messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import cli_error, cli_ok, labelled_csv


@pytest.fixture(scope="module")
def task_csv(tmp_path_factory) -> Path:
    labels = ["music" if i % 4 == 0 else "sport" for i in range(80)]  # unbalanced: only "music" scores 25%
    return labelled_csv(tmp_path_factory.mktemp("task") / "task.csv", labels, seed=1)


def test_headline_accuracy_is_the_exported_models(task_csv, tmp_path, monkeypatch):
    """metrics.json's `accuracy` is the merged (exported) model's, even when the merge changes predictions."""
    import torch

    import prunetune.models.export as export
    import prunetune.tuning.finetune as driver
    from prunetune.data.spec import DataSpec
    from prunetune.tuning.finetune import finetune
    from prunetune.tuning.spec import TuneSpec

    real_merge = export.merge_lora_keep_masks

    def flipping_merge(model, masks):  # a merge that flips every prediction of the binary classifier
        plain = real_merge(model, masks)
        with torch.no_grad():
            plain.classifier.weight.neg_()
            plain.classifier.bias.neg_()
        return plain

    monkeypatch.setattr(driver, "merge_lora_keep_masks", flipping_merge)  # where the driver looks it up
    cfg = TuneSpec(steps=None, n_samples=32, eval_samples=4, epochs=2, batch_size=8, seqlen=32, lr=1e-2, kd=False,
                   retention=False)
    r = finetune("tiny-bert", cfg, tmp_path / "ft", data=DataSpec(train=str(task_csv)))
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    after, before = saved["test_after_merge"], saved["test_before_merge"]
    assert after["accuracy"] == pytest.approx(1 - before["accuracy"]) and after["accuracy"] != before["accuracy"]
    assert saved["accuracy"] == after["accuracy"] and saved["macro_f1"] == after["macro_f1"]
    assert r["accuracy"] == after["accuracy"]


# ------------------------------------------------------------------------------------------------ bug 6: output dirs
def test_out_that_cannot_be_created_is_one_line(tmp_path, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = cli_error(["prune", "tiny-llama", "--method", "magnitude", "--out", str(blocker / "out")], capfd,
                    needle="is not a directory")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    if Path("/proc/self").is_dir():  # a root that cannot hold directories, even for root (ENOENT from mkdir)
        err = cli_error(["prune", "tiny-llama", "--method", "magnitude", "--out", "/proc/prunetune-nope/x"], capfd,
                        needle="/proc/prunetune-nope")
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["finetune", "tiny-bert", "--task", "missing-file.csv"],
    ["payt", "tiny-bert", "--task", "missing-file.csv"],
    ["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "2"],
    ["run", "quickstart", "--set", "prune.sparsity=2"],
])
def test_failed_validation_leaves_no_output_directory(argv, tmp_path, capfd):
    out = tmp_path / "new" / "deeper" / "out"
    (tmp_path / "kept-empty").mkdir()
    cli_error([*argv, "--out", str(out)], capfd)
    assert not (tmp_path / "new").exists()
    cli_error([*argv, "--out", str(tmp_path / "kept-empty" / "o")], capfd)
    assert (tmp_path / "kept-empty").is_dir() and not any((tmp_path / "kept-empty").iterdir())


def test_saved_files_follow_the_umask(tmp_path, capfd):
    import os

    old = os.umask(0o027)
    try:
        cli_ok(["prune", "tiny-llama", "--method", "magnitude", "--out", str(tmp_path / "p")], capfd)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "p").iterdir() if p.is_file()}
    assert modes and set(modes.values()) == {0o640}, modes
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o750


# ------------------------------------------------------------------------------------------------ bug 7: --resume
def test_resume_with_nothing_to_resume_says_so(tmp_path, capfd):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "tiny-llama"}, "stages": ["export"]}))
    out = cli_ok(["run", str(recipe), "--out", str(tmp_path / "run"), "--resume"], capfd)
    lines = [ln for ln in out.splitlines() if "nothing to resume" in ln]
    assert len(lines) == 1 and "starting a new run" in lines[0]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    again = cli_ok(["run", str(recipe), "--out", str(tmp_path / "run"), "--resume"], capfd)
    assert "nothing to resume" not in again and "complete, skipped" in again


# ------------------------------------------------------------------------------------------------ bug 8: offline noise
def test_offline_failure_prints_only_prunetunes_line(tmp_path, capfd, monkeypatch):
    """The hub libraries' retry warnings (what an offline `--task no-such-task` printed) stay silent."""
    import logging

    import datasets

    for name in ("huggingface_hub", "huggingface_hub.utils._http", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.NOTSET)  # as in a fresh process
    datasets.utils.logging.set_verbosity_warning()
    monkeypatch.setattr(logging.root, "handlers", [])  # pytest's capture handler would swallow the warnings

    def offline_load_dataset(name, *a, **kw):
        logging.getLogger("huggingface_hub.utils._http").warning(
            "'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/datasets/x")
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 4/5].")
        logging.getLogger("datasets.load").warning("Using the latest cached version of the dataset")
        logging.getLogger("httpx").warning("HTTP Request: HEAD https://huggingface.co/api 'HTTP/1.1 503'")
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline_load_dataset)
    err = cli_error(["finetune", "tiny-bert", "--task", "no-such-task", "--out", str(tmp_path / "o")], capfd,
                    needle="not a known task")
    assert err.strip().splitlines() == [err.strip()], err
    assert "Retry" not in err and "huggingface.co" not in err
