"""`prunetune shrink`'s method: one-shot structured pruning, whichever way the structures are scored: VIB gates
(`methods.vib`) or a structure criterion of the registry (l1, l2, wanda, flap; `pruning.shrink.scores`).

The engine (couplings, scores, widths, selection, surgery) is the `pruning.shrink` package, a floor below the
methods; VIB holds the gates; this module only dispatches and records what was done.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.evaluation.perplexity import causal_lm_loss
from prunetune.pruning.shrink.scores import BASELINES, baseline_scores, collect_moments
from prunetune.pruning.shrink.surgery import apply_masks, flap_compensate, shrink_selection
from prunetune.pruning.shrink.widths import (
    Geometry,
    Widths,
    allocate_widths,
    check_inputs,
    geometry,
    parse_structures,
    select,
    split_candidates,
)
from prunetune.methods.vib import StructuredSpec, VibMethod, train_gates


def prune_structured(model: nn.Module, method: str, sparsity: float, *, structures: str | tuple[str, ...] =
                     ("heads", "neurons"), round_to: int = 64, ids: torch.Tensor | None = None,
                     shrink: bool = True, vib: StructuredSpec | None = None, vib_options: dict | None = None,
                     batch_size: int = 4,
                     gate_state: dict[str, torch.Tensor] | None = None,
                     gates_out: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict]:
    """One-shot structured pruning to `sparsity` of block parameters; returns (model, facts).

    `method` is `vib` (gates trained on `ids`, see `methods.vib`) or a baseline (`l1`, `l2`, `wanda`, `flap`;
    Wanda and FLAP need `ids`). VIB's options are `vib`'s (the recipe's `structured` section, its one schema;
    None: the defaults), whose sparsity, structures and round_to are the arguments', and `vib_options`, the
    method's own keyword options (`VibMethod`: seed, optimizer, constraint, compensate, ...). With
    `shrink=False` the removed structures are zeroed instead (same outputs for heads and neurons), which needs no
    surgery. VIB's trained gates are copied into `gates_out` when given;
    passing them back as `gate_state` reuses them instead of training again (same model,
    sparsity and structures), e.g. to compare selections or compensation from one gate training.
    """
    structs = parse_structures(structures)
    geom = geometry(model)
    check_inputs(geom, sparsity, structs, round_to)
    facts: dict = {"method": method, "sparsity_target": sparsity, "structures": list(structs), "round_to": round_to}
    spec = (vib if vib is not None else StructuredSpec()).model_copy(
        update={"sparsity": sparsity, "structures": list(structs), "round_to": round_to})
    if method == "vib":
        if ids is None:
            raise PrunetuneError("vib needs calibration text (token windows) to train its gates")
        meth = VibMethod(spec, **(vib_options or {}))
        # FLAP's compensation and centred gates need the dense model's input means: one pass before the gates go in
        stats = collect_moments(model, ids[:8], batch_size) if meth.compensate or spec.vib_center else None
        if spec.vib_center:
            meth.set_means(model, stats)
        if gate_state is None:
            train_gates(model, meth, ids)
        else:
            meth.prepare(model)
            meth.gates.load_state_dict(gate_state)
            meth.gates.eval()
        if gates_out is not None:
            gates_out.update({k: v.detach().cpu().clone() for k, v in meth.gates.state_dict().items()})
        widths, scores = meth.widths(geom), meth.scores()
        if spec.neuron_ranking() == "flap":  # the hybrid: KV groups from the gates, neurons by FLAP's fluctuation
            scores["neurons"] = baseline_scores(model, "flap", stats)["neurons"]
        if spec.split == "measured":  # the gated model in eval computes what the fold of a selection will
            def gated(w: Widths) -> nn.Module:
                meth.set_eval_keep(select(scores, w, geom))
                return model

            widths, facts["split"] = measured_split(geom, sparsity, structs, round_to, gated, ids, batch_size)
            meth.clear_eval_keep()
        sel = select(scores, widths, geom)
        if meth.compensate:  # on the dense weights (before the μ fold): a removed structure's mean output
            flap_compensate(model, sel, stats)
        meth.fold(model, sel)
        facts["vib"] = meth.summary()
    elif method in BASELINES:
        stats = None
        if method in ("wanda", "flap"):
            if ids is None:
                raise PrunetuneError(f"{method} needs calibration text to score structures")
            stats = collect_moments(model, ids, batch_size)
            facts["calibration"] = {"windows": int(ids.shape[0]), "seqlen": int(ids.shape[1])}
        scores = {k: v for k, v in baseline_scores(model, method, stats).items() if k in structs}
        widths = allocate_widths(geom, sparsity, structs, round_to)
        if spec.split == "measured":
            def masked(w: Widths) -> nn.Module:  # a copy with the selection zeroed (and compensated, for FLAP)
                trial = copy.deepcopy(model)
                trial_sel = select(scores, w, geom)
                if method == "flap":
                    flap_compensate(trial, trial_sel, stats)
                apply_masks(trial, trial_sel)
                return trial

            if ids is None:
                raise PrunetuneError(f"split 'measured' tries each split on calibration text: {method} was given none")
            widths, facts["split"] = measured_split(geom, sparsity, structs, round_to, masked, ids, batch_size)
        sel = select(scores, widths, geom)
        if method == "flap":
            assert stats is not None
            flap_compensate(model, sel, stats)
    else:
        raise PrunetuneError(f"unknown structured method '{method}'; choose vib or one of {', '.join(BASELINES)}")
    dense = geom.dense()
    facts.update({
        "widths": widths.to_dict(), "dense_widths": dense.to_dict(),
        "block_params": geom.block_params(widths), "dense_block_params": geom.block_params(dense),
        "block_sparsity": 1 - geom.block_params(widths) / geom.block_params(dense),
        "compute_ratio": geom.flops_per_token(dense) / geom.flops_per_token(widths),
    })
    if shrink:
        model = shrink_selection(model, sel, structs)
    else:
        apply_masks(model, sel)
    facts["shrunk"] = shrink
    return model, facts


@torch.no_grad()
def calibration_loss(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy over the windows `ids`: what a measured split compares."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    try:
        for i in range(0, ids.shape[0], batch_size):
            nll, count = causal_lm_loss(model, ids[i:i + batch_size].to(device), reduction="sum")
            total, n = total + float(nll), n + count
    finally:
        model.train(was)
    return total / n


MEASURE_WINDOWS = 8  # calibration windows a measured split scores each candidate on


def measured_split(geom: Geometry, sparsity: float, structures: tuple[str, ...], round_to: int,
                   pruned: Callable[[Widths], nn.Module], ids: torch.Tensor, batch_size: int = 4
                   ) -> tuple[Widths, dict]:
    """The split between KV groups and neurons with the lowest calibration loss: each candidate
    (`pruning.shrink.widths.split_candidates`) is applied by `pruned` (the model as that split leaves it) and
    scored on the first `MEASURE_WINDOWS` windows. Why measure: every structure kind keeping the same fraction
    removes one of SmolLM2's three KV groups already at 20%, and which kind goes matters more than which
    structures inside a kind (BENCHMARKS.md, structured pruning: the split between kinds)."""
    tried = []
    for w in split_candidates(geom, sparsity, structures, round_to):
        loss = calibration_loss(pruned(w), ids[:MEASURE_WINDOWS], batch_size)
        tried.append({"widths": w.to_dict(), "loss": loss,
                      "block_sparsity": 1 - geom.block_params(w) / geom.block_params(geom.dense())})
    best = min(tried, key=lambda t: t["loss"])
    return Widths(**best["widths"]), {"rule": "measured", "windows": min(MEASURE_WINDOWS, int(ids.shape[0])),
                                      "tried": tried, "chosen": best["widths"]}
