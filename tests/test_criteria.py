"""The criterion registry, table-driven: one row per registered criterion, one set of shared assertions.

Adding a criterion = its file + one registry line + one row here (the table must cover the registry)."""

from __future__ import annotations

import math

import pytest
import torch

from prunetune.errors import PrunetuneError
from prunetune.models.arch import get_adapter
from prunetune.models.loading import load_model
from prunetune.pruning.api import prune
from prunetune.pruning.criteria import (CRITERIA, Criterion, criterion_names, get_criterion, register,
                                       structure_criterion_names)

# name -> (statistics, default granularity, how many weights of a [rows, cols] layer are pruned at sparsity s;
#          None = counted over all layers together)
TABLE = {
    "magnitude": ("none", "row", lambda r, c, s: r * math.floor(s * c)),
    "l1-global": ("none", "global", None),
    "l2-cols": ("none", "cols", lambda r, c, s: r * math.floor(s * c)),
    "wanda": ("column_norms", "row", lambda r, c, s: r * math.floor(s * c)),
    "sparsegpt": ("hessian", "layer", lambda r, c, s: math.floor(s * r * c)),
    "admm": ("hessian", "layer", lambda r, c, s: math.floor(s * r * c)),
    "owl-admm": ("hessian", "layer", "owl"),  # per-block sparsities; their weighted mean is the target
}
SPARSITY = 0.3


def _ids():
    return torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(0))


def _linears(model):
    return {n: lin for n, (_, lin) in get_adapter(model).linears().items()}


# structure scores (`prunetune shrink`, composable heads): name -> column score of W from input moments
STRUCTURE_TABLE = {
    "magnitude": lambda w, st: w.abs().sum(0),
    "l1-global": lambda w, st: w.abs().sum(0),
    "l2-cols": lambda w, st: w.pow(2).sum(0),
    "wanda": lambda w, st: w.abs().sum(0) * st.norm(),
    "flap": lambda w, st: w.pow(2).sum(0) * st.var(),
}


def test_table_covers_the_registry():
    assert set(TABLE) == set(criterion_names())
    assert set(STRUCTURE_TABLE) == set(structure_criterion_names())
    assert set(TABLE) | set(STRUCTURE_TABLE) == set(CRITERIA)


@pytest.mark.parametrize("name", list(STRUCTURE_TABLE))
def test_structure_criterion(name):
    """One vocabulary: the criteria that score structures are the registry's, under the same names."""
    from prunetune.pruning.criteria.flap import MomentStats

    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(6, 8, generator=gen, dtype=torch.float64), torch.randn(2, 5, 8, generator=gen) + 1.0
    stats = MomentStats(8)
    stats.accumulate(MomentStats.prepare(x), 2)
    assert stats.tokens == 10 and torch.allclose(stats.mean(), x.reshape(-1, 8).double().mean(0))
    crit = get_criterion(name, structures=True)
    assert torch.equal(crit.column_scores(w, stats), STRUCTURE_TABLE[name](w, stats))
    if crit.group_statistics == "none":
        assert torch.equal(crit.row_scores(w), crit.element_importance(w).sum(1))
    if not crit.scores_weights:  # a structure-only criterion is not offered to one-shot pruning
        with pytest.raises(PrunetuneError, match="unknown pruning method"):
            get_criterion(name)


def test_aliases_are_declared_once():
    """"l1" is l1-global everywhere (|W|, one global threshold by default); PAYT reads "magnitude" as l1-global
    too (the seed's L1Unstructured), one-shot pruning as |W| per row."""
    assert get_criterion("l1").name == get_criterion("L1Unstructured").name == "l1-global"
    assert get_criterion("magnitude").name == "magnitude"
    assert get_criterion("magnitude", "payt").name == "l1-global"
    assert get_criterion("l2", structures=True).name == "l2-cols"


