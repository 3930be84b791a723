"""Aggregates of a results directory: statistics over seeds per width, and width-scaling fits.

    RESULTS/aggregates/by_width.parquet   one row per (group, width, measure): mean, std, count, 95% CI
    RESULTS/aggregates/scaling.parquet    one row per (group, measure): log(measure) ~ exponent * log(width)
    RESULTS/aggregates/gp_init.parquet    one row per (group, width): outputs at init vs the NNGP (see pipeline.gp_init)

A *group* is one setting of every config column of :class:`~pipeline.run_config.RunConfig` but
``seed`` and ``width`` (and ``sweep``, ``data_dir``, ``device``, which do not change a result; and
``lr``, which in a run row is the rate actually used, a measurement). So runs that differ in
dataset, ``n_train``, depth, activation, parameterisation, ``w_std``, optimiser, ``lr_scale``,
steps, label noise, ... are never pooled. Every group column is repeated in both tables, after
``group_id``: a short stable hash of the group's settings.

*Measures* are every numeric column of the runs table that is not a config column: the
measurements of :mod:`pipeline.results` and any numeric column added later. List columns named
``<name>_by_layer`` are split into ``<name>_layer0``, ``<name>_layer1``, ... (input layer first),
and ``disagree_nn_lin_test = 1 - agree_nn_lin_test`` is derived. Statistics use the ``status ==
"ok"`` runs only; ``n_runs``, ``n_ok``, ``n_diverged`` and ``n_failed`` count every run of the
(group, width). The 95% CI is Student's t: ``mean +- t(0.975, count-1) * std / sqrt(count)``.

Scaling fits: ordinary least squares of ``log(value)`` on ``log(width)`` over the individual ok runs
of a group. ``exponent`` is the slope, ``prefactor`` the value at width 1 (``value ~ prefactor *
width**exponent``), ``r2`` the coefficient of determination over those runs, ``exponent_se`` the
textbook OLS standard error (runs taken as independent, which they are not). ``ci_low/ci_high``: a
95% CI with the *seeds* as the units (``ci_method = "seed_cluster_t"``): a seed's networks at
different widths share their initialisation and each seed has its own slope, so the CI is the slope
+- t(0.975, n_seeds - 1) times its seed-clustered (CR2) standard error; with one run per seed and
width that is the t interval over the per-seed slopes. ``n_seeds`` and ``ci_dof`` say what it rests
on (one seed: no CI; two: one degree of freedom, wide). Non-positive values cannot be logged: they are
dropped and counted in ``n_dropped``; dropping the smallest values of a width that keeps others
biases the exponent, and ``dropped_bias`` (``up``, ``down``, ``none``) and ``note`` say which way.
No slope is ever imposed.

The three tables carry a fingerprint of the runs parts (names, sizes, mtimes) in their Parquet schema
metadata; :func:`ensure_aggregates` recomputes them only when that changed (a pack's ``outputs``
part is committed before its ``runs`` part, so the runs fingerprint covers ``gp_init`` too).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.gp_init import gp_init_table
from pipeline.groups import Runs, split_runs, with_groups
from pipeline.run_config import RunConfig
from pipeline.store import GP_SAMPLES, RUNS, ResultsStore, is_not_writable, write_parquet_atomic

AGGREGATES = "aggregates"
BY_WIDTH, SCALING, GP_INIT = "by_width", "scaling", "gp_init"
TABLES = (BY_WIDTH, SCALING, GP_INIT)
VERSION = "4"  # bump when the aggregate tables change shape: stored aggregates are then recomputed
FINGERPRINT_KEY = b"ntk_sweep.fingerprint"

# The deviations from the kernel limit that shrink with width, fitted against it (plus every
# ``weight_rel_change_layer<i>``). Order is the order of the report's panels. ``weight_distance``
# (the absolute |theta_T - theta_0|) is fitted too: lazy training in NTK parameterisation keeps it
# O(1) while the parameter count grows, so its exponent is ~0 where the relative change vanishes.
DEVIATION_MEASURES = (
    "kernel_rel_dev_init", "kernel_rel_change", "weight_rel_change", "weight_distance", "rmse_nn_lin_test",
    "disagree_nn_lin_test", "rmse_nn_ntk_test", "relu_flip_frac",
)
# What Lee et al. (2019) report for NTK parameterisation and a small learning rate.
EXPECTED_EXPONENT = {
    "kernel_rel_dev_init": "-1/2",
    "kernel_rel_change": "between -1/2 and -1",
    "rmse_nn_lin_test": "between -1/2 and -1",
    "weight_distance": "0, bounded",
}
# μP (Yang & Hu 2021): its kernel at init is the NTK one (kernels.mlp), so it converges as n^-1/2; in training
# the kernel, the features and the input and output weights move by O(1) at every width. The hidden n x n
# weights move by O(1) in operator norm, i.e. n^-1/2 of their Frobenius norm (sqrt(n)), which also carries
# the total parameter norm.
EXPECTED_EXPONENT_MUP = {
    "kernel_rel_dev_init": "-1/2",
    "kernel_rel_change": "0",
    "weight_rel_change": "-1/2",
    "weight_distance": "0, bounded",
    "rmse_nn_lin_test": "0",
    "disagree_nn_lin_test": "0",
    "relu_flip_frac": "0",
}
STATUSES = ("ok", "diverged", "failed")
BOOTSTRAP = 2000
# How scaling.parquet's exponent CIs are computed (see fit_power_law); the former within-width bootstrap
# is kept for comparison.
CI_METHOD = "seed_cluster_t"
CI_METHODS = (CI_METHOD, "bootstrap_within_width")


# ----------------------------------------------------------------------------------------------
# Reading


def fingerprint(results: str | Path) -> str:
    """Hash of the runs and ``gp_samples`` parts' names, sizes and mtimes, this module's table version and
    the config fields (which make the group columns)."""
    root = Path(results)
    h = hashlib.sha256(f"{VERSION}|{','.join(RunConfig.model_fields)}\n".encode())
    store = ResultsStore(root)
    for part in [*store.parts(RUNS), *store.parts(GP_SAMPLES)]:
        st = part.stat()
        h.update(f"{part.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def aggregate_path(results: str | Path, name: str) -> Path:
    return Path(results) / AGGREGATES / f"{name}.parquet"


def stored_fingerprint(path: Path) -> str | None:
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = meta.get(FINGERPRINT_KEY)
    return value.decode() if value else None


def is_stale(results: str | Path) -> bool:
    current = fingerprint(results)
    return any(stored_fingerprint(aggregate_path(results, n)) != current for n in TABLES)


def deviation_measures(names: list[str] | tuple[str, ...]) -> list[str]:
    """The measures that get a width-scaling fit, in report order: :data:`DEVIATION_MEASURES`,
    then the per-layer weight changes."""
    layers = sorted((m for m in names if m.startswith("weight_rel_change_layer")), key=lambda m: int(m[23:]))
    return [m for m in DEVIATION_MEASURES if m in names] + layers


def expected_exponent(measure: str, n_layers: int | None = None, parameterization: str = "ntk") -> str:
    """The expected width exponent of a measure, or '': for ``"ntk"`` what Lee et al. (2019) report (NTK
    parameterisation, small learning rate); for ``"mup"`` the feature-learning regime of Yang & Hu (2021)
    (:data:`EXPECTED_EXPONENT_MUP`); none for ``"standard"``."""
    if parameterization not in ("ntk", "mup"):
        return ""
    mup = parameterization == "mup"
    if measure.startswith("weight_rel_change_layer") and n_layers:
        i = int(measure[23:])
        if i in (0, n_layers - 1):
            return "0" if mup else "-1/2"
        return "-1/2" if mup else "-1"
    return (EXPECTED_EXPONENT_MUP if mup else EXPECTED_EXPONENT).get(measure, "")


# ----------------------------------------------------------------------------------------------
# Statistics


def t_quantile(count: np.ndarray) -> np.ndarray:
    from scipy.stats import t

    count = np.asarray(count, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(count >= 2, t.ppf(0.975, np.maximum(count - 1, 1)), np.nan)


def fit_power_law(width: np.ndarray, value: np.ndarray, run_seed: np.ndarray | None = None, *,
                  method: str = CI_METHOD, n_boot: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Least-squares fit of ``log(value) = log(prefactor) + exponent * log(width)`` over the given
    runs, with a 95% CI for the exponent.

    ``run_seed``: per run, the seed it belongs to (None: every run is its own seed, i.e. the runs are
    taken as independent). ``method``:

    * ``"seed_cluster_t"`` (default): the seeds are the units. The OLS slope over all runs, its
      seed-clustered standard error (the CR2 sandwich: each seed's residuals corrected for its
      leverage) and Student's t with ``n_seeds - 1`` degrees of freedom. When every seed has one run
      at every width this is exactly the t interval over the per-seed slopes (their mean is the
      pooled slope); it also takes seeds with missing widths. A seed's networks at different widths
      share their initialisation and each seed has its own slope, so the runs of one seed are not
      independent; resampling runs within widths ignores that and under-covers. One seed: no CI.
    * ``"bootstrap_within_width"``: the former method, kept for comparison: 2.5/97.5 percentiles of
      the slope over ``n_boot`` bootstraps (RNG ``seed``) that resample runs within each width.

    Non-finite values are ignored (``n_nonfinite``); non-positive ones cannot be logged and are
    dropped (``n_dropped``). Dropping the smallest values at a width that keeps others raises that
    width's mean log: ``dropped_bias`` says which way that moves the exponent (``"up"``: less
    negative, the measure seems to fall more slowly than it does, as when zeros appear at the largest
    widths; ``"down"``; ``"none"`` when only whole widths were dropped, which just narrows the fitted
    range; ``""`` when nothing was dropped or nothing could be fitted), and ``note`` says it. Needs
    positive values at two widths or more, else ``exponent`` is NaN and ``note`` says why.
    """
    if method not in CI_METHODS:
        raise ValueError(f"method: {method!r} is not one of {CI_METHODS}")
    width = np.asarray(width, dtype=np.float64)
    value = np.asarray(value, dtype=np.float64)
    groups = np.arange(width.size) if run_seed is None else np.asarray(run_seed)
    finite = np.isfinite(value) & np.isfinite(width) & (width > 0)
    use = finite & (value > 0)
    out: dict[str, Any] = {
        "exponent": math.nan, "ci_low": math.nan, "ci_high": math.nan, "exponent_se": math.nan,
        "prefactor": math.nan, "r2": math.nan, "width_min": None, "width_max": None, "n_widths": 0,
        "n_points": int(use.sum()), "n_dropped": int((finite & ~use).sum()), "n_nonfinite": int((~finite).sum()),
        "n_bootstrap": 0, "ci_method": method, "n_seeds": int(len(np.unique(groups[use]))), "ci_dof": math.nan,
        "dropped_bias": "", "note": "",
    }
    notes: list[str] = []
    x, z = np.log(width[use]), np.log(value[use])
    levels = np.unique(width[use])
    if len(levels):
        out.update(width_min=int(levels.min()), width_max=int(levels.max()), n_widths=len(levels))
    if len(levels) < 2:
        out["note"] = "fewer than two widths with positive values"
        return out
    xm, zm = x.mean(), z.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (z - zm)).sum() / sxx)
    intercept = zm - slope * xm
    resid = z - (intercept + slope * x)
    ss_res, ss_tot = float((resid**2).sum()), float(((z - zm) ** 2).sum())
    out.update(exponent=slope, prefactor=float(np.exp(intercept)),
               r2=1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan)
    if len(x) > 2:
        out["exponent_se"] = math.sqrt(ss_res / (len(x) - 2) / sxx)
    if out["n_dropped"]:
        out["dropped_bias"], text = _dropped_bias(width[finite], value[finite] > 0, xm)
        notes.append(text)
    if method == "seed_cluster_t":
        notes.insert(0, _seed_cluster_t(out, x - xm, resid, sxx, groups[use]))
    else:
        notes.insert(0, _bootstrap_within_width(out, x, z, width[use], levels, n_boot, seed))
    out["note"] = "; ".join(n for n in notes if n)
    return out


