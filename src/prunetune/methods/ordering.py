"""Does the order of pruning and fine-tuning matter? Four orderings to the same target, same budget.

* `prune_ft`: prune to the target once, then fine-tune all steps.
* `ft_prune`: fine-tune all steps on the dense model, then prune to the target once.
* `iter_pf`: k rounds of (prune to target*r/k, fine-tune steps/k).
* `iter_fp`: k rounds of (fine-tune steps/k, prune to target*r/k).

Pruning is the engine's (Wanda by default, the recipe's `prune` section with the round's sparsity; earlier
zeros stay zero); fine-tuning is the tuning module's LoRA with the masks enforced and merged as
(W + sBA) * M after each fine-tuning step, so the next pruning sees the adapted weights. The model is
evaluated after every step, so the table shows the whole path, not just the end point.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field
from transformers import AutoTokenizer

from prunetune.errors import PrunetuneError
from prunetune.models.loading import load_model
from prunetune.schema import Spec

ORDERINGS = ("prune_ft", "ft_prune", "iter_pf", "iter_fp")


class OrderSpec(Spec):
    """The ordering study: how pruning and fine-tuning are interleaved on the way to a target sparsity."""

    orderings: list[Literal["prune_ft", "ft_prune", "iter_pf", "iter_fp"]] = Field(
        default_factory=lambda: ["prune_ft", "ft_prune", "iter_pf", "iter_fp"])
    target: float = Field(0.5, gt=0.0, lt=1.0)
    rounds: int = Field(3, ge=2, description="k rounds of the iterative orderings")
    steps: int = Field(12, ge=1, description="total fine-tuning steps per ordering (split over rounds)")


def plan(ordering: str, target: float, rounds: int, steps: int) -> list[tuple[str, float | int]]:
    """The ordering as actions: ('prune', sparsity) and ('ft', optimizer steps); total steps always `steps`."""
    if ordering not in ORDERINGS:
        raise PrunetuneError(f"unknown ordering '{ordering}'; choose one of: {', '.join(ORDERINGS)}")
    if not 0.0 < target < 1.0:
        raise PrunetuneError(f"ordering target sparsity must be in (0, 1), got {target}")
    if ordering == "prune_ft":
        return [("prune", target), ("ft", steps)]
    if ordering == "ft_prune":
        return [("ft", steps), ("prune", target)]
    if rounds < 2:
        raise PrunetuneError(f"iterative orderings need rounds >= 2, got {rounds}")
    if steps < rounds:
        raise PrunetuneError(f"iterative orderings need at least one fine-tuning step per round ({steps} < {rounds})")
    per = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    out: list[tuple[str, float | int]] = []
    for r in range(rounds):
        s = round(target * (r + 1) / rounds, 6)
        out += [("prune", s), ("ft", per[r])] if ordering == "iter_pf" else [("ft", per[r]), ("prune", s)]
    return out


def _action_label(kind: str, value) -> str:
    return f"prune to {value:.0%}" if kind == "prune" else f"fine-tune {value} steps"


def _start_row(state) -> dict | None:
    """The 'start' evaluation an earlier order_study stage of this run already made from the same model."""
    for h in state.history:
        if h["type"] == "order_study" and h.get("model_in") == state.model_spec():
            rows = state.out / "stages" / h["stage"] / "ordering.json"
            if rows.is_file():
                for r in json.loads(rows.read_text()):
                    if r["action"] == "start":
                        return r
    return None


def _tokenizer(spec: str):
    return AutoTokenizer.from_pretrained(spec) if Path(spec).is_dir() else load_model(spec, "causal-lm").tokenizer


@dataclass(frozen=True)
class OrderingSteps:
    """The four operations an ordering strings together, as the pipeline performs them for its own stages.

    The pipeline hands them in (`pipelines.stages.run_order_study`), so the study prunes, fine-tunes,
    evaluates and saves exactly as the `prune`, `finetune` and `evaluate` stages do, without this module
    importing the pipeline above it. Signatures are those of `pipelines.stages`:

        prune(loaded, recipe, prune_spec, seed, previous_masks) -> (masks, seconds, calibration)
        finetune(model_spec, recipe, tune_spec, masks, seed, work_dir, tokenizer=...) -> {model, tokenizer, curves}
        evaluate(loaded, recipe, eval_spec, seed) -> (metrics, layers)
        save(state_like, out_dir, model, tokenizer, masks) -> saved model dir
    """

    prune: Callable[..., Any]
    finetune: Callable[..., Any]
    evaluate: Callable[..., Any]
    save: Callable[..., Any]


def run_orderings(state, out_dir: Path, ops: OrderingSteps) -> list[dict]:
    """Run every ordering of the stage's `order` settings from the run's current model; rows of metrics."""
    prune_model, finetune_model, evaluate_model, save_model = ops.prune, ops.finetune, ops.evaluate, ops.save
    spec, recipe = state.spec, state.recipe
    if recipe.model.task != "causal-lm":
        raise PrunetuneError("the ordering study measures perplexity: it needs model.task causal-lm")
    eval_spec = recipe.eval
    tune_spec = recipe.tune
    rows: list[dict] = []
    curves: dict[str, list] = {}
    start = _start_row(state)
    if start is None:
        loaded = state.load()
        metrics, _ = evaluate_model(loaded, recipe, eval_spec, state.seed)
        start = {"step": 0, "action": "start", "sparsity": metrics["sparsity"]["value"], "metrics": metrics}
    for ordering in spec.orderings:
        rows.append({**start, "ordering": ordering, "final": False})
        current = state.model_spec()
        masks = state.masks()
        work = out_dir / "work" / ordering
        steps_done = 0
        actions = plan(ordering, spec.target, spec.rounds, spec.steps)
        for i, (kind, value) in enumerate(actions, 1):
            step_dir = work / f"step{i}"
            step_dir.mkdir(parents=True, exist_ok=True)
            seed = state.seed + 1000 * i
            if kind == "prune":
                loaded = load_model(current, "causal-lm")
                pspec = recipe.prune.model_copy(update={"sparsity": float(value), "pattern": None})
                masks, _, _ = prune_model(loaded, recipe, pspec, seed, masks)
                model, tok = loaded.model, loaded.tokenizer
            else:
                tspec = tune_spec.model_copy(update={"steps": int(value)})
                res = finetune_model(current, recipe, tspec, masks, seed, step_dir / "tune", tokenizer=_tokenizer(current))
                model, tok = res["model"], res["tokenizer"]
                for k, pts in res["curves"].items():
                    if k == "loss":
                        curves.setdefault(f"{ordering} loss", []).extend([[steps_done + s, v] for s, v in pts])
                steps_done += int(value)
                shutil.rmtree(step_dir / "tune" / "checkpoints", ignore_errors=True)
            state_like = type("S", (), {"name": f"{state.name}/{ordering}/step{i}", "recipe": recipe,
                                        "seed": state.seed, "index": state.index})
            saved = save_model(state_like, step_dir, model, tok, masks)
            metrics, _ = evaluate_model(type("L", (), {"model": model, "tokenizer": tok}), recipe, eval_spec,
                                        state.seed)
            rows.append({"ordering": ordering, "step": i, "action": _action_label(kind, value),
                         "sparsity": metrics["sparsity"]["value"], "metrics": metrics, "final": i == len(actions)})
            if current != state.model_spec():  # keep disk use to one model per ordering
                shutil.rmtree(Path(current), ignore_errors=True)
            current = str(saved)
            del model
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out_dir / "work", ignore_errors=True)
    (out_dir / "ordering_curves.json").write_text(json.dumps(curves))
    return rows
