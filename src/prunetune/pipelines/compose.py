"""The `compose` stage: composable pruning through `prunetune.methods.composable`, with its report.

Writes `out_dir/runs/composable.json` (everything measured), `out_dir/report.md` (per configuration the metric
with and without module-level fine-tuning, the compute time of both routes, the fine-tuned model's directory
`runs/<config>/composed/tuned/model`) and `out_dir/curves.json`
(training loss and validation accuracy of every configuration, with and without module-level FT), which the
run report draws as `plots/curves.png` (reporting is not imported here: pipelines and reporting are
independent layers).
"""

from __future__ import annotations

from pathlib import Path

from prunetune.methods.composable import (ATTENTION_UNITS, LINEAR_ROLES, check_linear_criterion, check_units,
                                          parse_configurations)
from prunetune.pipelines.stages import read_curves, tune_run
from prunetune.registry import StageKind, register_stage


def check_compose(spec) -> None:
    """The method's checks of a recipe's `compose` settings (rates pair up, units and criterion exist), run
    before a run directory is made; a mistake is one PrunetuneError line."""
    parse_configurations(spec.attention, spec.linear, spec.n, spec.grid)
    check_units(spec.attention_units, "attention_units", tuple(ATTENTION_UNITS))
    check_units(spec.linear_units, "linear_units", LINEAR_ROLES)
    check_linear_criterion(spec.linear_criterion)


def run_compose(state, out_dir: Path) -> dict:
    # the training code (run_composable: transformers' Trainer, peft, datasets, ~120 MiB) loads when this stage
    # runs, not when the registry imports this module for a run without it (`prunetune prune`'s pruning peak)
    from prunetune.methods.composable import run_composable

    recipe, spec = state.recipe, state.spec
    if state.model_dir is not None:
        model = str(state.model_dir)
    else:
        model = recipe.model.name
    run = tune_run(recipe, state.seed + state.index, task="seq-cls")
    configs = parse_configurations(spec.attention, spec.linear, spec.n, spec.grid)
    res = run_composable(model, out_dir / "runs", configs, recipe.tune, data=run["data"], task=run["task"],
                         seed=run["seed"], spec=spec, module_seed=state.seed)
    write_report(res, out_dir)
    metrics: dict = {}
    for row in res["rows"]:
        name = row["config"]["name"]
        for arm in ("composed", "baseline"):
            if arm in row and row[arm].get("accuracy") is not None:
                metrics[f"{name}/{arm}_accuracy"] = {"value": row[arm]["accuracy"], "protocol": row[arm]["test"]
                                                     and row[arm]["test"].get("protocol")}
    for k, v in res["compute_s"].items():
        if v is not None:
            metrics[f"compute_s/{k}"] = {"value": v, "protocol": {"what": "wall seconds: module-level FT (once) "
                                                                   "+ composing + model-level optimizer steps"}}
    models = {row["config"]["name"]: f"runs/{row['composed']['model']}" for row in res["rows"]
              if row["composed"].get("model")}
    return {"metrics": metrics, "artifacts": {"report": "report.md", "curves": "curves.json",
                                              "results": "runs/composable.json", "models": models}}


register_stage(StageKind("compose", f"{__name__}:run_compose", "compose", ranks="single",
                         check=f"{__name__}:check_compose", reads=("data.train:labelled",)))


def write_report(res: dict, out_dir: Path) -> Path:
    """report.md and curves.json from `run_composable`'s result."""
    import json

    lines = ["# Composable pruning", "",
             f"{len(res['rows'])} configurations, {res['plan']['unique_units']} unique pruned modules "
             f"({res['plan']['units_without_dedup']} without deduplication); module-level fine-tuning took "
             f"{res['modules']['wall_s']:.1f} s ({res['modules']['trained']} trained, "
             f"{res['modules']['from_cache']} from the cache).", "",
             "| configuration | sparsity | start val acc (module FT / none) | test acc with module FT | "
             "test acc without | model-FT seconds (with / without) | fine-tuned model |",
             "|---|---|---|---|---|---|---|"]
    series: dict[str, list[list[float]]] = {}
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for row in res["rows"]:
        name = row["config"]["name"]
        c, b = row["composed"], row.get("baseline")
        lines.append(f"| {name} | {fmt(c['sparsity'])} | {fmt(c['start_val_accuracy'])} / "
                     f"{fmt(b['start_val_accuracy']) if b else '-'} | {fmt(c['accuracy'])} | "
                     f"{fmt(b['accuracy']) if b else '-'} | {c['step_s']:.1f} / {b['step_s'] if b else float('nan'):.1f} | "
                     + (f"`runs/{c['model']}` |" if c.get("model") else "- |"))
        for arm, r in (("module FT", c), ("no module FT", b)):
            if not r:
                continue
            series[f"{name} {arm} loss"] = read_curves(Path(r["log"])).get("loss", [])
            series[f"{name} {arm} val accuracy"] = [[p["step"], p["accuracy"]] for p in r["points"]
                                                    if p["accuracy"] is not None]
    cs = res["compute_s"]
    lines += ["", f"Total compute: with composability {cs['with_composability']:.1f} s (module-level FT "
              f"{cs['module_ft']:.1f} s, once), without "
              + (f"{cs['without_composability']:.1f} s." if cs["without_composability"] is not None else "not run."),
              "", "Each configuration's fine-tuned model (with module-level FT; the test accuracy above is its "
              "score) is a plain Hugging Face directory at the path given, relative to this stage's directory: "
              "safetensors with the pruned weights at exact zeros, `masks.safetensors` and a model card beside. "
              "`start/` beside `tuned/` holds the composed weights before model-level fine-tuning.",
              "", "Loss and validation-accuracy curves: `plots/curves.png` of the run report "
              "(from this stage's curves.json).", ""]
    (out_dir / "curves.json").write_text(json.dumps(series, indent=2))
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
