"""`prunetune shrink`: structured pruning that shrinks the model (VIB or a structure criterion)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunetune.cli.app import app, quiet_libraries
from prunetune.cli.common import (
    COMMAND_FLAGS,
    claim_out,
    command_data,
    console,
    default_calib_split,
    run_and_report,
    show_recipe,
    validated_command_recipe,
)
from prunetune.errors import PrunetuneError


SHRINK_FLAGS = {  # flag parameter -> recipe key (no defaults here: commands/shrink.yaml and StructuredSpec hold them)
    "method": "structured.method", "sparsity": "structured.sparsity", "structures": "structured.structures",
    "round_to": "structured.round_to", "split": "structured.split", "calib": "data.calib",
    "calib_split": "data.calib_split",
    "nsamples": "structured.nsamples", "seqlen": "structured.seqlen", "vib_steps": "structured.vib_steps",
    "vib_batch": "structured.vib_batch", "vib_lr": "structured.vib_lr", "vib_mu_lr": "structured.vib_mu_lr",
    "vib_loss": "structured.vib_loss",
    "vib_widths": "structured.vib_widths", "vib_center": "structured.vib_center",
    "vib_neuron_ranking": "structured.vib_neuron_ranking",
    "lagrangian_warmup": "structured.lagrangian_warmup", "lagrangian_lr": "structured.lagrangian_lr",
    "lagrangian_step": "structured.lagrangian_step",
    "att_mul": "structured.att_mul",
    "max_windows": "eval.max_windows", "seed": "seed", "data_dir": "data.data_dir",
}

COMMAND_FLAGS["shrink"] = SHRINK_FLAGS


@app.command("shrink", epilog="Flags left out keep the values of the command's recipe; --print-recipe shows every "
             "value.")


def shrink_cmd(
    model: Annotated[str, typer.Argument(help="alias, HF dir, .gguf or hub id (Llama family)")],
    method: Annotated[Optional[str], typer.Option("--method", help="vib | l1 | l2 | wanda | flap")] = None,
    sparsity: Annotated[Optional[float], typer.Option(
        "--sparsity", help="fraction of block parameters removed, in [0, 1)")] = None,
    structures: Annotated[Optional[str], typer.Option(
        "--structures", help="comma list of heads, neurons, hidden")] = None,
    round_to: Annotated[Optional[int], typer.Option(
        "--round-to", help="kept neuron / hidden widths are multiples of this")] = None,
    split: Annotated[Optional[str], typer.Option(
        "--split", help="budget between KV groups and neurons: equal (same fraction each) or measured (each KV "
                        "count tried on calibration text, lowest loss wins)")] = None,
    calib: Annotated[Optional[str], typer.Option("--calib", help="calibration / gate-training text source")] = None,
    calib_split: Annotated[Optional[str], typer.Option(
        "--calib-split", help="default: valid for wikitext2, else train")] = None,
    nsamples: Annotated[Optional[int], typer.Option("--nsamples", help="calibration windows")] = None,
    seqlen: Annotated[Optional[int], typer.Option("--seqlen", help="tokens per window")] = None,
    vib_steps: Annotated[Optional[int], typer.Option("--vib-steps", help="VIB gate-training steps")] = None,
    vib_batch: Annotated[Optional[int], typer.Option("--vib-batch", help="windows per VIB step")] = None,
    vib_lr: Annotated[Optional[float], typer.Option(
        "--vib-lr", help="VIB_LR: learning rate of the gates' log sigma^2")] = None,
    vib_mu_lr: Annotated[Optional[float], typer.Option(
        "--vib-mu-lr", help="learning rate of the gates' mu (recipe default 0.01; the gate lr measured best with "
                            "--vib-steps 64 and --lagrangian-step gap)")] = None,
    vib_loss: Annotated[Optional[str], typer.Option(
        "--vib-loss", help="gate objective: kd (KL to the dense model) or lm")] = None,
    vib_widths: Annotated[Optional[str], typer.Option(
        "--vib-widths", help="uniform (baselines' rule) or learned (VIB's KV count)")] = None,
    vib_center: Annotated[Optional[bool], typer.Option(
        "--vib-center/--no-vib-center", help="gates on each structure's "
                                              "deviation from its calibration mean (a removed one leaves its mean as a bias)")] = None,
    vib_neuron_ranking: Annotated[Optional[str], typer.Option(
        "--vib-neuron-ranking", help="auto (flap with centred gates), vib (the gates) or flap "
                                                     "(FLAP's fluctuation ranks neurons, the gates KV groups)")] = None,
    lagrangian_warmup: Annotated[Optional[float], typer.Option(
        "--lagrangian-warmup", help="fraction of steps the target ramps over")] = None,
    lagrangian_lr: Annotated[Optional[float], typer.Option(
        "--lagrangian-lr", help="learning rate of the Lagrange multipliers")] = None,
    lagrangian_step: Annotated[Optional[str], typer.Option(
        "--lagrangian-step", help="adam (fixed step) or gap (step x gap, no push past the target)")] = None,
    att_mul: Annotated[Optional[float], typer.Option(
        "--att-mul", help="weight of attention parameters in the sparsity count")] = None,
    eval_ppl: Annotated[bool, typer.Option(
        "--eval-ppl", help="perplexity (WikiText-2 test) before and after")] = False,
    max_windows: Annotated[Optional[int], typer.Option(
        "--max-windows", help="--eval-ppl: first N windows of 512 tokens")] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="seed of the calibration sample and the gates")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="local WikiText-2 dir (else PRUNETUNE_DATA_DIR or hub)")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="run directory; the shrunk plain HF model lands in OUT/model")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue OUT: complete stages are skipped")] = False,
    print_recipe: Annotated[bool, typer.Option(
        "--print-recipe", help="print the recipe this command runs and exit")] = False,
) -> None:
    """Structured pruning that shrinks the model (VIB or L1/L2/Wanda/FLAP): fewer heads, neurons, hidden channels."""
    quiet_libraries()
    flags = {k: v for k, v in locals().items() if k in SHRINK_FLAGS}
    if structures is not None:
        flags["structures"] = [s.strip() for s in structures.split(",") if s.strip()]
    data = command_data("shrink", model, flags)
    default_calib_split(data, calib_split)
    if eval_ppl:
        data["stages"] = ["evaluate", "structured", "evaluate", "export"]
    rec = validated_command_recipe("shrink", data, flags)
    if print_recipe:
        show_recipe(rec)
        return
    if out is None:
        raise PrunetuneError("shrink needs --out (or --print-recipe)")
    out = claim_out(out)
    con = console()
    run_and_report(rec, out, resume=resume, overwrite=overwrite, con=con)
    con.print(f"shrunk model: {out / 'model'}   report: {out / 'report.md'}")
