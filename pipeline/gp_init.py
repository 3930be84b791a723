"""Gaussian process at initialisation: across the seeds of one width, the outputs ``f(x; theta0)`` on
the test points are samples of a centred GP with covariance ``K_NNGP`` (Neal 1996; Lee et al. 2018).

For each group of runs that differ only in seed, with ``S`` seeds and ``K`` outputs (``M = S K``
independent samples of the GP in the infinite-width limit):

* ``nngp_cov_rel_err = |C - K|_F / |K|_F`` with ``C = (1/M) sum f f^T`` (the mean is known to be 0);
* ``nngp_cov_rel_err_floor = sqrt((|K|_F^2 + tr(K)^2) / M) / |K|_F``: the error a true GP would give
  from M samples (Wishart: ``E|C - K|_F^2 = (|K|_F^2 + tr(K)^2)/M``). An error near the floor means
  the seeds cannot resolve the finite-width bias; well above it, the bias (O(1/width)) dominates;
* ``ks_stat``: Kolmogorov-Smirnov distance of the standardised marginals ``f(x)/sqrt(K(x, x))``,
  pooled over points, seeds and outputs, from ``N(0, 1)``, with its p-value (pooled values from one
  network are correlated, so read the p-value as descriptive).

Written to ``RESULTS/aggregates/gp_init.parquet``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.run_config import RunConfig
from pipeline.store import OUTPUTS, RUNS, ResultsStore, write_parquet_atomic

GROUP_EXCLUDE = {"seed", "run_id", "sweep", "data_dir", "device"}


def covariance_error(f0: np.ndarray, nngp: np.ndarray) -> tuple[float, float]:
    """``f0: (S, n, K)`` outputs at init; ``nngp: (n, n)``. Returns (relative error, sampling floor)."""
    s, n, k = f0.shape
    samples = f0.transpose(0, 2, 1).reshape(s * k, n).astype(np.float64)
    cov = samples.T @ samples / (s * k)
    norm = np.linalg.norm(nngp)
    floor = math.sqrt((norm**2 + np.trace(nngp) ** 2) / (s * k)) / norm
    return float(np.linalg.norm(cov - nngp) / norm), floor


def normality(f0: np.ndarray, nngp_diag: np.ndarray) -> tuple[float, float]:
    """KS statistic and p-value of ``f0 / sqrt(K(x, x))`` against N(0, 1)."""
    from scipy.stats import kstest

    z = f0 / np.sqrt(nngp_diag)[None, :, None]
    result = kstest(z.reshape(-1), "norm")
    return float(result.statistic), float(result.pvalue)


def gp_init_table(results: str | Path, data_dir: str | None = None) -> pa.Table:
    """One row per (config without seed) group with at least 2 seeds: the measures above."""
    from pipeline.train import analytic_kernels, load_subset

    store = ResultsStore(results)
    runs, outputs = store.table(RUNS), store.table(OUTPUTS)
    if not runs.num_rows or not outputs.num_rows:
        return pa.table({})
    f0_by_id = {rid: (np.asarray(f, dtype=np.float32), n, k) for rid, f, n, k in zip(
        *(outputs.column(c).to_pylist() for c in ("run_id", "f0_test", "n_test", "k")), strict=True)}
    groups: dict[tuple, list[dict]] = {}
    for row in runs.to_pylist():
        if row["run_id"] in f0_by_id:
            key = tuple((c, str(v)) for c, v in sorted(row.items()) if c in RunConfig.model_fields
                        and c not in GROUP_EXCLUDE)
            groups.setdefault(key, []).append(row)
    analytic_cache: dict[str, np.ndarray] = {}
    rows = []
    for members in groups.values():
        if len(members) < 2:
            continue
        config = RunConfig.from_row(members[0])
        if data_dir is not None:
            config = config.model_copy(update={"data_dir": data_dir})
        subset = load_subset(config)
        cache_key = repr((subset.key, config.depth, config.activation, config.w_std, config.b_std,
                          config.parameterization, config.width if config.parameterization == "standard" else 0))
        if cache_key not in analytic_cache:
            analytic_cache[cache_key] = analytic_kernels(config, subset)["nngp"][subset.n_train:, subset.n_train:]
        nngp = analytic_cache[cache_key]
        f0 = np.stack([f0_by_id[m["run_id"]][0].reshape(f0_by_id[m["run_id"]][1], -1) for m in members])
        err, floor = covariance_error(f0, nngp)
        ks, p_value = normality(f0, np.diag(nngp))
        rows.append({
            "dataset": config.dataset, "n_train": config.n_train, "n_test": config.n_test, "depth": config.depth,
            "activation": config.activation, "parameterization": config.parameterization, "w_std": config.w_std,
            "b_std": config.b_std, "width": config.width, "seeds": len(members), "outputs": f0.shape[2],
            "nngp_cov_rel_err": err, "nngp_cov_rel_err_floor": floor, "ks_stat": ks, "ks_pvalue": p_value,
        })
    rows.sort(key=lambda r: (r["dataset"], r["n_train"], r["depth"], r["activation"], r["width"]))
    return pa.Table.from_pylist(rows) if rows else pa.table({})


def write_gp_init(results: str | Path, data_dir: str | None = None) -> Path | None:
    table = gp_init_table(results, data_dir)
    if not table.num_rows:
        return None
    path = Path(results) / "aggregates" / "gp_init.parquet"
    write_parquet_atomic(table, path)
    return path
