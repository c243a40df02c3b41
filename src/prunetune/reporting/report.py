"""report.md for one run and for a comparison of runs, drawn only from what run directories store.

Numbers are never recomputed here: the tables show the metrics the stages recorded, each metric family
followed by the protocol that produced it, so a report can be regenerated from a finished run at any time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prunetune.errors import PrunetuneError
from prunetune.rundir import atomic_write_text, load_run, remove_partials
from prunetune.reporting import plots

EVAL_PREFIXES = ("ppl/", "task/", "harness/")


# --------------------------------------------------------------------------------------------- data
def eval_points(run: dict) -> list[dict]:
    """Every stage that measured a quality metric: {stage, sparsity, metrics{name: value}}."""
    pts = []
    for st in run["stages"]:
        m = st.get("metrics", {})
        vals = {k: v["value"] for k, v in m.items() if k.startswith(EVAL_PREFIXES) and isinstance(v, dict)
                and isinstance(v.get("value"), (int, float))}
        if vals:
            sp = m.get("sparsity", {}).get("value", 0.0)
            pts.append({"stage": st["stage"], "sparsity": sp, "metrics": vals})
    return pts


def protocols(run: dict) -> dict[str, object]:
    """First recorded protocol of every metric family (ppl/wikitext2, task/accuracy, ...)."""
    out: dict[str, object] = {}
    for st in run["stages"]:
        for k, v in st.get("metrics", {}).items():
            if isinstance(v, dict) and "protocol" in v and k not in out:
                out[k] = v["protocol"]
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.1f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _metric_names(points: list[dict]) -> list[str]:
    names: list[str] = []
    for p in points:
        names += [k for k in p["metrics"] if k not in names]
    return names


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _ordering_rows(run: dict) -> list[dict]:
    rows = []
    for st in run["stages"]:
        if st["type"] == "order_study":
            rows += _load_json(Path(st["dir"]) / "ordering.json") or []
    return rows


# --------------------------------------------------------------------------------------------- run report
def write_run_report(run_dir: Path | str) -> Path:
    """`run_dir/report.md` and `run_dir/plots/*.png` for one run."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    man, recipe = run["manifest"], run["recipe"]
    plot_dir = run_dir / "plots"
    if plot_dir.is_dir():
        remove_partials(plot_dir)  # temp files of plots a killed report left (the report redraws them all)
    lines = [f"# prunetune run: {recipe.get('name', run['name'])}", ""]
    if recipe.get("description"):
        lines += [recipe["description"].strip(), ""]
    total = sum(s["seconds"] for s in run["stages"])
    lines += [
        f"- model: `{recipe.get('model', {}).get('name')}` ({recipe.get('model', {}).get('task')})",
        f"- status: **{man.get('status')}**, {len(run['stages'])}/{len(recipe.get('stages', []))} stages, "
        f"stage time {total / 60:.1f} min",
        f"- created: {man.get('created')}, machine: {man.get('platform')}, {man.get('device')}, "
        f"{man.get('threads')} threads",
        f"- seed {man.get('seed')}, git `{man.get('git_rev')}`, versions: "
        + ", ".join(f"{k} {v}" for k, v in (man.get("versions") or {}).items() if v),
        "",
    ]
    if recipe.get("notes"):
        lines += ["## Sizing", "", recipe["notes"].strip(), ""]

    lines += ["## Stages", "", _table(["stage", "type", "seconds", "summary"], [
        [s["stage"], s["type"], f"{s['seconds']:.1f}", _stage_summary(s)] for s in run["stages"]]), ""]

    pts = eval_points(run)
    if pts:
        names = _metric_names(pts)
        lines += ["## Results", "", _table(["stage", "sparsity"] + names, [
            [p["stage"], f"{p['sparsity']:.2%}"] + [p["metrics"].get(n, "") for n in names] for p in pts]), ""]
        for metric in names:
            series = {metric: [(p["sparsity"], p["metrics"][metric], p["stage"]) for p in pts if metric in p["metrics"]]}
            fname = f"metric_vs_sparsity_{_slug(metric)}.png"
            plots.metric_vs_sparsity(series, metric, plot_dir / fname, log_y=metric.startswith("ppl/"))
            lines += [f"![{metric} vs sparsity](plots/{fname})", ""]

    orows = _ordering_rows(run)
    if orows:
        lines += _ordering_section(orows, plot_dir, "plots")

    lines += _layer_and_hist_section(run["stages"], plot_dir, "plots", prefix="")
    lines += _curves_section({"": run}, plot_dir, "plots")

    exported = [s for s in run["stages"] if s["type"] == "export"]
    if exported:
        lines += ["## Exported model", "", f"`{exported[-1]['artifacts'].get('model')}`: a plain Hugging Face directory "
                  "(safetensors; pruned weights are exact zeros) with `masks.safetensors` beside it.", ""]
    many = [(s, name, rel) for s in run["stages"] for name, rel in (s.get("artifacts", {}).get("models") or {}).items()]
    if many:  # a stage that makes one model per configuration (compose): each is a plain HF directory
        lines += ["## Exported models", "", "Plain Hugging Face directories (safetensors; pruned weights are exact "
                  "zeros) with `masks.safetensors` beside each:", ""]
        lines += [f"- {name}: `{os.path.relpath(s['dir'], run_dir)}/{rel}`" for s, name, rel in many]
        lines.append("")
    lines += ["## Protocols", ""]
    for k, p in protocols(run).items():
        lines.append(f"- **{k}**: {_protocol_text(p)}")
    lines += ["", f"Full metrics and settings: `manifest.json`; recipe: `recipe.yaml`.", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))  # whole or not at all: a kill mid-report leaves no torn file
    return path


