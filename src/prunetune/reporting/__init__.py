"""Reports: markdown tables and PNG plots drawn from run directories (`prunetune compare`).

`reporting.report` (run reports, `compare_runs`) and `reporting.plots`; this package imports neither, so that
neither imports back into a half-initialised package.
"""
