"""The init-only GP check of a job's ``gp_seeds``: many networks of one width, never trained.

For one (subset, architecture, width) and seeds ``0..S-1`` (the trained seeds' initialisations where they
overlap), :func:`gp_samples` returns one row for the ``gp_samples`` table:

* ``f0_test``: the outputs at init on every test point, ``(S, n_test, K)`` float32, flattened: what the
  covariance-error and KS measures of :mod:`pipeline.gp_init` use, now from ``S`` networks;
* ``residual_gram``: the ``(S, S)`` Gram ``<R_s, R_t>`` of the per-network residuals of
  :func:`kernels.finite_width.bias_residual` on the first ``min(n_test, GP_POINTS)`` test points, float64,
  flattened, and ``k_fro2 = |K|_F^2`` of the NNGP on those points: all that the finite-width bias
  ``|E[f f^T] - K|_F / |K|_F``, its standard error and any resampling of the seeds need.

Networks are float64 whatever the job's training dtype: the residuals are second-order small.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from kernels.finite_width import bias_residual, hidden_grams, limit_grams
from kernels.mlp import MLP
from pipeline.plan import GP_POINTS  # test points behind the bias: S residuals of GP_POINTS^2 float64 are held
from pipeline.run_config import RunConfig


def gp_samples(config: RunConfig, subset: Any, seeds: int, *, points: int = GP_POINTS) -> dict:
    """One ``gp_samples`` row for ``config``'s width (its ``seed`` is ignored): see the module docstring.

    ``subset``: the run's :class:`pipeline.data.Subset`. Keys: ``gp_id``, ``run_id`` (``config``'s, a
    trained run of the sweep, which names the group and width the row belongs to), ``width``, ``seeds``,
    ``n_test``, ``k``, ``points``, ``k_fro2``, ``residual_gram``, ``f0_test``, ``wall_s``.
    """
    start = time.perf_counter()
    x_test = torch.from_numpy(np.asarray(subset.x_test, dtype=np.float64))
    x_bias = x_test[: min(points, len(x_test))]
    arch = dict(activation=config.activation, w_std=config.w_std, b_std=config.b_std)
    limit = limit_grams(x_bias.numpy(), depth=config.depth, **arch)
    k_out = subset.y_train.shape[1]
    residuals = np.empty((seeds, len(x_bias) ** 2))
    f0 = np.empty((seeds, len(x_test), k_out), dtype=np.float32)
    for s in range(seeds):
        model = MLP(x_test.shape[1], config.width, config.depth, k_out, config.activation, config.w_std,
                    config.b_std, config.parameterization, seed=s, dtype=torch.float64)
        with torch.no_grad():
            f0[s] = model(x_test).numpy()
        grams = hidden_grams(model, x_bias)
        residuals[s] = bias_residual(grams, limit, **arch).reshape(-1).numpy()
    return {
        "gp_id": gp_id(config, seeds),
        "run_id": config.run_id,
        "width": config.width,
        "seeds": seeds,
        "n_test": len(x_test),
        "k": k_out,
        "points": len(x_bias),
        "k_fro2": float((limit.k**2).sum()),
        "residual_gram": (residuals @ residuals.T).reshape(-1).tolist(),
        "f0_test": f0.reshape(-1).tolist(),
        "wall_s": time.perf_counter() - start,
    }


def gp_id(config: RunConfig, seeds: int) -> str:
    """The key of a ``gp_samples`` row: the trained run it stands beside, and how many seeds."""
    return f"{config.run_id}-gp{seeds}"
