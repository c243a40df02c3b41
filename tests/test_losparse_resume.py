"""LoSparse resumes mid-stage: the method's state (PLATON averages, the schedule's step, the fixed mask, the
events) travels in every training checkpoint as safetensors + JSON, so a run interrupted after a checkpoint and
resumed ends with exactly the weights, masks and averages of the uninterrupted run, through `finetune` and
through `prunetune losparse ... --resume`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from cli_helpers import cli_killer, cli_ok
from prunetune.errors import PrunetuneError
from prunetune.methods.losparse import Losparse, LosparseSpec
from prunetune.tuning.spec import TuneSpec
from prunetune.tuning.finetune import finetune
from prunetune.tuning.lifecycle import METHOD_STATE_JSON, METHOD_STATE_TENSORS

#: 16 examples / batch 4 = 4 steps an epoch, 3 epochs: 12 steps, checkpoints at the epoch ends 4, 8 (and 12).
#: The schedule prunes S at steps 4 and 6 and fixes the mask at step 8 (= 12 - 5 + 1) (`final_mask: fixed`).
SPEC = dict(rank_ratio=0.2, keep=0.3, initial_warmup_steps=2, final_warmup_steps=5, deltaT=2, final_mask="fixed")
#: the method's rules (the defaults): PLATON windows of 3 steps (folds at 3, 6, 9, 12: the checkpoints at 4 and 8
#: hold a half-filled window), masks at 3, 6, then recomputed through the final warm-up at 8 and the folds 9, 12
METHOD_SPEC = dict(rank_ratio=0.2, keep=0.3, initial_warmup_steps=2, final_warmup_steps=5, deltaT=3)
#: the files the Trainer itself pickles into a checkpoint; the method's state is none of them
TRAINER_PICKLES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}


def _cfg() -> TuneSpec:
    """Full fine-tuning (LoSparse trains U, V and S itself) of 16 task examples for 3 epochs."""
    return TuneSpec(mode="full", steps=None, n_samples=16, eval_samples=4, test_samples=8, epochs=3, batch_size=4,
                    seqlen=24, retention=False, kd=False, lr=5e-3)


class _Crash(TrainerCallback):
    """The interruption: the process dies at the start of step `at` (its memory, the method object included,
    is gone; only the checkpoints on disk remain)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def _final(method: Losparse, res: dict) -> dict:
    """What the run ends with: U, V, S and bias of every factorised layer, the PLATON averages, the fixed mask,
    the events, and every weight of the exported (materialised) model."""
    out: dict = {"t": method.t, "updates": method.scores.updates, "events": method.events,
                 "model": {k: v.detach().clone() for k, v in res["_model"].state_dict().items()}}
    for n, lay in method.layers.items():
        for p in ("U", "V", "weight", "bias"):
            out[f"{n}.{p}"] = getattr(lay, p).detach().clone()
        out[f"avg/{n}"], out[f"unc/{n}"] = method.scores.avg[n].clone(), method.scores.unc[n].clone()
        out[f"acc/{n}"] = method.scores.acc[n].clone()
        out[f"fixed/{n}"] = method.fixed[n].clone()
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "model":
            assert a[k].keys() == b[k].keys()
            bad = [n for n in a[k] if not torch.equal(a[k][n], b[k][n])]
            assert not bad, f"exported weights differ: {bad[:3]}"
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    method = Losparse(LosparseSpec(**SPEC))
    res = finetune("tiny-bert", _cfg(), tmp_path_factory.mktemp("ref") / "run", method=method, kind="losparse")
    assert res["global_step"] == 12 and [e["step"] for e in method.events] == [4, 6, 8]
    return _final(method, res), res


@pytest.mark.parametrize("crash_at,resumed_from", [(6, 4), (10, 8)])
def test_interrupted_losparse_run_resumes_to_the_same_weights_masks_and_averages(tmp_path, uninterrupted,
                                                                                 crash_at, resumed_from):
    """Killed at step 6 it resumes from checkpoint-4 (mid-schedule: one mask event done, averages running);
    killed at step 10 from checkpoint-8 (the mask just fixed)."""
    ref, ref_res = uninterrupted
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune("tiny-bert", _cfg(), out, method=Losparse(LosparseSpec(**SPEC)), kind="losparse",
                 callbacks=(_Crash(crash_at),))
    ckpt = out / "checkpoints" / f"checkpoint-{resumed_from}"
    saved = json.loads((ckpt / METHOD_STATE_JSON).read_text())
    assert saved["method"] == "losparse" and saved["step"] == saved["values"]["t"] == resumed_from

    method = Losparse(LosparseSpec(**SPEC))  # a new process's method: nothing carried in memory
    res = finetune("tiny-bert", _cfg(), out, method=method, kind="losparse", resume=True)
    assert res["resumed_from"].endswith(ckpt.name) and res["global_step"] == 12
    _assert_same(_final(method, res), ref)
    assert res["train_loss"] == ref_res["train_loss"] and res["accuracy"] == ref_res["accuracy"]
    assert res["losparse_events"] == ref_res["losparse_events"]


