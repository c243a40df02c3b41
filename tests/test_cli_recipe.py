"""One option schema: every command is a one-stage recipe; `--print-recipe` prints it and `run` reproduces it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from cli_helpers import cli_error, cli_ok, labelled_csv
from prunetune.config import TuneSpec, validate_recipe


@pytest.fixture(scope="module")
def task_csv(tmp_path_factory) -> Path:
    labels = [("sport", "music", "money")[i % 3] for i in range(80)]
    return labelled_csv(tmp_path_factory.mktemp("task") / "task.csv", labels, seed=2)


def _weights(d: Path) -> dict:
    return load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("command,flags", [
    ("finetune", ["--n-samples", "24", "--epochs", "1", "--lora-rank", "4"]),
    ("payt", ["--n-samples", "24", "--epochs", "2", "--every-steps", "1", "--start", "0", "--mix", "0.25",
              "--criterion", "l2-cols", "--no-use-rs-lora"]),
])
def test_printed_recipe_run_reproduces_the_command(command, flags, task_csv, tmp_path, capfd):
    common = ["tiny-bert", "--task", str(task_csv), "--batch-size", "8", "--max-length", "32", "--eval-samples", "4",
              "--no-retention", "--seed", "3", "--lr", "0.01", *flags]
    text = cli_ok([command, *common, "--print-recipe"], capfd)
    recipe = yaml.safe_load(text)
    assert recipe["stages"] == [command, "export"] and recipe["seed"] == 3 and recipe["data"]["split_seed"] == 0
    assert recipe["model"] == {"name": "tiny-bert", "task": "seq-cls"} and recipe["tune"]["lr"] == 0.01
    f = tmp_path / "recipe.yaml"
    f.write_text(text)
    cli_ok([command, *common, "--out", str(tmp_path / "cmd")], capfd)
    cli_ok(["run", str(f), "--out", str(tmp_path / "run")], capfd)
    cmd = json.loads((tmp_path / "cmd" / "metrics.json").read_text())
    run = json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]
    key = {"finetune": "heldout_accuracy", "payt": "payt_test_accuracy"}[command]
    assert run[f"01-{command}"][key]["value"] == cmd["accuracy"]
    assert run[f"01-{command}"]["sparsity"]["value"] == pytest.approx(cmd["sparsity"], abs=0)
    a, b = _weights(tmp_path / "cmd" / "model"), _weights(tmp_path / "run" / "model")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    if command == "payt":
        assert cmd["mixing"]["mixed"] == 6 and cmd["sparsity"] == pytest.approx(0.5)


def test_command_defaults_come_from_the_recipe_specs(task_csv, tmp_path, capfd):
    """No second set of defaults: lr, LoRA alpha and KD come from TuneSpec and the command's recipe file."""
    cli_ok(["finetune", "tiny-bert", "--task", str(task_csv), "--n-samples", "8", "--epochs", "1", "--batch-size", "8",
            "--max-length", "16", "--eval-samples", "2", "--no-retention", "--lora-rank", "4", "--no-kd",
            "--out", str(tmp_path / "o")], capfd)
    tune = json.loads((tmp_path / "o" / "manifest.json").read_text())["config"]["tune"]
    spec = TuneSpec(lora_rank=4)
    assert tune["learning_rate"] == spec.learning_rate == 1e-3
    assert tune["lora_alpha"] == spec.alpha == 8.0 and tune["kd"] is False
    assert tune["lora_dropout"] == spec.lora_dropout and tune["split_seed"] == 0
    full = TuneSpec(mode="full")
    assert full.learning_rate == 1e-4 and TuneSpec(lr=3e-4).learning_rate == 3e-4


def test_recipe_kd_alpha_alone_switches_kd_on_and_mixing_is_a_recipe_option():
    r = validate_recipe({"stages": ["finetune"], "tune": {"kd_alpha": 0.3, "mix": {"fraction": 0.05}}})
    assert r.tune.kd and r.tune.kd_alpha == 0.3 and r.tune.mix.fraction == 0.05
    assert not validate_recipe({"stages": ["finetune"], "tune": {"kd_alpha": None}}).tune.kd
    from prunetune.pipelines.stages import tune_config

    cfg = tune_config(r, r.tune, 0)
    assert cfg.kd and cfg.kd_alpha == 0.3 and cfg.mix.fraction == 0.05 and cfg.lr == 1e-3


def test_negation_flags_and_bad_flags(tmp_path, capfd):
    text = cli_ok(["payt", "tiny-bert", "--no-use-rs-lora", "--no-full-evaluate", "--print-recipe"], capfd)
    assert yaml.safe_load(text)["tune"]["rslora"] is False
    assert yaml.safe_load(cli_ok(["payt", "tiny-bert", "--use-rs-lora", "--print-recipe"], capfd))["tune"]["rslora"]
    cli_error(["finetune", "tiny-bert", "--lora-dropout", "1.5", "--print-recipe"], capfd,
              needle="--lora-dropout (tune.lora_dropout)")
    cli_error(["finetune", "tiny-bert"], capfd, needle="--out")


def test_paper_defaults_are_the_seeds(capfd):
    r = yaml.safe_load(cli_ok(["payt", "minilm-l6", "--paper-defaults", "--print-recipe"], capfd))
    t, p = r["tune"], r["payt"]
    assert (t["lora_rank"], t["lora_alpha"], t["lora_dropout"], t["rslora"]) == (32, 32, 0.1, True)
    assert (p["schedule"], p["start"], t["epochs"], t["seqlen"], t["n_samples"]) == ("linear", 0.0, 5, 512, 1000)
    assert t["mix"]["sampling"] == "random" and r["stages"] == ["payt", "export"]
    # flags still override, and the CPU-sized defaults are unchanged without --paper-defaults
    r2 = yaml.safe_load(cli_ok(["payt", "minilm-l6", "--paper-defaults", "--epochs", "1", "--print-recipe"], capfd))
    assert r2["tune"]["epochs"] == 1 and r2["tune"]["lora_rank"] == 32
    cpu = yaml.safe_load(cli_ok(["payt", "minilm-l6", "--print-recipe"], capfd))
    assert (cpu["tune"]["lora_rank"], cpu["tune"]["epochs"], cpu["payt"]["schedule"]) == (8, 2, "agp")
