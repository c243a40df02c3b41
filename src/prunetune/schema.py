"""The base of every recipe section: a pydantic model that refuses unknown keys and validates on assignment.

Each section's schema lives with the code it configures (`data.spec.DataSpec`, `tuning.spec.TuneSpec`,
`methods.payt.spec.PaytSpec`, ...); `config.Recipe` composes them. They all derive from `Spec`, which sits at
the bottom of the layers so that every owner can use it.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from prunetune.errors import PrunetuneError


class Spec(BaseModel):
    """A recipe section: unknown keys are errors (a typo never passes silently), assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def checked(check: Callable[[str], object], value: str) -> str:
    """`value` once `check(value)` accepts it; its one-line PrunetuneError becomes pydantic's ValueError."""
    try:
        check(value)
    except PrunetuneError as exc:
        raise ValueError(str(exc)) from None
    return value
