"""Reports: markdown tables and PNG plots drawn from run directories (`prunetune compare`)."""

from __future__ import annotations

__all__ = ["compare_runs", "write_run_report"]


def __getattr__(name: str):
    if name in __all__:
        from prunetune.reporting import report

        return getattr(report, name)
    raise AttributeError(name)
