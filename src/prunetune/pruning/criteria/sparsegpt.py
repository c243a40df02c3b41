"""SparseGPT (Frantar & Alistarh 2023): prune a linear layer and fix the survivors with OBS updates.

For a layer y = W x the loss of pruning is the reconstruction error ||W X - Ŵ X||², whose Hessian is
H = X Xᵀ (here `H = 2/n Σ x xᵀ` over the n calibration sequences, as the reference code scales it). Columns
are processed left to right; each pruned weight's error is spread over the not-yet-processed columns of its
row with the inverse Hessian, so later weights compensate for earlier removals (Optimal Brain Surgeon).

Steps, as in the paper and its reference implementation:
1. dead inputs (H_jj = 0, never active) are removed from H and their weights zeroed;
2. dampening λ = 1% of mean(diag H) is added to the diagonal for numerical stability;
3. H⁻¹ is obtained from a Cholesky factorisation and replaced by the upper Cholesky factor of H⁻¹, whose
   rows give the OBS update directions for the sequential column order;
4. columns are processed in blocks of 128: inside a block updates are applied column by column, the block's
   accumulated error is applied to all later columns in one matrix product (lazy batch update);
5. the mask is chosen adaptively at the start of each block by the OBS saliency w²/[H⁻¹]_jj² on the weights
   as already updated; for N:M it is chosen per group of M columns when the loop reaches that group.

The count of pruned weights is exact: with `per="layer"` every block prunes its share of
floor(sparsity × numel) with cumulative rounding, with `per="row"` every row does the same for its columns.
Weights already zero (or outside a previous mask) are forced into the pruned set and count towards it, so
pruning an already sparse layer never revives a weight.
"""

from __future__ import annotations

import math

import torch

from prunetune.errors import PrunetuneError
from prunetune.pruning.criteria.registry import Criterion, register


class HessianStats:
    """Accumulates H = 2/n Σ_samples X_sᵀ X_s in float32, n = number of calibration sequences."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """XᵀX of one batch; layers fed the same tensor (q/k/v, gate/up) share it."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        return x.t().matmul(x)

    def accumulate(self, gram: torch.Tensor, batch: int) -> None:
        # a running mean, so the scale does not depend on how the samples were batched
        total = self.nsamples + batch
        self.H.mul_(self.nsamples / total)
        self.H.add_(gram.to(self.H.device), alpha=2.0 / total)
        self.nsamples = total

    def add(self, x: torch.Tensor) -> None:
        self.accumulate(self.prepare(x), x.shape[0] if x.dim() > 2 else 1)