@pytest.mark.parametrize("name", list(TABLE))
def test_criterion(name):
    crit = get_criterion(name)
    statistics, default, count = TABLE[name]
    assert crit.statistics == statistics and crit.default_granularity == default
    assert crit.needs_calibration == (statistics != "none")
    stats = crit.make_stats(16)
    assert (stats is None) == (not crit.needs_calibration)

    model = load_model("tiny-llama", "causal-lm").model
    before = {n: lin.weight.detach().clone() for n, lin in _linears(model).items()}
    if crit.needs_calibration:  # needs-calibration honoured: no data, no pruning, nothing touched
        with pytest.raises(PrunetuneError, match="needs calibration"):
            prune(model, name, SPARSITY)
        assert all(torch.equal(lin.weight, before[n]) for n, lin in _linears(model).items())
    masks = prune(model, name, SPARSITY, calib=_ids())

    zeros_total = numel_total = 0
    for n, lin in _linears(model).items():
        w, keep = lin.weight.detach(), masks[n]
        assert torch.equal(keep, w != 0), n  # the mask is the real zeros
        rows, cols = w.shape
        if callable(count):
            assert int((~keep).sum()) == count(rows, cols, SPARSITY), n
        if name == "l2-cols":  # whole input columns
            assert torch.equal(keep, keep[:1].expand_as(keep)), n
        if crit.updates_weights:
            assert not torch.equal(w[keep], before[n][keep]), n  # survivors compensate
        else:
            assert torch.equal(w[keep], before[n][keep]), n  # score-only: the rest is untouched
        zeros_total += int((~keep).sum())
        numel_total += w.numel()
    if count is None:
        assert zeros_total == math.floor(SPARSITY * numel_total)
    if count == "owl":  # each layer floors its own block's share: at most one weight per layer below the mean
        assert 0 <= math.floor(SPARSITY * numel_total) - zeros_total <= len(before)

    if not crit.needs_calibration:  # calibration data, when given anyway, changes nothing
        again = load_model("tiny-llama", "causal-lm").model
        with_calib = prune(again, name, SPARSITY, calib=_ids())
        plain = prune(load_model("tiny-llama", "causal-lm").model, name, SPARSITY)
        assert all(torch.equal(with_calib[n], plain[n]) for n in plain.names())


def test_aliases_and_unknown_names():
    assert get_criterion("L1Unstructured").name == "l1-global"
    assert get_criterion("LnStructured").name == "l2-cols"
    with pytest.raises(PrunetuneError, match="unknown pruning method 'nope'; choose one of: wanda, magnitude"):
        get_criterion("nope")


def test_register_rejects_duplicates_and_bad_declarations():
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Again", (Criterion,), {"name": "wanda"}))
    with pytest.raises(ValueError, match="statistics"):
        register(type("Odd", (Criterion,), {"name": "odd", "statistics": "moments"}))
    assert "odd" not in CRITERIA


def test_a_new_criterion_is_one_class(monkeypatch):
    """What adding a criterion takes: a class with a score; prune(), recipes and PAYT then accept it."""
    from prunetune.config import PruneSpec
    from prunetune.pruning.criteria import registry as criteria

    monkeypatch.setattr(criteria, "CRITERIA", dict(criteria.CRITERIA))
    monkeypatch.setattr(criteria, "_ALIASES", dict(criteria._ALIASES))

    @register
    class SquaredMagnitude(Criterion):
        name = "squared"

        def score(self, weight, stats=None):
            return weight.detach().float() ** 2

    assert PruneSpec(method="squared").method == "squared"
    model = load_model("tiny-llama", "causal-lm").model
    masks = prune(model, "squared", 0.5)
    ref = prune(load_model("tiny-llama", "causal-lm").model, "magnitude", 0.5)  # same order as |W|
    assert all(torch.equal(masks[n], ref[n]) for n in ref.names())
    from prunetune.methods.payt import compute_masks

    payt = compute_masks(load_model("tiny-llama", "causal-lm").model, "squared", 0.5)
    assert all(torch.equal(payt[n], ref[n]) for n in ref.names())
