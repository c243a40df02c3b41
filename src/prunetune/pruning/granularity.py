"""Scores -> keep-masks of exactly the asked sparsity, at every granularity.

Higher score = more important = kept. Counts are exact: unstructured `layer` prunes `floor(s * numel)`
weights of the layer, `row` prunes `floor(s * in_features)` in every output row (Wanda's comparison group),
`global` prunes `floor(s * total)` over all layers together; N:M zeroes exactly M-N of every M consecutive
inputs in each row; `rows`/`cols` remove whole output rows / input columns. Ties are broken by position
(stable sort), so masks are deterministic.
"""

from __future__ import annotations

import math

import torch

from prunetune.errors import PrunetuneError

GRANULARITIES = ("row", "layer", "global", "rows", "cols")


def check_sparsity(sparsity: float) -> float:
    if not (0.0 <= float(sparsity) < 1.0):
        raise PrunetuneError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def parse_nm(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): N weights kept out of every M."""
    if pattern is None or pattern in ("", "none", "unstructured"):
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise PrunetuneError(f"N:M pattern must look like '2:4', got '{pattern}'") from None
    if not (0 < n < m):
        raise PrunetuneError(f"N:M pattern needs 0 < N < M, got '{pattern}'")
    return n, m


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores of a 1-D tensor (stable: earlier position loses ties)."""
    return torch.sort(scores, stable=True).indices[:k]


def unstructured_mask(scores: torch.Tensor, sparsity: float, per: str = "layer") -> torch.Tensor:
    """Keep-mask pruning the lowest scores; `per` = 'layer' (whole tensor) or 'row' (each output row)."""
    sparsity = check_sparsity(sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if per == "row":
        k = int(math.floor(sparsity * scores.shape[1]))
        if k:
            idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
            mask.scatter_(1, idx, False)
        return mask
    if per != "layer":
        raise PrunetuneError(f"unknown per-layer granularity '{per}'; choose row or layer")
    k = int(math.floor(sparsity * scores.numel()))
    if k:
        mask.view(-1)[_lowest(scores.reshape(-1), k)] = False
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest of every M consecutive input weights in each row."""
    rows, cols = scores.shape
    if cols % m:
        raise PrunetuneError(f"N:M {n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    drop = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(-1, drop, False)
    return mask.reshape(rows, cols)


def structured_mask(scores: torch.Tensor, sparsity: float, axis: str) -> torch.Tensor:
    """Remove whole output rows ('rows', scores summed over inputs) or input columns ('cols')."""
    sparsity = check_sparsity(sparsity)
    dim = 1 if axis == "rows" else 0
    group = scores.sum(dim=dim)
    k = int(math.floor(sparsity * group.numel()))
    keep = torch.ones_like(group, dtype=torch.bool)
    if k:
        keep[_lowest(group, k)] = False
    return keep[:, None].expand_as(scores).clone() if axis == "rows" else keep[None, :].expand_as(scores).clone()


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all layers: exactly floor(s * total) weights pruned, wherever they are."""
    sparsity = check_sparsity(sparsity)
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    k = int(math.floor(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k:
        keep[_lowest(flat, k)] = False
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].view_as(s).clone()
        start += s.numel()
    return out


def mask_from_scores(scores: torch.Tensor, sparsity: float, granularity: str = "row",
                     pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """One layer's mask: N:M when a pattern is given (sparsity is then implied), else by granularity."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    if granularity in ("rows", "cols"):
        return structured_mask(scores, sparsity, granularity)
    if granularity in ("row", "layer"):
        return unstructured_mask(scores, sparsity, granularity)
    raise PrunetuneError(f"unknown granularity '{granularity}'; choose one of: {', '.join(GRANULARITIES)}")
