"""Magnitude (L1) importance: |W|. Needs no calibration data, which is why it is the baseline."""

from __future__ import annotations

import torch

from prunetune.pruning.criteria.registry import Criterion, register


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def l2_column_scores(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each input column broadcast over the layer, for structured column pruning."""
    w = weight.detach().float()
    return w.norm(dim=0, keepdim=True).expand_as(w) / w.shape[0]


@register
class Magnitude(Criterion):
    name = "magnitude"
    description = "|W|, no calibration; compared per output row unless a granularity says otherwise"

    def score(self, weight: torch.Tensor, stats=None) -> torch.Tensor:
        return magnitude_scores(weight)

    def element_importance(self, weight: torch.Tensor) -> torch.Tensor:
        """|W|: a structure's L1 norm (structured pruning's `l1`, composable's `l1` heads)."""
        return weight.abs()


@register
class L1Global(Magnitude):
    name = "l1-global"
    description = "|W| with one threshold over all pruned layers (PAYT's default)"
    aliases = ("l1", "l1unstructured", "l1_unstructured", "global-l1")
    default_granularity = "global"


@register
class L2Cols(Criterion):
    name = "l2-cols"
    description = "L2 norm of each input column: whole columns are removed (PAYT's structured criterion)"
    aliases = ("l2", "lnstructured", "ln_structured", "l2-structured", "l2structured")
    default_granularity = "cols"
    granularities = ("cols",)

    def score(self, weight: torch.Tensor, stats=None) -> torch.Tensor:
        return l2_column_scores(weight)

    def element_importance(self, weight: torch.Tensor) -> torch.Tensor:
        """W²: a structure's squared L2 norm (structured pruning's `l2`, composable's `l2` heads)."""
        return weight ** 2
