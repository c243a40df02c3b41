"""LoSparse, one folder: its settings (`spec`), its layers (`layers`: W ≈ U·V + S), PLATON's scores and the
schedule (`platon`), the lifecycle that prunes S while fine-tuning (`method`) and the factorised export
(`export`). Its stage is `losparse` (`pipelines.stages.shrink`), its command `prunetune losparse` (`cli.losparse`)."""

from __future__ import annotations

from prunetune.lazy import lazy_exports

#: the method's public names and the module of each, imported on first use (`prunetune.lazy`: the recipe
#: schema imports `spec`, and `prune` must not load the training side)
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

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
