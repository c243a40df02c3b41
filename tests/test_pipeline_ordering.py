"""The ordering study on tiny-llama: the path of sparsity per ordering, evaluation after every step."""

from __future__ import annotations

import json

import pytest
import yaml

from prunetune.config import load_recipe
from prunetune.pipelines.runner import run_recipe


def test_orderings_reach_target_with_eval_after_every_step(tmp_path, wikitext_dir):
    text = tmp_path / "text.txt"
    text.write_text((wikitext_dir / "test.txt").read_text()[:40_000])
    recipe = {
        "name": "tiny-order", "model": {"name": "tiny-llama"},
        "data": {"calib": str(text), "train": str(text), "ppl": [str(text)]},
        "prune": {"method": "wanda", "nsamples": 2, "seqlen": 32},
        "tune": {"batch_size": 2, "seqlen": 32, "eval_samples": 1, "lr": 0.01, "lora_rank": 4},
        "eval": {"ppl_seqlen": 32, "max_windows": 2},
        "order": {"target": 0.5, "rounds": 2, "steps": 2},
        "stages": [{"type": "order_study", "name": "fp", "orderings": ["iter_fp"]},
                   {"type": "order_study", "name": "pf", "orderings": ["prune_ft"]}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    man = run_recipe(load_recipe(str(path)), out, log=lambda *_: None)
    rows = json.loads((out / "stages" / "01-fp" / "ordering.json").read_text())
    rows += json.loads((out / "stages" / "02-pf" / "ordering.json").read_text())
    path_of = {}
    for r in rows:
        path_of.setdefault(r["ordering"], []).append((r["action"], round(r["sparsity"], 6)))
        assert "ppl/text.txt" in r["metrics"]  # evaluated after every step
    assert path_of["prune_ft"] == [("start", 0.0), ("prune to 50%", 0.5), ("fine-tune 2 steps", 0.5)]
    assert path_of["iter_fp"] == [("start", 0.0), ("fine-tune 1 steps", 0.0), ("prune to 25%", 0.25),
                                  ("fine-tune 1 steps", 0.25), ("prune to 50%", 0.5)]
    start = [r for r in rows if r["action"] == "start"]
    assert len({r["metrics"]["ppl/text.txt"]["value"] for r in start}) == 1  # one start, reused by stage 2
    assert man["metrics"]["01-fp"]["iter_fp/sparsity"]["value"] == pytest.approx(0.5)
    assert man["metrics"]["02-pf"]["prune_ft/sparsity"]["value"] == pytest.approx(0.5)
    assert not (out / "stages" / "01-fp" / "work").exists()  # intermediate models removed
    from prunetune.reporting.report import write_run_report

    report = write_run_report(out).read_text()
    assert "## Ordering study" in report and "plots/ordering_ppl_text_txt.png" in report
    assert (out / "plots" / "ordering_ppl_text_txt.png").stat().st_size > 5000