def _stage_summary(st: dict) -> str:
    parts = []
    for k, v in st.get("metrics", {}).items():
        if isinstance(v, dict) and isinstance(v.get("value"), (int, float)) and "/" not in k.split("ppl")[0]:
            val = v["value"]
            parts.append(f"{k} {val:.2%}" if k == "sparsity" else f"{k} {val:.4g}")
    return ", ".join(parts[:6])


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")


def _protocol_text(p) -> str:
    if isinstance(p, dict):
        return "; ".join(f"{k}={v}" for k, v in p.items())
    return str(p)


def _layer_and_hist_section(stages: list[dict], plot_dir: Path, rel: str, prefix: str) -> list[str]:
    lines: list[str] = []
    sparse = None
    for st in stages:  # the last stage whose model has zeros shows where they are
        layers = _load_json(Path(st["dir"]) / "layer_sparsity.json")
        if layers and any(v["sparsity"] > 0 for v in layers.values()):
            sparse = (st, layers)
    if sparse:
        st, layers = sparse
        fname = f"{prefix}layer_sparsity.png"
        plots.layer_sparsity_bars(layers, plot_dir / fname, f"{prefix.rstrip('_') or 'run'}: per-layer sparsity "
                                  f"after {st['stage']}")
        lines += ["## Per-layer sparsity", "", f"![per-layer sparsity]({rel}/{fname})", ""]
    for st in stages:
        hist = _load_json(Path(st["dir"]) / "histograms.json")
        if hist:
            fname = f"{prefix}weights_{st['stage']}.png"
            plots.weight_histograms(hist, plot_dir / fname)
            lines += [f"## Weight magnitudes before / after {st['stage']}", "",
                      f"![weight histograms]({rel}/{fname})", ""]
    return lines


def _curves_section(runs: dict[str, dict], plot_dir: Path, rel: str) -> list[str]:
    series: dict[str, list] = {}
    for rname, run in runs.items():
        for st in run["stages"]:
            c = _load_json(Path(st["dir"]) / "curves.json") or {}
            for k, pts in c.items():
                if pts:
                    label = " ".join(x for x in (rname, st["stage"], k) if x)
                    series[label] = pts
            for k, pts in (_load_json(Path(st["dir"]) / "ordering_curves.json") or {}).items():
                series[" ".join(x for x in (rname, k) if x)] = pts
    if not series:
        return []
    plots.curves(series, plot_dir / "curves.png")
    return ["## Training / evaluation curves", "", f"![curves]({rel}/curves.png)", ""]


def _ordering_section(rows: list[dict], plot_dir: Path, rel: str) -> list[str]:
    names: list[str] = []
    for r in rows:
        names += [k for k in r["metrics"] if k.startswith(EVAL_PREFIXES) and k not in names]
    lines = ["## Ordering study", "",
             "Every ordering reaches the same target sparsity with the same total fine-tuning budget; "
             "metrics after every step.", "",
             _table(["ordering", "step", "action", "sparsity"] + names, [
                 [r["ordering"], r["step"], r["action"], f"{r['sparsity']:.2%}"] + [r["metrics"].get(n, {}).get("value", "")
                                                                                   for n in names] for r in rows]), ""]
    final = [r for r in rows if r.get("final")]
    if final:
        lines += ["Final results:", "", _table(["ordering", "sparsity"] + names, [
            [r["ordering"], f"{r['sparsity']:.2%}"] + [r["metrics"].get(n, {}).get("value", "") for n in names]
            for r in final]), ""]
    for metric in names:
        series: dict[str, list] = {}
        for r in rows:
            if metric in r["metrics"]:
                series.setdefault(r["ordering"], []).append((r["sparsity"], r["metrics"][metric]["value"], ""))
        fname = f"ordering_{_slug(metric)}.png"
        plots.metric_vs_sparsity(series, metric, plot_dir / fname,
                                 title=f"ordering study: {metric} after every step (table above)",
                                 log_y=metric.startswith("ppl/"))
        lines += [f"![ordering {metric}]({rel}/{fname})", ""]
    return lines


