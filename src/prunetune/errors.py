"""One exception type for every mistake a user can make.

The CLI turns a `PrunetuneError` into a single readable line on stderr and exit code 2; anything else is a
bug and keeps its traceback. Library users catch it like any other exception.
"""

from __future__ import annotations


class PrunetuneError(Exception):
    """A user-facing error: bad input, missing asset, unsupported model. The message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
