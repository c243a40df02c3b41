"""`prunetune run` on tiny-llama: atomic stages, SIGKILL in a stage + --resume = the uninterrupted metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prunetune.config import load_recipe
from prunetune.errors import PrunetuneError
from prunetune.pipelines.runner import PAUSE_ENV, run_recipe
from cli_helpers import cli_killer

TINY = {
    "name": "tiny",
    "seed": 3,
    "model": {"name": "tiny-llama"},
    "data": {"calib": "TEXT", "train": "TEXT", "ppl": ["TEXT"]},
    "prune": {"method": "wanda", "sparsity": 0.5, "nsamples": 4, "seqlen": 64},
    "tune": {"steps": 3, "batch_size": 2, "seqlen": 64, "eval_samples": 2, "lr": 0.01},
    "eval": {"ppl_seqlen": 64, "max_windows": 4},
    "stages": ["evaluate", "prune", "evaluate", "finetune", "evaluate", "export"],
}


def values(manifest: dict) -> dict:
    """Every metric value of a run (timings excluded: they differ between runs by nature)."""
    return {f"{stage}/{k}": v["value"] for stage, m in manifest["metrics"].items() for k, v in m.items()
            if "seconds" not in k}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, wikitext_dir) -> Path:
    """The tiny recipe on a 60 KB slice of WikiText-2 (tokenising whole corpora would dominate the test)."""
    d = tmp_path_factory.mktemp("recipe")
    text = d / "text.txt"
    text.write_text((wikitext_dir / "test.txt").read_text()[:60_000])
    data = json.loads(json.dumps(TINY).replace("TEXT", str(text)))
    p = d / "tiny.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture(scope="module")
def reference(recipe_file, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ref") / "run"
    man = run_recipe(load_recipe(str(recipe_file)), out, log=lambda *_: None)
    from prunetune.reporting.report import write_run_report

    write_run_report(out)
    return out, man


def test_uninterrupted_run_layout_and_metrics(reference):
    out, man = reference
    assert man["status"] == "complete" and man["seed"] == 3 and man["git_rev"] is not None
    v = values(man)
    assert v["01-evaluate/sparsity"] == 0.0
    assert v["02-prune/sparsity"] == pytest.approx(0.5, abs=1e-9)  # Wanda row-wise: exactly half of each row
    assert v["05-evaluate/sparsity"] == pytest.approx(0.5, abs=1e-9)  # LoRA merge kept every zero
    assert v["03-evaluate/ppl/text.txt"] != v["01-evaluate/ppl/text.txt"]
    assert v["05-evaluate/ppl/text.txt"] != v["03-evaluate/ppl/text.txt"]  # fine-tuning changed the model
    proto = man["metrics"]["01-evaluate"]["ppl/text.txt"]["protocol"]
    assert (proto["seqlen"], proto["windows"], proto["dataset"]) == (64, 4, "text.txt")
    stages = sorted(p.name for p in (out / "stages").iterdir())
    assert stages == ["01-evaluate", "02-prune", "03-evaluate", "04-finetune", "05-evaluate", "06-export"]
    assert not list((out / "stages").glob("*.partial"))
    # the exported model is plain transformers with the zeros in it
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out / "model")
    w = m.model.layers[0].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-9)
    assert (out / "model" / "masks.safetensors").is_file() and (out / "report.md").is_file()


def _start_paused(recipe_file: Path, out: Path, stage: str) -> subprocess.Popen:
    env = {**os.environ, PAUSE_ENV: stage, "PRUNETUNE_PROGRESS": "0"}
    return subprocess.Popen([sys.executable, "-m", "prunetune.cli", "run", str(recipe_file), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("stage", ["02-prune", "04-finetune", "06-export"])
def test_sigkill_in_stage_then_resume_gives_same_metrics(recipe_file, reference, tmp_path, stage):
    out = tmp_path / "run"
    proc = _start_paused(recipe_file, out, stage)
    marker = out / "stages" / f"{stage}.partial" / ".paused"
    deadline = time.time() + 240
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"run ended before reaching {stage}: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"{stage} not reached in time")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # the stage has done its work but has not been renamed complete
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "stages" / f"{stage}.partial").is_dir() and not (out / "stages" / stage).exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    logs: list[str] = []
    man = run_recipe(load_recipe(str(recipe_file)), out, resume=True, log=logs.append)
    done_before = int(stage[:2]) - 1
    assert sum("skipped (resume)" in m for m in logs) == done_before
    assert not list((out / "stages").glob("*.partial"))
    assert values(man) == values(reference[1])  # bit-identical metrics


def test_resume_of_complete_run_skips_everything_and_rejects_other_recipe(reference, recipe_file, tmp_path):
    out, man = reference
    logs: list[str] = []
    again = run_recipe(load_recipe(str(recipe_file)), out, resume=True, log=logs.append)
    assert sum("skipped" in m for m in logs) == 6 and values(again) == values(man)
    with pytest.raises(PrunetuneError, match="recipe differs"):
        run_recipe(load_recipe(str(recipe_file), ["prune.sparsity=0.6"]), out, resume=True, log=lambda *_: None)
    with pytest.raises(PrunetuneError, match="exists and is not empty"):
        run_recipe(load_recipe(str(recipe_file)), out, log=lambda *_: None)


# ------------------------------------------------------------------ a training stage killed between checkpoints
TRAIN = {
    "name": "tiny-train",
    "seed": 5,
    "model": {"name": "tiny-llama"},
    "data": {"train": "TEXT", "ppl": ["TEXT"]},
    "tune": {"steps": 6, "batch_size": 2, "seqlen": 64, "eval_samples": 2, "lr": 0.01, "save_steps": 2},
    "eval": {"ppl_seqlen": 64, "max_windows": 2},
    "stages": ["finetune", "evaluate"],
}

# runs the CLI in a subprocess whose Trainer SIGKILLs its own process at the end of optimizer step KILL_AT
_KILLER = cli_killer(call='sys.argv = ["prunetune", "run", sys.argv[1], "--out", sys.argv[2]]\nmain()')


# PAYT: LoRA + KD while the base is pruned to 50% by L1 at every step from 20% of training (the masks move)
PAYT = {"payt": {"sparsity": 0.5, "schedule": "agp", "start": 0.2, "every": 1, "unit": "step",
                 "criterion": "l1-global"}, "tune": {**TRAIN["tune"], "kd": True}, "stages": ["payt", "evaluate"]}


def _write_recipe(recipe_file: Path, kind: str) -> Path:
    data = {**TRAIN, **(PAYT if kind == "payt" else {}), "name": f"tiny-{kind}"}
    p = recipe_file.parent / f"{kind}.yaml"
    if not p.is_file():
        p.write_text(yaml.safe_dump(json.loads(json.dumps(data).replace("TEXT", str(recipe_file.parent / "text.txt")))))
    return p


@pytest.fixture(scope="module")
def train_reference(recipe_file, tmp_path_factory):
    """kind -> (run dir, manifest) of its uninterrupted run, made once per module."""
    made: dict[str, tuple[Path, dict]] = {}

    def get(kind: str) -> tuple[Path, dict]:
        if kind not in made:
            out = tmp_path_factory.mktemp(f"{kind}-ref") / "run"
            made[kind] = out, run_recipe(load_recipe(str(_write_recipe(recipe_file, kind))), out, log=lambda *_: None)
        return made[kind]

    return get


def _stage_bytes(out: Path, stage: str) -> dict:
    """What the training stage published: its model's weights and masks (each tensor's bytes and the file's
    metadata: safetensors orders a header's metadata keys differently from one process to the next), its curves."""
    from safetensors import safe_open

    st = out / "stages" / stage
    got: dict = {"curves.json": (st / "curves.json").read_bytes()}
    for p in sorted((st / "model").glob("*.safetensors")):
        with safe_open(str(p), "pt") as fh:
            got[p.name] = (fh.metadata(), {k: fh.get_tensor(k).numpy().tobytes() for k in sorted(fh.keys())})
    return got


