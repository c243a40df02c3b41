"""Magnitude (L1) importance: |W|. Needs no calibration data, which is why it is the baseline."""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def l2_column_scores(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each input column broadcast over the layer, for structured column pruning."""
    w = weight.detach().float()
    return w.norm(dim=0, keepdim=True).expand_as(w) / w.shape[0]
