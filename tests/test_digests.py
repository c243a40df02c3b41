"""Behaviour fingerprint: every command and preset on tiny models, digested (issue 27's guard for the refactor).

Each case runs one CLI command (prune with each criterion x granularity, finetune, payt, losparse, shrink with
each method, compose, `run` of every preset with tiny overrides, and `--print-recipe` of every command) and
reduces what it leaves behind to a digest: every tensor of every `.safetensors` file under the run's `model/`
directories (weights and masks), every number and string of `manifest.json`'s metrics, and the printed recipe.
Timings, memory, throughput and paths are left out (they change from run to run); the tmp dir is replaced by
`<tmp>` wherever it appears.

Two strengths of comparison:

* on the machine that wrote the fixture (same torch version and CPU capability, recorded in it) every tensor
  is compared by the SHA-256 of its bytes and every number exactly: a refactor that changes one bit fails;
* elsewhere (CI on another CPU, where kernels may round differently) each file is compared by its tensors'
  names, shapes and dtypes exactly and by its count of non-zeros, sum and sum of squares, numbers with a
  relative tolerance of 2%.

`PRUNETUNE_UPDATE_DIGESTS=1 pytest tests/test_digests.py` rewrites the fixture (only for an intended change of
behaviour; say why in the commit). A case re-recorded on another machine than the fixture's (an intended change
of only some cases) names its machine in `case_machines`: the exact check applies to it on that machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import pytest
import yaml

from cli_helpers import cli_ok, labelled_csv

FIXTURE = Path(__file__).parent / "fixtures" / "digests.json"
UPDATE = os.environ.get("PRUNETUNE_UPDATE_DIGESTS") == "1"
THREADS = 2  # the fixture's: float sums (so trained weights and accuracies) change with torch's thread count


@pytest.fixture(autouse=True)
def _fixed_threads():
    """Every case runs at the fixture's thread count, whatever the machine's cores or OMP_NUM_THREADS say, so the
    exact comparison holds on CI and under a developer's OMP_NUM_THREADS=1 alike."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)
# manifest keys that measure the machine, not the computation
VOLATILE = re.compile(r"(second|_s$|_s/|^s$|time|timing|_ms|ms_|latency|per_s|tok_s|tokens_per|rss|memory|peak|"
                      r"bytes|threads|path|dir$|^git|version|host|date|duration|speed|cache_hit|elapsed)", re.I)

# -------------------------------------------------------------------------------------------- the cases
# The criteria and granularities as they were when the fixture was written (a new criterion adds rows here).
CRITERIA = ("wanda", "magnitude", "sparsegpt", "l1-global", "l2-cols")
GRANULARITIES = ("row", "layer", "global", "rows", "cols", "heads", "neurons")
TUNE = ["--batch-size", "4", "--max-length", "24", "--n-samples", "12", "--eval-samples", "4", "--test-samples",
        "8", "--epochs", "1", "--seed", "3"]
SET_TINY_LM = ["--set", "model.name=tiny-llama", "--set", "prune.nsamples=4", "--set", "prune.seqlen=32",
               "--set", "eval.ppl_seqlen=32", "--set", "eval.max_windows=2", "--set", "tune.steps=2",
               "--set", "tune.batch_size=2", "--set", "tune.seqlen=32", "--set", "tune.eval_samples=2"]
SET_TINY_CLS = ["--set", "model.name=tiny-bert", "--set", "tune.n_samples=12", "--set", "tune.batch_size=4",
                "--set", "tune.seqlen=24", "--set", "tune.eval_samples=4", "--set", "tune.epochs=1",
                "--set", "tune.test_samples=8"]


def _valid(method: str, granularity: str) -> bool:
    from prunetune.errors import PrunetuneError
    from prunetune.pruning.api import validate

    try:
        validate(method, 0.5, None, granularity)
    except PrunetuneError:
        return False
    return True


def _prune_cases() -> dict[str, list[str]]:
    cases = {}
    for crit in CRITERIA:
        for gran in GRANULARITIES:
            if _valid(crit, gran):
                cases[f"prune-{crit}-{gran}"] = ["prune", "tiny-llama", "--method", crit, "--granularity", gran,
                                                 "--sparsity", "0.5", "{calib}"]
    cases["prune-sparsegpt-2of4"] = ["prune", "tiny-llama", "--method", "sparsegpt", "--pattern", "2:4", "{calib}"]
    cases["prune-wanda-eval"] = ["prune", "tiny-llama", "--method", "wanda", "--sparsity", "0.6", "{calib}",
                                 "--eval-ppl", "{text}", "--max-windows", "2"]
    return cases


