"""How much sparsity at which training step: oneshot, linear and AGP (cubic) schedules.

A schedule is planned once, when the number of optimizer steps is known, into a list of pruning events
`(step, sparsity)`. Event k of n (k = 1..n) asks for

- `oneshot`: S (a single event),
- `linear`:  S * k / n,
- `agp`:     S * (1 - (1 - k / n)^3)   (Zhu & Gupta's cubic schedule: prune fast while the net is redundant),

and the last event asks for S *exactly* (set, not computed), so float rounding can neither overshoot the
target nor crash a "reached target?" check as in the original PAYT code. The first event is at
`floor(start * total_steps)` (a delay as a fraction of training) or, with `align: epoch`, that step rounded down
to the start of its epoch (`floor(start * epochs)` epochs in, as PAYT's own code counts its start), so that with
`unit: epoch` every event falls on an epoch boundary; later ones every `every` epochs (or steps), up to
`end * total_steps` (AGP's end step: with `end` < 1 the target is reached early and the rest of training
recovers under the final mask). An event at step s prunes before optimizer step s + 1, so step 0 prunes
before any training and the last event always leaves training after it to recover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from prunetune.errors import PrunetuneError
from prunetune.schema import Spec


@dataclass(frozen=True)
class PruningEvent:
    step: int
    sparsity: float
    index: int  # 1-based event number
    of: int  # number of events


class Schedule(Spec):
    """When pruning happens and how much: the schedule keys of a recipe section, one schema for every method that
    prunes while it trains (PAYT's `payt` section derives from it and adds its criterion). `plan` turns the
    settings into events once the step count is known."""

    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="the sparsity the last event asks for, exactly")
    schedule: Literal["agp", "linear", "oneshot"] = "agp"
    start: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of training before the first pruning event")
    end: float = Field(1.0, gt=0.0, le=1.0, description="fraction of training by which the last event has "
                       "happened (1.0: the last that fits); with end < 1 the rest of training recovers")
    every: int = Field(1, ge=1, description="distance between events, in units")
    unit: Literal["epoch", "step"] = "epoch"
    align: Literal["step", "epoch"] = Field(
        "step", description="step: the first event at floor(start x total steps); epoch: rounded down to the start "
        "of its epoch (floor(start x epochs)), as PAYT's own code does, so with unit epoch every event is on an "
        "epoch boundary")

    @model_validator(mode="after")
    def _end_after_start(self) -> Schedule:
        if self.end <= self.start:  # checked at load, not after the stages before the pruning one have run
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        return self

    def fraction(self, k: int, n: int) -> float:
        """Sparsity of event k of n; exactly the target at k == n."""
        if k >= n or self.schedule == "oneshot":
            return float(self.sparsity)
        r = k / n
        value = self.sparsity * (r if self.schedule == "linear" else 1.0 - (1.0 - r) ** 3)
        return min(float(self.sparsity), max(0.0, value))

    def steps(self, total_steps: int, steps_per_epoch: int) -> list[int]:
        """Steps of the pruning events: first at start * total (rounded down to its epoch's first step with
        `align: epoch`), then every `every` units, all < total."""
        if total_steps < 1:
            raise PrunetuneError("training has no optimizer steps: nothing to prune during (more data or epochs)")
        first = min(int(math.floor(self.start * total_steps + 1e-9)), total_steps - 1)
        if self.align == "epoch":
            spe = max(1, int(steps_per_epoch))
            first = (first // spe) * spe
        if self.schedule == "oneshot":
            return [first]
        gap = int(self.every) * (max(1, int(steps_per_epoch)) if self.unit == "epoch" else 1)
        limit = total_steps if self.end >= 1.0 else min(total_steps, int(math.floor(self.end * total_steps + 1e-9)) + 1)
        return list(range(first, max(limit, first + 1), gap))

    def plan(self, total_steps: int, steps_per_epoch: int) -> list[PruningEvent]:
        steps = self.steps(total_steps, steps_per_epoch)
        n = len(steps)
        return [PruningEvent(s, self.fraction(k, n), k, n) for k, s in enumerate(steps, 1)]

    def sparsity_at(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """Sparsity in force during optimizer step `step + 1` (0 before the first event)."""
        current = 0.0
        for ev in self.plan(total_steps, steps_per_epoch):
            if ev.step <= step:
                current = ev.sparsity
        return current
