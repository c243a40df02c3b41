"""One writer per run directory (issue 30, item 4): a second process on the same --out, a --resume or an
--overwrite while the first runs, is refused in one line and touches nothing; a killed run's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import cli_error, cli_ok
from prunetune.pipelines.runner import PAUSE_ENV
from prunetune.rundir import LOCK, RunLock

ARGS = ["prune", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5"]


def _snapshot(d):
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.name != LOCK}


def test_lock_is_exclusive_and_released(tmp_path):
    a = RunLock(tmp_path / "r").acquire()
    info = json.loads((tmp_path / "r" / LOCK).read_text())
    assert info["pid"] == os.getpid() and info["host"] and info["started"]
    # another holder (a child process) is refused while this one holds it
    code = "import sys; from prunetune.rundir import RunLock; RunLock(sys.argv[1]).acquire()"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode != 0 and f"pid {os.getpid()}" in proc.stderr and "in use" in proc.stderr
    a.release()
    assert not (tmp_path / "r").exists()  # it made the directory and left nothing in it: removed
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_second_writer_refused_then_stale_lock_taken_over(tmp_path, capfd):
    out = tmp_path / "run"
    env = {**os.environ, PAUSE_ENV: "01-prune", "PRUNETUNE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "prunetune.cli", *ARGS, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = out / "stages" / "01-prune.partial" / ".paused"
    deadline = time.time() + 180
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"first run did not reach its pause: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    before = _snapshot(out)
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            line = cli_error([*ARGS, "--out", str(out), *extra], capfd, needle="is in use by another prunetune process")
            assert f"pid {proc.pid}" in line
            assert _snapshot(out) == before  # the running one's files are untouched
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / LOCK).is_file()  # a killed run leaves its lock file: stale, since the kernel dropped the flock
    printed = cli_ok([*ARGS, "--out", str(out), "--resume"], capfd)
    assert f"took over the lock of a process that is gone (pid {proc.pid})" in printed
    assert (out / "model" / "config.json").is_file() and not (out / LOCK).exists()
