"""The criterion registry: one place that `prune()`, PAYT and recipes ask "what does criterion X do?".

`Criterion`, `register` and the lookups live in `criteria.registry` (see its docstring for what a criterion
declares); this package re-exports them and imports every criterion file, so that importing it fills the
registry.

`default_granularity` is the criterion's own comparison group when the caller names none, and
`granularities` the ones it supports. Adding a criterion = one file with a `@register` class (importing
`Criterion` and `register` from `criteria.registry`, never from this package) + one import line below + one
row in `tests/test_criteria.py`.
"""

from __future__ import annotations

from prunetune.pruning.criteria.registry import (  # noqa: F401  the registry's public names
    ALL_GRANULARITIES,
    CONTEXT_ALIASES,
    CRITERIA,
    STATISTICS,
    STRUCTURED,
    UNSTRUCTURED,
    Criterion,
    criterion_names,
    get_criterion,
    register,
    resolve_name,
    structure_criterion_names,
)

# the registry lines: one import per criterion file (order = the order choices are listed in)
from prunetune.pruning.criteria import wanda, magnitude, sparsegpt, admm, flap  # noqa: E402,F401,I001