CALIB = ["--calib", "{text}", "--nsamples", "4", "--seqlen", "32", "--calib-batch", "2", "--seed", "1"]
SHRINK = ["--sparsity", "0.3", "--round-to", "8", "--nsamples", "4", "--seqlen", "32", "--calib", "{text}",
          "--seed", "1"]
COMMANDS: dict[str, list[str]] = {
    **_prune_cases(),
    "finetune-lora": ["finetune", "tiny-bert", "--task", "{task}", *TUNE, "--lora-rank", "4", "--lr", "0.01",
                      "--no-retention"],
    "finetune-full-kd": ["finetune", "tiny-bert", "--task", "{task}", *TUNE, "--full", "--kd-alpha", "0.3",
                         "--lr", "0.001", "--retention", "--retention-windows", "2"],
    "finetune-causal": ["finetune", "tiny-llama", "--task", "{text}", "--task-type", "causal-lm", *TUNE,
                        "--lora-rank", "4", "--no-retention"],
    "payt-l1-global": ["payt", "tiny-bert", "--task", "{task}", *TUNE, "--epochs", "2", "--every-steps", "1",
                       "--start", "0", "--mix", "0.25", "--mix-source", "{text}", "--lr", "0.01", "--no-retention"],
    "payt-l2-cols-linear": ["payt", "tiny-bert", "--task", "{task}", *TUNE, "--epochs", "2", "--every-steps", "1",
                            "--start", "0", "--criterion", "l2-cols", "--schedule", "linear", "--no-use-rs-lora",
                            "--no-retention"],
    "payt-magnitude-nokd": ["payt", "tiny-bert", "--task", "{task}", *TUNE, "--epochs", "2", "--every-steps", "2",
                        "--criterion", "magnitude", "--no-kd", "--sparsity", "0.4", "--no-retention"],
    "losparse": ["losparse", "tiny-bert", "--task", "{task}", *TUNE, "--epochs", "2", "--warmup-steps", "1",
                 "--initial-warmup", "1", "--final-warmup", "1", "--delta-t", "1", "--keep", "0.3"],
    "losparse-structured": ["losparse", "tiny-bert", "--task", "{task}", *TUNE, "--structured-method", "mean",
                            "--structured-direction", "row", "--warmup-steps", "1", "--delta-t", "1",
                            "--epochs", "2", "--final-warmup", "1"],
    **{f"shrink-{m}": ["shrink", "tiny-llama", "--method", m, *SHRINK] for m in ("l1", "l2", "wanda", "flap")},
    "shrink-vib": ["shrink", "tiny-llama", "--method", "vib", "--vib-steps", "2", "--vib-batch", "2",
                   "--structures", "heads,neurons", *SHRINK],
    "shrink-vib-hidden-lm": ["shrink", "tiny-llama", "--method", "vib", "--vib-steps", "2", "--vib-loss", "lm",
                             "--structures", "neurons,hidden", *SHRINK],
    "compose": ["compose", "tiny-bert", "--task", "{task}", "--attention", "0.25", "0.5", "--linear", "0.3", "0.5",
                "--n-samples", "12", "--eval-samples", "4", "--steps", "2", "--max-length", "24", "--linear-steps",
                "2", "--attention-steps", "2", "--module-texts", "4", "--test-samples", "8"],
    "compose-grid-wanda-lora": ["compose", "tiny-bert", "--task", "{task}", "--attention", "0.5", "--linear", "0.5",
                                "--grid", "--linear-criterion", "wanda", "--attention-criterion", "l2", "--lora",
                                "--no-baseline", "--n-samples", "12", "--eval-samples", "4", "--steps", "2",
                                "--max-length", "24", "--linear-steps", "2", "--attention-steps", "2",
                                "--module-texts", "4", "--test-samples", "8"],
}
for _name, _argv in list(COMMANDS.items()):
    if _argv[0] == "prune":
        COMMANDS[_name] = [a for x in _argv for a in (CALIB if x == "{calib}" else [x])]
LM_DATA = ["--set", "data.calib={text}", "--set", "data.calib_split=valid", "--set", "data.train={text}",
           "--set", "data.ppl=[{text}]"]
