"""The layers of DESIGN.md hold: `lint-imports` passes on the package, fails on an upward import, and no
module imports one that imports it back (cycles are invisible to a layers contract inside one package).

Every import counts, also one inside a function (pyproject.toml's [tool.importlinter] says why). An import
kept inside a function says why (CONTRIBUTING.md); the two reasons that are promises are checked here:
`prunetune --help` loads no torch, and `prunetune prune` no training library.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
pytest.importorskip("importlinter")


def _lint(src: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c",
                                             "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([*cmd, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_layer_contracts_hold():
    r = _lint(SRC)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def _copy_with(tmp_path: Path, module: str, line: str, where: str) -> Path:
    """A copy of the package in which `module` gains `line` at module level or inside a new function."""
    dst = tmp_path / "src"
    shutil.copytree(SRC / "prunetune", dst / "prunetune", ignore=shutil.ignore_patterns("__pycache__"))
    path = dst / (module.replace(".", "/") + ".py")
    text = path.read_text()
    add = f"\n{line}\n" if where == "module" else f"\n\ndef _upward():\n    {line}\n"
    path.write_text(text + add)
    return dst


@pytest.mark.parametrize("where", ["module", "function"])
@pytest.mark.parametrize("module,line,broken", [
    ("prunetune.tuning.lora", "from prunetune.methods import payt", "prunetune.tuning.lora -> prunetune.methods.payt"),
    ("prunetune.pruning.masks", "import prunetune.evaluation.task",
     "prunetune.pruning.masks -> prunetune.evaluation.task"),
    ("prunetune.reporting.plots", "from prunetune.pipelines import stages",
     "prunetune.reporting.plots -> prunetune.pipelines.stages"),
    ("prunetune.pruning.shrink.scores", "from prunetune.pruning.api import prune",  # the cycle issue 27 broke
     "prunetune.pruning.shrink.scores -> prunetune.pruning.api"),
])
def test_upward_import_breaks_the_check(tmp_path, module, line, broken, where):
    r = _lint(_copy_with(tmp_path, module, line, where))
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and broken in r.stdout, r.stdout


def _scc(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_scc_finds_a_planted_cycle():
    assert _scc({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _scc({"a": {"b"}, "b": set()}) == []


#: Import cycles allowed to exist: none. The check stays a ratchet in form, should one ever have to be listed.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def _import_graph() -> dict[str, set[str]]:
    """Module -> modules it imports (any import, also inside functions). A package importing its own
    submodules (a registry's __init__ that loads its entries) is containment, not a dependency, and is left out."""
    import grimp

    sys.path.insert(0, str(SRC))
    try:
        g = grimp.build_graph("prunetune", cache_dir=None)
    finally:
        sys.path.remove(str(SRC))
    return {m: {t for t in g.find_modules_directly_imported_by(m) if not t.startswith(m + ".")} for m in g.modules}


def test_no_import_cycles():
    cycles = {tuple(c) for c in _scc(_import_graph())}
    assert cycles - KNOWN_CYCLES == set(), "new import cycle(s)"
    assert KNOWN_CYCLES - cycles == set(), "a known cycle is gone: remove it from KNOWN_CYCLES"


HEAVY = ("torch", "pydantic", "matplotlib", "transformers", "transformers.trainer", "peft", "datasets", "accelerate")


def _loaded_after(argv: list[str], tmp_path: Path) -> set[str]:
    """The heavy libraries in sys.modules after `prunetune ARGV` ran in a fresh interpreter."""
    code = (f"import json, sys\nsys.argv = ['prunetune', *{argv!r}]\nfrom prunetune.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["finetune", "--help"]])
def test_help_loads_no_torch(tmp_path, argv):
    """cli/ imports what loads torch, pydantic or matplotlib inside the command that uses it (typer itself loads
    pydantic to show one command's options)."""
    assert _loaded_after(argv, tmp_path) - {"pydantic"} == set()


def test_prune_loads_no_training_library(tmp_path):
    """The stages import the fine-tuning code inside the functions that train and the methods' packages defer
    their training side (prunetune.lazy): a prune run never loads transformers' Trainer, peft or datasets."""
    loaded = _loaded_after(["prune", "tiny-llama", "--method", "wanda", "--sparsity", "0.5",
                            "--out", str(tmp_path / "run")], tmp_path)
    assert "torch" in loaded  # it did prune
    assert loaded & {"transformers.trainer", "peft", "datasets"} == set()
