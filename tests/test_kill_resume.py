"""kill -9 anywhere, then --resume (issue 30, item 3): for every command that writes, SIGKILL at seeded random
points, resume, and get the outputs of an uninterrupted run (every safetensors file: weights, masks, module
cache; every metric but timings; the report, timings and paths aside).

Kill points, each drawn with a fixed seed from what an uninterrupted run of the same command does (counted
in-process by `Recorder`), each a test-only patch of the killed subprocess (`KILLER`; no hook in prunetune):

* `KILL_AT_FSYNC=n`: the n-th durable write of the run (every `os.fsync` prunetune makes: recipe, manifests,
  each file of a stage being committed, each file of an export, a cache entry, the report) -- anywhere;
* `KILL_AT` (training commands): the end of optimizer step n, as `cli_helpers.cli_killer` does (between steps);
* `KILL_AT_OPT_STEP=n`: right after the n-th `optimizer.step()` of the process, any torch optimizer (a global
  post-step hook): mid-step for the Trainer (before its scheduler, mask enforcement and callbacks), between the
  gate and multiplier updates of VIB's gate training (`shrink`), inside module-level or model-level FT (`compose`);
* `KILL_AT_BLOCK=b:c` (`prune`): the c-th forward call of block b's first calibrated linear in the sequential
  engine: c=1 while its statistics are being collected, c=2 while its pruned outputs propagate (one
  calibration batch), i.e. in the middle of the block;
* `KILL_IN=module:function:k:j`: just before the j-th write event (an `os.fsync` or `os.replace`) inside the k-th
  call of a function: the export's `save_hf_dir` mid-write, `ModuleCache.put` between an entry's tensors and its
  JSON (a half-written cache entry, which the resumed run must redo, never load), `write_run_report` mid-report.

The table in BENCHMARKS.md counts them (`test_kill_anywhere_then_resume_gives_identical_outputs` prints its row).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import cli_killer, cli_ok, labelled_csv

#: fsync kill points per command; the other kinds are added per command in `_points`
KILLS = 2
TRAINING = ("finetune", "payt", "losparse")
EXPORT = "prunetune.models.export:save_hf_dir"
REPORT = "prunetune.reporting.report:write_run_report"
CACHE_PUT = "prunetune.methods.composable.cache:ModuleCache.put"
HALF_ENTRY = 4  # put's write events: tensors fsync, rename, dir fsync, then the JSON's: killed before its fsync

_PATCH = """
import os, signal
def _die():
    os.kill(os.getpid(), signal.SIGKILL)
_n, _ev, _in_call = [0], [0], [False]
_real_fsync, _real_replace = os.fsync, os.replace
_at = int(os.environ.get("KILL_AT_FSYNC", "0"))
_in = os.environ.get("KILL_IN")
_in_j = int(_in.split(":")[3]) if _in else 0
def _event():
    if _in_call[0]:
        _ev[0] += 1
        if _ev[0] == _in_j:
            _die()
def _fsync(fd):
    _n[0] += 1
    if _n[0] == _at:
        _die()
    _event()
    _real_fsync(fd)
def _replace(*a, **kw):
    _event()
    return _real_replace(*a, **kw)
os.fsync, os.replace = _fsync, _replace
if _in:
    import importlib
    _mod, _qual, _k, _ = _in.split(":")
    *_owner_path, _fname = _qual.split(".")
    _owner = importlib.import_module(_mod)
    for _p in _owner_path:
        _owner = getattr(_owner, _p)
    _real_fn, _calls = getattr(_owner, _fname), [0]
    def _wrapped(*a, **kw):
        _calls[0] += 1
        _in_call[0] = _calls[0] == int(_k)
        try:
            return _real_fn(*a, **kw)
        finally:
            _in_call[0] = False
    setattr(_owner, _fname, _wrapped)
    import sys as _sys
    for _m in list(_sys.modules.values()):  # modules that already imported it by name
        if getattr(_m, "__name__", "").startswith("prunetune") and getattr(_m, _fname, None) is _real_fn:
            setattr(_m, _fname, _wrapped)
