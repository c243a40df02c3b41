"""VIB structured pruning, one folder: the `structured` section's settings (`spec`), the gates (`gates`), the
lifecycle that trains them against a Lagrangian target and folds them into a smaller model (`method`), and the
standalone gate-training loop (`train`). `methods.shrink` runs it (or a structure criterion) for the
`structured` stage (`pipelines.stages.shrink`) and `prunetune shrink` (`cli.shrink`)."""

from __future__ import annotations

from prunetune.lazy import lazy_exports

#: the method's public names and the module of each, imported on first use (`prunetune.lazy`: the recipe
#: schema imports `spec`, and `prune` must not load the training side)
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

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
