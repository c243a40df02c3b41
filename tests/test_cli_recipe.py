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
    assert recipe["model"] == {"name": "tiny-bert", "task": "seq-cls", "dtype": "fp32"} and recipe["tune"]["lr"] == 0.01
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
    # the command ran through the same runner: same recipe file, same stage settings, resumable like a run
    assert (tmp_path / "cmd" / "recipe.yaml").read_text() == (tmp_path / "run" / "recipe.yaml").read_text()
    stage_cfg = [json.loads((tmp_path / d / "stages" / f"01-{command}" / "manifest.json").read_text())["stage_config"]
                 for d in ("cmd", "run")]
    assert stage_cfg[0] == stage_cfg[1]
    again = cli_ok([command, *common, "--out", str(tmp_path / "cmd"), "--resume"], capfd)
    assert again.count("complete, skipped") == 2
    assert json.loads((tmp_path / "cmd" / "metrics.json").read_text()) == cmd
    cli_error([command, *common, "--lr", "0.02", "--out", str(tmp_path / "cmd"), "--resume"], capfd,
              needle="the recipe differs from the one that started")


def test_prune_printed_recipe_run_reproduces_the_command(tmp_path, wikitext_dir, capfd):
    """`prunetune prune ... --print-recipe` > FILE; `prunetune run FILE` gives the same masks, zeros and config."""
    from prunetune.pruning.masks import MaskSet

    calib = tmp_path / "calib.txt"
    calib.write_text((wikitext_dir / "valid.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    argv = ["prune", "tiny-llama", "--method", "wanda", "--sparsity", "0.6", "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "64", "--calib-batch", "2", "--seed", "5", "--eval-ppl", str(calib), "--max-windows", "2"]
    text = cli_ok([*argv, "--print-recipe"], capfd)
    recipe = yaml.safe_load(text)
    assert recipe["stages"] == ["evaluate", "prune", "evaluate", "export"] and recipe["seed"] == 5
    assert recipe["prune"]["calib_batch"] == 2 and recipe["prune"]["device"] is None
    assert recipe["model"] == {"name": "tiny-llama", "task": "auto", "dtype": "auto"} and recipe["data"]["calib"] == str(calib)
    assert (recipe["eval"]["ppl_seqlen"], recipe["eval"]["max_windows"]) == (64, 2)
    f = tmp_path / "prune.yaml"
    f.write_text(text)
    cli_ok([*argv, "--out", str(tmp_path / "cmd")], capfd)
    cli_ok(["run", str(f), "--out", str(tmp_path / "run")], capfd)
    cmd, run = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("cmd", "run"))
    assert cmd["config"] == run["config"] and cmd["config"]["prune"]["sparsity"] == 0.6
    for stage in ("01-evaluate", "02-prune", "03-evaluate"):
        a, b = cmd["metrics"][stage], run["metrics"][stage]
        assert a["sparsity"]["value"] == b["sparsity"]["value"]
        assert {k: v["value"] for k, v in a.items() if k.startswith("ppl/")} == \
            {k: v["value"] for k, v in b.items() if k.startswith("ppl/")}
    assert cmd["metrics"]["02-prune"]["sparsity"]["value"] == pytest.approx(0.6, abs=0.01)  # floor per row
    ma, mb = MaskSet.load(tmp_path / "cmd" / "model"), MaskSet.load(tmp_path / "run" / "model")
    assert sorted(ma.names()) == sorted(mb.names()) and all(bool((ma[n] == mb[n]).all()) for n in ma.names())
    wa, wb = _weights(tmp_path / "cmd" / "model"), _weights(tmp_path / "run" / "model")
    assert all(bool((wa[k] == wb[k]).all()) for k in wa)
    proto = cmd["metrics"]["02-prune"]["prune_seconds"]["protocol"]
    assert proto["calib_batch"] == 2 and proto["device"] == "cpu" and "seed 5" in proto["calibration"]


def test_prune_command_errors_leave_nothing_and_resume_like_run(tmp_path, capfd):
    out = tmp_path / "o"
    cli_error(["prune", "tiny-llama", "--method", "magnitude", "--skip", "no_such_layer", "--out", str(out)], capfd,
              needle="matches no prunable layer")
    assert not out.exists()  # a first stage that fails leaves no half-made run directory
    cli_ok(["prune", "tiny-llama", "--method", "magnitude", "--out", str(out)], capfd)
    again = cli_ok(["prune", "tiny-llama", "--method", "magnitude", "--out", str(out), "--resume"], capfd)
    assert again.count("complete, skipped") == 2
    cli_error(["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "0.3", "--out", str(out), "--resume"],
              capfd, needle="the recipe differs")
    cli_error(["prune", "tiny-llama", "--device", "tpu", "--print-recipe"], capfd, needle="unknown --device")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    cli_error(["payt", "tiny-llama", "--out", str(foreign), "--resume"], capfd, needle="cannot resume")


def test_command_defaults_come_from_the_recipe_specs(task_csv, tmp_path, capfd):
    """No second set of defaults: lr, LoRA alpha and KD come from TuneSpec and the command's recipe file."""
    cli_ok(["finetune", "tiny-bert", "--task", str(task_csv), "--n-samples", "8", "--epochs", "1", "--batch-size", "8",
            "--max-length", "16", "--eval-samples", "2", "--no-retention", "--lora-rank", "4", "--no-kd",
            "--out", str(tmp_path / "o")], capfd)
    run = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert run["kind"] == "run" and run["config"]["tune"]["lora_rank"] == 4  # the runner's manifest, as `run` writes
    # what the tuning module resolved from the recipe (recorded in the stage's own manifest)
    tune = json.loads((tmp_path / "o" / "stages" / "01-finetune" / "tune" / "manifest.json").read_text())["config"]["tune"]
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
    rec = r.tune.record(r.data, task="seq-cls", seed=0, export=False)  # what the run trains with, as recorded
    assert rec["kd"] and rec["kd_alpha"] == 0.3 and rec["mix"]["fraction"] == 0.05 and rec["learning_rate"] == 1e-3


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
