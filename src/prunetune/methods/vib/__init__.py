"""VIB structured pruning, one folder: the `structured` section's settings (`spec`), the gates (`gates`), the
lifecycle that trains them against a Lagrangian target and folds them into a smaller model (`method`), and the
standalone gate-training loop (`train`). `methods.shrink` runs it (or a structure criterion) for the
`structured` stage (`pipelines.stages.shrink`) and `prunetune shrink` (`cli.shrink`)."""

from __future__ import annotations

from importlib import import_module

#: the method's public names and the module of each, imported on first use (PEP 562): importing the package, or
#: its `spec` alone (the recipe schema does, so every command does), must not load the method's training code
#: (transformers' Trainer, peft, datasets: about 120 MiB resident and seconds of import that `prune` never uses)
_EXPORTS = {
    "StructuredSpec": "spec",
    "EPS": "gates",
    "GateBank": "gates",
    "VibGates": "gates",
    "NSGD_CLIP": "method",
    "VibMethod": "method",
    "train_gates": "train",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