@pytest.mark.parametrize("kind,newest", [("finetune", "complete"), ("finetune", "cut-short"), ("payt", "complete")])
def test_training_stage_killed_mid_stage_resumes_from_its_last_checkpoint(recipe_file, train_reference, tmp_path,
                                                                         kind, newest):
    recipe = _write_recipe(recipe_file, kind)
    ref_out, ref = train_reference(kind)
    stage = f"01-{kind}"
    out = tmp_path / "run"
    env = {**os.environ, "KILL_AT": "5", "PRUNETUNE_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(recipe), str(out)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpts = out / "stages" / f"{stage}.partial" / "tune" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    if newest == "cut-short":  # killed while writing checkpoint-4: its completion mark never came
        (ckpts / "checkpoint-4" / "prunetune_state.json").unlink()

    logs: list[str] = []
    man = run_recipe(load_recipe(str(recipe)), out, resume=True, log=logs.append)
    start = "checkpoint-4" if newest == "complete" else "checkpoint-2"
    assert any(f"resuming the interrupted stage from {start}" in m for m in logs), logs
    assert any("incomplete" in m and "passed over" in m for m in logs) == (newest == "cut-short")
    assert not list((out / "stages").glob("*.partial"))
    assert values(man) == values(ref)  # train loss, held-out loss, sparsity and perplexity to the bit
    steps = man["metrics"][stage]["train_loss"]["protocol"]["steps"]
    assert steps == ref["metrics"][stage]["train_loss"]["protocol"]["steps"] == 6
    assert _stage_bytes(out, stage) == _stage_bytes(ref_out, stage)  # the same weights, masks and curves
    tune = json.loads((out / "stages" / stage / "tune" / "metrics.json").read_text())
    assert tune["resumed_from"].endswith(start) and tune["global_step"] == 6
    if kind == "payt":  # the masks moved during training, and were carried across the kill
        assert man["metrics"][stage]["sparsity"]["value"] == pytest.approx(0.5, abs=0.01)


def test_resume_with_nothing_to_resume_says_so_in_one_line(recipe_file, tmp_path):
    from prunetune.pipelines.runner import prepare_run_dir

    logs: list[str] = []
    out = tmp_path / "new"
    prepare_run_dir(out, load_recipe(str(_write_recipe(recipe_file, "finetune"))), resume=True, overwrite=False, log=logs.append)
    assert len(logs) == 1 and "nothing to resume" in logs[0] and "\n" not in logs[0]
    assert (out / "recipe.yaml").is_file()


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    """An interrupted command (a long fine-tuning stopped with Ctrl-C) says so and fails; it used to exit 0."""
    import prunetune.config
    from prunetune.cli import main

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(prunetune.config, "preset_names", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["recipes"])
    assert exc.value.code == 130
    assert capsys.readouterr().err.strip() == "prunetune: interrupted"
