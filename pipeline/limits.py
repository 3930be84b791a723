"""The infinite-width limits a run is measured against: the analytic NTK and NNGP of its subset and
architecture, as the blocks and kernel-regression predictors the runs need (float64).

One task per (subset, architecture) computes them and every width's seeds share them (:mod:`pipeline.runner`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kernels.analytic import mlp_kernels, mlp_kernels_blocked
from kernels.solve import IndefiniteInPlace, solve
from pipeline.data import Subset
from pipeline.measures import MAX_EIGH
from pipeline.measures.spectra import spectrum_stats, top_eigenvalue
from pipeline.memory import peak_memory, reset_peak_memory
from pipeline.run_config import RunConfig


def analytic_kernels(config: RunConfig, subset: Subset) -> dict[str, np.ndarray]:
    """Analytic NNGP and NTK (float64) over ``train ++ test`` points: ``{"nngp", "ntk"}: (N, N)``.
    Depends on the subset and architecture only, so a sweep computes it once for all widths' seeds
    in NTK parameterisation (the standard-parameterisation NTK depends on the width)."""
    x = np.concatenate([subset.x_train, subset.x_test]).astype(np.float64)
    return mlp_kernels(x, **config.kernel_args())


ANALYTIC_BLOCK = 1024  # tile edge of the float64 analytic kernels (temporaries ~ a dozen of these squared)


@dataclass
class AnalyticBlocks:
    """What the runs of one (subset, architecture) need of its analytic (infinite-width) kernels, float64.

    n training points, m test points, K outputs. The NTK ``Theta`` in three blocks: ``ntk_tr (n, n)``,
    ``ntk_te_tr (m, n)`` (the train-test block is its transpose) and ``ntk_te_te (m, m)``.
    ``ntk_solver (m, n)``: ``Theta_te,tr (Theta_tr + eps I)^-1``, t = infinity kernel regression for any
    training targets. ``ntk_pred``, ``nngp_pred (m, K)``: the mean predictors at t = infinity of the
    NTK and the NNGP (``K_te,tr K_tr^-1 y``). ``lam_max``: top eigenvalue of ``ntk_tr``; ``spectrum``:
    ``(lambda_min, lambda_max, cond)`` of ``ntk_tr`` when ``n <= MAX_EIGH``. ``peak_rss_bytes``: the peak
    memory of the task that computed them. No ``(N, N)`` NNGP is ever formed: the runs need only its solve.
    """

    ntk_tr: np.ndarray
    ntk_te_tr: np.ndarray
    ntk_te_te: np.ndarray
    ntk_solver: np.ndarray
    ntk_pred: np.ndarray
    nngp_pred: np.ndarray
    lam_max: float
    spectrum: tuple[float, float, float] | None
    peak_rss_bytes: int | None = None

    @property
    def n(self) -> int:
        return len(self.ntk_tr)

    def ntk_block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """``Theta[r0:r1, c0:c1]`` over ``train ++ test`` for a block that lies within one of the
        train/test quadrants (``r0 < r1 <= n`` or ``n <= r0``, and the same for columns)."""
        n = self.n
        if r1 <= n and c1 <= n:
            return self.ntk_tr[r0:r1, c0:c1]
        if r0 >= n and c1 <= n:
            return self.ntk_te_tr[r0 - n:r1 - n, c0:c1]
        if r1 <= n and c0 >= n:
            return self.ntk_te_tr[c0 - n:c1 - n, r0:r1].T
        if r0 >= n and c0 >= n:
            return self.ntk_te_te[r0 - n:r1 - n, c0 - n:c1 - n]
        raise ValueError(f"block [{r0}:{r1}, {c0}:{c1}] straddles the train/test boundary {n}")


SWEEP_DIAG_REG = 1e-10  # of the mean diagonal: numerical safety only, the runs measure the unregularised limit


def kernel_solve(make: Callable[[], np.ndarray], rhs: np.ndarray, keep: bool) -> np.ndarray:
    """``(K + eps I)^-1 rhs`` by :func:`kernels.solve.solve` (the project's one solver; float64 Cholesky, LU
    when ``K`` is numerically indefinite), ``K = make()`` symmetric PSD, ``eps`` = :data:`SWEEP_DIAG_REG` of
    its mean diagonal. ``keep=False`` factorises ``make()``'s array in place (no copy; rebuilt for the LU
    fallback)."""
    args = dict(diag_reg=SWEEP_DIAG_REG, method="float64")
    if keep:
        return solve(make(), rhs, **args).alpha
    try:
        return solve(make(), rhs, overwrite=True, **args).alpha
    except IndefiniteInPlace:
        return solve(make(), rhs, **args).alpha


def analytic_blocks(config: RunConfig, subset: Subset) -> AnalyticBlocks:
    """The :class:`AnalyticBlocks` of a config's subset and architecture. Depends on the subset and the
    architecture only (and the width in standard parameterisation), so a sweep computes it once for all
    the widths' seeds. Peak memory: ``ntk_tr`` and one factor of it, ``2 n^2`` float64, plus the test blocks."""
    reset_peak_memory()
    x_tr, x_te = (np.asarray(a, dtype=np.float64) for a in (subset.x_train, subset.x_test))
    y_tr = subset.y_train.astype(np.float64)
    arch = config.kernel_args()
    ntk_tr = mlp_kernels_blocked(x_tr, get=("ntk",), block=ANALYTIC_BLOCK, **arch)["ntk"]
    ntk_te_tr = mlp_kernels_blocked(x_te, x_tr, get=("ntk",), block=ANALYTIC_BLOCK, **arch)["ntk"]
    ntk_te_te = mlp_kernels_blocked(x_te, get=("ntk",), block=ANALYTIC_BLOCK, **arch)["ntk"]
    # One eigendecomposition where the spectrum is wanted anyway; Lanczos for the top eigenvalue alone.
    spectrum = spectrum_stats(ntk_tr) if len(ntk_tr) <= MAX_EIGH else None
    lam_max = spectrum[1] if spectrum is not None else top_eigenvalue(ntk_tr)
    ntk_solver = np.ascontiguousarray(kernel_solve(lambda: ntk_tr, ntk_te_tr.T, keep=True).T)  # Theta_tr symmetric
    ntk_pred = ntk_solver @ y_tr
    alpha = kernel_solve(
        lambda: mlp_kernels_blocked(x_tr, get=("nngp",), block=ANALYTIC_BLOCK, **arch)["nngp"], y_tr, keep=False)
    nngp_te_tr = mlp_kernels_blocked(x_te, x_tr, get=("nngp",), block=ANALYTIC_BLOCK, **arch)["nngp"]
    nngp_pred = nngp_te_tr @ alpha
    return AnalyticBlocks(ntk_tr, ntk_te_tr, ntk_te_te, ntk_solver, ntk_pred, nngp_pred, lam_max, spectrum,
                          peak_memory())