def _seed_cluster_t(out: dict[str, Any], xc: np.ndarray, resid: np.ndarray, sxx: float, groups: np.ndarray) -> str:
    """Fills the CI of ``out`` from the seed-clustered CR2 standard error of the slope (``xc``: the
    centred log widths of the fitted runs, ``resid``: their OLS residuals) and t(n_seeds - 1)."""
    from scipy.stats import t

    seeds = np.unique(groups)
    if len(seeds) < 2:
        return "one seed: no CI (the seed-to-seed variation of the slope cannot be estimated)"
    n = xc.size
    if n < 3:
        return "two runs: no CI"
    # Design [1, xc] has (X'X)^-1 = diag(1/n, 1/sxx): the leverage between runs i, j is 1/n + xc_i xc_j / sxx.
    bread = np.array([1.0 / n, 1.0 / sxx])
    meat = np.zeros((2, 2))
    for s in seeds:
        ix = np.flatnonzero(groups == s)
        xs = np.column_stack([np.ones(ix.size), xc[ix]])
        lev = np.eye(ix.size) - (xs * bread) @ xs.T
        ev, vec = np.linalg.eigh(lev)
        inv_sqrt = np.where(ev > 1e-10, 1.0 / np.sqrt(np.clip(ev, 1e-10, None)), 0.0)  # pseudo-inverse root
        score = xs.T @ (vec @ (inv_sqrt * (vec.T @ resid[ix])))
        meat += np.outer(score, score)
    se = math.sqrt(max(meat[1, 1], 0.0)) / sxx
    dof = len(seeds) - 1
    half = float(t.ppf(0.975, dof)) * se
    out.update(ci_low=out["exponent"] - half, ci_high=out["exponent"] + half, ci_dof=float(dof))
    return ""


