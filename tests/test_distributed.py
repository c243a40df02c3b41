"""Scale-out on CPU: two processes (gloo) under torchrun and `accelerate launch` keep one set of masks.

Each launch runs the real console entry (`-m prunetune.cli`) in two processes, through the same runner as a
single process: the run directory has the runner's layout (stages/, manifest.json, metrics.json), both ranks
trained (world size 2 recorded), `--resume` skips complete stages and continues an interrupted training from
its checkpoint. What must hold besides: every rank ends with the same masks and step count, and the exported
model still has exactly the pruned zeros, whether the tuning is LoRA (merged as (W + s*BA) * M) or full
fine-tuning (weights re-zeroed after every DDP step), and PAYT pruning during DDP training computes the same
masks on both ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import cli_killer, cli_ok
from prunetune.pruning.masks import MaskSet
from prunetune.tuning.callbacks import masks_digest

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# 16 examples / (2 ranks x batch 4) = 2 steps per epoch, 2 epochs
FT_ARGS = ["--n-samples", "16", "--epochs", "2", "--batch-size", "4", "--max-length", "32", "--eval-samples", "8",
           "--test-samples", "20", "--no-retention"]
STEPS = 4


def _launcher(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    if not exe.exists():
        pytest.fail(f"{name} not found next to the python executable")
    return str(exe)


def _launch(cmd: list[str], env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRUNETUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _torchrun(*args: str) -> list[str]:
    return [_launcher("torchrun"), "--standalone", "--nproc_per_node", "2", *args]


def _tune_dir(out: Path) -> Path:
    """The training stage's tuning run inside the runner's layout (stages/01-finetune/tune, 01-payt/tune)."""
    (stage,) = [d for d in (out / "stages").iterdir() if d.name.startswith("01-")]
    return stage / "tune"


@pytest.fixture()
def pruned(tmp_path, capsys) -> Path:
    """tiny-llama with 50% magnitude pruning (per row), saved as a plain HF dir with its masks (OUT/model)."""
    d = tmp_path / "pruned"
    cli_ok(["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--out", str(d)], capsys)
    return d / "model"


def _rank_states(out: Path) -> tuple[dict, dict]:
    """What each rank wrote at the end of training: global step and masks digest."""
    return tuple(json.loads((_tune_dir(out) / f"rank{r}.json").read_text()) for r in (0, 1))


def _check_two_ranks_kept_masks(out: Path, pruned: Path) -> None:
    want = MaskSet.load(pruned)
    r0, r1 = _rank_states(out)
    assert r0["masks_digest"] == r1["masks_digest"] == masks_digest(want)  # the input dir's masks, on both ranks
    assert r0["global_step"] == r1["global_step"] == STEPS
    m = json.loads((out / "metrics.json").read_text())
    assert m["global_step"] == STEPS and m["sparsity"] == 0.5 and m["world_size"] == 2
    assert MaskSet.load(out / "model").sparsity() == 0.5
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["world_size"] == 2

    from transformers import AutoModelForSequenceClassification

    before = load_file(pruned / "model.safetensors")
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ROLES:
            w = mod.weight.detach()
            assert int((w == 0).sum()) * 2 == w.numel(), name  # exactly half, in the exported weights
            assert torch.equal(w == 0, ~want[name]), name  # and exactly where the pruning put them
            assert not torch.equal(w, before[f"{name}.weight"]), name  # while the kept weights did train
            checked += 1
    assert checked == 2 * len(ROLES)  # tiny-llama: 2 blocks


@pytest.mark.slow
def test_accelerate_multi_cpu_lora_keeps_pruned_zeros(tmp_path, pruned):
    """`accelerate launch --multi_gpu --num_processes 2` without GPUs is MULTI_CPU: two gloo processes."""
    out = tmp_path / "acc"
    _launch([_launcher("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "-m", "prunetune.cli",
             "finetune", str(pruned), *FT_ARGS, "--out", str(out)])
    _check_two_ranks_kept_masks(out, pruned)
    assert json.loads((out / "manifest.json").read_text())["config"]["tune"]["mode"] == "lora"


# a torchrun worker that SIGKILLs its own process at the end of optimizer step KILL_AT (torchrun then stops the other)
_KILLER = cli_killer(rank="1")


@pytest.mark.slow
def test_torchrun_ddp_full_finetune_killed_then_resumed_keeps_pruned_zeros(tmp_path, pruned):
    """Rank 1 dies after step 3 of 4; `--resume` under torchrun continues both ranks from checkpoint-2."""
    out = tmp_path / "ddp"
    killer = tmp_path / "killer.py"
    killer.write_text(_KILLER)
    args = ["finetune", str(pruned), "--full", *FT_ARGS, "--out", str(out)]
    p = _launch(_torchrun(str(killer), *args), env={"KILL_AT": "3"}, ok=False)
    assert p.returncode != 0
    partial = out / "stages" / "01-finetune.partial"
    ckpts = sorted((partial / "tune" / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-2"]  # the epoch-end checkpoint, before the kill
    want = MaskSet.load(pruned)
    weights = load_file(ckpts[0] / "model.safetensors")  # the zeros held under DDP in the Trainer's checkpoint
    assert all(torch.equal(weights[f"{n}.weight"] == 0, ~want[n]) for n in want.names())
    assert {f.name for f in ckpts[0].glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}  # both ranks

    p = _launch(_torchrun("-m", "prunetune.cli", *args, "--resume"))
    assert "resuming the interrupted stage from checkpoint-2" in p.stdout
    _check_two_ranks_kept_masks(out, pruned)
    tune = json.loads((out / "metrics.json").read_text())
    assert tune["resumed_from"].endswith("checkpoint-2")
    assert not (out / "adapter").exists() and not list((out / "stages").glob("*.partial"))
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["tune"]["mode"] == "full"


def _structure(d) -> object:
    """The shape of a JSON document: its keys (nested) and value types, not its values."""
    if isinstance(d, dict):
        return {k: _structure(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_structure(v) for v in d[:1]]
    return type(d).__name__ if d is not None else None


@pytest.mark.slow
def test_torchrun_finetune_goes_through_the_runner(tmp_path, capsys):
    """Two ranks run the command's one-stage recipe through the runner: the same layout and manifests as one
    process, world size 2 recorded, and `--resume` of the finished run skips both stages."""
    args = ["finetune", "tiny-llama", *FT_ARGS]
    single = tmp_path / "single"
    cli_ok([*args, "--out", str(single)], capsys)
    out = tmp_path / "ddp"
    _launch(_torchrun("-m", "prunetune.cli", *args, "--out", str(out)))

    def files(d: Path) -> set[str]:
        return {str(p.relative_to(d)) for p in d.rglob("*") if "rank" not in p.name and "/tb/" not in str(p)}

    assert files(out) == files(single)  # stages/01-finetune/..., 02-export, model/, report.md, recipe.yaml, ...
    man, ref = (json.loads((d / "manifest.json").read_text()) for d in (out, single))
    assert man["stages"] == ref["stages"] == ["01-finetune", "02-export"] and man["status"] == "complete"
    assert man["world_size"] == 2 and ref["world_size"] == 1
    for stage in man["stages"]:
        sm, sr = (json.loads((d / "stages" / stage / "manifest.json").read_text()) for d in (out, single))
        assert _structure(sm) == _structure(sr) and sm["world_size"] == 2
        assert sm["stage_config"] == sr["stage_config"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == STEPS  # 16 examples / (2 ranks x 4) x 2 epochs
    assert json.loads((single / "metrics.json").read_text())["global_step"] == 2 * STEPS
    assert {r["global_step"] for r in _rank_states(out)} == {STEPS}  # both ranks took every step
    assert (out / "model" / "model.safetensors").is_file() and (out / "report.md").is_file()

    p = _launch(_torchrun("-m", "prunetune.cli", *args, "--out", str(out), "--resume"))
    assert p.stdout.count("complete, skipped (resume)") == 2, p.stdout[-2000:]  # rank 0 alone reports
    assert json.loads((out / "manifest.json").read_text())["metrics"] == man["metrics"]


# ------------------------------------------------------------------------------------------------ PAYT
@pytest.mark.slow
def test_two_process_gloo_payt_identical_masks(tmp_path):
    out = tmp_path / "ddp"
    _launch([_launcher("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "prunetune.cli", "payt",
             "tiny-llama", "--n-samples", "16", "--epochs", "2", "--batch-size", "4", "--max-length", "32",
             "--eval-samples", "8", "--every-steps", "1", "--test-samples", "20", "--no-retention", "--out", str(out)])
    r0, r1 = _rank_states(out)
    assert r0["masks_digest"] == r1["masks_digest"] and r0["masks_digest"]
    # (16 + 1 mixed) examples / (2 ranks x 4) = 3 steps x 2 epochs
    assert r0["global_step"] == r1["global_step"] == 6
    m = json.loads((out / "metrics.json").read_text())
    assert m["sparsity"] == pytest.approx(0.5, abs=1e-9) and m["world_size"] == 2
    assert MaskSet.load(out / "model").sparsity() == pytest.approx(0.5, abs=1e-9)
    shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ prunetune run
@pytest.mark.slow
def test_torchrun_recipe_prunes_on_rank0_and_finetunes_on_both(tmp_path, wikitext_dir):
    """`prunetune run RECIPE` under torchrun: evaluate and prune (Wanda calibration) run on rank 0 while rank 1
    waits, the fine-tuning on both ranks; the stages before the training give exactly the one-process numbers."""
    import yaml

    from prunetune.config import load_recipe
    from prunetune.pipelines.runner import run_recipe

    text = tmp_path / "text.txt"
    text.write_text((wikitext_dir / "test.txt").read_text()[:60_000])
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 3, "model": {"name": "tiny-llama"},
        "data": {"calib": str(text), "train": str(text), "ppl": [str(text)]},
        "prune": {"method": "wanda", "sparsity": 0.5, "nsamples": 4, "seqlen": 64},
        "tune": {"steps": 4, "batch_size": 2, "seqlen": 64, "eval_samples": 2, "lr": 0.01},
        "eval": {"ppl_seqlen": 64, "max_windows": 4},
        "stages": ["evaluate", "prune", "evaluate", "finetune", "evaluate", "export"]}))
    ref = run_recipe(load_recipe(str(recipe)), tmp_path / "single", log=lambda *_: None)
    out = tmp_path / "ddp"
    p = _launch(_torchrun("-m", "prunetune.cli", "run", str(recipe), "--out", str(out)))
    assert p.stdout.count("02-prune: done") == 1  # rank 0 alone logs
    man = json.loads((out / "manifest.json").read_text())
    assert man["stages"] == ref["stages"] and man["status"] == "complete" and man["world_size"] == 2
    for stage in ("01-evaluate", "02-prune", "03-evaluate"):  # rank 0's work, the same as one process's
        assert {k: v["value"] for k, v in man["metrics"][stage].items() if "seconds" not in k} == \
            {k: v["value"] for k, v in ref["metrics"][stage].items() if "seconds" not in k}, stage
    ranks = [json.loads((out / "stages" / "04-finetune" / "tune" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["global_step"] == 2  # 4 x 2 examples over 2 ranks x batch 2
    assert man["metrics"]["04-finetune"]["sparsity"]["value"] == pytest.approx(0.5, abs=1e-3)
    assert MaskSet.load(out / "model").sparsity() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("preset", ["order-study", "composable"])
def test_stages_with_their_own_trainings_refuse_a_multi_process_launch(preset, monkeypatch):
    """The ordering study and composable pruning train several models inside one stage: under a launcher they
    would train on rank 0 alone while the others wait, so the recipe is refused before anything runs."""
    from prunetune.config import load_recipe
    from prunetune.errors import PrunetuneError
    from prunetune.pipelines.runner import check_recipe

    recipe = load_recipe(preset)
    check_recipe(recipe)  # one process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PrunetuneError, match="runs its trainings in one process.*2 processes"):
        check_recipe(recipe)
