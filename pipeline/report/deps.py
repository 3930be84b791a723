"""The names the report takes from the rest of ``pipeline``, each imported here and only here, on first use.

``deps.NAME`` imports the module that defines NAME when it is first read, not when the report is
imported: ``ntk-sweep --help`` imports the report, and those modules pull in torch, pandas or pyarrow.
Where a name moves, its line in ``SOURCES`` is the one to change.
"""

from __future__ import annotations

import importlib
from typing import Any

SOURCES = {
    # results tables: the aggregates and the runs as arrays
    "tables": "pipeline.aggregate",
    "read_table": "pipeline.aggregate",
    "split_runs": "pipeline.groups",
    "BY_WIDTH": "pipeline.aggregate",
    "SCALING": "pipeline.aggregate",
    "GP_INIT": "pipeline.aggregate",
    "deviation_measures": "pipeline.aggregate",
    "expected_exponent": "pipeline.aggregate",
    # GP at init: the groups whose NNGP could not be recomputed; the subset a run trained on
    "skipped_groups": "pipeline.gp_init",
    "load_recorded_subset": "pipeline.gp_init",
    # a run's configuration, the results layout, and the analytic kernels of a subset
    "RunConfig": "pipeline.run_config",
    "GRAMS": "pipeline.store",
    "ResultsStore": "pipeline.store",
    "analytic_kernels": "pipeline.limits",
    "UserError": "pipeline.errors",
}


def __getattr__(name: str) -> Any:
    try:
        module = SOURCES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), name)
