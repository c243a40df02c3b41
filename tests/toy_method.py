"""A toy method added from outside the package (CONTRIBUTING.md's worked example; tests/test_contributing.py runs it).

It prunes a random quarter of every prunable weight. One stage function, one registration line for its stage
kind, one command: nothing in src/prunetune is edited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from prunetune.cli.app import app
from prunetune.cli.common import claim_out, console, run_and_report
from prunetune.config import validate_recipe
from prunetune.models.arch import get_adapter
from prunetune.pipelines.stages import save_model, sparsity_metric
from prunetune.pruning.masks import MaskSet
from prunetune.registry import STAGE_KINDS, StageKind, register_stage

FRACTION = 0.25


def run_toy(state, out_dir: Path) -> dict:
    """The stage: load the previous stage's model, prune, save it where the next stage loads it from."""
    loaded = state.load()
    gen = torch.Generator().manual_seed(state.seed)
    with torch.no_grad():
        for _, lin in get_adapter(loaded.model).linears().values():
            lin.weight.mul_(torch.rand(lin.weight.shape, generator=gen) >= FRACTION)
    metric, _ = sparsity_metric(loaded.model)
    save_model(state, out_dir, loaded.model, loaded.tokenizer, MaskSet.from_model(loaded.model))
    return {"metrics": {"sparsity": metric}}


if "toy" not in STAGE_KINDS:  # the registration line (guarded: a test module may be imported twice)
    register_stage(StageKind("toy", f"{__name__}:run_toy", section=None, produces_model=True))


@app.command("toy")
def toy_cmd(
    model: Annotated[str, typer.Argument(help="alias, HF dir or hub id")],
    out: Annotated[Path, typer.Option("--out", help="run directory")],
    resume: Annotated[bool, typer.Option("--resume", help="continue OUT")] = False,
) -> None:
    """Prune a random quarter of every prunable weight (a toy): a one-stage recipe run like `prunetune run`."""
    recipe = validate_recipe({"name": "toy", "model": {"name": model}, "stages": ["toy", "export"]}, "toy")
    run_and_report(recipe, claim_out(out), resume=resume, overwrite=False, con=console())
