"""kill -9 anywhere, then --resume (issue 30, item 3): for every command that writes, SIGKILL at seeded random
points, resume, and get the outputs of an uninterrupted run (every safetensors file: weights, masks, module
cache; every metric but timings).

Kill points: the N-th durable write of the run (every `os.fsync` prunetune makes: recipe, manifests, each
file of a stage being committed, each file of an export, a cache entry), N drawn with a fixed seed from the
writes an uninterrupted run makes; and, for the training commands, the end of a drawn optimizer step (as
`cli_helpers.cli_killer` does). The table in BENCHMARKS.md counts them: `KILLS` below.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import cli_killer, cli_ok, labelled_csv

#: fsync kill points per command; training commands get one optimizer-step kill point more
KILLS = 2
TRAINING = ("finetune", "payt", "losparse")

_PATCH = """
import os, signal
_n = [0]
_real = os.fsync
_at = int(os.environ.get("KILL_AT_FSYNC", "0"))
def _fsync(fd):
    _n[0] += 1
    if _n[0] == _at:
        os.kill(os.getpid(), signal.SIGKILL)
    _real(fd)
os.fsync = _fsync
"""
KILLER = _PATCH + cli_killer()  # KILL_AT (optimizer step) and KILL_AT_FSYNC (durable write), either or both


def _commands(d: Path) -> dict[str, list[str]]:
    text, task = str(d / "text.txt"), str(d / "task.csv")
    tune = ["--task", task, "--n-samples", "16", "--epochs", "1", "--batch-size", "4", "--max-length", "16",
            "--eval-samples", "4", "--test-samples", "8", "--no-retention", "--save-steps", "1"]
    return {
        "prune": ["prune", "tiny-llama", "--method", "wanda", "--calib", text, "--nsamples", "4", "--seqlen", "32"],
        "shrink": ["shrink", "tiny-llama", "--method", "vib", "--calib", text, "--nsamples", "4", "--seqlen", "32",
                   "--vib-steps", "3", "--vib-batch", "2", "--round-to", "8", "--structures", "heads,neurons"],
        "finetune": ["finetune", "tiny-bert", *tune, "--no-kd"],
        "payt": ["payt", "tiny-bert", *tune, "--schedule", "linear", "--every-steps", "1", "--start", "0.25",
                 "--sparsity", "0.5", "--mix", "0"],
        "losparse": ["losparse", "tiny-bert", *[a for a in tune if a != "--no-retention"], "--rank-ratio", "0.2", "--keep", "0.3",
                     "--initial-warmup-steps", "1", "--final-warmup-steps", "1", "--delta-t", "1"],
        "compose": ["compose", "tiny-bert", "--task", task, "--attention", "0.25", "--linear", "0.3",
                    "--n-samples", "16", "--eval-samples", "4", "--steps", "2", "--max-length", "16",
                    "--linear-steps", "2", "--attention-steps", "2", "--module-texts", "8", "--test-samples", "8"],
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory, wikitext_dir) -> Path:
    d = tmp_path_factory.mktemp("killdata")
    (d / "text.txt").write_text((wikitext_dir / "valid.txt").read_text()[:20_000])
    labelled_csv(d / "task.csv", ["sport", "tech"] * 20, seed=1)
    return d


TIMING = ("seconds", "runtime", "_s", "_ms", "peak", "per_second", "time")


def _tensors(path: Path) -> tuple[dict, dict]:
    """A safetensors file's metadata and tensors (as bytes). Not the file's bytes: safetensors writes its
    metadata map in no fixed order, so two identical saves can differ in the header."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}, {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())}


def outputs(out: Path) -> dict:
    """What must be identical: every tensor (and metadata) of every safetensors file of the run (checkpoints aside: a resumed
    run has fewer) and every metric value that is not a timing."""
    files = {str(p.relative_to(out)): _tensors(p) for p in sorted(out.rglob("*.safetensors"))
             if "checkpoint" not in str(p.relative_to(out))}
    man = json.loads((out / "manifest.json").read_text())
    metrics = {f"{s}/{k}": v.get("value") if isinstance(v, dict) else v for s, m in man["metrics"].items()
               for k, v in m.items() if not any(t in k for t in TIMING)}
    return {"files": files, "metrics": metrics}


def _count_writes(monkeypatch) -> list[int]:
    n = [0]
    real = os.fsync

    def fsync(fd: int) -> None:
        n[0] += 1
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return n


def _killed(argv: list[str], env_kill: dict) -> int:
    env = {**os.environ, "KILL_AT": "-1", "PRUNETUNE_PROGRESS": "0", **env_kill}
    proc = subprocess.run([sys.executable, "-c", KILLER, *argv], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=600)
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("command", ["prune", "shrink", "finetune", "payt", "losparse", "compose"])
def test_kill_anywhere_then_resume_gives_identical_outputs(command, data, tmp_path, capfd, monkeypatch):
    argv = _commands(data)[command]
    ref = tmp_path / "ref"
    with monkeypatch.context() as m:
        writes = _count_writes(m)
        cli_ok([*argv, "--out", str(ref)], capfd)
    want = outputs(ref)
    rng = random.Random(f"issue30-{command}")
    points = [{"KILL_AT_FSYNC": str(k)} for k in sorted(rng.sample(range(1, writes[0] + 1), KILLS))]
    if command in TRAINING:
        points.append({"KILL_AT": str(rng.randint(1, 3))})
    for i, point in enumerate(points):
        out = tmp_path / f"kill{i}"
        code = _killed([*argv, "--out", str(out)], point)
        assert code == -signal.SIGKILL, (point, code)
        cli_ok([*argv, "--out", str(out), "--resume"], capfd)
        got = outputs(out)
        assert got["metrics"] == want["metrics"], point
        assert got["files"].keys() == want["files"].keys(), point
        for name in want["files"]:
            assert got["files"][name] == want["files"][name], (point, name)
    capfd.readouterr()
    print(f"{command}: {len(points)} kill points {points} of {writes[0]} writes: all resumed identically")
