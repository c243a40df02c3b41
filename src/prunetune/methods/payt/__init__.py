"""Prune-As-You-Tune (PAYT), one folder: its settings (`spec`), the lifecycle that prunes on a schedule while
LoRA+KD fine-tunes (`method`), and its runs and full comparison (`comparison`). The stages that run it are
`payt` and `full_evaluate` (`pipelines.stages.tune`), its command `prunetune payt` (`cli.tune`)."""

from __future__ import annotations

from prunetune.methods.payt.spec import FullEvaluateSpec, PaytSpec  # noqa: F401  the method's public names
from prunetune.methods.payt.method import (  # noqa: F401  the method's public names
    PaytCallback,
    PaytMethod,
    canonical_criterion,
    compute_masks,
)
from prunetune.methods.payt.comparison import (  # noqa: F401  the method's public names
    CONFIGURATIONS,
    ROWS,
    comparison_payload,
    comparison_table,
    configuration_label,
    original_retention,
    prune_only,
    run_configuration,
    run_payt,
    table_row,
)
