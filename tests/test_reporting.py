"""Reports and plots: drawn from run directories, numbers copied exactly, PNGs that are real images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from prunetune.reporting import plots
from prunetune.reporting.report import compare_runs, eval_points, write_run_report

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5_000


def _fake_run(root: Path, name: str, sparsity: float, ppl: tuple[float, float]) -> Path:
    """A finished run directory as `prunetune run` writes it (two evaluations around a prune)."""
    run = root / name
    st = run / "stages"
    layers = {f"model.layers.{i}.mlp.{r}": {"role": r, "sparsity": sparsity} for i in range(3) for r in ("up", "down")}
    hist = {"dense": {}, "pruned": {}, "label_before": "before pruning", "label_after": "after pruning"}
    edges = [i / 10 for i in range(11)]
    for n in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"):
        hist["dense"][n] = {"edges": edges, "counts": [100 - 5 * i for i in range(10)], "zeros": 0, "numel": 775}
        hist["pruned"][n] = {"edges": edges, "counts": [0] * 4 + [100 - 5 * i for i in range(4, 10)],
                             "zeros": 430, "numel": 775}
    stages = [
        ("01-evaluate", "evaluate", {"sparsity": {"value": 0.0, "protocol": {}},
                                     "ppl/wikitext2": {"value": ppl[0], "protocol": {"seqlen": 512, "windows": 16}}}),
        ("02-prune", "prune", {"sparsity": {"value": sparsity, "protocol": {}}}),
        ("03-evaluate", "evaluate", {"sparsity": {"value": sparsity, "protocol": {}},
                                     "ppl/wikitext2": {"value": ppl[1], "protocol": {"seqlen": 512, "windows": 16}}}),
    ]
    for i, (sname, typ, metrics) in enumerate(stages):
        d = st / sname
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"stage": sname, "type": typ, "index": i, "seconds": 1.5,
                                                     "metrics": metrics, "artifacts": {}}))
        (d / "layer_sparsity.json").write_text(json.dumps(
            {k: {**v, "sparsity": metrics["sparsity"]["value"]} for k, v in layers.items()}))
    (st / "02-prune" / "histograms.json").write_text(json.dumps(hist))
    (st / "02-prune" / "curves.json").write_text(json.dumps({"loss": [[1, 3.0], [2, 2.5], [3, 2.2]]}))
    (run / "recipe.yaml").write_text(f"name: {name}\nmodel: {{name: tiny-llama, task: causal-lm}}\nstages: [evaluate]\n")
    (run / "manifest.json").write_text(json.dumps({
        "status": "complete", "seed": 0, "metrics": {s: m for s, _, m in stages}, "versions": {"torch": "x"}}))
    return run


def test_run_report_copies_numbers_and_draws_pngs(tmp_path):
    run = _fake_run(tmp_path, "a", 0.5, (21.123456, 35.654321))
    path = write_run_report(run)
    text = path.read_text()
    assert "| 01-evaluate | 0.00% | 21.12 |" in text and "| 03-evaluate | 50.00% | 35.65 |" in text
    pngs = re.findall(r"\]\((plots/[^)]+\.png)\)", text)
    assert {"plots/metric_vs_sparsity_ppl_wikitext2.png", "plots/layer_sparsity.png", "plots/weights_02-prune.png",
            "plots/curves.png"} <= set(pngs)
    assert all(_is_png(run / p) for p in pngs)
    assert "seqlen=512; windows=16" in text  # the protocol sits next to the numbers


def test_compare_table_and_plots(tmp_path):
    a = _fake_run(tmp_path, "a", 0.5, (21.0, 35.0))
    b = _fake_run(tmp_path, "b", 0.7, (21.0, 80.0))
    path = compare_runs([a, b], tmp_path / "cmp")
    text = path.read_text()
    assert "| a | a | tiny-llama | 03-evaluate | 50.00% | 35 |" in text
    assert "| b | b | tiny-llama | 03-evaluate | 70.00% | 80 |" in text
    pngs = re.findall(r"\]\((plots/[^)]+\.png)\)", text)
    assert len(pngs) >= 6 and all(_is_png(tmp_path / "cmp" / p) for p in pngs)
    assert [p["sparsity"] for p in eval_points({"stages": [json.loads((b / "stages" / s / "manifest.json").read_text())
                                                          for s in ("01-evaluate", "03-evaluate")]})] == [0.0, 0.7]


def test_compare_rejects_non_run(tmp_path):
    from prunetune.errors import PrunetuneError

    with pytest.raises(PrunetuneError, match="not a prunetune run directory"):
        compare_runs([tmp_path], tmp_path / "out")


def test_plot_functions_write_pngs(tmp_path):
    p1 = plots.metric_vs_sparsity({"x": [(0.0, 10.0, "dense"), (0.5, 20.0, "pruned")], "y": [(0.3, 15.0, "")]},
                                  "ppl", tmp_path / "m.png", log_y=True)
    p2 = plots.curves({"loss": [[1, 2.0], [2, 1.5]], "eval_accuracy": [[2, 0.8]]}, tmp_path / "c.png")
    assert _is_png(p1) and _is_png(p2)


def test_weight_histograms_of_a_real_prune(tiny_llama):
    """The histogram data the prune stage stores: zeros counted apart, non-zeros binned, totals add up."""
    from prunetune.pipelines.stages import chosen_layers, weight_histograms
    from prunetune.pruning.api import prune

    model = tiny_llama.model
    names = chosen_layers(model)
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    dense = weight_histograms(model, names)
    prune(model, "magnitude", 0.5)
    pruned = weight_histograms(model, names, {n: h["edges"] for n, h in dense.items()})
    for n in names:
        d, p = dense[n], pruned[n]
        assert d["zeros"] == 0 and sum(d["counts"]) == d["numel"]
        assert p["zeros"] == d["numel"] // 2 and sum(p["counts"]) + p["zeros"] == p["numel"]
        # magnitude pruning removes the smallest: the lowest bins empty out, the top bin is untouched
        assert p["counts"][0] == 0 and p["counts"][-1] == d["counts"][-1]


def test_cli_compare_and_recipes(tmp_path, capsys):
    from prunetune.cli import main

    a = _fake_run(tmp_path, "a", 0.5, (21.0, 35.0))
    main(["compare", str(a), "--out", str(tmp_path / "c")])
    assert "| a | a | tiny-llama | 03-evaluate | 50.00% | 35 |" in (tmp_path / "c" / "report.md").read_text()
    main(["recipes"])
    out = capsys.readouterr().out
    assert all(n in out for n in ("quickstart", "payt", "wanda-lora", "sparsegpt-2of4", "order-study"))