PRESETS: dict[str, list[str]] = {
    "quickstart": [*SET_TINY_LM, *LM_DATA],
    "wanda-lora": [*SET_TINY_LM, *LM_DATA],
    "sparsegpt-2of4": [*SET_TINY_LM, *LM_DATA],
    "structured": [*SET_TINY_LM, *LM_DATA, "--set", "structured.nsamples=4", "--set", "structured.seqlen=32",
                   "--set", "structured.vib_steps=2", "--set", "structured.round_to=8"],
    "order-study": [*SET_TINY_LM, *LM_DATA, "--set", "order.steps=2"],
    "payt": [*SET_TINY_CLS, "--set", "data.train={task}", "--set", "tune.mix.source={text}",
             "--set", "payt.nsamples=4", "--set", "payt.seqlen=32"],
    "payt-paper": [*SET_TINY_CLS, "--set", "data.train={task}", "--set", "tune.mix.source={text}",
                   "--set", "tune.lora_rank=4", "--set", "tune.lora_alpha=4"],
    "losparse": [*SET_TINY_CLS, "--set", "data.train={task}", "--set", "losparse.warmup_steps=1",
                 "--set", "losparse.deltaT=1", "--set", "tune.epochs=2", "--set", "losparse.final_warmup=1"],
    "composable": [*SET_TINY_CLS, "--set", "data.train={task}", "--set", "tune.steps=2",
                   "--set", "compose.linear_steps=2", "--set", "compose.attention_steps=2",
                   "--set", "compose.module_texts=4", "--set", "compose.module_batch=2"],
}
PRINT_RECIPES: dict[str, list[str]] = {
    "prune": ["prune", "tiny-llama", "--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "8"],
    "prune-eval": ["prune", "tiny-llama", "--eval-ppl", "wikitext2", "--max-windows", "3"],
    "shrink": ["shrink", "tiny-llama", "--method", "flap", "--sparsity", "0.2"],
    "shrink-vib": ["shrink", "tiny-llama", "--vib-lr", "0.1", "--structures", "heads,hidden", "--eval-ppl"],
    "finetune": ["finetune", "tiny-bert", "--lora-rank", "4", "--kd-alpha", "0.2", "--mix", "0.1"],
    "payt": ["payt", "tiny-bert", "--sparsity", "0.6", "--criterion", "wanda", "--every-steps", "3"],
    "payt-paper": ["payt", "tiny-bert", "--paper-defaults"],
    "payt-full-evaluate": ["payt", "tiny-bert", "--full-evaluate", "--full-lr", "0.0002"],
    "losparse": ["losparse", "tiny-bert", "--keep", "0.1", "--distill-from", "x", "--kd-weight", "0.5"],
    "compose": ["compose", "tiny-bert", "--attention", "0.1", "0.2", "--linear", "0.3", "0.4", "--steps", "5"],
}


# -------------------------------------------------------------------------------------------- digests
def _machine() -> str:
    """The CPU's vendor is part of the key: an Intel and an AMD core with the same AVX512 capability round some
    kernels differently (CI ran on both; 23 cases' bytes differed), so the exact check only holds on the vendor
    that wrote the fixture and the tolerant one applies on the other."""
    import platform

    import torch

    vendor = platform.processor() or "unknown"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        vendor = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.M).group(1)
    except (OSError, AttributeError):
        pass
    return f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, {vendor}"


def _file_digest(tensors: dict) -> dict:
    """Per tensor "sha256-prefix nonzeros" (exact), and the file's totals (compared with a tolerance elsewhere)."""
    import torch

    per, nonzero, total, sumsq, shapes = {}, 0, 0.0, 0.0, []
    for k, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        raw = t.to(torch.uint8) if t.dtype == torch.bool else t.view(torch.uint8)
        nz = int((t != 0).sum())
        per[k] = f"{hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:12]} {nz}"
        f = t.double()
        nonzero, total, sumsq = nonzero + nz, total + float(f.sum()), sumsq + float((f * f).sum())
        shapes.append(f"{k}:{'x'.join(map(str, t.shape))}:{str(t.dtype).removeprefix('torch.')}")
    return {"tensors": per, "shapes": hashlib.sha256("|".join(shapes).encode()).hexdigest()[:12],
            "nonzero": float(nonzero), "sum": total, "sumsq": sumsq}


