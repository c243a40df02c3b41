"""CONTRIBUTING.md's worked examples run: a criterion, a method added from tests/ only, a model family."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cli_helpers import cli_ok

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str) -> str:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    m = re.search(rf"<!-- example:{name} -->\n```python\n(.*?)```", text, re.S)
    assert m, f"CONTRIBUTING.md has no example '{name}'"
    return m.group(1)


def test_criterion_example(monkeypatch):
    from prunetune.pruning.criteria import registry

    monkeypatch.setattr(registry, "CRITERIA", dict(registry.CRITERIA))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    exec(compile(_example("criterion"), "CONTRIBUTING.md:criterion", "exec"), {})
    from prunetune.config import PruneSpec

    assert PruneSpec(method="squared").method == "squared"  # recipes and `prune --method` accept it


def test_family_example(monkeypatch):
    from prunetune.models import arch

    monkeypatch.setattr(arch, "ADAPTERS", list(arch.ADAPTERS))
    exec(compile(_example("family"), "CONTRIBUTING.md:family", "exec"), {})


def test_method_example_is_the_toy_module():
    assert _example("method") == (ROOT / "tests" / "toy_method.py").read_text()


def test_a_toy_method_from_tests_runs_through_cli_recipe_resume_and_report(tmp_path, capsys, wikitext_dir):
    """Adding a method is one new file plus one registration line: no file of src/prunetune is edited, and it
    runs as a command, in a recipe with other stages, resumes, and shows in the report."""
    import toy_method  # noqa: F401  registers the stage kind and the command

    out = tmp_path / "cmd"
    cli_ok(["toy", "tiny-llama", "--out", str(out)], capsys)
    man = json.loads((out / "manifest.json").read_text())
    assert man["stages"] == ["01-toy", "02-export"]
    sparsity = man["metrics"]["01-toy"]["sparsity"]["value"]
    assert sparsity == pytest.approx(0.25, abs=0.02)
    assert man["metrics"]["02-export"]["sparsity"]["value"] == sparsity
    assert "01-toy" in (out / "report.md").read_text()
    again = cli_ok(["toy", "tiny-llama", "--out", str(out), "--resume"], capsys)
    assert again.count("complete, skipped") == 2

    text = tmp_path / "text.txt"
    text.write_text((wikitext_dir / "valid.txt").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    recipe = {"name": "toy-recipe", "seed": 1, "model": {"name": "tiny-llama"},
              "data": {"train": str(text), "ppl": [str(text)]}, "eval": {"ppl_seqlen": 32, "max_windows": 2},
              "tune": {"steps": 1, "batch_size": 2, "seqlen": 32, "eval_samples": 2},
              "stages": ["evaluate", "toy", "finetune", "evaluate", "export"]}
    f = tmp_path / "toy.yaml"
    f.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    cli_ok(["run", str(f), "--out", str(run)], capsys)
    man = json.loads((run / "manifest.json").read_text())
    m = man["metrics"]
    assert m["02-toy"]["sparsity"]["value"] == pytest.approx(0.25, abs=0.02)
    assert m["04-evaluate"]["sparsity"]["value"] == m["02-toy"]["sparsity"]["value"]  # fine-tuning kept the zeros
    assert m["04-evaluate"]["ppl/text.txt"]["value"] != m["01-evaluate"]["ppl/text.txt"]["value"]
    again = cli_ok(["run", str(f), "--out", str(run), "--resume"], capsys)
    assert again.count("complete, skipped") == 5
    assert json.loads((run / "manifest.json").read_text())["metrics"] == m
    assert "toy" in (run / "report.md").read_text()
