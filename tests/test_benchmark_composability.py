"""benchmarks/composability.py's multi-seed summary and tables, from JSON only (no model, no torch)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("_bench_composability", ROOT / "benchmarks" / "composability.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _seeded(one: dict) -> dict:
    """Two seeds made from a committed one-seed result: seed 1 is seed 0 with other clocks and test accuracies."""
    s0 = copy.deepcopy(one)
    s1 = copy.deepcopy(one)
    s1["totals"].update(baseline_s=900.0, composability_s=300.0, module_ft_s=100.0, ratio=3.0)
    for i, r in enumerate(s1["rows"]):
        r["composed_test"] = r["baseline_test"] + 0.01 * (i - 1)
        r["composed_reached_at_step"], r["holds"] = (None, False) if i == 0 else (r["composed_reached_at_step"], True)
    for s, d in (("0", s0), ("1", s1)):
        d["seed"] = int(s)
        d["original"].update(shared_across_seeds=True, trained_at_seed=0)
    bench = _bench()
    per_seed = {"0": s0, "1": s1}
    return {"benchmark": "composability-seeds", "model": one["model"], "data": one["data"],
            "machine": {**one["machine"], "loadavg_start": [1.0, 1.0, 1.0]}, "settings": one["settings"],
            "seeds_requested": [0, 1, 2], "seeds_done": [0, 1], "original_note": "shared original",
            "per_seed": per_seed, "summary": bench.summarize(per_seed), "wall_s": 1.0}


def test_summary_pairs_the_seeds_and_configurations():
    one = json.loads((ROOT / "benchmarks/results/composability.json").read_text())
    sm = _seeded(one)["summary"]
    r0 = one["totals"]["ratio"]
    assert sm["seeds"] == [0, 1]
    assert sm["ratio_mean"] == pytest.approx((r0 + 3.0) / 2)
    assert sm["ratio_of_sums"] == pytest.approx((one["totals"]["baseline_s"] + 900)
                                                / (one["totals"]["composability_s"] + 300))
    assert sm["seeds_at_2x"] == 1 and sm["all_reached"] is False
    diffs = [r["composed_test"] - r["baseline_test"] for r in one["rows"]] + [0.01 * (i - 1) for i in range(4)]
    pd = sm["paired_test_diff"]
    assert pd["n"] == 8 and pd["test_n"] == 223
    assert pd["mean"] == pytest.approx(sum(diffs) / 8)
    assert pd["ci95"][0] < pd["mean"] < pd["ci95"][1]
    c = sm["configs"]["a0.25_l0.3"]
    assert [x["seed"] for x in c["seeds"]] == [0, 1] and c["reached"] == 1
    assert c["diff_mean"] == pytest.approx((one["rows"][0]["composed_test"] - one["rows"][0]["baseline_test"]
                                            - 0.01) / 2)


def test_render_of_a_seeded_result_and_of_a_one_seed_result():
    bench = _bench()
    one = json.loads((ROOT / "benchmarks/results/composability.json").read_text())
    text = bench.render(_seeded(one))
    assert "| 0 | 474 s | 408 s | 139 s | **1.16×** | 4 / 4 |" in text
    assert "| 1 | 900 s | 300 s | 100 s | **3.00×** | 3 / 4 |" in text
    assert "(of 0, 1, 2 requested)" in text and "≥ 2× in 1 of 2 seeds" in text
    assert "| 0.25 / 0.3 | 28.7% | 95.1% / 95.1% | 95.1% / 94.1% |" in text
    assert "reached its target: no" in text
    # the one-seed JSON still renders its own table
    assert "Total wall time: baseline 474 s" in bench.render(one)


def test_plot_of_a_seeded_result(tmp_path):
    pytest.importorskip("matplotlib")
    one = json.loads((ROOT / "benchmarks/results/composability.json").read_text())
    path = _bench().plot(_seeded(one), tmp_path / "p.png")
    assert Path(path).stat().st_size > 1000
