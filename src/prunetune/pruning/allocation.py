"""Per-block sparsity allocation: OWL (outlier-weighted layer-wise sparsity, Yin et al., ICML 2024).

Uniform sparsity treats every block alike, but LLM blocks differ in how many *outlier* weights they hold (weights
whose Wanda score |W_ij| ‖X_j‖ is far above the block's mean), and those are the ones pruning must not touch.
OWL measures each block's outlier ratio D_l = share of its scores above M × their mean (M = 5 by default, all the
block's prunable linears pooled), then sets its sparsity from it, linearly within a band of width 2λ:

    keep_l = 2λ (D_l − min D) / (max D − min D),  shifted so the mean keep is 1 − s;   s_l = 1 − keep_l

so the block with the most outliers is pruned λ below the target and the one with the fewest λ above it. The
authors' code (luuyin/OWL) averages over blocks, which are all the same size in a decoder; here the mean is
weighted by each block's prunable weights, so the model's total sparsity is the target exactly whatever was
skipped. The ratios come from a pass over the dense model (its own `calibrate.sequential` pass, as in the
reference, which computes every block's ratio before pruning any), with Wanda's column-norm statistics.

λ = 0.08, M = 5: the paper's LLaMA setting at 70%. A λ that pushes a block outside [0, 1) is an error.
"""

from __future__ import annotations

import math

import torch

from prunetune.errors import PrunetuneError
from prunetune.models.arch import get_adapter, unwrap
from prunetune.pruning import calibrate
from prunetune.pruning.calibrate import release_freed_memory
from prunetune.pruning.criteria.wanda import ColumnNormStats, wanda_scores

OWL_LAMBDA = 0.08
OWL_M = 5.0
LAYER_SPARSITY = ("uniform", "owl")


def check_owl(lam: float, m: float) -> None:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and 0.0 <= lam < 0.5):
        raise PrunetuneError(f"OWL lambda must be in [0, 0.5) (half the width of the sparsity band), got {lam}")
    if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
        raise PrunetuneError(f"OWL M (outlier = score above M x the block's mean) must be > 0, got {m}")


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of a block's scores (its layers pooled) above `m` × their mean: OWL's layer-wise outlier ratio."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def owl_sparsities(ratios: list[float], sizes: list[int], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity from outlier ratios: a band of width 2λ, more outliers = sparser-less, size-weighted
    mean exactly `sparsity`; one readable error when a block would leave [0, 1)."""
    check_owl(lam, OWL_M)
    if len(ratios) != len(sizes) or not ratios:
        raise PrunetuneError("OWL needs one outlier ratio per block")
    lo, hi = min(ratios), max(ratios)
    spread = hi - lo
    keep = [0.0 if spread == 0 else (r - lo) / spread * 2 * lam for r in ratios]
    total = float(sum(sizes))
    mean_keep = sum(k * n for k, n in zip(keep, sizes)) / total
    out = [sparsity - (k - mean_keep) for k in keep]  # sparsity = 1 - keep, shifted to the asked mean
    for i, s in enumerate(out):
        if not (0.0 <= s < 1.0):
            raise PrunetuneError(f"OWL lambda {lam} puts block {i} at sparsity {s:.4f}, outside [0, 1), for a "
                                 f"target of {sparsity}; use a smaller --owl-lambda")
    return out


@torch.no_grad()
def owl_block_ratios(model, ids: torch.Tensor, targets: dict[str, torch.nn.Module], m: float, *,
                     device=None, batch_size: int = 1, progress: bool | None = None,
                     encoder_decoder: bool = False, io=None) -> tuple[list[float], list[int]]:
    """(outlier ratio, prunable weights) of every block with targets, from one pass over the dense model.

    A `calibrate.sequential` pass whose per-block step only measures (nothing is pruned), so the blocks see
    dense inputs, as in the reference; encoder-decoder models get `collect_all`'s single dense pass. With a
    streaming `io` each block is read as in the pruning pass but dropped unwritten after it (`_ReadOnly`)."""
    adapter = get_adapter(unwrap(model))
    ratios: list[float] = []
    sizes: list[int] = []

    def measure(stats: dict) -> None:
        scores = [wanda_scores(targets[n].weight, st.norms()) for n, st in stats.items()]
        ratios.append(outlier_ratio(scores, m))
        sizes.append(sum(s.numel() for s in scores))

    def factory(_name, lin, dev):
        return ColumnNormStats(lin.in_features, dev)

    if encoder_decoder:
        stats = calibrate.collect_all(model, ids, factory, set(targets), batch_size=batch_size, progress=progress)
        for b in adapter.blocks():
            names = [k for k in (calibrate.layer_key(adapter, x) for x in b.linears.values()) if k in stats]
            if names:
                measure({n: stats[n] for n in names})
    else:
        calibrate.sequential(model, ids, factory, lambda _block, stats: measure(stats), targets=set(targets),
                             device=device, batch_size=batch_size, progress=progress, propagate=False,
                             io=None if io is None else _ReadOnly(io))
    return ratios, sizes


class _ReadOnly:
    """A block io for the measuring pass: blocks are loaded as the pruning pass loads them, then dropped to the
    meta device unwritten (the pruning pass that follows reads them again and writes them once)."""

    def __init__(self, io) -> None:
        self.io = io

    def load(self, module: torch.nn.Module) -> None:
        self.io.load(module)

    def release(self, module: torch.nn.Module) -> None:
        module.to("meta")
        release_freed_memory()
