"""LoSparse, one folder: its settings (`spec`), its layers (`layers`: W ≈ U·V + S), PLATON's scores and the
schedule (`platon`), the lifecycle that prunes S while fine-tuning (`method`) and the factorised export
(`export`). Its stage is `losparse` (`pipelines.stages.shrink`), its command `prunetune losparse` (`cli.losparse`)."""

from __future__ import annotations

from importlib import import_module

#: the method's public names and the module of each, imported on first use (PEP 562): importing the package, or
#: its `spec` alone (the recipe schema does, so every command does), must not load the method's training code
#: (transformers' Trainer, peft, datasets: about 120 MiB resident and seconds of import that `prune` never uses)
_EXPORTS = {
    "SEED_NAMES": "spec",
    "LosparseSpec": "spec",
    "DIRECTIONS": "platon",
    "STRUCTURED_METHODS": "platon",
    "LosparseSchedule": "platon",
    "PlatonScores": "platon",
    "select_keep": "platon",
    "unit_direction": "platon",
    "DEFAULT_ROLES": "layers",
    "LowRankSparseLinear": "layers",
    "check_rank": "layers",
    "factorize": "layers",
    "losparse_layers": "layers",
    "materialize": "layers",
    "parameter_counts": "layers",
    "rank_for": "layers",
    "targets": "layers",
    "save_factorized": "export",
    "Losparse": "method",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
