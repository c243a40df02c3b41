"""VIB structured pruning, one folder: the `structured` section's settings (`spec`), the gates (`gates`), the
lifecycle that trains them against a Lagrangian target and folds them into a smaller model (`method`), and the
standalone gate-training loop (`train`). `methods.shrink` runs it (or a structure criterion) for the
`structured` stage (`pipelines.stages.shrink`) and `prunetune shrink` (`cli.shrink`)."""

from __future__ import annotations

from prunetune.methods.vib.spec import StructuredSpec  # noqa: F401  the method's public names
from prunetune.methods.vib.gates import EPS, GateBank, VibGates  # noqa: F401  the method's public names
from prunetune.methods.vib.method import NSGD_CLIP, VibMethod  # noqa: F401  the method's public names
from prunetune.methods.vib.train import train_gates  # noqa: F401  the method's public names