def test_checkpoint_holds_the_method_state_as_safetensors_and_json_and_no_pickle_of_it(tmp_path, uninterrupted):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    method = Losparse(LosparseSpec(**SPEC))
    with pytest.raises(KeyboardInterrupt):
        finetune("tiny-bert", _cfg(), out, method=method, kind="losparse", callbacks=(_Crash(9),))
    ckpt = out / "checkpoints" / "checkpoint-8"
    names = {p.name for p in ckpt.iterdir()}
    assert {METHOD_STATE_TENSORS, METHOD_STATE_JSON, "prunetune_state.json", "masks.safetensors"} <= names
    pickled = {n for n in names if n.rsplit(".", 1)[-1] in ("pt", "pth", "bin", "pkl", "pickle")}
    assert pickled <= TRAINER_PICKLES, pickled
    meta = json.loads((ckpt / METHOD_STATE_JSON).read_text())
    tensors = load_file(str(ckpt / METHOD_STATE_TENSORS))
    assert sorted(tensors) == meta["tensors"]
    layers = sorted(method.layers)
    assert sorted(meta["values"]["fixed"]) == layers
    for n in layers:  # Ī, Ū of every S and its fixed mask; the averages are those the run held at step 8
        assert tensors[f"platon_avg/{n}"].shape == method.layers[n].weight.shape
        assert tensors[f"fixed_mask/{n}"].dtype == torch.uint8
        assert float(tensors[f"platon_unc/{n}"].abs().sum()) > 0
    assert meta["values"]["t"] == 8 and meta["values"]["platon_emas"] == 8
    assert [e["step"] for e in meta["values"]["events"]] == [4, 6, 8]
    kept = sum(int(tensors[f"fixed_mask/{n}"].sum()) for n in layers) / sum(tensors[f"fixed_mask/{n}"].numel()
                                                                         for n in layers)
    assert kept == pytest.approx(SPEC["keep"], abs=1e-3)
    # a checkpoint that lost the method's state is incomplete: resume passes over it to the one before, and
    # with none left says so in one line (it never continues with reset averages)
    from prunetune.tuning.finetune import last_good_checkpoint

    (ckpt / METHOD_STATE_JSON).unlink()
    good, skipped = last_good_checkpoint(out / "checkpoints")
    assert good.name == "checkpoint-4" and "method state is missing" in skipped[0]
    (good / METHOD_STATE_TENSORS).unlink()
    with pytest.raises(PrunetuneError, match=r"checkpoint-8 is corrupt \(its method state is missing\)") as e:
        finetune("tiny-bert", _cfg(), out, method=Losparse(LosparseSpec(**SPEC)), kind="losparse", resume=True)
    assert "\n" not in str(e.value) and str(e.value).startswith("--resume: checkpoint")


@pytest.mark.parametrize("crash_at,resumed_from", [(6, 4), (10, 8)])
def test_resume_mid_platon_window_and_mid_final_recompute_is_exact(tmp_path, crash_at, resumed_from):
    """The default rules across a checkpoint: the open window's sum and step count travel with the averages, so a
    run resumed mid-window (checkpoint-4: one step into the window 4-6; checkpoint-8: two into 7-9, in the final
    warm-up whose mask is recomputed) ends exactly as the uninterrupted one."""
    ref_method = Losparse(LosparseSpec(**METHOD_SPEC))
    ref_res = finetune("tiny-bert", _cfg(), tmp_path / "ref", method=ref_method, kind="losparse")
    assert [e["step"] for e in ref_method.events] == [3, 6, 8, 9, 12]
    assert [e["fixed"] for e in ref_method.events] == [False, False, True, True, True]
    assert ref_method.scores.folds == 4 and ref_method.scores.pending == 0
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune("tiny-bert", _cfg(), out, method=Losparse(LosparseSpec(**METHOD_SPEC)), kind="losparse",
                 callbacks=(_Crash(crash_at),))
    saved = json.loads((out / "checkpoints" / f"checkpoint-{resumed_from}" / METHOD_STATE_JSON).read_text())
    assert saved["values"]["platon_pending"] == resumed_from % 3 and saved["values"]["platon_folds"] == resumed_from // 3
    method = Losparse(LosparseSpec(**METHOD_SPEC))
    res = finetune("tiny-bert", _cfg(), out, method=method, kind="losparse", resume=True)
    assert res["global_step"] == 12
    _assert_same(_final(method, res), _final(ref_method, ref_res))
    assert res["train_loss"] == ref_res["train_loss"] and res["losparse_events"] == ref_res["losparse_events"]


