"""ADMM weight update with a gradual mask (Boža 2024, "Fast and Effective Weight Update for Pruned LLMs").

Same problem as SparseGPT, per layer: keep a share of the weights and choose their values to minimise the
reconstruction error ‖(W − Ŵ) X‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ) with H = XᵀX, the statistic SparseGPT already
accumulates (`HessianStats`). SparseGPT fixes each column once, left to right; ADMM instead splits the problem
into a least-squares step and a projection onto the sparse set and alternates them, so every kept weight can
still move after every other choice:

    W ← (H W₀ + ρ (Z − U)) (H + ρ I)⁻¹      (least squares, one matmul with a matrix inverted once)
    Z ← mask(W + U) ⊙ (W + U)               (projection onto the sparse set)
    U ← U + W − Z                           (scaled dual: what the projection removed so far)

Rules as in the authors' code: H is normalised to a unit diagonal (columns of W scaled by ‖X_j‖, so |W + U|
there is Wanda's score and the mask is chosen on it), dampened by `damp` × mean(diag H), ρ = 1. The mask tightens
along the cubic schedule s_t = s − s (1 − t/T)³ over the first T = `gradual` iterations and is then fixed; for
N:M the N largest of each group are always kept and the others leave gradually.

Defaults differ from the authors' (20 iterations, T = 15, 10% dampening) where we measured better: 60 iterations,
T = 45 (three quarters of them, also when only `iters` is given) and 1% dampening. On real SmolLM2-135M layer
inputs at 70% this reconstructed q_proj/down_proj/o_proj 22-40% better than SparseGPT where the authors' settings
did 19-34%, and `prunetune prune --method admm --sparsity 0.7` reached WikiText-2 perplexity 70.17 against 75.99
(SparseGPT: 104.22); BENCHMARKS.md, "Beyond SparseGPT". `--admm-iters 20 --admm-damp 0.1` gives the authors'. After the ADMM iterations the kept weights are
refitted exactly on the fixed mask (`refit` conjugate-gradient steps on the per-row least-squares problem,
from ADMM's solution; the paper's final update), so the result is the optimum for its mask.

Counts are exact: `layer` prunes floor(s × numel) of the layer, `row` floor(s × in_features) of each row,
N:M exactly M − N of every group. Weights already zero (or outside a previous mask) are forced into the
pruned set and count towards it, as in SparseGPT.
"""

from __future__ import annotations

import math

import torch

from prunetune.errors import PrunetuneError
from prunetune.pruning.criteria.registry import Criterion, register
from prunetune.pruning.criteria.sparsegpt import HessianStats

DEFAULTS = {"iters": 60, "gradual": 45, "damp": 0.01, "rho": 1.0, "refit": 0}


def check_options(iters: int, gradual: int, damp: float, rho: float, refit: int) -> None:
    """One readable line for each option out of range (checked before any layer is touched)."""
    if not (isinstance(iters, int) and 1 <= iters <= 10_000):
        raise PrunetuneError(f"ADMM iterations must be an integer in [1, 10000], got {iters}")
    if not (isinstance(gradual, int) and 0 <= gradual <= iters):
        raise PrunetuneError(f"ADMM gradual-mask iterations must be an integer in [0, iterations={iters}], "
                             f"got {gradual}")
    if not (isinstance(damp, (int, float)) and 0.0 < damp <= 10.0 and math.isfinite(damp)):
        raise PrunetuneError(f"ADMM damping must be in (0, 10] (a fraction of mean(diag XᵀX)), got {damp}")
    if not (isinstance(rho, (int, float)) and 0.0 < rho and math.isfinite(rho)):
        raise PrunetuneError(f"ADMM penalty rho must be > 0, got {rho}")
    if not (isinstance(refit, int) and 0 <= refit <= 10_000):
        raise PrunetuneError(f"ADMM refit steps must be an integer in [0, 10000], got {refit}")


