"""Deferred public names for a package (PEP 562), so that importing it loads only what its caller uses."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `package.<exports[name]>` on first access of `name` and keeps the value.

    Why: every command validates its recipe, which imports each method's `spec`, hence each method's package;
    if the package imported its training side eagerly, `prunetune prune` would carry transformers' Trainer,
    peft and datasets (about 120-135 MiB resident) through its pruning peak without using them. A name equal to
    one of the package's submodules must not be deferred: once anything imports that submodule, Python binds
    the module object to that attribute and this hook is never asked."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{exports[name]}"), name)
        namespace[name] = value
        return value

    return __getattr__
