"""Gaussian process at initialisation: across the seeds of one width, the outputs ``f(x; theta0)`` on
the test points are samples of a centred GP with covariance ``K_NNGP`` (Neal 1996; Lee et al. 2018).

For each group of runs (a group of :mod:`pipeline.aggregate`: one setting of every config field but
seed and width) and width, with ``S`` distinct seeds that stored their outputs at init (the
``outputs`` table) and ``K`` outputs (``M = S K`` independent samples of the GP in the limit):

* ``nngp_cov_rel_err = |C - K|_F / |K|_F`` with ``C = (1/M) sum f f^T`` (the mean is known to be 0);
* ``nngp_cov_rel_err_floor = sqrt((|K|_F^2 + tr(K)^2) / M) / |K|_F``: the error a true GP would give
  from M samples (Wishart: ``E|C - K|_F^2 = (|K|_F^2 + tr(K)^2)/M``). An error near the floor means
  the seeds cannot resolve finite-width effects; well above it they show: non-Gaussian outputs (excess
  kurtosis ~1/width widens the spread of ``C`` past the Gaussian floor) and, from two hidden layers on,
  an O(1/width) bias of ``E[f f^T]`` (at one hidden layer it equals the NNGP at every width);
* ``ks_stat``: Kolmogorov-Smirnov distance of the standardised marginals ``f(x)/sqrt(K(x, x))``,
  pooled over points, seeds and outputs, from ``N(0, 1)``, with its p-value (pooled values from one
  network are correlated, so read the p-value as descriptive); ``ks_stat_floor``: the median KS
  distance of the same statistic computed on ``M`` exact draws of the GP ``N(0, K)`` (simulated,
  seeded): what a true GP gives with this many seeds and these correlations;
* ``seeds_by_count`` / ``nngp_cov_rel_err_by_seeds`` / ``nngp_cov_rel_err_floor_by_seeds``: the same
  error from the first 2, 4, 8, ... seeds (in seed order) and from all ``S``: how it shrinks with the
  seed count (toward the floor, ``~ S^-1/2``, until finite-width effects are reached).

With a job's ``gp_seeds: S`` (init-only networks, :mod:`pipeline.gp_sample`, table ``gp_samples``), the
measures above use those ``S`` networks instead of the trained seeds (``source = "gp_seeds"``), and the
finite-width *bias* of the covariance is measured too, on the first ``points`` test points, with the
estimator of :mod:`kernels.finite_width` (second-order noise only, so a few hundred networks resolve it):

* ``nngp_bias_rel = |E[f f^T] - K|_F / |K|_F`` (square root of the unbiased U-statistic; 0 when that is
  negative), ``nngp_bias_rel_lo`` / ``_hi`` its 95% interval (the U-statistic +- 1.96 jackknife standard
  errors over seeds, square-rooted, clipped at 0), ``nngp_bias_rel_floor`` what the estimate would show
  from noise alone (its rms for a zero bias), ``nngp_bias_resolved`` whether the interval excludes 0;
* ``nngp_bias_exponent`` (``_lo`` / ``_hi``): the least-squares slope of ``log nngp_bias_rel`` on
  ``log width`` over the group's resolved widths (theory: -1), with a 95% percentile interval from
  resampling the seeds as units (one resample of seed indices applied at every width: a seed's networks at
  different widths share their first rows), repeated on every width's row of the group.

The analytic NNGP on the test points (it depends on the inputs and the architecture only, not on the
width) is read from the results, where the task that computed the runs' limits stored it once per subset
(:func:`pipeline.store.nngp_test_path`); nothing here loads a dataset or imports torch. Groups without that
array (results written by an older version) are skipped and named in the table's schema metadata
(``ntk_sweep.gp_init_skipped``). Written by :func:`pipeline.aggregate.ensure_aggregates`
to ``RESULTS/aggregates/gp_init.parquet`` (a view ``gp_init`` in ``ntk-sweep query``), with zero rows
and the same columns when no width has two seeds with stored outputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from kernels.bias_statistics import bias_statistics
from pipeline.errors import UserError
from pipeline.groups import split_runs, with_groups
from pipeline.run_config import RunConfig
from pipeline.store import GP_SAMPLES, OUTPUTS, RUNS, ResultsStore, nngp_test_path

KS_FLOOR_DRAWS = 32  # simulated GP draws behind ks_stat_floor
BOOTSTRAP_DRAWS = 2000  # seed resamples behind nngp_bias_exponent's interval
SKIPPED_KEY = b"ntk_sweep.gp_init_skipped"
MEASURE_FIELDS = {
    "width": pa.int64(), "seeds": pa.int64(), "outputs": pa.int64(),
    "nngp_cov_rel_err": pa.float64(), "nngp_cov_rel_err_floor": pa.float64(),
    "ks_stat": pa.float64(), "ks_pvalue": pa.float64(), "ks_stat_floor": pa.float64(),
    "seeds_by_count": pa.list_(pa.int64()), "nngp_cov_rel_err_by_seeds": pa.list_(pa.float64()),
    "nngp_cov_rel_err_floor_by_seeds": pa.list_(pa.float64()),
    "source": pa.string(),
    "nngp_bias_rel": pa.float64(), "nngp_bias_rel_lo": pa.float64(), "nngp_bias_rel_hi": pa.float64(),
    "nngp_bias_rel_floor": pa.float64(), "nngp_bias_resolved": pa.bool_(), "bias_points": pa.int64(),
    "nngp_bias_exponent": pa.float64(), "nngp_bias_exponent_lo": pa.float64(),
    "nngp_bias_exponent_hi": pa.float64(),
}
NO_BIAS = {"nngp_bias_rel": math.nan, "nngp_bias_rel_lo": math.nan, "nngp_bias_rel_hi": math.nan,
           "nngp_bias_rel_floor": math.nan, "nngp_bias_resolved": None, "bias_points": None,
           "nngp_bias_exponent": math.nan, "nngp_bias_exponent_lo": math.nan, "nngp_bias_exponent_hi": math.nan}


def bias_measures(gram: np.ndarray, k_fro2: float) -> dict:
    """The per-width bias columns (module docstring) from the ``(S, S)`` residual Gram and ``|K|_F^2``."""
    st = bias_statistics(gram)
    half = 1.96 * st.u_se
    rel = lambda v: math.sqrt(max(v, 0.0) / k_fro2)  # noqa: E731
    return {"nngp_bias_rel": rel(st.u), "nngp_bias_rel_lo": rel(st.u - half), "nngp_bias_rel_hi": rel(st.u + half),
            "nngp_bias_rel_floor": math.sqrt(st.noise2 / k_fro2), "nngp_bias_resolved": bool(st.u - half > 0)}


def bias_exponent(grams: dict[int, tuple[np.ndarray, float]], *, draws: int = BOOTSTRAP_DRAWS,
                  seed: int = 0) -> tuple[float, float, float]:
    """Slope of ``log nngp_bias_rel`` on ``log width`` and its 95% seed-resampling interval.

    ``grams``: width -> (``(S, S)`` residual Gram, ``|K|_F^2``) over the same ``S`` seeds, resolved widths
    only. NaNs with fewer than two widths; resamples in which a width's estimate is not positive are left
    out of the interval (there are none when every width is well resolved).
    """
    widths = sorted(grams)
    if len(widths) < 2:
        return math.nan, math.nan, math.nan
    logw = np.log(widths)

    def slope(weights: np.ndarray | None) -> float:
        u = np.array([bias_statistics(grams[w][0], weights).u / grams[w][1] for w in widths])
        return float(np.polyfit(logw, 0.5 * np.log(u), 1)[0]) if np.all(u > 0) else math.nan

    rng = np.random.default_rng(seed)
    s = len(grams[widths[0]][0])
    boots = np.array([slope(np.bincount(rng.integers(0, s, s), minlength=s)) for _ in range(draws)])
    boots = boots[np.isfinite(boots)]
    lo, hi = np.percentile(boots, [2.5, 97.5]) if len(boots) else (math.nan, math.nan)
    return slope(None), float(lo), float(hi)


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


def gp_sqrt(nngp: np.ndarray) -> np.ndarray:
    """``L`` with ``L L^T = K`` (symmetric square root, negative rounding eigenvalues clipped)."""
    lam, vec = np.linalg.eigh(nngp)
    return vec * np.sqrt(np.clip(lam, 0.0, None))[None, :]


def ks_floor(root: np.ndarray, nngp_diag: np.ndarray, seeds: int, outputs: int, *, draws: int = KS_FLOOR_DRAWS,
             seed: int = 0) -> float:
    """Median KS statistic of :func:`normality` over ``draws`` simulated sets of ``seeds x outputs``
    exact GP samples (``root``: :func:`gp_sqrt` of the NNGP)."""
    rng = np.random.default_rng(seed)
    n = len(root)
    stats = []
    for _ in range(draws):
        f0 = (root @ rng.normal(size=(n, seeds * outputs))).reshape(n, seeds, outputs).transpose(1, 0, 2)
        stats.append(normality(f0, nngp_diag)[0])
    return float(np.median(stats))


def seed_counts(total: int) -> list[int]:
    """2, 4, 8, ... below ``total``, then ``total``."""
    counts, c = [], 2
    while c < total:
        counts.append(c)
        c *= 2
    return counts + [total]


def empty_table(group_fields: list[pa.Field] | None = None) -> pa.Table:
    fields = [pa.field("group_id", pa.string()), *(group_fields or [])]
    fields += [pa.field(k, t) for k, t in MEASURE_FIELDS.items() if k not in {f.name for f in fields}]
    return pa.schema(fields).empty_table()


def gp_init_table(results: str | Path, runs_table: pa.Table | None = None) -> pa.Table:
    """One row per (group, width) with at least 2 seeds that stored outputs: the measures above, after
    ``group_id`` and the group columns (as in ``by_width``). ``runs_table``: the runs table if the
    caller has read it already."""
    store = ResultsStore(results)
    runs_table = runs_table if runs_table is not None else store.table(RUNS)
    outputs = store.table(OUTPUTS)
    if runs_table is None or not runs_table.num_rows or "run_id" not in runs_table.column_names:
        return empty_table()
    runs = split_runs(runs_table)
    group_fields = list(runs.groups.schema)
    gp_by_run = _gp_rows_by_run(store)
    if not outputs.num_rows and not gp_by_run:
        return empty_table(group_fields)
    f0_by_id = {rid: (f, n, k) for rid, f, n, k in zip(
        *(outputs.column(c).to_pylist() for c in ("run_id", "f0_test", "n_test", "k")), strict=True)} \
        if outputs.num_rows else {}
    rows_all = runs_table.to_pylist()
    members: dict[tuple[int, int], dict[int, int]] = {}  # (group, width) -> seed -> row index, with outputs
    gp_rows: dict[tuple[int, int], dict] = {}  # (group, width) -> its gp_samples row
    for i, row in enumerate(rows_all):
        key = (int(runs.gid[i]), int(runs.width[i]))
        if row["run_id"] in gp_by_run:
            gp_rows.setdefault(key, gp_by_run[row["run_id"]])
        if row["run_id"] in f0_by_id and f0_by_id[row["run_id"]][0] is not None:
            members.setdefault(key, {}).setdefault(int(runs.seed[i]), i)
    analytic_cache: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    floors: dict[tuple, float] = {}  # the same simulated draws for every width of a group
    out_rows, gids, skipped = [], [], {}
    bias_grams: dict[int, dict[int, tuple[np.ndarray, float]]] = {}  # group -> resolved width -> gram, |K|^2
    for (g, width) in sorted(set(members) | set(gp_rows)):
        by_seed, gp_row = members.get((g, width), {}), gp_rows.get((g, width))
        if gp_row is None and len(by_seed) < 2:
            continue
        first = sorted(by_seed.values())[0] if by_seed else next(
            i for i, r in enumerate(rows_all) if r["run_id"] == gp_row["run_id"])
        config = RunConfig.from_row(rows_all[first])
        cache_key = nngp_test_path(config)
        if cache_key not in analytic_cache:
            try:
                nngp = store.read_array(cache_key).astype(np.float64)
            except UserError:
                skipped[runs.group_ids[g]] = (f"no analytic NNGP of its test points stored at grams.zarr/{cache_key} "
                                              "(results written before it was stored there)")
                continue
            analytic_cache[cache_key] = (nngp, gp_sqrt(nngp))
        nngp, root = analytic_cache[cache_key]
        if gp_row is not None:
            f0 = np.asarray(gp_row["f0_test"], dtype=np.float64).reshape(gp_row["seeds"], gp_row["n_test"], -1)
        else:
            idx = [by_seed[s] for s in sorted(by_seed)]
            f0 = np.stack([np.asarray(f0_by_id[rows_all[i]["run_id"]][0], dtype=np.float64)
                           .reshape(f0_by_id[rows_all[i]["run_id"]][1], -1) for i in idx])
        if f0.shape[1] != len(nngp):
            skipped[runs.group_ids[g]] = f"outputs on {f0.shape[1]} test points, the subset has {len(nngp)}"
            continue
        s, _, k = f0.shape
        err, floor = covariance_error(f0, nngp)
        ks, p_value = normality(f0, np.diag(nngp))
        counts = seed_counts(s)
        by_seeds = [covariance_error(f0[:c], nngp) for c in counts]
        if (cache_key, s, k) not in floors:
            floors[cache_key, s, k] = ks_floor(root, np.diag(nngp), s, k)
        bias = dict(NO_BIAS)
        if gp_row is not None:
            gram = np.asarray(gp_row["residual_gram"], dtype=np.float64).reshape(s, s)
            bias.update(bias_measures(gram, gp_row["k_fro2"]), bias_points=gp_row["points"])
            if bias["nngp_bias_resolved"]:
                bias_grams.setdefault(g, {})[width] = (gram, gp_row["k_fro2"])
        out_rows.append({
            "width": width, "seeds": s, "outputs": k,
            "nngp_cov_rel_err": err, "nngp_cov_rel_err_floor": floor, "ks_stat": ks, "ks_pvalue": p_value,
            "ks_stat_floor": floors[cache_key, s, k],
            "seeds_by_count": counts, "nngp_cov_rel_err_by_seeds": [e for e, _ in by_seeds],
            "nngp_cov_rel_err_floor_by_seeds": [f for _, f in by_seeds],
            "source": "gp_seeds" if gp_row is not None else "trained seeds", **bias,
        })
        gids.append(g)
    for g, grams in bias_grams.items():
        slope, lo, hi = bias_exponent(grams)
        for row, gid in zip(out_rows, gids, strict=True):
            if gid == g and row["source"] == "gp_seeds":
                row.update(nngp_bias_exponent=slope, nngp_bias_exponent_lo=lo, nngp_bias_exponent_hi=hi)
    table = empty_table(group_fields)
    if out_rows:
        cols = {k: pa.array([r[k] for r in out_rows], t) for k, t in MEASURE_FIELDS.items()}
        table = with_groups(runs, np.array(gids, dtype=np.int64), cols)
    if skipped:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               SKIPPED_KEY: json.dumps(skipped).encode()})
    return table


def _gp_rows_by_run(store: ResultsStore) -> dict[str, dict]:
    """``gp_samples`` rows by the trained run they stand beside; the most seeds win."""
    table = store.table(GP_SAMPLES)
    best: dict[str, dict] = {}
    for row in table.to_pylist() if table.num_rows else []:
        if row["run_id"] not in best or row["seeds"] > best[row["run_id"]]["seeds"]:
            best[row["run_id"]] = row
    return best


def skipped_groups(table: pa.Table) -> dict[str, str]:
    """group_id -> why it has no gp_init rows (its data could not be loaded), from the metadata."""
    raw = (table.schema.metadata or {}).get(SKIPPED_KEY)
    return json.loads(raw) if raw else {}
