"""The one registry of stage kinds: what a recipe's `stages: [...]` may name, and how the runner runs each.

A stage kind declares, in one `StageKind`:

* `function`: where its code is, as "module:function" (`fn(state, out_dir) -> {"metrics", "artifacts"}`). It is
  imported when the stage runs, not here: the recipe schema (`config`) reads this table to validate stage
  names and sections, and sits below the code the stages run;
* `section`: the recipe section holding its settings (a stage's own options override it); None = no options;
* `produces_model`: it saves `out_dir/model/`, which the next stage loads;
* `resumable`: on `--resume` an interrupted run continues from the last checkpoint of its training;
* `ranks`: under a multi-process launcher (torchrun, accelerate launch), "all" = every rank runs it (they train
  together), "main" = rank 0 alone while the others wait, "single" = it trains inside its own loops and refuses
  a multi-process launch (a Trainer on rank 0 alone would wait forever for the other ranks' gradients);
* `check`: optionally "module:function", called with the stage's settings before any run directory exists
  (a method's own checks, which the schema cannot express without importing the method);
* `reads`: the recipe keys naming the local inputs it reads (`data.train`, `data.train:labelled` for labelled
  examples whatever the model's head, `data.calib`, `data.ppl`, `tune.teacher`, `losparse.teacher`), checked
  to exist and hold what the stage needs before any stage runs.

Adding a stage kind is one `register_stage(StageKind(...))` call beside its function; the runner has no special case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Literal

Ranks = Literal["main", "all", "single"]


@dataclass(frozen=True)
class StageKind:
    name: str
    function: str
    section: str | None
    produces_model: bool = False
    resumable: bool = False
    ranks: Ranks = "main"
    check: str | None = None
    reads: tuple[str, ...] = ()

    def load(self) -> Callable:
        """The stage's function (looked up at every call, so that a test may monkeypatch the module)."""
        return _resolve(self.function)

    def load_check(self) -> Callable | None:
        return None if self.check is None else _resolve(self.check)


def _resolve(ref: str) -> Callable:
    module, _, attr = ref.partition(":")
    return getattr(import_module(module), attr)


STAGE_KINDS: dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> StageKind:
    """Add a stage kind; a name registered twice is a bug, refused."""
    if kind.name in STAGE_KINDS:
        raise ValueError(f"stage kind {kind.name!r} is registered twice")
    if kind.ranks not in ("main", "all", "single"):
        raise ValueError(f"stage kind {kind.name!r}: ranks must be main, all or single, got {kind.ranks!r}")
    STAGE_KINDS[kind.name] = kind
    return kind


def stage_kind(name: str) -> StageKind:
    _load_builtins()
    return STAGE_KINDS[name]


def stage_names() -> tuple[str, ...]:
    _load_builtins()
    return tuple(STAGE_KINDS)


# ------------------------------------------------------------------------------------------ the built-in kinds
#: the modules whose `register_stage` calls declare the built-in kinds, each beside its function. They sit above
#: this registry, which must not import them (config reads it to validate recipes; the stages' code imports it):
#: they are imported by name on the first lookup. A stage kind from outside the package registers when its
#: own module is imported (tests/toy_method.py).
BUILTIN_MODULES = ("prunetune.pipelines.stages", "prunetune.pipelines.compose")
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            import_module(module)
