"""How far a network's empirical NTK is from the analytic NTK at init, and how far it moves in training:
Frobenius norms over all ``N x N`` entries, formed one row panel at a time."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from kernels.empirical import empirical_ntk
from kernels.mlp import MLP
from pipeline.measures import norm_panels

if TYPE_CHECKING:
    from pipeline.limits import AnalyticBlocks


def kernel_norms(model0: MLP, model_t: MLP | None, x_all: Tensor, an: AnalyticBlocks,
                  keep: bool = False) -> dict[str, Any]:
    """Frobenius norms over all ``N x N`` entries of the empirical NTKs of ``model0`` (and ``model_t``),
    formed one row panel ``(rows, N)`` at a time in the models' dtype and reduced in float64: ``dev`` =
    ``||ntk0 - Theta||``, ``theta`` = ``||Theta||``, ``init`` = ``||ntk0||`` and ``change`` =
    ``||ntk_t - ntk0||``; the same four over the ``n x n`` training block alone with a ``_train`` suffix
    (what gradient descent sees). No ``(N, N)`` array is formed unless ``keep`` (then ``ntk0``, ``ntk_t``:
    float32 numpy). ``x_all``: ``(N, d)`` train ++ test inputs."""
    total, n = len(x_all), an.n
    sq = {f"{k}{part}": 0.0 for k in ("dev", "theta", "init", "change") for part in ("", "_train")}
    kept: dict[str, Any] = {}
    if keep:
        kept = {"ntk0": np.empty((total, total), np.float32)}
        if model_t is not None:
            kept["ntk_t"] = np.empty((total, total), np.float32)
    for r0, r1 in norm_panels(n, total, model0.config["width"]):
        e0 = empirical_ntk(model0, x_all[r0:r1], x_all).double().cpu().numpy()
        theta = np.concatenate([an.ntk_block(r0, r1, c0, c1) for c0, c1 in ((0, n), (n, total))], axis=1)
        train_rows = r1 <= n
        for part, cols in (("", slice(None)), ("_train", slice(0, n))):
            if part and not train_rows:
                continue
            sq["dev" + part] += float(np.square(e0[:, cols] - theta[:, cols]).sum())
            sq["theta" + part] += float(np.square(theta[:, cols]).sum())
            sq["init" + part] += float(np.square(e0[:, cols]).sum())
        del theta
        if keep:
            kept["ntk0"][r0:r1] = e0
        if model_t is not None:
            et = empirical_ntk(model_t, x_all[r0:r1], x_all).double().cpu().numpy()
            sq["change"] += float(np.square(et - e0).sum())
            if train_rows:
                sq["change_train"] += float(np.square(et[:, :n] - e0[:, :n]).sum())
            if keep:
                kept["ntk_t"][r0:r1] = et
    out: dict[str, Any] = {k: math.sqrt(v) for k, v in sq.items()}
    if keep:  # the panels are computed row by row: symmetrise as the whole-matrix kernel is
        out.update({k: 0.5 * (v + v.T) for k, v in kept.items()})
    return out
