"""Heavy optional dependencies live in extras; a feature that needs a missing one says which extra to install."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from prunetune.errors import PrunetuneError, optional_import

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
HEAVY = {"lm-eval": "lm-eval", "sacrebleu": "seq2seq", "datasets": "hub", "tensorboard": "tensorboard"}


def _names(reqs: list[str]) -> set[str]:
    return {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for r in reqs}


def test_heavy_packages_are_extras_and_the_test_install_gets_them_all():
    core = _names(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    for package, extra in HEAVY.items():
        assert package not in core, f"{package} is a core dependency"
        assert package in _names(extras[extra]), f"{package} missing from extra {extra}"
    # README step 1 installs `.[test]`: it must pull every extra, or tests of those features could not run
    assert "prunetune[all]" in extras["test"]
    assert set(extras["all"][0].split("[")[1].rstrip("]").split(",")) == set(HEAVY.values())


@pytest.mark.parametrize("call, extra", [
    (lambda: __import__("prunetune.evaluation.task", fromlist=["bleu"]).bleu(["a b"], ["a b"]), "seq2seq"),
    (lambda: __import__("prunetune.data.sources", fromlist=["_hf_load"])._hf_load("x/y"), "hub"),
])
def test_missing_extra_is_one_line_naming_it(monkeypatch, call, extra):
    for mod in ("sacrebleu", "datasets"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes `import mod` raise ImportError
    with pytest.raises(PrunetuneError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg and f"pip install 'prunetune[{extra}]'" in msg


def test_unknown_task_without_datasets_says_both_things(monkeypatch):
    from prunetune.data.sources import load_labelled

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(PrunetuneError) as err:
        load_labelled("no-such-task")
    assert "not a known task" in str(err.value) and "prunetune[hub]" in str(err.value)


def test_optional_import_returns_the_module():
    assert optional_import("json", "none", "x").dumps([1]) == "[1]"