def _normalise(value, tmp: str):
    """Numbers and strings of a metrics tree, without the machine-dependent keys; the tmp dir becomes <tmp>."""
    if isinstance(value, dict):
        return {k: _normalise(v, tmp) for k, v in sorted(value.items()) if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [_normalise(v, tmp) for v in value]
    if isinstance(value, str):
        return value.replace(tmp, "<tmp>")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _run_digest(out: Path, tmp: str) -> dict:
    from safetensors.torch import load_file

    files = {}
    for f in sorted(out.rglob("*.safetensors")):
        rel = f.relative_to(out)
        if "model" not in rel.parts[:-1] or "checkpoint" in str(rel) or "cache" in str(rel):
            continue
        files[str(rel)] = _file_digest(load_file(str(f)))
    man = json.loads((out / "manifest.json").read_text())
    return {"metrics": _normalise(man.get("metrics", {}), tmp), "files": files}


def _base(tmp_path: Path) -> str:
    """pytest's base temp dir of this session (`.../pytest-N`: the data files and the run dirs are under it)."""
    return str(tmp_path.parent)


def _fill(argv: list[str], paths: dict[str, str]) -> list[str]:
    return [a.format(**paths) if "{" in a else a for a in argv]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, wikitext_dir) -> dict[str, str]:
    d = tmp_path_factory.mktemp("digest-data")
    text = d / "text.txt"
    text.write_text((wikitext_dir / "valid.txt").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    labels = [("sport", "music", "money")[i % 3] for i in range(60)]
    task = labelled_csv(d / "task.csv", labels, seed=2)
    return {"text": str(text), "task": str(task)}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The fixture's digests; with PRUNETUNE_UPDATE_DIGESTS=1 the cases fill a new one, written at the end."""
    old = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {"machine": None, "cases": {}}
    new = {"machine": _machine(), "cases": {}}
    yield old, new
    if UPDATE:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        cases = dict(sorted({**old["cases"], **new["cases"]}.items()))
        if set(new["cases"]) >= set(old["cases"]):  # every case recorded here: the fixture is this machine's
            machine, per_case = new["machine"], {}
        else:  # some cases re-recorded: they name this machine, the rest keep the fixture's
            machine, per_case = old["machine"] or new["machine"], dict(old.get("case_machines", {}))
            for name in new["cases"]:
                per_case.pop(name, None)
                if new["machine"] != machine:
                    per_case[name] = new["machine"]
        lines = ",\n".join(f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in cases.items())
        FIXTURE.write_text(f'{{"machine": {json.dumps(machine)}, "case_machines": '
                           f'{json.dumps(dict(sorted(per_case.items())))}, "cases": {{\n{lines}\n}}}}\n')


def _close(a, b, where: str) -> list[str]:
    """Differences between two digests, tolerant (another machine) of float rounding."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys differ: {sorted(set(a) ^ set(b))}"]
        return [d for k in a if k != "tensors" for d in _close(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{where}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=2e-2,
                                                                                          abs_tol=1e-3)
        return [] if ok else [f"{where}: {a} != {b}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _check(name: str, got, recorded) -> None:
    got = json.loads(json.dumps(got))  # tuples -> lists, keys -> str: as the fixture reads back
    old, new = recorded
    new["cases"][name] = got
    if UPDATE:
        return
    assert name in old["cases"], f"{name} has no recorded digest: run with PRUNETUNE_UPDATE_DIGESTS=1"
    want = old["cases"][name]
    if old.get("case_machines", {}).get(name, old["machine"]) == _machine():
        if got != want:  # exact: report the numbers that moved, then the tensors whose bytes changed
            diffs = _close(got, want, name)
            if isinstance(got, dict):
                for f, d in got.get("files", {}).items():
                    old_t = want.get("files", {}).get(f, {}).get("tensors", {})
                    diffs += [f"{f}:{k}: {v} != {old_t.get(k)}" for k, v in d["tensors"].items() if old_t.get(k) != v]
            pytest.fail("behaviour changed (exact digest):\n" + "\n".join((diffs or [repr(got)])[:30]))
    else:
        diffs = _close(got, want, name)
        assert not diffs, "behaviour changed:\n" + "\n".join(diffs[:30])


# -------------------------------------------------------------------------------------------- the tests
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_digest(name, paths, recorded, tmp_path, capfd):
    out = tmp_path / "run"
    cli_ok([*_fill(COMMANDS[name], paths), "--out", str(out)], capfd)
    _check(f"command/{name}", _run_digest(out, _base(tmp_path)), recorded)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_digest(name, paths, recorded, tmp_path, capfd):
    out = tmp_path / "run"
    cli_ok(["run", name, *_fill(PRESETS[name], paths), "--out", str(out)], capfd)
    _check(f"preset/{name}", _run_digest(out, _base(tmp_path)), recorded)


@pytest.mark.parametrize("name", sorted(PRINT_RECIPES))
def test_print_recipe_digest(name, recorded, capfd):
    text = cli_ok([*PRINT_RECIPES[name], "--print-recipe"], capfd)
    _check(f"recipe/{name}", yaml.safe_load(text), recorded)


@pytest.mark.parametrize("name", ["quickstart", "payt", "order-study"])
def test_preset_recipe_digest(name, recorded):
    from prunetune.config import load_recipe, recipe_to_dict

    _check(f"preset-recipe/{name}", recipe_to_dict(load_recipe(name)), recorded)
