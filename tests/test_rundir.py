"""rundir: atomic writes publish whole files with the user's umask; the run-directory reader."""

from __future__ import annotations

import json
import os
import stat

import pytest

from prunetune.errors import PrunetuneError
from prunetune.rundir import atomic_dir, atomic_write_json, atomic_write_text, load_run


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_write_uses_umask_and_replaces(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a.txt", "one")
        assert p.read_text() == "one"
        assert _mode(p) == 0o644  # not 0600 as tempfile.mkstemp would give
        atomic_write_json(p, {"x": 1})
        assert json.loads(p.read_text()) == {"x": 1}
    finally:
        os.umask(old)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]  # no temp file left behind


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    p = atomic_write_text(tmp_path / "a.json", '{"ok": true}')

    def no_rename(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_json(p, {"ok": False})
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"ok": True}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


def test_atomic_dir_all_or_nothing(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out, {"kind": "x"}) as tmp:
        (tmp / "w.bin").write_bytes(b"1234")
        assert not out.exists()
    assert (out / "w.bin").read_bytes() == b"1234"
    assert json.loads((out / "manifest.json").read_text()) == {"kind": "x"}
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "w.bin").write_bytes(b"new")
            raise RuntimeError("interrupted")
    assert (out / "w.bin").read_bytes() == b"1234"  # the old complete dir survives a failed write
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model"]


def test_load_run_reads_complete_stages_only(tmp_path):
    with pytest.raises(PrunetuneError, match="not a prunetune run directory"):
        load_run(tmp_path)
    atomic_write_json(tmp_path / "manifest.json", {"status": "running"})
    (tmp_path / "recipe.yaml").write_text("name: t\n")
    for name, done in (("01-evaluate", True), ("02-prune", False)):
        d = tmp_path / "stages" / name
        d.mkdir(parents=True)
        if done:
            atomic_write_json(d / "manifest.json", {"stage": name})
    run = load_run(tmp_path)
    assert [s["stage"] for s in run["stages"]] == ["01-evaluate"]
    assert run["recipe"] == {"name": "t"} and run["manifest"]["status"] == "running"
