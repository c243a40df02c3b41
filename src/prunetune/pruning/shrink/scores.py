"""Structure scores: how much each KV group, MLP neuron and hidden channel matters.

The criteria are the registry's (`pruning.criteria`: l1 = l1-global's |W|, l2 = l2-cols' W², wanda, flap),
through their structure scores (`column_scores`, `row_scores`); this module sums them over each coupling.
`baseline_scores` is structured pruning's (every layer, float64, each member normalised by its mean);
`structure_scores` the per-block scores of one kind from weight-shaped element scores (as `prune`'s
structured granularities combine them), for `widths.keep_from_scores`.
"""

from __future__ import annotations

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.models.arch import base_linear, get_adapter, unwrap
from prunetune.pruning.calibrate import calibration_ids, collect_all, layer_key
from prunetune.pruning.criteria import get_criterion
from prunetune.pruning.criteria.flap import MomentStats
from prunetune.pruning.shrink.couplings import (
    block_couplings,
    block_linears,
    check_structure,
    group_scores,
    shrinkable_adapter,
)
from prunetune.pruning.shrink.widths import geometry


BASELINES = ("l1", "l2", "wanda", "flap")  # registry criteria (`pruning.criteria`) that score structures


def column_scores(method: str, weight: torch.Tensor, stats: MomentStats | None) -> torch.Tensor:
    """Importance of each input column of a linear, in float64, by the registry's criterion: L1/L2 of the
    column, Wanda Σ|W|·||X||, FLAP var(X)·||W||²."""
    if method not in BASELINES:
        raise PrunetuneError(f"unknown structured criterion '{method}'; choose from {', '.join(BASELINES)}")
    return get_criterion(method, structures=True).column_scores(weight.detach().double(), stats)


def row_scores(method: str, weight: torch.Tensor) -> torch.Tensor:
    return get_criterion(method, structures=True).row_scores(weight.detach().double())


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.mean().clamp_min(1e-30)


def baseline_scores(model: nn.Module, method: str, stats: dict[str, MomentStats] | None) -> dict[str, torch.Tensor]:
    """Scores of every structure. L1/L2 sum every coupled weight (each member normalised by its mean, as in
    `pruning.shrink.couplings.group_scores`); Wanda and FLAP score what a structure *feeds* (the o_proj / down_proj
    input columns, FLAP's choice) and, for hidden channels, the input columns of every projection."""
    adapter = get_adapter(model)
    geom = geometry(model)
    qchunk = geom.groups * geom.head_dim
    names = [{r: adapter.name_of(m) for r, m in lin.items()} for lin in block_linears(adapter)]
    heads, neurons = [], []
    hidden = torch.zeros(geom.hidden, dtype=torch.float64)
    for l, lin in enumerate(block_linears(adapter)):
        st = (lambda r: stats[names[l][r]]) if stats is not None else (lambda r: None)
        o_cols = column_scores(method, lin["o"].weight, st("o")).cpu()
        d_cols = column_scores(method, lin["down"].weight, st("down")).cpu()
        h = _norm(o_cols.view(geom.kv_heads, qchunk).sum(1))
        n = _norm(d_cols)
        if method in ("l1", "l2"):
            for r, chunk in (("q", qchunk), ("k", geom.head_dim), ("v", geom.head_dim)):
                h += _norm(row_scores(method, lin[r].weight).cpu().view(geom.kv_heads, chunk).sum(1))
            for r in ("gate", "up"):
                n += _norm(row_scores(method, lin[r].weight).cpu())
            for r in ("o", "down"):
                hidden += _norm(row_scores(method, lin[r].weight).cpu())
        for r in ("q", "k", "v", "gate", "up"):
            hidden += _norm(column_scores(method, lin[r].weight, st(r)).cpu())
        heads.append(h)
        neurons.append(n)
    if method in ("l1", "l2"):
        hidden += _norm(column_scores(method, unwrap(model).get_input_embeddings().weight, None).cpu())
    return {"heads": torch.stack(heads), "neurons": torch.stack(neurons), "hidden": hidden}


def collect_moments(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> dict[str, MomentStats]:
    """Input moments of every projection from one pass of the dense model over the calibration windows."""
    adapter = get_adapter(model)
    targets = {layer_key(adapter, lin) for _, lin in adapter.linears().values()}
    return collect_all(model, ids, lambda _n, lin, dev: MomentStats(lin.in_features, dev), targets,
                       batch_size=batch_size, progress=False)


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return calibration_ids(source, tokenizer, nsamples, seqlen, seed)


def structure_scores(model: torch.nn.Module, kind: str, scores: dict[str, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """[n_blocks, n_groups] importance of each KV group or MLP neuron, from element scores of its members.

    `scores` maps module name -> weight-shaped element scores (|W| when omitted; Wanda's |W|·‖X‖ or any
    criterion's output otherwise), combined per coupling as `group_scores` does for masks, so a plan from
    `keep_from_scores(model, {kind: structure_scores(...)}, ...)` removes what `prune(granularity=kind)` would.
    """
    adapter = shrinkable_adapter(model)
    check_structure(adapter, kind)
    if kind == "hidden":
        raise PrunetuneError("hidden-channel scores are model-wide: pass a [hidden_size] tensor to keep_from_scores")
    cs = block_couplings(adapter, kind)
    if scores is None:
        scores = {m.name: base_linear(adapter.root.get_submodule(m.name)).weight.detach().abs()
                  for c in cs for m in c.members}
    return torch.stack([group_scores(c, scores) for c in cs])