if os.environ.get("KILL_AT_OPT_STEP"):
    from torch.optim.optimizer import register_optimizer_step_post_hook
    _steps, _at_step = [0], int(os.environ["KILL_AT_OPT_STEP"])
    def _post(opt, args, kwargs):
        _steps[0] += 1
        if _steps[0] == _at_step:
            _die()
    register_optimizer_step_post_hook(_post)
if os.environ.get("KILL_AT_BLOCK"):
    import prunetune.pruning.calibrate as _cal
    _b, _c = map(int, os.environ["KILL_AT_BLOCK"].split(":"))
    _real_hooks, _seen = _cal._hooks, [0]
    def _hooks(named, stats):
        handles = _real_hooks(named, stats)
        if _seen[0] == _b:
            _hit = [0]
            def _kill(_m, _i, _o):
                _hit[0] += 1
                if _hit[0] == _c:
                    _die()
            next(iter(named.values())).register_forward_hook(_kill)  # not in handles: sees the propagation too
        _seen[0] += 1
        return handles
    _cal._hooks = _hooks
"""
KILLER = _PATCH + cli_killer()  # any of the KILL_* variables above, and KILL_AT (end of optimizer step)


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
_TIMED = re.compile(r"(\S*(?:seconds|runtime|_s|_ms|peak|per_second|time)\S*) [-+.\deE%]+")


def _tensors(path: Path) -> tuple[dict, dict]:
    """A safetensors file's metadata and tensors (as bytes). Not the file's bytes: safetensors writes its
    metadata map in no fixed order, so two identical saves can differ in the header."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}, {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())}


def report(out: Path) -> dict:
    """report.md without what measures the machine or names the directory (paths, creation time, the checkout's
    commit, stage seconds, timing metrics in the stage summaries), and the names of its plots."""
    lines, section = [], ""
    for line in (out / "report.md").read_text().replace(str(out), "<out>").splitlines():
        section = line if line.startswith("## ") else section
        if line.startswith(("- status:", "- created:")):
            continue
        if line.startswith("- seed "):  # the checkout's commit: another worktree may land one between kill and resume
            line = re.sub(r"git `[^`]*`", "git <rev>", line)
        if section == "## Stages" and re.match(r"\| \d\d-", line):  # stage | type | seconds | summary
            cells = line.split(" | ")
            line = " | ".join([cells[0], cells[1], _TIMED.sub(r"\1 <t>", " | ".join(cells[3:]))])
        lines.append(line)
    return {"report.md": lines, "plots": sorted(p.name for p in (out / "plots").glob("*"))}


def outputs(out: Path) -> dict:
    """What must be identical: every tensor (and metadata) of every safetensors file of the run (checkpoints aside: a resumed
    run has fewer), of its module cache when it has one beside it, every metric value that is not a timing,
    and the report."""
    files = {str(p.relative_to(out)): _tensors(p) for p in sorted(out.rglob("*.safetensors"))
             if "checkpoint" not in str(p.relative_to(out))}
    cache = _cache(out)
    files.update({f"<cache>/{p.name}": _tensors(p) for p in sorted(cache.glob("*.safetensors"))})
    man = json.loads((out / "manifest.json").read_text())
    metrics = {f"{s}/{k}": v.get("value") if isinstance(v, dict) else v for s, m in man["metrics"].items()
               for k, v in m.items() if not any(t in k for t in TIMING)}
    return {"files": files, "metrics": metrics, "report": report(out)}


def _cache(out: Path) -> Path:
    return out.with_name(out.name + "-cache")


def _argv(command: str, data: Path, out: Path) -> list[str]:
    """The command; compose keeps its module cache beside OUT (as `--cache-dir` users do), so that a resumed run
    finds what the killed one cached, half-written entries included."""
    extra = ["--cache-dir", str(_cache(out))] if command == "compose" else []
    return [*_commands(data)[command], *extra, "--out", str(out)]


