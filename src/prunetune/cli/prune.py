"""`prunetune prune`: one-shot pruning (a criterion of the registry) as a one-stage recipe."""

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
    table,
    validated_command_recipe,
)
from prunetune.data.sources import load_text
from prunetune.errors import PrunetuneError


PRUNE_FLAGS = {  # flag parameter -> recipe key (no defaults here: commands/prune.yaml and PruneSpec hold them)
    "method": "prune.method", "sparsity": "prune.sparsity", "pattern": "prune.pattern",
    "granularity": "prune.granularity", "calib": "data.calib", "calib_split": "data.calib_split",
    "nsamples": "prune.nsamples", "seqlen": "prune.seqlen", "skip": "prune.skip", "device": "prune.device",
    "calib_batch": "prune.calib_batch", "max_windows": "eval.max_windows", "seed": "seed",
    "data_dir": "data.data_dir", "stream": "prune.stream", "max_memory": "prune.max_memory",
    "dtype": "model.dtype",
    "data_dir": "data.data_dir", "layer_sparsity": "prune.layer_sparsity", "owl_lambda": "prune.owl_lambda",
    "owl_m": "prune.owl_m", "refine": "prune.refine", "admm_iters": "prune.admm_iters", "admm_damp": "prune.admm_damp",
}

COMMAND_FLAGS["prune"] = PRUNE_FLAGS


@app.command("prune", epilog="Flags left out keep the values of the command's recipe; --print-recipe shows every "
             "value.")


