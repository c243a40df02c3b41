"""`prunetune finetune` and `prunetune payt`: training commands, each a one-stage recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from prunetune.cli.app import app, quiet_libraries
from prunetune.cli.common import (
    COMMAND_FLAGS,
    claim_out,
    command_recipe,
    console,
    run_and_report,
    show_recipe,
    table,
)
from prunetune.cli.options import (
    TUNE_FLAGS,
    NOT_FLAGS,
    RECIPE_NOTE,
    BatchSize,
    DataDir,
    Epochs,
    EvalSamples,
    Kd,
    KdAlpha,
    KdTemp,
    Lora,
    LoraAlpha,
    LoraDropout,
    LoraRank,
    Lr,
    MaxLength,
    Mix,
    MixSampling,
    MixSource,
    MixStrategy,
    NSamples,
    Out,
    Overwrite,
    PrintRecipe,
    Resume,
    Retention,
    RetentionWindows,
    Rslora,
    SaveSteps,
    Seed,
    SplitSeed,
    Task,
    TaskType,
    Teacher,
    TestSamples,
)
from prunetune.errors import PrunetuneError
from prunetune.rundir import atomic_write_json



PAYT_FLAGS = {"sparsity": "payt.sparsity", "schedule": "payt.schedule", "start": "payt.start", "end": "payt.end",
              "every": "payt.every", "criterion": "payt.criterion"}

COMMAND_FLAGS["finetune"] = TUNE_FLAGS
COMMAND_FLAGS["payt"] = {**TUNE_FLAGS, **PAYT_FLAGS}


def _print_run(title: str, r: dict) -> None:
    rows: list[tuple[str, str]] = [("train examples", str(r["train_examples"])), ("steps", str(r["global_step"]))]
    for key, label in (("test_before_merge", "before merge"), ("test_after_merge", "after merge (exported)")):
        m = r.get(key) or {}
        if "accuracy" in m:
            rows.append((f"accuracy / macro-F1 {label}", f"{m['accuracy']:.4f} / {m['macro_f1']:.4f}"))
        elif "perplexity" in m:
            rows.append((f"test perplexity {label}", f"{m['perplexity']:.3f}"))
    rows.append(("sparsity (real zeros of prunable linears)", f"{r.get('sparsity', 0.0):.4%}"))
    if r.get("retention"):
        rows.append((f"retention: {r['retention']['metric']}", f"{r['retention']['value']:.4f}"))
    me = r.get("mask_enforcement", {})
    if me.get("steps"):
        rows.append(("mask enforcement / step", f"{me['enforce_ms_per_step']:.1f} ms ({me['overhead_fraction']:.2%})"))
    rows.append(("train seconds", f"{r['timings']['train_s']:.1f}"))
    console().print(table(title, rows))


def run_tuning_command(recipe, title: str, out: Path, *, resume: bool, overwrite: bool) -> dict:
    """A finetune/payt recipe through the runner, like `prunetune run`; OUT/metrics.json is the stage's result.

    Under a multi-process launcher (torchrun, accelerate launch) every rank runs the same recipe through the
    runner, which trains the stage on all ranks together and lets rank 0 alone write, report and print.
    """
    # at run time: the runner loads torch and pydantic, which --help must not load
    from prunetune.pipelines.runner import is_main_process

    out = claim_out(out)
    run_and_report(recipe, out, resume=resume, overwrite=overwrite, con=console())
    if not is_main_process():
        return {}
    stage = out / "stages" / recipe.stage_names()[0]
    r = json.loads((stage / "tune" / "metrics.json").read_text())
    atomic_write_json(out / "metrics.json", r)
    _print_run(title, r)
    return r


def full_evaluate_recipe(recipe, full_lr: float | None, baselines: str | None = None):
    """`payt --full-evaluate`: the payt command's recipe with one stage per configuration of the comparison
    (`methods.payt.CONFIGURATIONS`; "original" only when retention is measured), each from the recipe's model,
    then the table stage. Same settings, same seed: `--print-recipe` prints it, `--resume` continues it."""
    # at run time: config and methods.payt load pydantic and torch, which --help must not load
    from prunetune.config import recipe_to_dict, validate_recipe
    from prunetune.methods.payt import CONFIGURATIONS

    data = recipe_to_dict(recipe)
    runs = [r for r in CONFIGURATIONS if r != "original" or recipe.tune.retention]
    data.update(name=f"{recipe.name}-full-evaluate",
                description="`prunetune payt --full-evaluate`: the seed's eight configurations (dense full/LoRA FT, "
                            "prune without FT, prune -> full/LoRA FT, PAYT, PAYT without KD, the other LoRA scaling) "
                            "from the same model, data, split, seed and budget, then one table (full_evaluate.md / "
                            ".json in the run directory).",
                full_evaluate={"full_lr": full_lr, **({"baselines": baselines} if baselines else {})},
                stages=[{"type": "full_evaluate", "name": r, "run": r} for r in (*runs, "table")])
    return validate_recipe(data, "payt --full-evaluate")


@app.command(epilog=RECIPE_NOTE)
def finetune(
    model: Annotated[str, typer.Argument(help="alias, HF dir (a pruned one keeps its masks), .gguf or hub id")],
    task: Task = None, task_type: TaskType = None, lora: Lora = None, lora_rank: LoraRank = None,
    lora_alpha: LoraAlpha = None, lora_dropout: LoraDropout = None, rslora: Rslora = None, kd: Kd = None,
    kd_alpha: KdAlpha = None, kd_temp: KdTemp = None, teacher: Teacher = None, epochs: Epochs = None, lr: Lr = None,
    batch_size: BatchSize = None, max_length: MaxLength = None, n_samples: NSamples = None,
    eval_samples: EvalSamples = None, test_samples: TestSamples = None, seed: Seed = None,
    split_seed: SplitSeed = None, mix: Mix = None, mix_source: MixSource = None, mix_strategy: MixStrategy = None,
    mix_sampling: MixSampling = None, data_dir: DataDir = None, retention: Retention = None,
    retention_windows: RetentionWindows = None, save_steps: SaveSteps = None, print_recipe: PrintRecipe = False,
    resume: Resume = False, overwrite: Overwrite = False, out: Out = None,
) -> None:
    """Fine-tune (LoRA/rsLoRA or full) with knowledge distillation; pruned weights stay zero."""
    quiet_libraries()
    flags = {k: v for k, v in locals().items() if k not in NOT_FLAGS}
    recipe = command_recipe("finetune", model, flags)
    if print_recipe:
        show_recipe(recipe)
        return
    if out is None:
        raise PrunetuneError("finetune needs --out (or --print-recipe)")
    run_tuning_command(recipe, f"finetune {model} -> {out}", out, resume=resume, overwrite=overwrite)


@app.command(epilog=RECIPE_NOTE)
def payt(
    model: Annotated[str, typer.Argument(help="alias, HF dir, .gguf or hub id")],
    task: Task = None, task_type: TaskType = None,
    sparsity: Annotated[Optional[float], typer.Option(
        "--sparsity", "--sparsity-target", help="target sparsity in [0, 1)")] = None,
    schedule: Annotated[Optional[str], typer.Option(
        "--schedule", "--pruning-schedule", help="oneshot | linear | agp")] = None,
    start: Annotated[Optional[float], typer.Option(
        "--start", "--start-pruning-epoch-ptg", help="fraction of training before pruning")] = None,
    end: Annotated[Optional[float], typer.Option(
        "--end", help="fraction of training by which the target is reached (1: the last event that fits)")] = None,
    every: Annotated[Optional[int], typer.Option(
        "--every", "--prune-every-epoch", help="prune every N epochs")] = None,
    every_steps: Annotated[Optional[int], typer.Option(
        "--every-steps", help="prune every N optimizer steps instead")] = None,
    criterion: Annotated[Optional[str], typer.Option(
        "--criterion", "--pruning-method", help="l1-global | l2-cols | wanda")] = None,
    lora: Lora = None, lora_rank: LoraRank = None, lora_alpha: LoraAlpha = None, lora_dropout: LoraDropout = None,
    rslora: Rslora = None, kd: Kd = None, kd_alpha: KdAlpha = None, kd_temp: KdTemp = None, teacher: Teacher = None,
    epochs: Epochs = None, lr: Lr = None,
    full_lr: Annotated[Optional[float], typer.Option(
        "--full-lr", help="--full-evaluate: learning rate of the dense full-FT baseline (default 1e-4; --lr is for the LoRA runs)")] = None,
    baselines: Annotated[Optional[str], typer.Option(
        "--baselines", help="--full-evaluate: plain (default: the dense and prune -> FT baselines without KD or data "
        "mixing, as in PAYT's own comparison) | distilled (with the run's KD and mixing, as the PAYT rows)")] = None,
    batch_size: BatchSize = None, max_length: MaxLength = None, n_samples: NSamples = None,
    eval_samples: EvalSamples = None, test_samples: TestSamples = None, seed: Seed = None,
    split_seed: SplitSeed = None, mix: Mix = None, mix_source: MixSource = None, mix_strategy: MixStrategy = None,
    mix_sampling: MixSampling = None, data_dir: DataDir = None, retention: Retention = None,
    retention_windows: RetentionWindows = None, save_steps: SaveSteps = None,
    full_evaluate: Annotated[bool, typer.Option(
        "--full-evaluate/--no-full-evaluate", help="run the seed's eight configurations (dense full/LoRA FT, prune without FT, prune -> full/LoRA FT, PAYT, PAYT without KD, other LoRA scaling) into one table")] = False,
    paper_defaults: Annotated[bool, typer.Option(
        "--paper-defaults", help="start from the payt-paper preset (the seed's defaults: rank 32, alpha 32, dropout 0.1, rsLoRA, linear from 0, 5 epochs, 512 tokens, 1,000 samples)")] = False,
    print_recipe: PrintRecipe = False, resume: Resume = False, overwrite: Overwrite = False, out: Out = None,
) -> None:
    """Prune-As-You-Tune: prune the base weights on a schedule during (LoRA) fine-tuning with KD."""
    quiet_libraries()
    if every_steps is not None and every_steps < 1:
        raise PrunetuneError(f"--every-steps must be >= 1, got {every_steps}")
    flags = {k: v for k, v in locals().items()
             if k not in (*NOT_FLAGS, "full_lr", "full_evaluate", "paper_defaults", "baselines")}
    if baselines is not None and not full_evaluate:
        raise PrunetuneError("--baselines applies to --full-evaluate only")
    extra = {"payt.every": every_steps, "payt.unit": "step"} if every_steps else {}
    recipe = command_recipe("payt", model, flags, extra, base="payt-paper" if paper_defaults else None)
    if full_evaluate:
        recipe = full_evaluate_recipe(recipe, full_lr, baselines)
    if print_recipe:
        show_recipe(recipe)
        return
    if out is None:
        raise PrunetuneError("payt needs --out (or --print-recipe)")
    if full_evaluate:  # eight runs compared in one table: a multi-stage recipe, run like any other
        # at run time: the runner loads torch and pydantic
        from prunetune.pipelines.runner import is_main_process

        out = claim_out(out)
        con = console()
        run_and_report(recipe, out, resume=resume, overwrite=overwrite, con=con)
        if is_main_process():
            con.print((out / "full_evaluate.md").read_text(), markup=False, highlight=False)
            con.print(f"written: {out / 'full_evaluate.md'} and {out / 'full_evaluate.json'}")
        return
    run_tuning_command(recipe, f"payt {model} -> {out}", out, resume=resume, overwrite=overwrite)
