"""Prune-As-You-Tune (PAYT), one folder: its settings (`spec`), the lifecycle that prunes on a schedule while
LoRA+KD fine-tunes (`method`), and its runs and full comparison (`comparison`). The stages that run it are
`payt` and `full_evaluate` (`pipelines.stages.tune`), its command `prunetune payt` (`cli.tune`)."""

from __future__ import annotations

from importlib import import_module

#: the method's public names and the module of each, imported on first use (PEP 562): importing the package, or
#: its `spec` alone (the recipe schema does, so every command does), must not load the method's training code
#: (transformers' Trainer, peft, datasets: about 120 MiB resident and seconds of import that `prune` never uses)
_EXPORTS = {
    "FullEvaluateSpec": "spec",
    "PaytSpec": "spec",
    "PaytCallback": "method",
    "PaytMethod": "method",
    "canonical_criterion": "method",
    "compute_masks": "method",
    "CONFIGURATIONS": "comparison",
    "ROWS": "comparison",
    "comparison_payload": "comparison",
    "comparison_table": "comparison",
    "configuration_label": "comparison",
    "original_retention": "comparison",
    "prune_only": "comparison",
    "run_configuration": "comparison",
    "run_payt": "comparison",
    "table_row": "comparison",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
