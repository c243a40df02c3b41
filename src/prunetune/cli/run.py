"""`prunetune run`, `recipes` and `compare`: recipes and presets, and the comparison of run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunetune.cli.app import app, quiet_libraries
from prunetune.cli.common import claim_out, console, run_and_report
from prunetune.errors import PrunetuneError


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(
        help="preset name (see `prunetune recipes`) or a recipe YAML file")] = "quickstart",
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="run directory (default: runs/<recipe>-<timestamp>)")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue OUT: complete stages are skipped, an interrupted training stage continues from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty OUT")] = False,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="override a recipe key: section.key=value (repeatable)")] = None,
) -> None:
    """Run a recipe: stages in order, each atomic and resumable; ends with manifest.json and report.md."""
    quiet_libraries()
    import datetime as _dt

    # at run time: config loads pydantic and torch, which --help must not load
    from prunetune.config import load_recipe

    rec = load_recipe(recipe, set_ or [])
    if out is None:
        if resume:
            raise PrunetuneError("--resume needs --out: the run directory to continue")
        out = Path("runs") / f"{rec.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = claim_out(out)
    con = console()
    con.print(f"[bold]prunetune run[/bold] {rec.name} -> {out}")
    man = run_and_report(rec, out, resume=resume, overwrite=overwrite, con=con)
    # at run time: the runner loads torch and pydantic
    from prunetune.pipelines.runner import is_main_process

    if is_main_process():  # under a multi-process launcher, rank 0 reports
        con.print(f"report: {out / 'report.md'}  (stage time {sum(man['timings'].get(s, 0) for s in man['stages']):.0f} s)")


@app.command()
def recipes() -> None:
    """List the recipe presets shipped with prunetune."""
    from rich.table import Table

    # at run time: config loads pydantic and torch, which --help must not load
    from prunetune.config import load_recipe, preset_names

    t = Table(title="presets (prunetune run NAME)", header_style="bold")
    for c in ("name", "model", "stages", "description"):
        t.add_column(c)
    for name in preset_names():
        r = load_recipe(name)
        first = " ".join(r.description.split()).split(": ")[0].split(". ")[0]
        t.add_row(name, r.model.name, " > ".join(s.name or s.type for s in r.stages), first)
    console().print(t)


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="run directories written by `prunetune run`")],
    out: Annotated[Path, typer.Option("--out", help="directory for report.md and plots/")],
) -> None:
    """Compare runs: one results table and PNG plots (metric vs sparsity, layers, weights, curves)."""
    # at run time: reporting loads matplotlib, which --help must not load
    from prunetune.reporting.report import compare_runs

    path = compare_runs(runs, out)
    console().print(f"written: {path}")
