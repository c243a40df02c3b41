"""Disk full (issue 30, item 5): a write that fails with ENOSPC says what failed in one line, leaves the previous
complete output as it was, reports nothing as done that was not written, and `--resume` then finishes with
the bytes of an uninterrupted run.

ENOSPC is simulated where every durable write of prunetune passes: `os.fsync` (rundir's atomic files and
directories, stage commits) raises it for files under the path the test names, as a full disk does when the
data is flushed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest

from cli_helpers import cli_error, cli_ok

ARGS = ["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5"]


def _full_disk(monkeypatch, where: str) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if where in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _digest(d) -> dict:
    """Metadata and tensor bytes of each safetensors file (not the file's bytes: safetensors writes its metadata
    map in no fixed order)."""
    from safetensors import safe_open

    out = {}
    for p in sorted(d.iterdir()):
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                out[p.name] = (f.metadata(), {k: hashlib.sha256(f.get_tensor(k).numpy().tobytes()).hexdigest()
                                              for k in sorted(f.keys())})
    return out


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name the file")


def test_disk_full_in_export_then_resume(tmp_path, capfd, monkeypatch):
    ref = tmp_path / "ref"
    cli_ok([*ARGS, "--out", str(ref)], capfd)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _full_disk(m, f"{out}/model.")  # the export's temp directory beside OUT/model
        line = cli_error([*ARGS, "--out", str(out)], capfd, needle="No space left on device")
    assert f"{out}/model." in line  # says which file could not be written
    assert (out / "stages" / "01-prune" / "manifest.json").is_file()  # the complete stage stays
    assert not (out / "stages" / "02-export").exists() and not (out / "model").exists()  # not reported done
    assert not list(out.glob("*.partial"))  # the export's temp directory went with the failure
    assert not (out / "stages" / "02-export.partial" / "manifest.json").exists()  # the stage's own is not complete
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    cli_ok([*ARGS, "--out", str(out), "--resume"], capfd)  # the disk has room again
    assert _digest(out / "model") == _digest(ref / "model")


def test_disk_full_keeps_the_previous_export_intact(tmp_path, capfd, monkeypatch):
    """A failed re-export leaves the model directory that was there before, byte for byte."""
    out = tmp_path / "run"
    cli_ok([*ARGS, "--out", str(out)], capfd)
    before = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
    import shutil

    shutil.rmtree(out / "stages" / "02-export")  # the export stage is to be redone on --resume
    with monkeypatch.context() as m:
        _full_disk(m, f"{out}/model.")
        cli_error([*ARGS, "--out", str(out), "--resume"], capfd, needle="No space left on device")
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir()} == before
    assert not (out / "stages" / "02-export").exists()


def test_disk_full_on_a_stage_commit(tmp_path, capfd, monkeypatch):
    """ENOSPC while the first stage is being committed: the stage is not published, the fresh --out is not
    left half-made (nothing to resume), and the error names the file."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _full_disk(m, "01-prune.partial")
        line = cli_error([*ARGS, "--out", str(out)], capfd, needle="No space left on device")
    assert "01-prune.partial" in line
    assert not out.exists()


def test_half_written_files_of_a_killed_run_are_never_read(tmp_path, capfd):
    """A kill during the very first writes leaves only temp files (`*.partial`): the directory counts as
    empty, --resume starts the run afresh and removes them."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml.999.partial").write_text("name: half-writ")
    (out / "model.999.partial").mkdir()
    printed = cli_ok([*ARGS, "--out", str(out), "--resume"], capfd)
    assert "nothing to resume" in printed
    assert not list(out.glob("*.partial")) and (out / "model" / "config.json").is_file()
