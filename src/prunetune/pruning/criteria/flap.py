"""FLAP's fluctuation (An et al. 2024): a structure matters as much as the variance of its input times the
squared norm of the weights it feeds, var(X_j) · ||W_:j||². A structure criterion only: it scores input
channels (what `prunetune shrink --method flap` removes, with FLAP's bias compensation), not single weights.
"""

from __future__ import annotations

import torch

from prunetune.pruning.criteria.registry import Criterion, register


class MomentStats:
    """Per input column: sum, sum of squares and token count (Wanda needs ||X_j||, FLAP mean and variance)."""

    def __init__(self, n: int, device: torch.device | str | None = None) -> None:
        self.s = torch.zeros(n, dtype=torch.float64, device=device)
        self.sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.tokens = 0

    @staticmethod
    def prepare(x: torch.Tensor):
        x = x.detach().reshape(-1, x.shape[-1]).double()
        return x.sum(0), x.pow(2).sum(0), x.shape[0]

    def accumulate(self, prepared, batch: int) -> None:
        s, sq, n = prepared
        self.s += s.to(self.s.device)
        self.sq += sq.to(self.sq.device)
        self.tokens += n

    def mean(self) -> torch.Tensor:
        return self.s / max(self.tokens, 1)

    def norm(self) -> torch.Tensor:
        return self.sq.sqrt()

    def var(self) -> torch.Tensor:
        m = self.mean()
        return (self.sq / max(self.tokens, 1) - m * m).clamp_min(0)


@register
class Flap(Criterion):
    name = "flap"
    description = "var(X_j) x ||W_:j||^2 per input channel (calibrated; structures only, with bias compensation)"
    scores_weights = False
    group_statistics = "moments"

    def column_scores(self, weight: torch.Tensor, stats: MomentStats | None = None) -> torch.Tensor:
        return weight.pow(2).sum(0) * stats.var().to(weight.device)
