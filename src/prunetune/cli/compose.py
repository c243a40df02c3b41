"""`prunetune compose`: composable pruning as a one-stage recipe (`commands/compose.yaml`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunetune.cli.app import app, quiet_libraries
from prunetune.cli.common import (COMMAND_FLAGS, command_data, console, run_and_report, show_recipe,
                                  validated_command_recipe)
from prunetune.cli.options import RECIPE_NOTE


COMPOSE_FLAGS = {  # flag parameter -> recipe key (no defaults here: commands/compose.yaml and ComposeSpec hold them)
    "task": "data.train", "attention": "compose.attention", "linear": "compose.linear", "n": "compose.n",
    "grid": "compose.grid", "attention_units": "compose.attention_units", "linear_units": "compose.linear_units",
    "attention_criterion": "compose.attention_criterion", "linear_criterion": "compose.linear_criterion",
    "linear_steps": "compose.linear_steps", "attention_steps": "compose.attention_steps",
    "module_texts": "compose.module_texts", "cache_dir": "compose.cache_dir", "baseline": "compose.baseline",
    "steps": "tune.steps", "epochs": "tune.epochs", "n_samples": "tune.n_samples", "eval_samples": "tune.eval_samples",
    "test_samples": "tune.test_samples", "batch_size": "tune.batch_size", "max_length": "tune.seqlen",
    "lr": "tune.lr", "seed": "seed",
}
COMMAND_FLAGS["compose"] = COMPOSE_FLAGS


@app.command(epilog=RECIPE_NOTE)
def compose(
    model: Annotated[str, typer.Argument(
        help="the model to prune: alias, local HF dir (e.g. a fine-tuned classifier) or hub id")],
    task: Annotated[Optional[str], typer.Option(
        "--task", help="labelled task data: bbc-news | .csv/.jsonl (text,label) (recipe default: bbc-news)")] = None,
    attention: Annotated[Optional[list[str]], typer.Option(
        "--attention", help="fraction of heads removed, one per configuration (--attention 0.25 0.5); "
        "'0.1,0.2,...' = one per block")] = None,
    linear: Annotated[Optional[list[str]], typer.Option(
        "--linear", help="fraction of linear weights removed (o, FFN), one per configuration")] = None,
    n: Annotated[Optional[int], typer.Option(
        "-n", help="number of configurations (must equal the length of the lists)")] = None,
    grid: Annotated[Optional[bool], typer.Option(
        "--grid/--pairs", help="every (attention, linear) combination instead of pairing")] = None,
    attention_units: Annotated[Optional[list[str]], typer.Option(
        "--attention-unit", help="attention | cross-attention (repeatable)")] = None,
    linear_units: Annotated[Optional[list[str]], typer.Option(
        "--linear-unit", help="o | co | gate | up | down (repeatable)")] = None,
    attention_criterion: Annotated[Optional[str], typer.Option("--attention-criterion", help="head score: l1 | l2")] = None,
    linear_criterion: Annotated[Optional[str], typer.Option("--linear-criterion", help="linear score: l1 | wanda")] = None,
    linear_steps: Annotated[Optional[int], typer.Option(
        "--linear-steps", help="module-level steps per pruned linear")] = None,
    attention_steps: Annotated[Optional[int], typer.Option(
        "--attention-steps", help="module-level steps per attention module")] = None,
    module_texts: Annotated[Optional[int], typer.Option(
        "--module-texts", help="training texts captured for module-level FT")] = None,
    cache_dir: Annotated[Optional[str], typer.Option("--cache-dir", help="module cache (default: inside --out)")] = None,
    baseline: Annotated[Optional[bool], typer.Option(
        "--baseline/--no-baseline", help="also fine-tune without module-level FT (the control)")] = None,
    lora: Annotated[Optional[bool], typer.Option(
        "--lora/--full", help="model-level fine-tuning: LoRA or full (recipe default: full)")] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="model-level optimizer steps per configuration")] = None,
    epochs: Annotated[Optional[float], typer.Option(
        "--epochs", help="model-level epochs when --steps is not given (recipe default: 1)")] = None,
    n_samples: Annotated[Optional[int], typer.Option("--n-samples", help="training examples (recipe default: 256)")] = None,
    eval_samples: Annotated[Optional[int], typer.Option(
        "--eval-samples", help="validation examples for the curves (recipe default: 64)")] = None,
    test_samples: Annotated[Optional[int], typer.Option(
        "--test-samples", help="test examples scored (default: the whole test split)")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="recipe default: 8")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="tokens per example (recipe default: 64)")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="model-level learning rate (recipe default: 1e-4)")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="run directory (default: runs/compose-<timestamp>)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue OUT: complete stages are skipped")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty OUT")] = False,
    print_recipe: Annotated[bool, typer.Option(
        "--print-recipe", help="print the recipe YAML this command runs, and exit")] = False,
) -> None:
    """Composable pruning: fine-tune each pruned module once, compose every configuration, fine-tune it briefly.

    A one-stage recipe (`commands/compose.yaml`) run like `prunetune run`."""
    quiet_libraries()
    import datetime as _dt

    # at run time: the runner loads torch and pydantic, which --help must not load
    from prunetune.pipelines.runner import check_recipe

    flags = {k: v for k, v in locals().items() if k in COMPOSE_FLAGS or k == "lora"}
    rec = validated_command_recipe("compose", command_data("compose", model, flags), flags)
    check_recipe(rec)
    if print_recipe:
        show_recipe(rec)
        return
    if out is None:
        out = Path("runs") / f"compose-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    con = console()
    con.print(f"[bold]prunetune compose[/bold] {model} -> {out}")
    run_and_report(rec, out, resume=resume, overwrite=overwrite, con=con)
    stage = sorted((out / "stages").glob("*-compose"))
    if stage:
        con.print((stage[-1] / "report.md").read_text(), markup=False, highlight=False)
