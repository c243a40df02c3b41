"""Pipelines: a recipe's stages run in order, atomically and resumably (`prunetune run`)."""

from __future__ import annotations

__all__ = ["run_recipe", "load_run"]


def __getattr__(name: str):
    if name in __all__:
        # on first use: importing a stage module (the registry does, by name) need not load the runner too
        from prunetune.pipelines import runner

        return getattr(runner, name)
    raise AttributeError(name)