def _kth_smallest(x: torch.Tensor, k: int, sample: int = 8192) -> torch.Tensor:
    """`torch.kthvalue(x, k).values`, exactly, in a fraction of its time on a large 1-D tensor.

    The gradual mask asks for one threshold per ADMM iteration, and on CPU kthvalue copies and quick-selects
    the whole layer (it was half of ADMM's time on a 576 x 1536 layer, the matmuls the other half). A strided
    sample's quantiles bracket the k-th value with ~4 standard deviations to spare; one count below the bracket
    and a selection inside it (a few percent of the elements) give the same value. If the bracket missed
    (ties, or bad luck), the full kthvalue answers."""
    n = x.numel()
    if n <= 4 * sample:
        return torch.kthvalue(x, k).values
    s = torch.sort(x[:: n // sample]).values
    m, q = s.numel(), k / n
    half = 4.0 * math.sqrt(q * (1 - q) / m) + 2.0 / m
    lo, hi = s[max(int((q - half) * m), 1) - 1], s[min(int((q + half) * m) + 1, m) - 1]
    below = int((x < lo).sum())
    inside = x[(x >= lo) & (x <= hi)]
    if below < k <= below + inside.numel():
        return torch.kthvalue(inside, k - below).values
    return torch.kthvalue(x, k).values


def _threshold_keep(score: torch.Tensor, k: int, dim: int | None) -> torch.Tensor:
    """Keep what is above the k-th lowest score (of the whole tensor, or of each row): an O(n) selection for
    the intermediate masks of the gradual schedule, where a tie kept or dropped changes nothing that lasts."""
    if k <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if dim is None:
        return score > _kth_smallest(score.reshape(-1), k)
    return score > torch.kthvalue(score, k, dim=1, keepdim=True).values


def _keep_mask(score: torch.Tensor, prune_frac: float, per: str, pattern: tuple[int, int] | None,
               forced: torch.Tensor | None, exact: bool = True) -> torch.Tensor:
    """Keep-mask pruning the lowest `score`s: a fraction of the layer / of each row, or N:M grown gradually.

    Forced weights score -inf so they are pruned first and count; if there are more of them than the
    fraction asks, they are all pruned. `exact=False` (intermediate masks) selects by a k-th-value threshold
    instead of a full sort: the same mask up to ties, 4x faster on a 576 x 1536 layer."""
    rows, cols = score.shape
    if forced is not None:
        score = score.masked_fill(forced, float("-inf"))
    keep = torch.ones_like(score, dtype=torch.bool)
    if pattern is not None:
        n, m = pattern
        groups = score.reshape(rows, cols // m, m)
        top = torch.zeros_like(groups, dtype=torch.bool)
        top.scatter_(-1, torch.topk(groups, n, dim=-1).indices, True)  # N:M: the N best of each group stay
        top = top.reshape(rows, cols)
        if forced is not None:
            top &= ~forced
        score = score.masked_fill(top, float("inf"))
        rest = rows * cols - int(top.sum())  # the candidates; all of them go at the full 1 − N/M
        k = min(rest, math.floor(prune_frac * m / (m - n) * rest + 1e-9))
        if forced is not None:
            k = max(k, int(forced.sum()))
        if not exact:
            return _threshold_keep(score, k, None)
        if k:
            keep.view(-1)[torch.sort(score.reshape(-1), stable=True).indices[:k]] = False
        return keep
    if not exact:
        return _threshold_keep(score, math.floor(prune_frac * (cols if per == "row" else rows * cols)),
                               1 if per == "row" else None)
    if per == "row":
        k = torch.full((rows,), math.floor(prune_frac * cols), dtype=torch.long, device=score.device)
        if forced is not None:
            k = torch.maximum(k, forced.sum(1))
        order = torch.sort(score, dim=1, stable=True).indices
        ranks = torch.arange(cols, device=score.device).unsqueeze(0)
        return keep.scatter_(1, order, ranks >= k.unsqueeze(1))
    k = math.floor(prune_frac * rows * cols)
    if forced is not None:
        k = max(k, int(forced.sum()))
    if k:
        keep.view(-1)[torch.sort(score.reshape(-1), stable=True).indices[:k]] = False
    return keep


def _refit(W: torch.Tensor, W0H: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, steps: int) -> torch.Tensor:
    """Conjugate gradient on each row's least squares min (w − w₀) H (w − w₀)ᵀ over its kept weights.

    All rows at once (one rows × in by in × in product per step); H has a unit diagonal here, so it needs no
    preconditioner. Starts from `W` (ADMM's answer), so a few steps finish what ADMM nearly reached."""
    keepf = keep.to(W.dtype)
    W = W * keepf
    R = (W0H - W.matmul(H)) * keepf  # minus the gradient, on the kept weights
    P = R.clone()
    rr = (R * R).sum(1, keepdim=True)
    for _ in range(steps):
        HP = P.matmul(H) * keepf
        pHp = (P * HP).sum(1, keepdim=True)
        alpha = torch.where(pHp > 0, rr / pHp.clamp_min(1e-30), torch.zeros_like(rr))
        W += alpha * P
        R -= alpha * HP
        rr_new = (R * R).sum(1, keepdim=True)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr))
        P = R + beta * P
        rr = rr_new
        if float(rr.max()) == 0.0:
            break
    return W


@torch.no_grad()
def admm_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float, *, pattern: tuple[int, int] | None = None,
               per: str = "layer", keep: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               iters: int = DEFAULTS["iters"], gradual: int = DEFAULTS["gradual"], damp: float = DEFAULTS["damp"],
               rho: float = DEFAULTS["rho"], refit: int = DEFAULTS["refit"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight with zeros, keep-mask) for one layer; `weight` itself is not modified.

    `keep`: a previous keep-mask (weights outside it, and weights already zero, are forced into the pruned
    set). `mask`: a fixed keep-mask to fit instead of choosing one (then `sparsity` and `pattern` are ignored;
    with it the result is the least-squares optimum on those weights for the dampened H)."""
    check_options(iters, gradual, damp, rho, refit)
    if per not in ("layer", "row"):
        raise PrunetuneError(f"ADMM selects per 'layer' or per 'row', got '{per}'")
    W0 = weight.detach().float()
    rows, cols = W0.shape
    if pattern is not None and cols % pattern[1]:
        raise PrunetuneError(f"N:M {pattern[0]}:{pattern[1]} needs in_features divisible by {pattern[1]}, got {cols}")
    forced = W0 == 0
    if keep is not None:
        if keep.shape != W0.shape:
            raise PrunetuneError(f"previous mask has shape {tuple(keep.shape)}, weight {tuple(W0.shape)}")
        forced |= ~keep.to(device=W0.device, dtype=torch.bool)
    forced = forced if bool(forced.any()) else None
    H = H.detach().to(device=W0.device, dtype=torch.float32)
    norm = torch.diag(H).clamp_min(0).sqrt() + 1e-8  # dead inputs (H_jj = 0) get ~0 score: pruned first
    Hn = H / norm.unsqueeze(0) / norm.unsqueeze(1)
    Hn.diagonal().add_(damp * float(torch.diag(Hn).mean()))
    Wn = W0 * norm.unsqueeze(0)
    if forced is not None:
        Wn = Wn.masked_fill(forced, 0.0)
    W0H = Wn.matmul(Hn)  # the least-squares right-hand side: W₀ H (rows x in)
    A = Hn.clone()
    A.diagonal().add_(rho)
    try:  # (cholesky_inverse is 10x slower than a triangular solve on CPU: 7.5 s vs 0.6 s at 1536)
        A = torch.cholesky_solve(torch.eye(cols, device=A.device), torch.linalg.cholesky(A))
    except torch.linalg.LinAlgError:
        raise PrunetuneError("ADMM: XᵀX is not positive definite even after dampening; use more calibration "
                             "samples") from None

    fixed = mask is not None
    if fixed:
        keep_m = mask.to(device=W0.device, dtype=torch.bool)
        if forced is not None:
            keep_m = keep_m & ~forced
    else:
        keep_m = _keep_mask(Wn.abs(), sparsity if gradual == 0 else 0.0, per, pattern, forced)
    W = Wn.clone()
    U = torch.zeros_like(W)
    W0HA = W0H.matmul(A)  # the constant part of every least-squares step
    keep_f = keep_m.to(W.dtype)  # (multiplying by the bool mask would convert it to float at every iteration)
    # every iteration writes into the same four layer-sized buffers: fresh temporaries at each of 60 iterations
    # fragmented the heap between threads and made the process's peak vary by ~90 MiB from run to run
    Z, score = torch.empty_like(W), torch.empty_like(W)
    for t in range(iters):
        V = U.add_(W)  # V = W + U, in U's storage (U is rebuilt from it below)
        if not fixed and t < gradual:
            s_t = sparsity - sparsity * (1 - (t + 1) / gradual) ** 3
            keep_m = _keep_mask(torch.abs(V, out=score), s_t, per, pattern, forced, exact=t == gradual - 1)
            keep_f.copy_(keep_m)
        torch.mul(V, keep_f, out=Z)
        U = V.sub_(Z)  # U = V - Z
        torch.addmm(W0HA, Z.sub_(U), A, alpha=rho, out=W)  # W = (W₀H + ρ (Z − U)) A
    del Z, score
    Z = (W + U) * keep_m
    if refit:
        H_fit = Hn  # the dampened H: the refit optimises the objective ADMM converges to
        Z = _refit(Z, W0H, H_fit, keep_m, refit)
    out = (Z * keep_m) / norm.unsqueeze(0)
    return out.to(weight.dtype), keep_m


@register
class ADMM(Criterion):
    name = "admm"
    description = ("ADMM weight update from the Hessian XᵀX (calibrated): gradual cubic mask on Wanda's score, "
                   "then an exact least-squares refit of the kept weights")
    aliases = ("admm-grad",)
    statistics = "hessian"
    stats_class = HessianStats
    updates_weights = True
    default_granularity = "layer"  # the authors' default: one selection over the whole layer
    granularities = ("layer", "row")
    options = DEFAULTS

    def check(self, **opts) -> dict:
        """Defaults overridden by `opts` (None = default), every option checked: the one-line errors."""
        unknown = set(opts) - set(DEFAULTS)
        if unknown:
            raise PrunetuneError(f"ADMM has no option {sorted(unknown)}; it takes {sorted(DEFAULTS)}")
        full = {**DEFAULTS, **{k: v for k, v in opts.items() if v is not None}}
        if opts.get("iters") is not None and opts.get("gradual") is None:
            full["gradual"] = round(0.75 * full["iters"])  # the default's share of the iterations (20 -> 15)
        check_options(**full)
        return full

    def update(self, weight: torch.Tensor, stats: HessianStats, sparsity: float, *,
               pattern: tuple[int, int] | None, granularity: str,
               keep: torch.Tensor | None, **opts) -> tuple[torch.Tensor, torch.Tensor]:
        return admm_prune(weight.to(stats.H.device), stats.H, sparsity, pattern=pattern, per=granularity,
                          keep=None if keep is None else keep.to(stats.H.device), **self.check(**opts))


@register
class OwlADMM(ADMM):
    """The preset `owl-admm`: ADMM with OWL's per-block sparsity, the combination the OWL and ADMM papers find
    best at high unstructured sparsity; `--layer-sparsity uniform` turns it back into plain `admm`."""

    name = "owl-admm"
    description = "ADMM weight update with OWL's outlier-weighted per-block sparsity (calibrated)"
    aliases = ()
    preset = {"layer_sparsity": "owl"}
