"""Gradient descent on a linear model in closed form, and a run's learning rate from the stability edge of
its linearised dynamics."""

from __future__ import annotations

import numpy as np
import torch

from kernels.empirical import empirical_ntk
from kernels.mlp import MLP
from pipeline.data import Subset
from pipeline.measures import MAX_FULL_NTK
from pipeline.measures.spectra import top_eigenvalue, top_ntk_eigenvalue
from pipeline.run_config import RunConfig

Tensor = torch.Tensor


def gd_closed_form(theta_tr: np.ndarray, theta_te_tr: np.ndarray, r0: np.ndarray, rate: float,
                   steps: int) -> np.ndarray:
    """Change of the test predictions after ``steps`` of GD on a linear model with kernel ``theta``.

    ``-Theta_te,tr Theta^-1 (I - (I - rate Theta)^t) r0``, with ``rate = lr / n``.
    ``theta_tr: (m, m)``, ``theta_te_tr: (m', m)``, ``r0: (m,)`` or ``(m, K)``: the initial training
    residual ``f0 - y``. For ``t < m`` it iterates the exact map ``r <- r - rate Theta r`` in function
    space (``t m^2`` flops); otherwise it uses the eigenbasis (``m^3``), with
    ``(1 - (1 - rate lam)^t) / lam`` taken stably for small ``lam`` (limit ``rate t``).
    """
    if steps < len(theta_tr):
        r, total = np.array(r0, dtype=np.float64), np.zeros_like(r0, dtype=np.float64)
        for _ in range(steps):
            total += r
            r -= rate * (theta_tr @ r)
        return -rate * (theta_te_tr @ total)
    lam, vec = np.linalg.eigh(theta_tr)
    lam = np.clip(lam, 0.0, None)
    a = rate * lam
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        small = a < 0.5  # there 1 - (1 - a)^t loses digits to cancellation: use expm1/log1p
        decayed = np.where(small, -np.expm1(steps * np.log1p(-np.where(small, a, 0.0))), 1 - (1 - a) ** steps)
        gain = np.where(lam > 0, decayed / np.where(lam > 0, lam, 1.0), rate * steps)
    return -theta_te_tr @ (vec @ (gain.reshape(-1, *([1] * (r0.ndim - 1))) * (vec.T @ r0)))


def rate_and_closed_form(model: MLP, x_all: Tensor, f0_tr: Tensor, f0_te: Tensor, subset: Subset,
                          lam_analytic: float, cfg: RunConfig) -> tuple[float, float, np.ndarray | None]:
    """``(lr_critical, lr, lin_closed)`` of one seed at init.

    The top eigenvalue of the full ``(nK, nK)`` training-set empirical NTK: exact from the ``(N, n, K, K)``
    blocks against the training points when ``n K <= MAX_FULL_NTK``, else by power iteration. With the
    blocks (and full-batch GD) also ``lin_closed (m, K)``: the linearised model's test predictions after
    ``cfg.steps`` from the network's own NTK, a consistency check on the trained linear model (None
    otherwise). The blocks are dropped before the next seed: they grow as ``N n K^2``.
    """
    n, k_out = subset.y_train.shape
    nk = n * k_out
    full = nk <= MAX_FULL_NTK
    if full:
        blocks = empirical_ntk(model, x_all, x_all[:n], trace=False).double().cpu().numpy()
        big = blocks.transpose(0, 2, 1, 3).reshape(len(x_all) * k_out, nk)  # a copy: blocks can go
        del blocks
        lam_max = top_eigenvalue(big[:nk])
    else:
        lam_max = top_ntk_eigenvalue(model, x_all[:n])
    lr_crit = 2.0 * n / max(lam_analytic, lam_max)
    lr = cfg.lr if cfg.lr is not None else cfg.effective_lr_scale * lr_crit
    closed = None
    if full and cfg.optimizer == "gd":
        r0 = (f0_tr.double().cpu().numpy() - subset.y_train.astype(np.float64)).reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):  # a rate far above critical: the run diverges
            change = gd_closed_form(big[:nk], big[nk:], r0, lr / n, cfg.steps)
        closed = f0_te.double().cpu().numpy() + change.reshape(-1, k_out)
    return lr_crit, lr, closed