def _bootstrap_within_width(out: dict[str, Any], x: np.ndarray, z: np.ndarray, width: np.ndarray,
                            levels: np.ndarray, n_boot: int, seed: int) -> str:
    """Fills the CI of ``out`` from a percentile bootstrap that resamples runs within each width."""
    by_width = [np.flatnonzero(width == w) for w in levels]
    if max(len(ix) for ix in by_width) < 2:
        return "one run per width: no bootstrap over seeds"
    rng = np.random.default_rng(seed)
    idx = np.concatenate([ix[rng.integers(0, len(ix), size=(n_boot, len(ix)))] for ix in by_width], axis=1)
    xb, zb = x[idx], z[idx]
    xc = xb - xb.mean(axis=1, keepdims=True)
    slopes = (xc * (zb - zb.mean(axis=1, keepdims=True))).sum(axis=1) / (xc**2).sum(axis=1)
    lo, hi = np.percentile(slopes, [2.5, 97.5])
    out.update(ci_low=float(lo), ci_high=float(hi), n_bootstrap=n_boot)
    return ""


def _dropped_bias(width: np.ndarray, positive: np.ndarray, x_mean: float) -> tuple[str, str]:
    """Which way dropping the non-positive values moves the fitted exponent, and a note saying so.
    ``width``/``positive``: the runs with a finite value; ``x_mean``: the mean log width of the fit.

    At a width that keeps some values, the dropped ones were its smallest, so the mean log there is
    too high; a width above the mean log width pulls the slope up, one below it down. A width whose
    values were all dropped just drops out of the fit."""
    lean, n_partial = 0.0, 0
    for w in np.unique(width):
        at = width == w
        kept, dropped = int(positive[at].sum()), int((~positive[at]).sum())
        if kept and dropped:
            n_partial += dropped
            lean += (math.log(w) - x_mean) * kept * dropped / (kept + dropped)
    n = int((~positive).sum())
    if not n_partial:
        return "none", f"{n} value(s) ≤ 0 not fitted, at widths left out whole (the fitted range is narrower)"
    if lean == 0:
        return "none", f"{n} value(s) ≤ 0 not fitted, {n_partial} at widths that kept others: no net bias"
    bias = "up" if lean > 0 else "down"
    way = "less negative: the true decay is likely steeper" if bias == "up" else "more negative"
    return bias, (f"{n} value(s) ≤ 0 not fitted, {n_partial} at widths that kept others: "
                  f"exponent biased {bias} ({way})")


