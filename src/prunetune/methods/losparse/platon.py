"""PLATON's importance for S (`PlatonScores`: EMA of |θ·∇θ| times EMA of its uncertainty), the keep-mask over all
targeted S together (`select_keep`, per entry or pooled per row / column) and the cubic schedule of the kept
fraction (`LosparseSchedule`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunetune.errors import PrunetuneError

STRUCTURED_METHODS = ("mean", "sum", "max", "min")
DIRECTIONS = ("row", "col", "row_col")


# ------------------------------------------------------------------------------------------------ PLATON
class PlatonScores:
    """Ī and Ū per scored tensor; `update` after each optimizer step, `score` = Ī·Ū (Ī alone when β2 = 1).

    I = |θ·∇θ| uses the weights after the step and the gradient that produced it, as in the seed. PLATON's rule
    (`window` = deltaT, the default): I is averaged over a window of `window` steps and the window's mean is
    folded into both moving averages once, at the window's last step (steps deltaT, 2·deltaT, ... of training,
    where the mask is recomputed):

        Ī ← β1·Ī + (1 − β1)·mean(I),   Ū ← β2·Ū + (1 − β2)·|mean(I) − Ī|   (Ī after its update)

    so β1 = 0.85 forgets over windows, not over steps. `window` = 1 folds every step (deltaT 1).
    β2 = 1 switches the uncertainty off: the score is Ī alone (the LoSparse code's default). The seed's window is
    the deltaT steps *before* the fold step (the fold step's I opens the next window, and its first window holds a
    zero); here a window is the deltaT steps ending at the fold, so the mask sees the step it is computed at.
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 0.95, window: int = 1) -> None:
        if not (0.0 <= beta1 < 1.0) or not (0.0 <= beta2 <= 1.0):
            raise PrunetuneError(f"PLATON needs 0 <= beta1 < 1 and 0 <= beta2 <= 1, got {beta1}, {beta2}")
        if int(window) < 1:
            raise PrunetuneError(f"PLATON's window (deltaT) must be >= 1 step, got {window}")
        self.beta1, self.beta2, self.window = beta1, beta2, int(window)
        self.avg: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}
        self.acc: dict[str, torch.Tensor] = {}  # sum of I over the open window's steps
        self.pending = 0  # steps in the open window
        self.updates = 0  # steps seen
        self.folds = 0  # window means folded into Ī and Ū

    @property
    def uncertainty(self) -> bool:
        return self.beta2 < 1.0

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter]) -> bool:
        """Add this step's I to the open window; at the window's last step fold its mean. True when folded."""
        for name, p in params.items():
            if p.grad is None:
                continue
            ipt = (p.detach() * p.grad.detach()).abs().float()
            if name not in self.avg:
                self.avg[name] = torch.zeros_like(ipt)
                self.unc[name] = torch.zeros_like(ipt)
                self.acc[name] = torch.zeros_like(ipt)
            self.acc[name].add_(ipt)
        self.pending += 1
        self.updates += 1
        if self.pending < self.window:
            return False
        for name, acc in self.acc.items():
            mean = acc.div_(self.pending) if self.pending > 1 else acc
            avg = self.avg[name].mul_(self.beta1).add_(mean, alpha=1 - self.beta1)
            if self.uncertainty:
                self.unc[name].mul_(self.beta2).add_((mean - avg).abs_(), alpha=1 - self.beta2)
            acc.zero_()
        self.pending = 0
        self.folds += 1
        return True

    def score(self, name: str) -> torch.Tensor:
        return self.avg[name] * self.unc[name] if self.uncertainty else self.avg[name]


def _pool(score: torch.Tensor, method: str, dim: int) -> torch.Tensor:
    if method == "mean":
        return score.mean(dim)
    if method == "sum":
        return score.sum(dim)
    if method == "max":
        return score.amax(dim)
    return score.amin(dim)


def unit_direction(direction: str, role: str) -> str:
    """rows or cols of S for a layer. The seed's `row_col` prunes rows of q/k/v and columns of the others."""
    if direction == "row_col":
        return "row" if role in ("q", "k", "v", "cq", "ck", "cv") else "col"
    return direction


