"""Wanda importance (Sun et al. 2023): |W_ij| * ||X_j||_2.

A weight matters as much as its magnitude times how strongly its input column fires on real data; the
activation norm is what magnitude pruning misses on LLMs, whose few outlier input features carry large
values. The comparison group is each output row (see `granularity.unstructured_mask(per="row")`).
"""

from __future__ import annotations

import torch

from prunetune.pruning.criteria.registry import Criterion, register


class ColumnNormStats:
    """Running sum of squares of each input feature over all calibration tokens.

    Sums (not means) so that ||X_j||_2 = sqrt(sum) is exactly the norm over every token seen; all layers see
    the same tokens, so scores stay comparable across layers for global thresholds.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    @staticmethod
    def prepare(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Per-batch summary; layers fed the same tensor (q/k/v, gate/up) share it."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        return x.pow(2).sum(dim=0), x.shape[0]

    def accumulate(self, prepared: tuple[torch.Tensor, int], batch: int) -> None:
        sq, tokens = prepared
        self.sq_sum += sq.to(device=self.sq_sum.device, dtype=self.sq_sum.dtype)
        self.tokens += tokens

    def add(self, x: torch.Tensor) -> None:
        self.accumulate(self.prepare(x), x.shape[0] if x.dim() > 2 else 1)

    def norms(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """|W| scaled column-wise by the L2 norm of that input feature over the calibration tokens."""
    w = weight.detach().float()
    return w.abs() * column_norms.to(device=w.device, dtype=w.dtype).reshape(1, -1)


@register
class Wanda(Criterion):
    name = "wanda"
    description = "|W| x ||X_j||_2 (calibrated), compared per output row"
    statistics = "column_norms"
    stats_class = ColumnNormStats

    group_statistics = "moments"

    def score(self, weight: torch.Tensor, stats: ColumnNormStats) -> torch.Tensor:
        return wanda_scores(weight, stats.norms())

    def column_scores(self, weight: torch.Tensor, stats=None) -> torch.Tensor:
        """Σ_i |W_ij| · ||X_j||: an input channel's Wanda score (structured pruning; `stats` are moments)."""
        return weight.abs().sum(0) * stats.norm().to(weight.device)
