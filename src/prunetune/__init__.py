"""prunetune: compress pre-trained transformers by pruning while fine-tuning, with honest evaluation."""

from __future__ import annotations

__version__ = "0.1.0"

from prunetune.errors import PrunetuneError

__all__ = ["PrunetuneError", "__version__", "load_model", "prune"]


def __getattr__(name: str):
    # Lazy: importing the package must stay cheap (the CLI's --help should not import torch), and both modules
    # import this package first (a cycle at import).
    if name == "load_model":
        from prunetune.models.loading import load_model

        return load_model
    if name == "prune":  # a model prunes in memory, a checkpoint path streams
        from prunetune.pruning.stream import prune

        return prune
    raise AttributeError(name)
