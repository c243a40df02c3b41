"""The criterion registry: one place that `prune()`, PAYT and recipes ask "what does criterion X do?".

A criterion declares what it needs and gives one of two things per layer:

* `needs_calibration` and `statistics`: "none" (weights only), "column_norms" (‖X_j‖₂ per input feature),
  "hessian" (XᵀX); "gradients" is reserved for training-time importance (PLATON), which the one-shot
  engine cannot feed. `stats_class` builds the per-layer accumulator the calibration engine fills;
* a **score** per weight (higher = kept; a granularity turns scores into a mask of exactly the asked
  sparsity), or, when `updates_weights`, an **update**: new weights and their keep-mask (SparseGPT).

`default_granularity` is the criterion's own comparison group when the caller names none, and
`granularities` the ones it supports. Adding a criterion = one file with a `@register` class + one import
line at the bottom of this file + one row in `tests/test_criteria.py`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from prunetune.errors import PrunetuneError

UNSTRUCTURED = ("row", "layer", "global")
STRUCTURED = ("rows", "cols", "heads", "neurons")
ALL_GRANULARITIES = UNSTRUCTURED + STRUCTURED
STATISTICS = ("none", "column_norms", "hessian", "gradients")


class Criterion:
    """Base class: subclasses set the class attributes and implement `score` or `update`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    statistics: ClassVar[str] = "none"
    stats_class: ClassVar[type | None] = None
    updates_weights: ClassVar[bool] = False
    default_granularity: ClassVar[str] = "row"
    granularities: ClassVar[tuple[str, ...]] = ALL_GRANULARITIES

    @property
    def needs_calibration(self) -> bool:
        return self.statistics != "none"

    def make_stats(self, in_features: int, device: torch.device | str | None = None) -> Any:
        """A fresh accumulator for one layer's calibration statistics (None when none are needed)."""
        return None if self.stats_class is None else self.stats_class(in_features, device)

    def score(self, weight: torch.Tensor, stats: Any = None) -> torch.Tensor:
        """Importance of every weight, shaped like `weight` (score-only criteria)."""
        raise NotImplementedError(f"criterion '{self.name}' updates weights; it has no score")

    def update(self, weight: torch.Tensor, stats: Any, sparsity: float, *, pattern: tuple[int, int] | None,
               granularity: str, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(new weight with zeros, keep-mask) for one layer (`updates_weights` criteria); `keep` = still alive."""
        raise NotImplementedError(f"criterion '{self.name}' only scores weights")

    def __repr__(self) -> str:
        return f"<criterion {self.name}: statistics={self.statistics}, default granularity={self.default_granularity}>"


CRITERIA: dict[str, Criterion] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: add one instance of `cls` to the registry under its name and aliases."""
    if cls.statistics not in STATISTICS:
        raise ValueError(f"criterion {cls.name}: statistics must be one of {STATISTICS}, got {cls.statistics!r}")
    if cls.default_granularity not in cls.granularities:
        raise ValueError(f"criterion {cls.name}: default granularity {cls.default_granularity!r} not supported")
    for key in (cls.name, *cls.aliases):
        if key.lower() in _ALIASES:
            raise ValueError(f"criterion name or alias {key!r} is registered twice")
    CRITERIA[cls.name] = cls()
    for key in (cls.name, *cls.aliases):
        _ALIASES[key.lower()] = cls.name
    return cls


def criterion_names() -> tuple[str, ...]:
    return tuple(CRITERIA)


def get_criterion(name: str) -> Criterion:
    """The registered criterion for a name or alias (case-insensitive); one readable error otherwise."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise PrunetuneError(f"unknown pruning method '{name}'; choose one of: {', '.join(CRITERIA)}")
    return CRITERIA[_ALIASES[key]]


# the registry lines: one import per criterion file (order = the order choices are listed in)
from prunetune.pruning.criteria import wanda, magnitude, sparsegpt, admm  # noqa: E402,F401,I001