@torch.no_grad()
def select_keep(scores: dict[str, torch.Tensor], keep: float, structured_method: str | None = None,
                directions: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks over all `scores` together: the highest-scoring units holding `keep` of all entries.

    Unstructured: exactly round(keep·N) entries (ties broken by position, so the count is exact). Structured:
    each row (or column) is one unit scored by pooling its entries; units are taken best-first while they fit
    in the budget, so the kept fraction is `keep` up to one unit.
    """
    names = list(scores)
    total = sum(scores[n].numel() for n in names)
    budget = int(round(keep * total))
    if structured_method is None:
        flat = torch.cat([scores[n].reshape(-1) for n in names])
        keep_flat = torch.zeros(total, dtype=torch.bool, device=flat.device)
        if budget > 0:
            keep_flat[torch.topk(flat, budget, sorted=False).indices] = True
        out, off = {}, 0
        for n in names:
            k = scores[n].numel()
            out[n] = keep_flat[off : off + k].view_as(scores[n])
            off += k
        return out
    directions = directions or {}
    unit_scores, unit_sizes, owners = [], [], []
    for i, n in enumerate(names):
        s = scores[n]
        d = directions.get(n, "row")
        pooled = _pool(s, structured_method, 1 if d == "row" else 0)
        unit_scores.append(pooled)
        unit_sizes.append(torch.full_like(pooled, s.shape[1] if d == "row" else s.shape[0]))
        owners.append(torch.full(pooled.shape, i, dtype=torch.long, device=pooled.device))
    us, sz = torch.cat(unit_scores), torch.cat(unit_sizes)
    order = torch.argsort(us, descending=True, stable=True)
    fits = torch.cumsum(sz[order], 0) <= budget
    chosen = torch.zeros_like(us, dtype=torch.bool)
    chosen[order[fits]] = True
    out, off = {}, 0
    for i, n in enumerate(names):
        k = unit_scores[i].numel()
        units = chosen[off : off + k]
        off += k
        if directions.get(n, "row") == "row":
            out[n] = units[:, None].expand_as(scores[n]).clone()
        else:
            out[n] = units[None, :].expand_as(scores[n]).clone()
    return out



# ------------------------------------------------------------------------------------------------ schedule
@dataclass
class LosparseSchedule:
    """The seed's cubic schedule of the kept fraction of S over optimizer steps t = 1..total_steps.

    t ≤ iw: keep `initial_threshold` (plain fine-tuning, no pruning); iw < t ≤ T − fw: cubic decay
    keep(t) = f + (i − f)·(1 − (t − iw)/(T − iw − fw))³, a mask every `deltaT` steps; t > T − fw: `final_threshold`
    exactly, the mask fixed.
    """

    total_steps: int
    initial_warmup_steps: int
    final_warmup_steps: int
    final_threshold: float
    initial_threshold: float = 1.0
    deltaT: int = 10

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise PrunetuneError(f"LoSparse needs at least one training step, got {self.total_steps}")
        if self.initial_warmup_steps < 0 or self.final_warmup_steps < 0:
            raise PrunetuneError("LoSparse warm-ups must be >= 0 steps")
        if self.initial_warmup_steps + self.final_warmup_steps >= self.total_steps:
            raise PrunetuneError(
                f"LoSparse warm-ups ({self.initial_warmup_steps} initial + {self.final_warmup_steps} final steps) "
                f"leave no pruning steps in {self.total_steps} training steps: shorten them or train longer")

    @property
    def fix_step(self) -> int:
        """The first step of the final warm-up (mask computed at final_threshold and frozen)."""
        return self.total_steps - self.final_warmup_steps + 1

    def at(self, t: int) -> tuple[float, bool]:
        """(kept fraction, whether to recompute the mask) after optimizer step t."""
        iw, T = self.initial_warmup_steps, self.total_steps
        if t <= iw:
            return self.initial_threshold, False
        if t >= self.fix_step:
            return self.final_threshold, t == self.fix_step
        span = T - iw - self.final_warmup_steps
        frac = 1.0 - (t - iw) / span
        keep = self.final_threshold + (self.initial_threshold - self.final_threshold) * frac**3
        return keep, t % self.deltaT == 0
