"""|B|_F^2 without the noise's upward bias, from the ``S x S`` Gram of per-network residuals: the U-statistic
``U = sum_{s != t} <R_s, R_t> / (S (S-1))`` and its jackknife standard error.

The residuals ``R_s`` come from :mod:`kernels.finite_width` (one per untrained network); everything here is
a function of their Gram ``<R_s, R_t>``, so resampling seeds needs no residual matrices. Torch-free: the
aggregates (:mod:`pipeline.gp_init`) compute it when results are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BiasStatistics:
    """From ``S`` residuals: ``u`` the unbiased estimate of ``|B|_F^2``, ``u_se`` its jackknife standard error,
    ``noise2`` the expected ``|mean R - B|_F^2`` (what ``|mean R|_F^2`` would show for ``B = 0``)."""

    u: float
    u_se: float
    noise2: float
    seeds: int


def bias_statistics(gram: np.ndarray, weights: np.ndarray | None = None) -> BiasStatistics:
    """:class:`BiasStatistics` from the ``(S, S)`` Gram ``<R_s, R_t>`` of the residuals.

    ``weights``: optional ``(S,)`` multiplicities (a bootstrap resample of the seeds); pairs of copies of
    one seed are left out of the U-statistic, so it stays unbiased.
    """
    s = len(gram)
    c = np.ones(s) if weights is None else np.asarray(weights, dtype=np.float64)
    diag = np.diag(gram)
    pairs = float(c.sum() ** 2 - (c**2).sum())
    u = float((c @ gram @ c - (c**2 * diag).sum()) / pairs) if pairs > 0 else math.nan
    n = c.sum()
    mean_sq = float(c @ gram @ c) / n**2
    noise2 = max(float((c * diag).sum() / n - mean_sq), 0.0) / max(n - 1, 1)
    u_se = math.nan
    if weights is None and s >= 3:
        total, rows = float(gram.sum()), gram.sum(axis=1)
        leave = ((total - 2 * rows + diag) - (diag.sum() - diag)) / ((s - 1) * (s - 2))
        u_se = float(math.sqrt((s - 1) / s * ((leave - leave.mean()) ** 2).sum()))
    return BiasStatistics(u=u, u_se=u_se, noise2=noise2, seeds=s)