# ------------------------------------------------------------------------------------------------ the command
# the CLI in a subprocess whose Trainer SIGKILLs its own process at the end of optimizer step KILL_AT
_KILLER = cli_killer()

#: 24 examples / batch 4 = 6 steps an epoch, 2 epochs; checkpoints at steps 4, 6 (epoch end), 8 and 12, the last
#: two kept; S pruned at 4, 6, 8, the final mask computed at 10 and recomputed at the window's fold at 12
CLI_ARGS = ["losparse", "tiny-bert", "--task", "bbc-news", "--n-samples", "24", "--epochs", "2", "--batch-size", "4",
            "--max-length", "24", "--eval-samples", "4", "--test-samples", "12", "--rank-ratio", "0.2", "--keep",
            "0.3", "--initial-warmup-steps", "2", "--final-warmup-steps", "3", "--delta-t", "2", "--save-steps", "4"]


def test_losparse_command_takes_save_steps(capsys):
    import yaml

    rec = yaml.safe_load(cli_ok([*CLI_ARGS, "--print-recipe"], capsys))
    assert rec["tune"]["save_steps"] == 4 and rec["stages"][0] == "losparse"


def _published(out: Path) -> dict:
    """What the LoSparse stage published: both exports' tensors, its curves and facts, the run's metrics."""
    from safetensors import safe_open

    stage = next(p for p in sorted((out / "stages").iterdir()) if p.name.endswith("-losparse"))
    facts = json.loads((stage / "losparse.json").read_text())
    facts["losparse"].pop("factorized_dir")  # a path inside the run directory
    got: dict = {"curves": (stage / "curves.json").read_text(), "facts": facts}
    for p in sorted((stage / "model").glob("*.safetensors")) + sorted((stage / "factorized").glob("*.safetensors")):
        with safe_open(str(p), "pt") as fh:
            got[f"{p.parent.name}/{p.name}"] = {k: fh.get_tensor(k).numpy().tobytes() for k in sorted(fh.keys())}
    man = json.loads((out / "manifest.json").read_text())
    got["metrics"] = {f"{s}/{k}": v["value"] for s, m in man["metrics"].items() for k, v in m.items()
                      if "seconds" not in k}
    return got


@pytest.mark.slow
def test_losparse_command_killed_mid_stage_resumes_from_its_checkpoint(tmp_path, capsys):
    ref = tmp_path / "ref"
    cli_ok([*CLI_ARGS, "--out", ref], capsys)
    out = tmp_path / "run"
    env = {**os.environ, "KILL_AT": "9", "PRUNETUNE_PROGRESS": "0"}  # mid-schedule: after the event at 8
    proc = subprocess.run([sys.executable, "-c", _KILLER, *CLI_ARGS, "--out", str(out)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    partial = next((out / "stages").glob("*-losparse.partial"))
    assert sorted(p.name for p in (partial / "tune" / "checkpoints").iterdir()) == ["checkpoint-6", "checkpoint-8"]

    said = cli_ok([*CLI_ARGS, "--out", out, "--resume"], capsys)
    assert "resuming the interrupted stage from checkpoint-8" in said
    tune = json.loads((out / "stages" / partial.name.removesuffix(".partial") / "tune" / "metrics.json").read_text())
    assert tune["resumed_from"].endswith("checkpoint-8") and tune["global_step"] == 12
    assert [e["step"] for e in tune["losparse_events"]] == [4, 6, 8, 10, 12]
    assert _published(out) == _published(ref)  # the same weights (both exports), masks, curves and metrics
