"""Eigenvalues of kernels: the top eigenvalue (Lanczos, or power iteration on NTK-vector products), the
spectrum's extremes and condition number, and the residual energy per eigen-band of the analytic NTK
during training (spectral bias)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.func import functional_call, jvp

from kernels.empirical import empirical_ntk
from kernels.mlp import MLP
from pipeline.measures import MAX_EIGH
from pipeline.results import SPECTRAL_COLUMNS

Tensor = torch.Tensor

# Eigen-bands of the analytic NTK on the training set (indices in decreasing eigenvalue order) over
# which the spectral-bias table sums residual energy; the last band runs to n.
SPECTRAL_BANDS = ((0, 1), (1, 4), (4, 16), (16, 64), (64, None))


def top_eigenvalue(matrix: np.ndarray) -> float:
    """Largest eigenvalue of a symmetric PSD matrix by Lanczos (a dense eigvalsh costs m^3)."""
    from scipy.sparse.linalg import eigsh

    if len(matrix) <= 64:
        return float(np.linalg.eigvalsh(matrix)[-1])
    return float(eigsh(matrix, k=1, which="LA", tol=1e-10, return_eigenvectors=False)[0])


def spectrum_stats(kernel: np.ndarray) -> tuple[float, float, float]:
    """(lambda_min, lambda_max, condition number) of a symmetric PSD matrix."""
    lam = np.linalg.eigvalsh(kernel)
    lo, hi = float(lam[0]), float(lam[-1])
    return lo, hi, hi / lo if lo > 0 else math.inf


def top_ntk_eigenvalue(model: MLP, x: Tensor, iterations: int = 60, seed: int = 0) -> float:
    """Largest eigenvalue of the full ``(nK, nK)`` empirical NTK ``J J^T`` on ``x``, by power iteration
    on NTK-vector products ``J (J^T v)`` (``torch.func`` vjp then jvp; no Jacobian is formed).
    Power iteration approaches from below; 60 iterations leave well under 1% on NTK spectra,
    whose top eigenvalue is well separated."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict) -> Tensor:
        return functional_call(model, p, (x,))

    out, pullback = torch.func.vjp(f, params)
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    lam = 0.0
    for _ in range(iterations):
        v = v / torch.linalg.norm(v)
        (cotangent,) = pullback(v)
        w = jvp(f, (params,), (cotangent,))[1]
        lam = float((v * w).sum())
        v = w
    return lam


def train_spectrum(model: MLP, x_tr: Tensor) -> tuple[float, float, float] | None:
    """Spectrum of the traced empirical NTK on the training points (``n <= MAX_EIGH``)."""
    if len(x_tr) > MAX_EIGH:
        return None
    return spectrum_stats(empirical_ntk(model, x_tr).double().cpu().numpy())


class SpectralTracker:
    """Residual energy per eigen-band of the analytic training-set NTK, at each logged step.

    ``theta_tr: (n, n)``; ``r0: (S, n, K)`` initial residuals ``f0 - y`` of the S seeds; ``lrs``:
    their learning rates. ``record`` takes the current train predictions ``(S, n, K)`` of the
    network and of the linearised model.
    """

    def __init__(self, theta_tr: np.ndarray, y_tr: np.ndarray, r0: np.ndarray, lrs: list[float]) -> None:
        lam, vec = np.linalg.eigh(theta_tr)
        self.lam, self.vec = lam[::-1].clip(min=0.0), vec[:, ::-1]  # decreasing eigenvalues
        n = len(lam)
        self.bands = [(lo, n if hi is None else min(hi, n)) for lo, hi in SPECTRAL_BANDS if lo < n]
        self.y = y_tr
        self.c0_sq = (np.einsum("ni,snk->sik", self.vec, r0) ** 2).sum(-1)  # (S, n)
        self.rates = np.asarray(lrs)[:, None] / n
        self.rows: list[dict[str, list]] = [{k: [] for k in SPECTRAL_COLUMNS} for _ in lrs]

    def energies(self, pred: np.ndarray) -> np.ndarray:
        """``(S, n)`` energy of the residual ``pred - y`` along each eigenvector."""
        return (np.einsum("ni,snk->sik", self.vec, pred - self.y) ** 2).sum(-1)

    def record(self, step: int, nn_tr: np.ndarray, lin_tr: np.ndarray) -> None:
        e_nn, e_lin = self.energies(nn_tr), self.energies(lin_tr)
        with np.errstate(over="ignore", invalid="ignore"):
            e_th = (1 - self.rates * self.lam[None, :]) ** (2 * step) * self.c0_sq
        for s, table in enumerate(self.rows):
            for b, (lo, hi) in enumerate(self.bands):
                row = dict(step=step, band=b, band_lo=lo, band_hi=hi, energy_nn=float(e_nn[s, lo:hi].sum()),
                           energy_lin=float(e_lin[s, lo:hi].sum()), energy_theory=float(e_th[s, lo:hi].sum()))
                for k, v in row.items():
                    table[k].append(v)

    def predicted_loss_ratio(self, s: int, steps: int) -> float:
        """``L_T / L_0`` of GD under the analytic kernel from seed ``s``'s initial residual."""
        decay = (1 - self.rates[s] * self.lam) ** (2 * steps)
        return float((decay * self.c0_sq[s]).sum() / self.c0_sq[s].sum())