class _single_thread_on_cpu:
    """The column loop is thousands of tiny ops: on CPU, intra-op threading only adds synchronisation
    (measured 0.5 s vs 3.6 s for a 576x576 layer on a busy 2-core machine), so it runs on one thread."""

    def __init__(self, device: torch.device) -> None:
        self.active = device.type == "cpu"
        self.saved = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.active:
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.active:
            torch.set_num_threads(self.saved)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float, *, pattern: tuple[int, int] | None = None,
                    per: str = "layer", blocksize: int = 128, percdamp: float = 0.01,
                    keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight with zeros, keep-mask) for one layer; `weight` itself is not modified.

    Weights that are already zero, or outside `keep` (a previous keep-mask), are forced into the pruned set:
    they stay zero, count towards the asked sparsity, and the drift the OBS updates of earlier columns gave
    them is propagated to the later columns like any pruned weight's error. Pruning an already sparse layer
    therefore never revives a weight and still compensates for every removal.
    """
    if per not in ("layer", "row"):
        raise PrunetuneError(f"SparseGPT selects per 'layer' (per block) or per 'row', got '{per}'")
    W = weight.detach().clone().float()
    rows, cols = W.shape
    forced = W == 0
    if keep is not None:
        if keep.shape != W.shape:
            raise PrunetuneError(f"previous mask has shape {tuple(keep.shape)}, weight {tuple(W.shape)}")
        forced |= ~keep.to(device=W.device, dtype=torch.bool)
        W[forced] = 0.0
    H = H.detach().clone().float().to(W.device)
    if pattern is not None:
        n, m = pattern
        if cols % m:
            raise PrunetuneError(f"N:M {n}:{m} needs in_features divisible by {m}, got {cols}")
        blocksize = m * max(1, blocksize // m)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    # each in_features² matrix is freed as soon as the next exists: at most two of them live here at once
    # (five before: on a 2816-wide down_proj that held 63 MiB more at the streamed block's peak); same numbers
    try:
        L = torch.linalg.cholesky(H)
        del H
        Hinv = torch.cholesky_inverse(L)
        del L
        Hinv = torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise PrunetuneError("SparseGPT: the Hessian is not positive definite even after dampening; "
                             "use more calibration samples") from None

    prune_mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    with _single_thread_on_cpu(W.device):
        _column_loop(W, Hinv, prune_mask, forced, blocksize, pattern, per, sparsity)
    keep_out = ~prune_mask
    W.mul_(keep_out)
    return W.to(weight.dtype), keep_out


def _select(saliency: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """True at the k lowest saliencies of each row (k a per-row tensor) or of the whole tensor (k an int)."""
    out = torch.zeros_like(saliency, dtype=torch.bool)
    if isinstance(k, int):
        if k:
            out.view(-1)[torch.sort(saliency.reshape(-1), stable=True).indices[:k]] = True
        return out
    order = torch.sort(saliency, dim=1, stable=True).indices
    ranks = torch.arange(saliency.shape[1], device=saliency.device).unsqueeze(0)
    return out.scatter_(1, order, ranks < k.unsqueeze(1))


def _column_loop(W: torch.Tensor, Hinv: torch.Tensor, prune_mask: torch.Tensor, forced: torch.Tensor,
                 blocksize: int, pattern: tuple[int, int] | None, per: str, sparsity: float) -> None:
    """Blocked OBS sweep over the columns; updates `W` and `prune_mask` (True = pruned) in place.

    Counts are cumulative: after the block ending at column e, floor(sparsity × rows × e) weights are pruned
    (`layer`) or floor(sparsity × e) in each row (`row`), so totals are exact whatever the block width. Forced
    weights (saliency -inf) are taken first; a block holding more of them than its share prunes them all and
    later blocks prune that much less.
    """
    rows, cols = W.shape
    pruned_layer = 0
    pruned_rows = torch.zeros(rows, dtype=torch.long, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        f1 = forced[:, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern is None:
            saliency = (W1.pow(2) / d.reshape(1, -1).pow(2)).masked_fill(f1, float("-inf"))
            if per == "layer":
                need = math.floor(sparsity * rows * i2) - pruned_layer
                k = min(max(need, int(f1.sum())), rows * count)
                mask1 = _select(saliency, k)
                pruned_layer += k
            else:
                need = math.floor(sparsity * i2) - pruned_rows
                k_rows = torch.maximum(need, f1.sum(1)).clamp(max=count)
                mask1 = _select(saliency, k_rows)
                pruned_rows += k_rows
        for i in range(count):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                fg = f1[:, i : i + m]
                sal = (W1[:, i : i + m].pow(2) / d[i : i + m].reshape(1, -1).pow(2)).masked_fill(fg, float("-inf"))
                mask1[:, i : i + m] = _select(sal, fg.sum(1).clamp(min=m - n))
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0.0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        prune_mask[:, i1:i2] = mask1
        if i2 < cols:
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])


@register
class SparseGPT(Criterion):
    name = "sparsegpt"
    description = "OBS weight updates from the Hessian XᵀX (calibrated); adaptive selection per 128-column block"
    statistics = "hessian"
    stats_class = HessianStats
    updates_weights = True
    default_granularity = "layer"  # the paper's adaptive selection over each whole block
    granularities = ("layer", "row")

    def update(self, weight: torch.Tensor, stats: HessianStats, sparsity: float, *,
               pattern: tuple[int, int] | None, granularity: str,
               keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsegpt_prune(weight.to(stats.H.device), stats.H, sparsity, pattern=pattern, per=granularity,
                               keep=None if keep is None else keep.to(stats.H.device))
