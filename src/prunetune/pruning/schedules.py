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

from prunetune.errors import PrunetuneError

SCHEDULES = ("oneshot", "linear", "agp")
UNITS = ("epoch", "step")
ALIGNS = ("step", "epoch")


@dataclass(frozen=True)
class PruningEvent:
    step: int
    sparsity: float
    index: int  # 1-based event number
    of: int  # number of events


@dataclass(frozen=True)
class Schedule:
    """Validated schedule settings; `plan` turns them into events once the step count is known."""

    kind: str = "agp"
    target: float = 0.5
    start: float = 0.0  # fraction of training before the first pruning event
    every: int = 1  # distance between events, in `unit`s
    unit: str = "epoch"
    end: float = 1.0  # fraction of training by which the last event has happened (1.0: the last that fits)
    align: str = "step"  # epoch: the first event at the start of the epoch holding floor(start * total_steps)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise PrunetuneError(f"unknown pruning schedule '{self.kind}'; choose one of: {', '.join(SCHEDULES)}")
        if not (0.0 <= float(self.target) < 1.0) or math.isnan(float(self.target)):
            raise PrunetuneError(f"target sparsity must be in [0, 1), got {self.target}")
        if not (0.0 <= float(self.start) < 1.0) or math.isnan(float(self.start)):
            raise PrunetuneError(f"pruning start must be a fraction of training in [0, 1), got {self.start}")
        if not (float(self.start) < float(self.end) <= 1.0) or math.isnan(float(self.end)):
            raise PrunetuneError(f"pruning end must be a fraction of training in (start, 1], got {self.end} "
                                 f"(start {self.start})")
        if int(self.every) < 1:
            raise PrunetuneError(f"prune every N {self.unit}s needs N >= 1, got {self.every}")
        if self.unit not in UNITS:
            raise PrunetuneError(f"unknown schedule unit '{self.unit}'; choose epoch or step")
        if self.align not in ALIGNS:
            raise PrunetuneError(f"unknown schedule alignment '{self.align}'; choose step or epoch")

    def fraction(self, k: int, n: int) -> float:
        """Sparsity of event k of n; exactly the target at k == n."""
        if k >= n:
            return float(self.target)
        if self.kind == "oneshot":
            return float(self.target)
        r = k / n
        value = self.target * (r if self.kind == "linear" else 1.0 - (1.0 - r) ** 3)
        return min(float(self.target), max(0.0, value))

    def steps(self, total_steps: int, steps_per_epoch: int) -> list[int]:
        """Steps of the pruning events: first at start * total (rounded down to its epoch's first step with
        `align: epoch`), then every `every` units, all < total."""
        if total_steps < 1:
            raise PrunetuneError("training has no optimizer steps: nothing to prune during (more data or epochs)")
        first = min(int(math.floor(self.start * total_steps + 1e-9)), total_steps - 1)
        if self.align == "epoch":
            spe = max(1, int(steps_per_epoch))
            first = (first // spe) * spe
        if self.kind == "oneshot":
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
