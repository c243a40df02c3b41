"""Prune-As-You-Tune (PAYT), one folder: its settings (`spec`), the lifecycle that prunes on a schedule while
LoRA+KD fine-tunes (`method`), and its runs and full comparison (`comparison`). The stages that run it are
`payt` and `full_evaluate` (`pipelines.stages.tune`), its command `prunetune payt` (`cli.tune`)."""

from __future__ import annotations

from prunetune.lazy import lazy_exports

#: the method's public names and the module of each, imported on first use (`prunetune.lazy`: the recipe
#: schema imports `spec`, and `prune` must not load the training side)
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

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