# --------------------------------------------------------------------------------------------- compare
def compare_runs(run_dirs: list[Path | str], out: Path | str) -> Path:
    """`out/report.md` + plots comparing runs: final metrics table, metric vs sparsity, layers, weights, curves."""
    if not run_dirs:
        raise PrunetuneError("compare needs at least one run directory")
    runs: dict[str, dict] = {}
    for d in run_dirs:
        run = load_run(d)
        key = run["name"]
        while key in runs:
            key += "'"
        runs[key] = run
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_dir = out / "plots"
    for d in (out, plot_dir):  # temp files a killed comparison left (this one redraws everything)
        remove_partials(d)
    allpts = {k: eval_points(r) for k, r in runs.items()}
    names: list[str] = []
    for pts in allpts.values():
        names += [n for n in _metric_names(pts) if n not in names]
    lines = [f"# prunetune comparison of {len(runs)} runs", ""]
    rows = []
    for k, r in runs.items():
        pts = allpts[k]
        finals = [r2 for r2 in _ordering_rows(r) if r2.get("final")]
        if not pts and finals:  # an ordering study: one row per ordering's final model
            for f in finals:
                rows.append([f"{k} [{f['ordering']}]", r["recipe"].get("name", ""),
                             r["recipe"].get("model", {}).get("name", ""), f["action"], f"{f['sparsity']:.2%}"]
                            + [f["metrics"].get(n, {}).get("value", "") for n in names]
                            + [round(sum(s["seconds"] for s in r["stages"]) / 60, 1), r["manifest"].get("status")])
            continue
        last = pts[-1] if pts else {"sparsity": float("nan"), "metrics": {}, "stage": "-"}
        rows.append([k, r["recipe"].get("name", ""), r["recipe"].get("model", {}).get("name", ""), last["stage"],
                     f"{last['sparsity']:.2%}"] + [last["metrics"].get(n, "") for n in names]
                    + [round(sum(s["seconds"] for s in r["stages"]) / 60, 1), r["manifest"].get("status")])
    lines += ["## Final results (last evaluation of each run)", "",
              _table(["run", "recipe", "model", "stage", "sparsity"] + names + ["minutes", "status"], rows), ""]
    for metric in names:
        series = {k: [(p["sparsity"], p["metrics"][metric], p["stage"].split("-", 1)[-1]) for p in pts
                      if metric in p["metrics"]] for k, pts in allpts.items()}
        fname = f"metric_vs_sparsity_{_slug(metric)}.png"
        plots.metric_vs_sparsity(series, metric, plot_dir / fname, log_y=metric.startswith("ppl/"))
        lines += [f"![{metric} vs sparsity](plots/{fname})", ""]
    for k, r in runs.items():
        sec = _layer_and_hist_section(r["stages"], plot_dir, "plots", prefix=f"{_slug(k)}_")
        if sec:
            lines += [f"## {k}", ""] + [ln.replace("## ", "### ") for ln in sec]
        orows = _ordering_rows(r)
        if orows:
            lines += [ln.replace("## ", "### ") for ln in _ordering_section(orows, plot_dir, "plots")]
    lines += _curves_section(runs, plot_dir, "plots")
    lines += ["## Protocols", ""]
    for n in names:  # numbers measured differently must not be read as comparable
        seen_p: dict[str, list[str]] = {}
        for k, r in runs.items():
            for st in r["stages"]:
                for key, v in st.get("metrics", {}).items():
                    if key.endswith(n) and isinstance(v, dict) and isinstance(v.get("protocol"), dict):
                        p = v["protocol"]
                        sig = ", ".join(f"{f}={p[f]}" for f in ("dataset", "seqlen", "windows", "documents", "n")
                                        if f in p)
                        if k not in seen_p.setdefault(sig, []):
                            seen_p[sig].append(k)
        if len(seen_p) > 1:
            lines.append(f"- **warning: {n} was measured under different protocols**: "
                         + "; ".join(f"{sig} ({', '.join(ks)})" for sig, ks in seen_p.items()))
    seen: dict = {}
    for k, r in runs.items():
        for m, p in protocols(r).items():
            if m.startswith(EVAL_PREFIXES) and m not in seen:
                seen[m] = p
                lines.append(f"- **{m}** (as in {k}): {_protocol_text(p)}")
    lines += ["", "Runs: " + ", ".join(f"`{r['dir']}`" for r in runs.values()), ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))  # whole or not at all: a kill mid-report leaves no torn file
    return path
