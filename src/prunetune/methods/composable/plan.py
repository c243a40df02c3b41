"""Configurations (attention rate, linear rate), global or per block, and the plan: the unique units (block, module,
criterion, rate) every configuration needs, each trained once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prunetune.errors import PrunetuneError
from prunetune.models.arch import ArchAdapter
from prunetune.pruning.criteria import CRITERIA, Criterion, criterion_names, get_criterion


#: module kinds a configuration rate applies to: attention units take the attention rate, linears the linear rate
ATTENTION_UNITS = {"attention": ("q", "k", "v"), "cross-attention": ("cq", "ck", "cv")}

LINEAR_ROLES = ("o", "co", "gate", "up", "down")

ALL_UNITS = tuple(ATTENTION_UNITS) + LINEAR_ROLES

DEFAULT_ATTENTION_UNITS = ("attention", "cross-attention")

DEFAULT_LINEAR_UNITS = LINEAR_ROLES
# Criteria are the registry's (`pruning.criteria`): a linear unit takes any that scores weights from the weights
# or input column norms (l1 = l1-global's |W|, wanda, ...), a head any that scores structures from the weights
# (l1: |W|, l2: W², summed per head).


def _check_rate(r: float, what: str) -> float:
    try:
        r = float(r)
    except (TypeError, ValueError):
        raise PrunetuneError(f"{what} rate must be a number in [0, 1), got '{r}'") from None
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise PrunetuneError(f"{what} rate must be in [0, 1), got {r}")
    return r


def parse_rate(value: float | str | Sequence[float], what: str) -> Rate:
    """A global rate (0.5) or one rate per block ('0.1,0.2,0.3' or a list)."""
    if isinstance(value, str):
        parts = [p for p in value.replace(";", ",").split(",") if p.strip()]
        if not parts:
            raise PrunetuneError(f"{what} rate is empty")
        value = parts if len(parts) > 1 else parts[0]
    if isinstance(value, (list, tuple)):
        rates = tuple(_check_rate(v, what) for v in value)
        return rates[0] if len(rates) == 1 else rates
    return _check_rate(value, what)

Rate = float | tuple[float, ...]


@dataclass(frozen=True)
class Configuration:
    """One pruned version: the fraction of attention heads and of linear weights removed (global or per block)."""

    attention: Rate
    linear: Rate

    def rate(self, kind: str, block: int) -> float:
        r = self.attention if kind in ATTENTION_UNITS else self.linear
        return r[block] if isinstance(r, tuple) else r

    @property
    def name(self) -> str:
        fmt = lambda r: "-".join(f"{x:g}" for x in r) if isinstance(r, tuple) else f"{r:g}"  # noqa: E731
        return f"a{fmt(self.attention)}_l{fmt(self.linear)}"

    def to_dict(self) -> dict:
        return {"attention": list(self.attention) if isinstance(self.attention, tuple) else self.attention,
                "linear": list(self.linear) if isinstance(self.linear, tuple) else self.linear, "name": self.name}


def parse_configurations(attention: Sequence[float | str], linear: Sequence[float | str], n: int | None = None,
                         grid: bool = False) -> list[Configuration]:
    """Pair `attention` and `linear` position by position (the seed's `-n N`), or take their cross product.

    Paired lists must have the same length, and N (when given) must equal it: a silent truncation would run
    configurations nobody asked for.
    """
    att = [parse_rate(a, "attention") for a in attention]
    lin = [parse_rate(x, "linear") for x in linear]
    if not att or not lin:
        raise PrunetuneError("give at least one attention rate and one linear rate")
    if grid:
        if n is not None and n != len(att) * len(lin):
            raise PrunetuneError(f"-n {n} does not match the grid of {len(att)} x {len(lin)} = "
                                 f"{len(att) * len(lin)} configurations")
        pairs = list(itertools.product(att, lin))
    else:
        if len(att) != len(lin):
            raise PrunetuneError(f"--attention has {len(att)} rates but --linear has {len(lin)}: pair them one to "
                                 "one, or use --grid for every combination")
        if n is not None and n != len(att):
            raise PrunetuneError(f"-n {n} does not match the {len(att)} rates given to --attention and --linear")
        pairs = list(zip(att, lin))
    out: list[Configuration] = []
    for a, li in pairs:
        c = Configuration(a, li)
        if c not in out:
            out.append(c)
    return out


@dataclass(frozen=True)
class Unit:
    """One module of one block pruned one way: the thing fine-tuned once and shared by configurations."""

    block: int
    kind: str  # attention | cross-attention | o | co | gate | up | down
    criterion: str
    rate: float

    @property
    def id(self) -> str:
        return f"b{self.block}.{self.kind}.{self.criterion}.{self.rate:g}"


@dataclass
class Plan:
    """Unique units, and for each configuration which units it is made of."""

    configs: list[Configuration]
    units: list[Unit]
    members: dict[str, list[Unit]]  # configuration name -> its units
    unit_count_without_dedup: int

    def to_dict(self) -> dict:
        return {"configurations": [c.to_dict() for c in self.configs], "unique_units": len(self.units),
                "units_without_dedup": self.unit_count_without_dedup,
                "units": [u.id for u in self.units],
                "members": {k: [u.id for u in v] for k, v in self.members.items()}}


def check_units(units: Iterable[str], what: str, allowed: Sequence[str]) -> tuple[str, ...]:
    units = tuple(units)
    for u in units:
        if u not in allowed:
            raise PrunetuneError(f"unknown module role '{u}' in {what}; choose from: {', '.join(allowed)}")
    return units


def registered_criterion(name: str):
    """The criterion registry's entry (`pruning.criteria.get_criterion`), or None for a name it does not know."""
    try:
        return get_criterion(name)
    except PrunetuneError:
        return None


def scores_linear(crit) -> bool:
    """A score (not a weight update) from the weights or input column norms: what the module capture holds."""
    return not crit.updates_weights and crit.statistics in ("none", "column_norms")


def check_linear_criterion(name: str) -> str:
    """Any registry criterion that scores weights from the weights alone or from input column norms (the module
    capture has both; a weight-updating criterion such as SparseGPT is not a score)."""
    crit = registered_criterion(name)
    if crit is None or not scores_linear(crit):
        allowed = ["l1"] + [n for n in criterion_names() if scores_linear(CRITERIA[n])]
        raise PrunetuneError(f"unknown or unsupported linear criterion '{name}'; choose one of: {', '.join(allowed)}")
    return name


def _has_element_importance(crit) -> bool:
    return type(crit).element_importance is not Criterion.element_importance


def check_head_criterion(name: str) -> str:
    """A registry criterion that scores a head from its weights alone (l1: |W|, l2: W²)."""
    crit = registered_criterion(name)
    if crit is None or not _has_element_importance(crit):
        raise PrunetuneError(f"unknown head criterion '{name}'; choose one of: l1, l2")
    return name


def linear_criterion_needs_activations(name: str) -> bool:
    """Whether the linear criterion scores from input activations (wanda, column-norm criteria): the control
    arm (`baseline`, pruned without module-level fine-tuning) then captures the original model's inputs too."""
    if name == "wanda":
        return True
    crit = registered_criterion(name)
    return crit is not None and crit.statistics == "column_norms"


def plan(configs: Sequence[Configuration], adapter: ArchAdapter, *,
         attention_units: Sequence[str] = DEFAULT_ATTENTION_UNITS, linear_units: Sequence[str] = DEFAULT_LINEAR_UNITS,
         attention_criterion: str = "l1", linear_criterion: str = "l1") -> Plan:
    """Deduplicate every configuration's (block, module, criterion, rate) into the units to fine-tune."""
    attention_units = check_units(attention_units, "the attention modules", tuple(ATTENTION_UNITS))
    linear_units = check_units(linear_units, "the linear modules", LINEAR_ROLES)
    check_head_criterion(attention_criterion)
    check_linear_criterion(linear_criterion)
    blocks = adapter.blocks()
    for c in configs:
        for what, r in (("attention", c.attention), ("linear", c.linear)):
            if isinstance(r, tuple) and len(r) != len(blocks):
                raise PrunetuneError(f"configuration {c.name}: {len(r)} per-block {what} rates for a model with "
                                     f"{len(blocks)} blocks")
    units: list[Unit] = []
    seen: set[Unit] = set()
    members: dict[str, list[Unit]] = {}
    total = 0
    for c in configs:
        mine: list[Unit] = []
        for b in blocks:
            kinds = [k for k in attention_units if all(r in b.linears for r in ATTENTION_UNITS[k])]
            kinds += [k for k in linear_units if k in b.linears]
            for kind in kinds:
                rate = c.rate(kind, b.index)
                if rate == 0.0:
                    continue  # left dense: the original module, nothing to fine-tune
                crit = attention_criterion if kind in ATTENTION_UNITS else linear_criterion
                u = Unit(b.index, kind, crit, rate)
                mine.append(u)
                total += 1
                if u not in seen:
                    seen.add(u)
                    units.append(u)
        members[c.name] = mine
    return Plan(list(configs), units, members, total)
