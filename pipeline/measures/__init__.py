"""The measurements of one trained run, grouped by family, and the sizes and schedules they share with the planner.

Families, one module each:

* :mod:`~pipeline.measures.spectra`: eigenvalues of kernels (top eigenvalue, condition numbers, the
  spectral-bias tracker of residual energy per eigen-band);
* :mod:`~pipeline.measures.kernel_distance`: Frobenius distances between the empirical NTKs at init and at
  the end and the analytic NTK, formed in row panels;
* :mod:`~pipeline.measures.dynamics`: the closed forms of gradient descent on a linear model, and the
  learning rate from the stability edge of the linearised dynamics;
* :mod:`~pipeline.measures.outputs`: losses, accuracies, agreement of two predictors, weight change and
  activation-pattern flips.

This module itself imports no torch: :mod:`pipeline.plan` costs a run from the same thresholds and panel
sizes that the measurements use.
"""

from __future__ import annotations

import math

import numpy as np

MAX_FULL_NTK = 4096  # n_train * K up to which the (nK x nK) empirical-NTK closed form is computed
MAX_EIGH = 4096  # n_train up to which train-set spectra and the spectral-bias table are computed
NORM_PANEL = 1024  # rows of an (N, N) kernel turned into float64 at a time for its norms


def norm_panels(n: int, total: int, width: int) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` of ``train ++ test`` (``n`` training points of ``total``) in which the
    empirical NTKs are formed for their norms, none straddling the boundary ``n``. Each panel recomputes the
    column features (``O(N K width^2)``) beside its Gram (``O(rows N K width)``), so wide networks get taller
    panels: ``max(NORM_PANEL, 2 width)`` rows, at most ``total``; memory is ``rows x N`` per kernel."""
    rows = min(total, max(NORM_PANEL, 2 * width))
    return [(lo, min(end, lo + rows)) for start, end in ((0, n), (n, total)) for lo in range(start, end, rows)]


def log_steps(steps: int, points: int) -> list[int]:
    """``0``, then about ``points`` log-spaced steps up to and including ``steps``."""
    if steps == 0:
        return [0]
    grid = np.unique(np.round(np.logspace(0, math.log10(steps), points - 1)).astype(int))
    return [0] + [int(s) for s in grid if 0 < s <= steps]
