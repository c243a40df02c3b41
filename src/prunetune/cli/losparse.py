"""`prunetune losparse`: LoSparse (W ~ U·V + S, S pruned by PLATON while fine-tuning) as a one-stage recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunetune.cli.app import app, quiet_libraries
from prunetune.cli.common import COMMAND_FLAGS, claim_out, command_recipe, console, run_and_report, show_recipe
from prunetune.cli.options import (
    TUNE_FLAGS,
    NOT_FLAGS,
    RECIPE_NOTE,
    SaveSteps,
    TaskType,
)
from prunetune.errors import PrunetuneError


LOSPARSE_FLAGS = {"rank_ratio": "losparse.rank_ratio", "keep": "losparse.keep",
                  "initial_threshold": "losparse.initial_threshold", "warmup_steps": "losparse.warmup_steps",
                  "initial_warmup": "losparse.initial_warmup", "final_warmup": "losparse.final_warmup",
                  "initial_warmup_steps": "losparse.initial_warmup_steps",
                  "final_warmup_steps": "losparse.final_warmup_steps", "delta_t": "losparse.deltaT",
                  "beta1": "losparse.beta1", "beta2": "losparse.beta2",
                  "final_mask": "losparse.final_mask",
                  "structured_method": "losparse.structured_method",
                  "structured_direction": "losparse.structured_direction", "distill_from": "losparse.teacher",
                  "kd_weight": "losparse.kd_weight", "layer_weight": "losparse.layer_weight",
                  "distill_temp": "losparse.kd_temp"}

COMMAND_FLAGS["losparse"] = {**TUNE_FLAGS, **LOSPARSE_FLAGS}


@app.command(epilog=RECIPE_NOTE)
def losparse(
    model: Annotated[str, typer.Argument(help="alias, HF dir or hub id")],
    task: Annotated[Optional[str], typer.Option(
        "--task", help="task data: bbc-news | .csv/.jsonl (text,label) | text source")] = None,
    task_type: TaskType = None,
    rank_ratio: Annotated[Optional[float], typer.Option(
        "--rank-ratio", "--low-rank-parameter-ratio", help="share of each matrix in U and V, in (0, 1): rank = ceil(p*m*n/(m+n))")] = None,
    keep: Annotated[Optional[float], typer.Option(
        "--keep", "--final-threshold", help="fraction of S's entries kept at the end, in (0, 1)")] = None,
    initial_threshold: Annotated[Optional[float], typer.Option(
        "--initial-threshold", help="kept fraction of S before pruning")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(
        "--warmup-steps", help="the unit of --initial-warmup / --final-warmup")] = None,
    initial_warmup: Annotated[Optional[float], typer.Option(
        "--initial-warmup", help="plain fine-tuning before pruning, in warmup steps")] = None,
    final_warmup: Annotated[Optional[float], typer.Option(
        "--final-warmup", help="steps with the mask fixed at the end, in warmup steps")] = None,
    initial_warmup_steps: Annotated[Optional[int], typer.Option(
        "--initial-warmup-steps", help="the same as a plain step count")] = None,
    final_warmup_steps: Annotated[Optional[int], typer.Option(
        "--final-warmup-steps", help="the same as a plain step count")] = None,
    delta_t: Annotated[Optional[int], typer.Option(
        "--delta-t", "--deltaT", help="PLATON's window: average |θ·∇θ| over N steps, fold it into the EMAs and "
        "recompute the mask once per window")] = None,
    beta1: Annotated[Optional[float], typer.Option("--beta1", help="EMA of the sensitivity |θ·∇θ|")] = None,
    beta2: Annotated[Optional[float], typer.Option(
        "--beta2", help="EMA of its uncertainty; 1 = uncertainty off (the LoSparse code's default)")] = None,
    final_mask: Annotated[Optional[str], typer.Option(
        "--final-mask", help="recompute (default: the mask is recomputed during the final warm-up, as the method "
        "does) | fixed (computed once at its start)")] = None,
    structured_method: Annotated[Optional[str], typer.Option(
        "--structured-method", "--structured_method", help="mean | sum | max | min (rows/columns of S) | none (unstructured)")] = None,
    structured_direction: Annotated[Optional[str], typer.Option(
        "--structured-direction", "--structured_direction", help="row | col | row_col")] = None,
    distill_from: Annotated[Optional[str], typer.Option(
        "--distill-from", "--teacher-path", help="dense fine-tuned model dir to distil from")] = None,
    kd_weight: Annotated[Optional[float], typer.Option(
        "--kd-weight", help="weight of T^2*KL on the logits (needs --distill-from)")] = None,
    layer_weight: Annotated[Optional[float], typer.Option(
        "--layer-weight", help="weight of the layer-output MSE (needs --distill-from)")] = None,
    distill_temp: Annotated[Optional[float], typer.Option(
        "--distill-temp", help="temperature of the logit KD")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", "--num-epochs", "--num_train_epochs")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", "--learning-rate", "--learning_rate")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "--per-device-train-batch-size")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", "--max-seq-length")] = None,
    n_samples: Annotated[Optional[int], typer.Option("--n-samples", help="training examples (0 = all)")] = None,
    eval_samples: Annotated[Optional[int], typer.Option("--eval-samples")] = None,
    test_samples: Annotated[Optional[int], typer.Option(
        "--test-samples", help="test examples scored (0 = the whole test split)")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="training seed; not the split")] = None,
    split_seed: Annotated[Optional[int], typer.Option(
        "--split-seed", help="seed of the fixed train/validation/test split")] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir")] = None,
    save_steps: SaveSteps = None,
    print_recipe: Annotated[bool, typer.Option(
        "--print-recipe", help="print the recipe this command runs (YAML) and exit")] = False,
    resume: Annotated[bool, typer.Option("--resume")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="run directory")] = None,
) -> None:
    """LoSparse: every projection becomes U·V + S (SVD init), S pruned by PLATON while fine-tuning; exports a
    plain HF dir and the factorised form (prunetune.load_model rebuilds it). Seed option names are aliases."""
    quiet_libraries()
    flags = {k: v for k, v in locals().items() if k not in NOT_FLAGS}
    recipe = command_recipe("losparse", model, flags)
    if print_recipe:
        show_recipe(recipe)
        return
    if out is None:
        raise PrunetuneError("losparse needs --out (or --print-recipe)")
    con = console()
    con.print(f"[bold]prunetune losparse[/bold] {model} -> {out}")
    run_and_report(recipe, claim_out(out), resume=resume, overwrite=overwrite, con=con)
