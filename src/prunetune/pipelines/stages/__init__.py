"""The stages a recipe strings together. Each is `fn(state, out_dir) -> {"metrics", "artifacts"}`.

A stage writes only into `out_dir` (a `.partial` directory the runner renames when the stage returns).
Stages that change the model save it as `out_dir/model/` (plain HF safetensors dir + `masks.safetensors`);
the next stage loads from there. Every metric carries its protocol.

What each stage kind is (its recipe section, whether it produces a model, resumes, and how it runs under
several processes) is declared once, by the `register_stage` call beside its function (`prunetune.registry`). Under a multi-process launcher the training
stages (`ranks="all"`: finetune, payt, losparse, full_evaluate) run on every rank, which train together; after
training, rank 0 alone evaluates, saves and returns the metrics (`state.is_main`), the other ranks return
nothing. Every other stage runs on rank 0 only.
"""

from __future__ import annotations

from prunetune.pipelines.stages.common import (  # noqa: F401  (the registry finds run_* here)
    TUNE_DIR,
    resumable_checkpoint,
    dump,
    zeros_metric,
    sparsity_metric,
    card_info,
    save_model,
)
from prunetune.pipelines.stages.evaluate import (  # noqa: F401  (the registry finds run_* here)
    run_evaluate,
    evaluate_model,
)
from prunetune.pipelines.stages.prune import (  # noqa: F401  (the registry finds run_* here)
    HIST_BINS,
    chosen_layers,
    weight_histograms,
    prune_model,
    streaming_checkpoint,
    run_prune,
)
from prunetune.pipelines.stages.tune import (  # noqa: F401  (the registry finds run_* here)
    tune_run,
    read_curves,
    sized_training_text,
    test_set_protocol,
    finetune_model,
    run_finetune,
    run_payt,
    run_order_study,
    run_full_evaluate,
)
from prunetune.pipelines.stages.export import (  # noqa: F401  (the registry finds run_* here)
    run_export,
    model_streamed,
)
from prunetune.pipelines.stages.shrink import (  # noqa: F401  (the registry finds run_* here)
    run_structured,
    run_losparse,
)
