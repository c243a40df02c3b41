"""`Criterion` and `register`: the registry itself, in a module of its own so that the criterion files import
it without importing the package `__init__` that imports them (no import cycle).

A criterion declares what it needs and gives one of two things per layer:

* `needs_calibration` and `statistics`: "none" (weights only), "column_norms" (‖X_j‖₂ per input feature),
  "hessian" (XᵀX); "gradients" is reserved for training-time importance (PLATON), which the one-shot
  engine cannot feed. `stats_class` builds the per-layer accumulator the calibration engine fills;
* a **score** per weight (higher = kept; a granularity turns scores into a mask of exactly the asked
  sparsity), or, when `updates_weights`, an **update**: new weights and their keep-mask (SparseGPT).

A criterion may also score **structures** (groups of weights: a KV group, an MLP neuron, a hidden channel;
what `prunetune shrink` and composable pruning remove): `element_importance` is one weight's share of a group
score, `column_scores` / `row_scores` a layer's input columns / output rows (`group_statistics` says which
calibration moments they read). A criterion that scores only structures (FLAP) sets `scores_weights = False`.

Names are case-insensitive; `aliases` are declared on the class, and the few names whose meaning depends on the
caller are in `CONTEXT_ALIASES`, here and nowhere else.
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
    scores_weights: ClassVar[bool] = True  # False: scores structures only (not offered to one-shot pruning)
    group_statistics: ClassVar[str] = "none"  # "moments": structure scores read per-column mean / norm / variance

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

    # ---------------------------------------------------------------- structures (groups of weights)
    @property
    def scores_structures(self) -> bool:
        """True when the criterion can score whole structures (`column_scores` / `row_scores`)."""
        return type(self).column_scores is not Criterion.column_scores or \
            type(self).element_importance is not Criterion.element_importance

    def element_importance(self, weight: torch.Tensor) -> torch.Tensor:
        """One weight's share of a structure's score, from the weights alone (|W| for L1, W² for L2);
        computed in the dtype of `weight`, which the caller chooses."""
        raise PrunetuneError(f"criterion '{self.name}' cannot score structures from the weights alone")

    def column_scores(self, weight: torch.Tensor, stats: Any = None) -> torch.Tensor:
        """Importance of each input column of a linear (what a removed input channel costs)."""
        return self.element_importance(weight).sum(0)

    def row_scores(self, weight: torch.Tensor) -> torch.Tensor:
        """Importance of each output row of a linear."""
        return self.element_importance(weight).sum(1)

    def __repr__(self) -> str:
        return f"<criterion {self.name}: statistics={self.statistics}, default granularity={self.default_granularity}>"


CRITERIA: dict[str, Criterion] = {}
_ALIASES: dict[str, str] = {}
#: names whose meaning depends on the caller, declared once: in PAYT "magnitude" is the seed's L1Unstructured,
#: one global threshold (`l1-global`), while `prunetune prune --method magnitude` compares per row.
CONTEXT_ALIASES: dict[str, dict[str, str]] = {"payt": {"magnitude": "l1-global"}}


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: add one instance of `cls` to the registry under its name and aliases."""
    if cls.statistics not in STATISTICS:
        raise ValueError(f"criterion {cls.name}: statistics must be one of {STATISTICS}, got {cls.statistics!r}")
    if cls.scores_weights and cls.default_granularity not in cls.granularities:
        raise ValueError(f"criterion {cls.name}: default granularity {cls.default_granularity!r} not supported")
    for key in (cls.name, *cls.aliases):
        if key.lower() in _ALIASES:
            raise ValueError(f"criterion name or alias {key!r} is registered twice")
    CRITERIA[cls.name] = cls()
    for key in (cls.name, *cls.aliases):
        _ALIASES[key.lower()] = cls.name
    return cls


def criterion_names() -> tuple[str, ...]:
    """The criteria that score weights (what `prune --method` and PAYT's `--criterion` offer)."""
    return tuple(n for n, c in CRITERIA.items() if c.scores_weights)


def resolve_name(name: str, context: str | None = None) -> str | None:
    """The registered name for a name or alias (case-insensitive) as `context` reads it; None if unknown."""
    key = str(name).strip().lower()
    key = CONTEXT_ALIASES.get(context or "", {}).get(key, key)
    return _ALIASES.get(key)


def structure_criterion_names() -> tuple[str, ...]:
    """The criteria that score structures (what `prunetune shrink --method` and composable pruning offer)."""
    return tuple(n for n, c in CRITERIA.items() if c.scores_structures)


def get_criterion(name: str, context: str | None = None, *, structures: bool = False) -> Criterion:
    """The registered criterion for a name or alias (case-insensitive); one readable error otherwise.

    By default a criterion that scores weights; with `structures=True` one that scores structures."""
    found = resolve_name(name, context)
    if structures:
        if found is None or not CRITERIA[found].scores_structures:
            raise PrunetuneError(f"unknown structure criterion '{name}'; choose one of: "
                                 f"{', '.join(structure_criterion_names())}")
        return CRITERIA[found]
    if found is None or not CRITERIA[found].scores_weights:
        raise PrunetuneError(f"unknown pruning method '{name}'; choose one of: {', '.join(criterion_names())}")
    return CRITERIA[found]

