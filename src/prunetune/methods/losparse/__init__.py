"""LoSparse, one folder: its settings (`spec`), its layers (`layers`: W ≈ U·V + S), PLATON's scores and the
schedule (`platon`), the lifecycle that prunes S while fine-tuning (`method`) and the factorised export
(`export`). Its stage is `losparse` (`pipelines.stages.shrink`), its command `prunetune losparse` (`cli.losparse`)."""

from __future__ import annotations

from prunetune.methods.losparse.spec import SEED_NAMES, LosparseSpec  # noqa: F401  the method's public names
from prunetune.methods.losparse.platon import (  # noqa: F401  the method's public names
    DIRECTIONS,
    STRUCTURED_METHODS,
    LosparseSchedule,
    PlatonScores,
    select_keep,
    unit_direction,
)
from prunetune.methods.losparse.layers import (  # noqa: F401  the method's public names
    DEFAULT_ROLES,
    LowRankSparseLinear,
    check_rank,
    factorize,
    losparse_layers,
    materialize,
    parameter_counts,
    rank_for,
    targets,
)
from prunetune.methods.losparse.export import save_factorized  # noqa: F401  the method's public names
from prunetune.methods.losparse.method import Losparse  # noqa: F401  the method's public names