class Recorder:
    """In-process counts of what an uninterrupted run does, to draw kill points from: durable writes,
    optimizer steps, calibrated blocks, and the write events of each call of the `KILL_IN` functions."""

    def __init__(self, monkeypatch, targets: tuple[str, ...]) -> None:
        import importlib

        from torch.optim.optimizer import register_optimizer_step_post_hook

        import prunetune.pruning.calibrate as cal

        self.fsyncs = self.steps = self.blocks = 0
        self.calls: dict[str, list[int]] = {t: [] for t in targets}
        self._inside: list[str] = []
        real_fsync, real_replace, real_hooks = os.fsync, os.replace, cal._hooks

        def event() -> None:
            for t in self._inside:
                self.calls[t][-1] += 1

        def fsync(fd: int) -> None:
            self.fsyncs += 1
            event()
            real_fsync(fd)

        def replace(*a, **kw):
            event()
            return real_replace(*a, **kw)

        def hooks(named, stats):
            self.blocks += 1
            return real_hooks(named, stats)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(cal, "_hooks", hooks)
        for t in targets:
            mod, qual = t.split(":")
            *path, name = qual.split(".")
            owner = importlib.import_module(mod)
            for part in path:
                owner = getattr(owner, part)
            real = getattr(owner, name)
            wrapped = self._wrap(t, real)
            monkeypatch.setattr(owner, name, wrapped)
            # the modules that imported it by name (`from ... import save_hf_dir`) hold the real one
            for m in list(sys.modules.values()):
                if getattr(m, "__name__", "").startswith("prunetune") and getattr(m, name, None) is real:
                    monkeypatch.setattr(m, name, wrapped)

        def step(opt, args, kwargs) -> None:
            self.steps += 1

        self._handle = register_optimizer_step_post_hook(step)

    def _wrap(self, target: str, fn):
        def wrapped(*a, **kw):
            self.calls[target].append(0)
            self._inside.append(target)
            try:
                return fn(*a, **kw)
            finally:
                self._inside.remove(target)

        return wrapped

    def close(self) -> None:
        self._handle.remove()


def _points(command: str, rec: Recorder, rng: random.Random) -> list[dict]:
    """The seeded kill points of one command (see the module docstring), each {env var: value, "kind": ...}."""
    pts = [{"kind": "write", "KILL_AT_FSYNC": str(k)} for k in sorted(rng.sample(range(1, rec.fsyncs + 1), KILLS))]
    if command in TRAINING:
        pts.append({"kind": "step end", "KILL_AT": str(rng.randint(1, 3))})
    if command in (*TRAINING, "shrink", "compose"):
        kind = {"shrink": "gate training", "compose": "module/model FT"}.get(command, "mid-step")
        pts.append({"kind": kind, "KILL_AT_OPT_STEP": str(rng.randint(1, rec.steps))})
    if command == "prune":
        for c in (1, 2):  # statistics pass, then propagation of the pruned block
            pts.append({"kind": "mid-block", "KILL_AT_BLOCK": f"{rng.randrange(rec.blocks)}:{c}"})
        last = len(rec.calls[EXPORT])  # the export stage's write of OUT/model
        pts.append({"kind": "export", "KILL_IN": f"{EXPORT}:{last}:{rng.randint(1, rec.calls[EXPORT][-1])}"})
    if command == "compose":
        k = rng.randint(1, len(rec.calls[CACHE_PUT]))
        pts.append({"kind": "cache entry", "KILL_IN": f"{CACHE_PUT}:{k}:{HALF_ENTRY}"})
    pts.append({"kind": "report", "KILL_IN": f"{REPORT}:1:{rng.randint(1, rec.calls[REPORT][0])}"})
    return pts


def _killed(argv: list[str], env_kill: dict) -> int:
    env = {**os.environ, "KILL_AT": "-1", "PRUNETUNE_PROGRESS": "0",
           **{k: v for k, v in env_kill.items() if k != "kind"}}
    proc = subprocess.run([sys.executable, "-c", KILLER, *argv], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=600)
    return proc.returncode


