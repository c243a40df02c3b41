"""One exception type for every mistake a user can make.

The CLI turns a `PrunetuneError` into a single readable line on stderr and exit code 2; anything else is a
bug and keeps its traceback. Library users catch it like any other exception.
"""

from __future__ import annotations


class PrunetuneError(Exception):
    """A user-facing error: bad input, missing asset, unsupported model. The message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def optional_import(module: str, extra: str, purpose: str):
    """Import a dependency that lives in one of prunetune's extras, or say in one line how to get it.

    Heavy packages that only one feature needs (lm-eval, sacrebleu, datasets, tensorboard) are extras so that a
    plain `pip install prunetune` stays small; the feature that needs one must fail with the install command,
    not with a bare ModuleNotFoundError deep inside a run.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PrunetuneError(
            f"{purpose} needs the '{module.split('.')[0]}' package ({exc}); install it with "
            f"pip install 'prunetune[{extra}]'"
        ) from None