def prune_cmd(
    model: Annotated[str, typer.Argument(help="alias, HF dir, .gguf or hub id")],
    method: Annotated[Optional[str], typer.Option(
        "--method", help="a registered criterion: magnitude | wanda | sparsegpt | admm | owl-admm | l1-global | l2-cols (recipe default: wanda)")] = None,
    sparsity: Annotated[Optional[float], typer.Option(
        "--sparsity", help="fraction of weights to prune, in [0, 1) (recipe default: 0.5)")] = None,
    pattern: Annotated[Optional[str], typer.Option(
        "--pattern", help="N:M semi-structured pattern, e.g. 2:4 (overrides --sparsity)")] = None,
    granularity: Annotated[Optional[str], typer.Option(
        "--granularity", help="row | layer | global | rows | cols | heads | neurons (default: sparsegpt layer, others row)")] = None,
    calib: Annotated[Optional[str], typer.Option(
        "--calib", help="calibration text: bbc-news | wikitext2 | FILE (.txt/.csv/.jsonl)")] = None,
    calib_split: Annotated[Optional[str], typer.Option(
        "--calib-split", help="split of --calib (default: valid for wikitext2, else train)")] = None,
    nsamples: Annotated[Optional[int], typer.Option(
        "--nsamples", min=1, help="calibration windows (recipe default: 32)")] = None,
    seqlen: Annotated[Optional[int], typer.Option(
        "--seqlen", min=2, help="tokens per calibration (and --eval-ppl) window (recipe default: 512)")] = None,
    skip: Annotated[Optional[list[str]], typer.Option(
        "--skip", help="regex of module names to leave dense (repeatable)")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="calibration device: cpu | cuda (the model stays on CPU; streaming: one block at a time on it)")] = None,
    calib_batch: Annotated[Optional[int], typer.Option(
        "--calib-batch", min=1, help="calibration windows per block forward (memory vs speed; recipe default: 4)")] = None,
    stream: Annotated[Optional[bool], typer.Option(
        "--stream/--no-stream", help="read, prune and write one block at a time from a local safetensors dir (default: when the model would not fit --max-memory)")] = None,
    max_memory: Annotated[Optional[str], typer.Option(
        "--max-memory", help="memory budget that decides streaming, e.g. 16GB (default: what the machine has free)")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="auto | bf16 | fp16 | fp32: load, prune and export dtype (recipe default: auto, the checkpoint's)")] = None,
    layer_sparsity: Annotated[Optional[str], typer.Option(
        "--layer-sparsity", help="uniform | owl: each block its own sparsity from its activation outliers, the mean kept (default: the method's, owl for owl-admm)")] = None,
    owl_lambda: Annotated[Optional[float], typer.Option(
        "--owl-lambda", help="OWL: half-width of the per-block sparsity band (recipe default: 0.08)")] = None,
    owl_m: Annotated[Optional[float], typer.Option(
        "--owl-m", help="OWL: an outlier scores above M x its block's mean (recipe default: 5)")] = None,
    refine: Annotated[Optional[str], typer.Option(
        "--refine", help="none | dsnot: prune-and-grow swaps after the criterion (calibrated criteria)")] = None,
    admm_iters: Annotated[Optional[int], typer.Option(
        "--admm-iters", help="ADMM iterations; the mask reaches its target over the first 3/4 (recipe default: 60)")] = None,
    admm_damp: Annotated[Optional[float], typer.Option(
        "--admm-damp", help="ADMM dampening, fraction of mean(diag XᵀX) (recipe default: 0.01)")] = None,
    eval_ppl: Annotated[Optional[str], typer.Option(
        "--eval-ppl", help="perplexity before and after (windows of --seqlen) on wikitext2 | bbc-news | FILE")] = None,
    max_windows: Annotated[Optional[int], typer.Option(
        "--max-windows", min=1, help="--eval-ppl: first N windows only")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="seed of the calibration sample")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="local WikiText-2 dir (else PRUNETUNE_DATA_DIR or hub)")] = None,
    print_recipe: Annotated[bool, typer.Option(
        "--print-recipe", help="print the recipe this command runs (YAML) and exit")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue OUT: complete stages are skipped")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out")] = False,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="run directory: the plain HF model + masks.safetensors land in OUT/model")] = None,
) -> None:
    """Prune a model one-shot (magnitude, Wanda, SparseGPT) and save it as a plain HF directory with its masks.

    A one-stage recipe (prune, export; evaluate before and after with --eval-ppl) run like `prunetune run`.
    """
    quiet_libraries()
    # at run time: these load torch (config also pydantic), which --help must not load
    from prunetune.config import PruneSpec
    from prunetune.models.loading import natural_task
    from prunetune.pruning.api import validate
    from prunetune.pruning.criteria import get_criterion

    flags = {k: v for k, v in locals().items() if k in PRUNE_FLAGS}
    flags["skip"] = list(skip) if skip else None
    if device not in (None, "cpu") and not str(device).startswith("cuda"):  # the flag's name in the message
        raise PrunetuneError(f"unknown --device '{device}'; choose cpu or cuda")
    data = command_data("prune", model, flags)
    # everything that can be checked without the model is checked first (the engine's own messages)
    p = {**{k: f.default for k, f in PruneSpec.model_fields.items()}, **data.get("prune", {})}
    opts = {"iters": p["admm_iters"], "damp": p["admm_damp"]} if hasattr(get_criterion(p["method"]), "check") else None
    validate(p["method"], p["sparsity"], p["pattern"], p["granularity"], layer_sparsity=p["layer_sparsity"],
             owl_lambda=p["owl_lambda"], owl_m=p["owl_m"], refine=p["refine"], options=opts)
    default_calib_split(data, calib_split)
    d = data["data"]
    if eval_ppl:
        d.update(ppl=[eval_ppl], ppl_split="test")
        data.setdefault("eval", {})["ppl_seqlen"] = p["seqlen"]
        data["stages"] = ["evaluate", "prune", "evaluate", "export"]
    recipe = validated_command_recipe("prune", data, flags)
    spec = recipe.prune
    if print_recipe:
        show_recipe(recipe)
        return
    if out is None:
        raise PrunetuneError("prune needs --out (or --print-recipe)")
    if spec.device and spec.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise PrunetuneError("--device cuda asked but no CUDA device is available")
    dd = recipe.data.data_dir
    if get_criterion(spec.method).needs_calibration or spec.extras()["layer_sparsity"] == "owl":
        load_text(recipe.data.calib, recipe.data.calib_split, data_dir=dd)
    if eval_ppl:
        load_text(eval_ppl, "test", data_dir=dd)
        nat_task, _ = natural_task(model)
        if nat_task != "causal-lm":
            raise PrunetuneError(f"--eval-ppl needs a causal LM; {model} is a {nat_task} model")
    # at run time: the stages load torch and pydantic
    from prunetune.pipelines.stages import streaming_checkpoint

    streams = not resume and streaming_checkpoint(model, recipe, spec, out) is not None
    if streams and eval_ppl:
        raise PrunetuneError("--eval-ppl loads the whole model, which this run streams because it does not fit "
                             "(or --stream); evaluate the pruned model with `prunetune eval` where it fits")
    out = claim_out(out)
    # at run time: calibrate loads torch
    from prunetune.pruning.calibrate import bound_heap_growth

    bound_heap_growth(memory_first=streams)  # this process only prunes (and evaluates): free tensors go back to the OS
    con = console()
    man = run_and_report(recipe, out, resume=resume, overwrite=overwrite, con=con)
    names = recipe.stage_names()
    pruned = man["metrics"][next(n for n in names if n.endswith("-prune"))]
    gran = pruned["prune_seconds"]["protocol"]["granularity"]
    rows = [("method", spec.method + (f" {spec.pattern}" if spec.pattern else f" {spec.sparsity:.0%} ({gran})")),
            ("real-zero sparsity (prunable linears)", f"{pruned['sparsity']['value']:.4%}"),
            ("prune seconds", f"{pruned['prune_seconds']['value']:.1f}")]
    evals = [n for n in names if n.endswith("-evaluate")]
    for tag, stage in zip(("before", "after"), evals):
        for key, m in man["metrics"][stage].items():
            if key.startswith("ppl/"):
                p = m["protocol"]
                rows.append((f"perplexity {tag} ({p['dataset']}, {p['windows']} x {p['seqlen']})",
                             f"{m['value']:.4f}"))
    rows.append(("saved", str(out / "model")))
    con.print(table(f"prune {model}", rows))