def _half_entries(cache: Path) -> list[str]:
    return [p.name for p in cache.glob("*.safetensors") if not p.with_suffix(".json").is_file()]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["prune", "shrink", "finetune", "payt", "losparse", "compose"])
def test_kill_anywhere_then_resume_gives_identical_outputs(command, data, tmp_path, capfd, monkeypatch):
    ref = tmp_path / "ref"
    with monkeypatch.context() as m:
        rec = Recorder(m, (EXPORT, REPORT, CACHE_PUT))
        try:
            cli_ok(_argv(command, data, ref), capfd)
        finally:
            rec.close()
    want = outputs(ref)
    rng = random.Random(f"issue30-{command}")
    points = _points(command, rec, rng)
    for i, point in enumerate(points):
        out = tmp_path / f"kill{i}"
        argv = _argv(command, data, out)
        code = _killed(argv, point)
        assert code == -signal.SIGKILL, (point, code)
        if (out / "report.md").exists():  # published whole or not at all
            assert (out / "report.md").read_text().rstrip().endswith("recipe: `recipe.yaml`."), point
        if point["kind"] == "cache entry":  # the kill left a half-written entry: tensors without their JSON
            assert _half_entries(_cache(out)), point
        cli_ok([*argv, "--resume"], capfd)
        got = outputs(out)
        assert got["metrics"] == want["metrics"], point
        assert got["files"].keys() == want["files"].keys(), point
        for name in want["files"]:
            assert got["files"][name] == want["files"][name], (point, name)
        assert got["report"] == want["report"], point
        assert not _half_entries(_cache(out)), point  # redone, not loaded
        assert not list(out.rglob("*.partial")), point  # no temp file or stage of the killed run is left
    capfd.readouterr()
    kinds: dict[str, int] = {}
    for p in points:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    print(f"{command}: {len(points)} kill points ({json.dumps(kinds)}) of {rec.fsyncs} writes, {rec.steps} optimizer "
          f"steps, {rec.blocks} calibrated blocks: all resumed identically; {points}")


@pytest.mark.slow
def test_compare_killed_anywhere_then_rerun_gives_identical_report(data, tmp_path, capfd, monkeypatch):
    """`compare` keeps no state to resume: killed at any of its durable writes (report.md, each plot), the same
    command run again gives the uninterrupted run's report and plots, and the killed run never leaves a torn
    report (whole or absent)."""
    run = tmp_path / "run"
    cli_ok(_argv("prune", data, run), capfd)

    def argv(out: Path) -> list[str]:
        return ["compare", str(run), "--out", str(out)]

    def result(out: Path) -> dict:
        return {"report.md": (out / "report.md").read_text(),
                "plots": sorted(p.name for p in (out / "plots").glob("*"))}

    with monkeypatch.context() as m:
        rec = Recorder(m, ())
        try:
            cli_ok(argv(tmp_path / "ref"), capfd)
        finally:
            rec.close()
    want = result(tmp_path / "ref")
    assert rec.fsyncs >= 2 and want["plots"]  # the report and at least one plot are durable writes
    points = sorted(random.Random("issue30-compare").sample(range(1, rec.fsyncs + 1), min(3, rec.fsyncs)))
    for k in [*points, rec.fsyncs]:  # and the last write: report.md itself
        out = tmp_path / f"kill{k}"
        assert _killed(argv(out), {"KILL_AT_FSYNC": str(k)}) == -signal.SIGKILL, k
        if (out / "report.md").exists():
            assert (out / "report.md").read_text() == want["report.md"], k
        cli_ok(argv(out), capfd)
        assert result(out) == want, k
        assert not list(out.rglob("*.partial")), k
    capfd.readouterr()
    print(f"compare: {len(points) + 1} kill points of {rec.fsyncs} writes ({[*points, rec.fsyncs]}): all rerun identically")
