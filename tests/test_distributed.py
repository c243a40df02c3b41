"""Scale-out on CPU: two processes (gloo) under torchrun and `accelerate launch` keep one set of masks.

Each launch runs the real console entry (`-m prunetune.cli`) in two processes. What must hold: every rank ends
with the same masks and step count, and the exported model still has exactly the pruned zeros, whether the
tuning is LoRA (merged as (W + s*BA) * M) or full fine-tuning (weights re-zeroed after every DDP step), and PAYT
pruning during DDP training computes the same masks on both ranks.
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

from cli_helpers import cli_ok
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


def _launch(cmd: list[str]) -> None:
    env = {**os.environ, "PRUNETUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.fixture()
def pruned(tmp_path, capsys) -> Path:
    """tiny-llama with 50% magnitude pruning (per row), saved as a plain HF dir with its masks (OUT/model)."""
    d = tmp_path / "pruned"
    cli_ok(["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--out", str(d)], capsys)
    return d / "model"


def _rank_states(out: Path) -> tuple[dict, dict]:
    """What each rank wrote at the end of training: global step and masks digest."""
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))


def _check_two_ranks_kept_masks(out: Path, pruned: Path) -> None:
    want = MaskSet.load(pruned)
    r0, r1 = _rank_states(out)
    assert r0["masks_digest"] == r1["masks_digest"] == masks_digest(want)  # the input dir's masks, on both ranks
    assert r0["global_step"] == r1["global_step"] == STEPS
    m = json.loads((out / "metrics.json").read_text())
    assert m["global_step"] == STEPS and m["sparsity"] == 0.5
    assert MaskSet.load(out / "model").sparsity() == 0.5

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
    assert (out / "adapter" / "adapter").is_dir()  # LoRA run: adapter export beside the merged model


@pytest.mark.slow
def test_torchrun_ddp_full_finetune_keeps_pruned_zeros(tmp_path, pruned):
    out = tmp_path / "ddp"
    _launch([_launcher("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "prunetune.cli", "finetune",
             str(pruned), "--full", *FT_ARGS, "--out", str(out)])
    _check_two_ranks_kept_masks(out, pruned)
    assert not (out / "adapter").exists()
    # the export re-applies the masks anyway; the Trainer's own checkpoints show the zeros held at every epoch
    want = MaskSet.load(pruned)
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    assert [c.name for c in ckpts] == ["checkpoint-2", f"checkpoint-{STEPS}"]
    for ckpt in ckpts:
        weights = load_file(ckpt / "model.safetensors")
        assert all(torch.equal(weights[f"{n}.weight"] == 0, ~want[n]) for n in want.names()), ckpt.name
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["tune"]["lora"] is False


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
    assert m["sparsity"] == pytest.approx(0.5, abs=1e-9)
    shutil.rmtree(out, ignore_errors=True)