def by_width_table(runs: Runs) -> pa.Table:
    """Per (group, width, measure): mean, std, count, sem, 95% CI over the ok runs, and run counts."""
    import pandas as pd

    names = list(runs.measures)
    ok = runs.status == "ok"
    keys = pd.DataFrame({"gid": runs.gid, "width": runs.width})
    cells = keys.drop_duplicates().sort_values(["gid", "width"]).reset_index(drop=True)
    counts = pd.DataFrame({"gid": runs.gid, "width": runs.width, "status": runs.status.astype(str)})
    counts = counts.groupby(["gid", "width", "status"]).size().unstack("status", fill_value=0)
    for s in STATUSES:
        if s not in counts.columns:
            counts[s] = 0
    counts["n_runs"] = counts.sum(axis=1) if len(counts.columns) else 0
    cells = cells.merge(counts.reset_index(), on=["gid", "width"], how="left").fillna(0)

    frame = pd.DataFrame({"gid": runs.gid[ok], "width": runs.width[ok], **{m: v[ok] for m, v in runs.measures.items()}})
    long = frame.melt(id_vars=["gid", "width"], value_vars=names, var_name="measure", value_name="value")
    stats = long.groupby(["gid", "width", "measure"], sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
    measured = set(stats.loc[stats["count"] > 0, "measure"])
    names = [m for m in names if m in measured]  # e.g. diverged_step: never set on an ok run
    if names:
        grid = cells.merge(pd.DataFrame({"measure": names}), how="cross")
        grid = grid.merge(stats, on=["gid", "width", "measure"], how="left")
    else:  # no ok run anywhere: one row per (group, width) keeps the diverged/failed counts
        grid = cells.assign(measure=None, mean=math.nan, std=math.nan, count=0)
    grid["count"] = grid["count"].fillna(0).astype(np.int64)
    count = grid["count"].to_numpy(dtype=np.float64)
    std = grid["std"].to_numpy(dtype=np.float64)
    mean = grid["mean"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sem = np.where(count >= 2, std / np.sqrt(count), np.nan)
    half = t_quantile(count) * sem
    order = {m: i for i, m in enumerate(names)}
    grid["_order"] = grid["measure"].map(order)
    sort = np.lexsort((grid["_order"].to_numpy(), grid["width"].to_numpy(), grid["gid"].to_numpy()))

    cols = {
        "width": pa.array(grid["width"].to_numpy(dtype=np.int64)[sort]),
        "measure": pa.array(grid["measure"].to_numpy(dtype=object)[sort].tolist(), pa.string()),
        "mean": pa.array(mean[sort]), "std": pa.array(std[sort]),
        "count": pa.array(count[sort].astype(np.int64)), "sem": pa.array(sem[sort]),
        "ci_low": pa.array((mean - half)[sort]), "ci_high": pa.array((mean + half)[sort]),
        "n_runs": pa.array(grid["n_runs"].to_numpy(dtype=np.int64)[sort]),
        "n_ok": pa.array(grid["ok"].to_numpy(dtype=np.int64)[sort]),
        "n_diverged": pa.array(grid["diverged"].to_numpy(dtype=np.int64)[sort]),
        "n_failed": pa.array(grid["failed"].to_numpy(dtype=np.int64)[sort]),
    }
    gids = grid["gid"].to_numpy(dtype=np.int64)[sort]
    return with_groups(runs, gids, cols)


def scaling_table(runs: Runs, *, n_boot: int = BOOTSTRAP, method: str = CI_METHOD) -> pa.Table:
    """Per (group, deviation measure): the log-log fit against width (:func:`fit_power_law`, the
    runs' seeds as the units; ``method`` and ``n_boot`` as there)."""
    ok = runs.status == "ok"
    rows: list[dict[str, Any]] = []
    gids: list[int] = []
    for g in range(runs.groups.num_rows):
        sel = ok & (runs.gid == g)
        for measure in deviation_measures(list(runs.measures)):
            values = runs.measures[measure][sel]
            if not np.isfinite(values).any():
                continue  # not measured for this group (e.g. relu_flip_frac of a smooth activation)
            # A bootstrap's RNG seed depends on the group and measure only, not on the other groups.
            seed = int.from_bytes(hashlib.sha256(f"{runs.group_ids[g]}|{measure}".encode()).digest()[:4], "little")
            fit = fit_power_law(runs.width[sel], values, runs.seed[sel], method=method, n_boot=n_boot, seed=seed)
            rows.append({"measure": measure, **fit})
            gids.append(g)
    fields = {
        "measure": pa.string(), "exponent": pa.float64(), "ci_low": pa.float64(), "ci_high": pa.float64(),
        "exponent_se": pa.float64(), "prefactor": pa.float64(), "r2": pa.float64(), "width_min": pa.int64(),
        "width_max": pa.int64(), "n_widths": pa.int64(), "n_points": pa.int64(), "n_dropped": pa.int64(),
        "n_nonfinite": pa.int64(), "n_bootstrap": pa.int64(), "note": pa.string(),
        # Added later: after the older columns, so that their positions stay.
        "ci_method": pa.string(), "n_seeds": pa.int64(), "ci_dof": pa.float64(), "dropped_bias": pa.string(),
    }
    cols = {k: pa.array([r[k] for r in rows], t) for k, t in fields.items()}
    return with_groups(runs, np.array(gids, dtype=np.int64), cols)


# ----------------------------------------------------------------------------------------------
# Computing and storing


def compute(results: str | Path, *, n_boot: int = BOOTSTRAP, runs_table: pa.Table | None = None
            ) -> tuple[pa.Table, pa.Table]:
    """``(by_width, scaling)`` of a results directory, without writing anything. ``runs_table``: the
    runs table, if the caller has read it already."""
    table = runs_table if runs_table is not None else ResultsStore(results).table(RUNS)
    if table.num_rows == 0:
        raise UserError(f"{Path(results) / 'runs'}: no runs yet (run a sweep into {results} first)")
    runs = split_runs(table)
    return by_width_table(runs), scaling_table(runs, n_boot=n_boot)


def _compute_all(root: Path) -> dict[str, pa.Table]:
    """The three aggregate tables, fingerprinted in their schema metadata."""
    stamp = fingerprint(root)
    runs_table = ResultsStore(root).table(RUNS)
    tables = (*compute(root, runs_table=runs_table), gp_init_table(root, runs_table=runs_table))
    if fingerprint(root) != stamp:  # a sweep committed a part meanwhile: the next call recomputes
        stamp = "changed-while-computing"
    meta = {FINGERPRINT_KEY: stamp.encode(), b"ntk_sweep.aggregate_version": VERSION.encode()}
    return {name: table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
            for name, table in zip(TABLES, tables, strict=True)}


def _write_all(root: Path, tables: dict[str, pa.Table]) -> None:
    for name, table in tables.items():
        write_parquet_atomic(table, aggregate_path(root, name))


def ensure_aggregates(results: str | Path, *, force: bool = False) -> bool:
    """Write ``RESULTS/aggregates/{by_width,scaling,gp_init}.parquet`` if the runs changed since they
    were computed (or ``force``). Returns True if they were recomputed. ``gp_init`` has zero rows
    when no width has two seeds with stored outputs at init (results written before the ``outputs``
    table existed). See :func:`tables` for a results directory that cannot be written."""
    root = Path(results)
    if not root.is_dir():
        raise UserError(f"{root}: not a results directory")
    if not force and not is_stale(root):
        return False
    _write_all(root, _compute_all(root))
    return True


def tables(results: str | Path, *, refresh: bool = True) -> dict[str, pa.Table]:
    """The aggregate tables (``by_width``, ``scaling``, ``gp_init``), up to date: read from
    ``RESULTS/aggregates/`` when they are, else recomputed and written there, or, when the results
    directory cannot be written (read-only), recomputed in memory only. ``refresh=False``: the stored
    tables as they are (those that read). Raises :class:`UserError` when there are no runs."""
    root = Path(results)
    if not root.is_dir():
        raise UserError(f"{root}: not a results directory")
    if not refresh or not is_stale(root):
        stored = {}
        for name in TABLES:
            try:
                stored[name] = pq.read_table(aggregate_path(root, name))
            except (OSError, pa.ArrowException):
                continue
        if not refresh or len(stored) == len(TABLES):
            return stored
    computed = _compute_all(root)
    try:
        _write_all(root, computed)
    except OSError as exc:
        if not is_not_writable(exc):
            raise
    return computed


def load(results: str | Path, name: str, *, refresh: bool = True):
    """One aggregate table (``"by_width"``, ``"scaling"`` or ``"gp_init"``) as a pandas DataFrame,
    recomputed first if stale (``refresh``; in memory only when the results directory is read-only)."""
    table = tables(results, refresh=refresh).get(name)
    if table is None:
        raise UserError(f"{aggregate_path(results, name)}: no such aggregate table")
    return table.to_pandas()
