"""Transitional re-exports of the trainer's old module (issue 17 split it into run, limits, measures and results).

Kept only while tests owned by other work in progress still import from here; removed with them.
"""

from pipeline.data import load_subset  # noqa: F401
from pipeline.limits import analytic_blocks, analytic_kernels  # noqa: F401
from pipeline.measures import log_steps  # noqa: F401
from pipeline.results import KERNEL_REGIME_ONLY, SCALAR_METRICS, RunResult  # noqa: F401
from pipeline.run import train_run, train_runs  # noqa: F401
