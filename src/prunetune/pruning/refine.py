"""Mask refinement after any calibrated criterion: DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training").

A criterion picks a mask once; DSnoT then swaps, row by row, one pruned weight back in for one kept weight out,
training-free, to shrink the row's *expected* reconstruction error

    e_i = Σ_j (W_ij − Ŵ_ij) E[x_j]        (W: dense weights, Ŵ: pruned ones, E[x_j]: input j's mean)

i.e. the mean shift the pruning adds to output i. Rules as in the authors' code (zyxxmu/DSnoT): if e_i > 0, the
weight grown back is the pruned one with the largest W_ij E[x_j] / Var[x_j]^p (it cancels most error for the
least variance it brings); if e_i < 0, the smallest. The weight pruned in exchange is, among the kept weights
whose contribution Ŵ_ij E[x_j] has the sign that moves e_i towards 0, the one of lowest Wanda score
|W_ij| ‖X_j‖ (for N:M: the lowest-Wanda kept weight of the grown weight's group, so the pattern stays exact).
A row stops at |e_i| ≤ `threshold` (0.1) or after `cycles` (50) swaps. One change from the reference: a swap
is taken only if it makes |e_i| smaller (the reference's default also takes swaps that overshoot), so
refinement never worsens the error it optimises; a row stops at the first swap that would not help.

Grown weights get their dense values back; weights pruned by the swap are zeroed. After a weight-updating
criterion (SparseGPT, ADMM) the kept weights are the updated ones, and e_i measures them against the dense W.

Statistics: the per-input mean and variance over the calibration tokens (`MomentStats`), collected in the same
forward passes as the criterion's own statistics (`with_moments`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prunetune.errors import PrunetuneError

REFINERS = ("none", "dsnot")
DSNOT_DEFAULTS = {"cycles": 50, "threshold": 0.1, "pow_var": 1.0}


class MomentStats:
    """Per-input-feature sum and sum of squares over all calibration tokens (mean, variance, ‖X_j‖₂)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    @staticmethod
    def prepare(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        return x.sum(0), x.pow(2).sum(0), x.shape[0]

    def accumulate(self, prepared: tuple[torch.Tensor, torch.Tensor, int], batch: int) -> None:
        s, sq, n = prepared
        self.sum += s.to(device=self.sum.device, dtype=self.sum.dtype)
        self.sq_sum += sq.to(device=self.sq_sum.device, dtype=self.sq_sum.dtype)
        self.tokens += n

    def add(self, x: torch.Tensor) -> None:
        self.accumulate(self.prepare(x), 1)

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).float()

    def var(self) -> torch.Tensor:
        n = max(self.tokens, 1)
        return (self.sq_sum / n - (self.sum / n) ** 2).clamp_min(0).float()

    def norms(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()


class WithMoments:
    """A criterion's statistics plus `MomentStats`, fed by the same forward hooks (one `prepare` per tensor)."""

    def __init__(self, inner: Any, in_features: int, device: torch.device | str | None = None) -> None:
        self.inner = inner
        self.moments = MomentStats(in_features, device)

    def prepare(self, x: torch.Tensor) -> tuple[Any, Any]:
        return (None if self.inner is None else self.inner.prepare(x)), MomentStats.prepare(x)

    def accumulate(self, prepared: tuple[Any, Any], batch: int) -> None:
        if self.inner is not None:
            self.inner.accumulate(prepared[0], batch)
        self.moments.accumulate(prepared[1], batch)


def check_refine(refine: str | None, statistics: str, method: str) -> str | None:
    """The refiner's name (None = none); one readable line when it cannot follow this criterion."""
    if refine in (None, "", "none"):
        return None
    key = str(refine).strip().lower()
    if key not in REFINERS:
        raise PrunetuneError(f"unknown refinement '{refine}'; choose one of: {', '.join(REFINERS)}")
    if statistics in ("none", "gradients"):
        raise PrunetuneError(f"--refine {key} swaps weights from calibration input statistics; {method} collects "
                             "none (use wanda, sparsegpt or admm)")
    return key


def check_dsnot(cycles: int, threshold: float, pow_var: float) -> None:
    if not (isinstance(cycles, int) and 0 <= cycles <= 100_000):
        raise PrunetuneError(f"DSnoT cycles must be an integer in [0, 100000], got {cycles}")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise PrunetuneError(f"DSnoT threshold must be >= 0, got {threshold}")
    if not (math.isfinite(pow_var) and pow_var >= 0):
        raise PrunetuneError(f"DSnoT variance power must be >= 0, got {pow_var}")


def expected_error(dense: torch.Tensor, pruned: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """e_i = Σ_j (W_ij − Ŵ_ij) E[x_j] per output row: the mean shift pruning adds to each output."""
    return (dense.float() - pruned.float()).matmul(mean.float().to(dense.device))


def _pointer_take(order: torch.Tensor, ptr: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column at each row's pointer in its sorted candidate list, and whether it is still a candidate."""
    cols = order.shape[1]
    p = ptr.clamp(max=cols - 1)
    col = order.gather(1, p.unsqueeze(1)).squeeze(1)
    ok = (ptr < cols) & valid.gather(1, col.unsqueeze(1)).squeeze(1)
    return col, ok


@torch.no_grad()
def dsnot(dense: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor, moments: MomentStats, *,
          pattern: tuple[int, int] | None = None, cycles: int = DSNOT_DEFAULTS["cycles"],
          threshold: float = DSNOT_DEFAULTS["threshold"],
          pow_var: float = DSNOT_DEFAULTS["pow_var"],
          allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(refined weights, refined keep-mask): the same count per row (per group for N:M), |e_i| never larger.

    `dense`: the weights before pruning; `pruned`/`keep`: the criterion's result. Weights that were exactly zero
    in `dense`, and weights outside `allowed` (an earlier pruning's mask), are never grown."""
    check_dsnot(cycles, threshold, pow_var)
    W0 = dense.detach().float()
    Wq = pruned.detach().float().clone() * keep
    keep = keep.clone().to(torch.bool)
    rows, cols = W0.shape
    dev = W0.device
    mu = moments.mean().to(dev)
    var = moments.var().to(dev)
    wanda = W0.abs() * moments.norms().to(dev).unsqueeze(0)
    e = expected_error(W0, Wq, mu)
    contrib0 = W0 * mu.unsqueeze(0)  # what growing j back subtracts from e
    grow_ok = ~keep & (W0 != 0)
    if allowed is not None:
        grow_ok &= allowed.to(device=dev, dtype=torch.bool)
    grow_metric = contrib0 / var.clamp_min(1e-12).pow(pow_var).unsqueeze(0) if pow_var else contrib0
    # growing candidates: for e > 0 the largest metric first, for e < 0 the smallest first
    up = torch.sort(grow_metric.masked_fill(~grow_ok, float("-inf")), dim=1, descending=True, stable=True).indices
    down = torch.sort(grow_metric.masked_fill(~grow_ok, float("inf")), dim=1, stable=True).indices
    ptr_up = torch.zeros(rows, dtype=torch.long, device=dev)
    ptr_down = torch.zeros(rows, dtype=torch.long, device=dev)
    active = torch.ones(rows, dtype=torch.bool, device=dev)
    ar = torch.arange(rows, device=dev)
    if pattern is None:
        contrib = Wq * mu.unsqueeze(0)  # what pruning j adds to e
        neg_ok, pos_ok = keep & (contrib < 0), keep & (contrib > 0)
        prune_neg = torch.sort(wanda.masked_fill(~neg_ok, float("inf")), dim=1, stable=True).indices
        prune_pos = torch.sort(wanda.masked_fill(~pos_ok, float("inf")), dim=1, stable=True).indices
        ptr_neg = torch.zeros(rows, dtype=torch.long, device=dev)
        ptr_pos = torch.zeros(rows, dtype=torch.long, device=dev)
    else:
        m = pattern[1]
        protect = torch.zeros_like(keep)  # grown weights are not pruned again in the same refinement
    for _ in range(cycles):
        positive = e > 0
        g_up, ok_up = _pointer_take(up, ptr_up, grow_ok)
        g_down, ok_down = _pointer_take(down, ptr_down, grow_ok)
        g = torch.where(positive, g_up, g_down)
        ok = torch.where(positive, ok_up, ok_down)
        if pattern is None:
            p_neg, okn = _pointer_take(prune_neg, ptr_neg, neg_ok)
            p_pos, okp = _pointer_take(prune_pos, ptr_pos, pos_ok)
            p = torch.where(positive, p_neg, p_pos)
            ok &= torch.where(positive, okn, okp)
        else:
            start = g - g % m
            group = start.unsqueeze(1) + torch.arange(m, device=dev).unsqueeze(0)
            cand = keep.gather(1, group) & ~protect.gather(1, group)
            gw = wanda.gather(1, group).masked_fill(~cand, float("inf"))
            best = gw.argmin(1)
            p = start + best
            ok &= cand.any(1)
        e_after = e - contrib0[ar, g] + Wq[ar, p] * mu[p]
        take = active & ok & (e.abs() > threshold) & (e_after.abs() < e.abs())
        active &= take
        if not bool(take.any()):
            break
        r = ar[take]
        keep[r, g[take]] = True
        Wq[r, g[take]] = W0[r, g[take]]
        keep[r, p[take]] = False
        Wq[r, p[take]] = 0.0
        e = torch.where(take, e_after, e)
        ptr_up += (take & positive).long()
        ptr_down += (take & ~positive).long()
        if pattern is None:
            ptr_neg += (take & positive).long()
            ptr_pos += (take & ~positive).long()
        else:
            protect[r, g[take]] = True
    return Wq.to(pruned.dtype), keep
