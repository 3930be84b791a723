"""Aggregates: per-width statistics over seeds and width-scaling fits, on synthetic runs written in
the real results layout (``pipeline.store``), so the known answer is known exactly."""

import math
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from pipeline import aggregate
from pipeline.errors import UserError
from pipeline.results import SCALAR_METRICS, RunResult
from pipeline.run_config import RunConfig
from pipeline.store import ResultsStore, write_parquet_atomic

WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096)
EXPONENTS = {"kernel_rel_dev_init": -0.5, "kernel_rel_change": -0.77, "rmse_nn_lin_test": -0.66,
             "weight_rel_change": -1.0}


def synthetic_results(out, *, widths=WIDTHS, seeds=5, noise=0.15, rng=0, depth=2, status=None, metrics=None,
                      **config):
    """Runs whose measures are ``2 * width**exponent * exp(noise * N(0, 1))``, written pack by pack
    with :meth:`ResultsStore.write_pack`. ``status(width, seed)`` and ``metrics(width, seed) -> dict``
    override per run. Returns the list of rows written."""
    rng = np.random.default_rng(rng)
    store = ResultsStore(out)
    rows = []
    for w in widths:
        pack = []
        for s in range(seeds):
            cfg = RunConfig(dataset="digits", n_train=50, n_test=40, depth=depth, width=w, seed=s, steps=100,
                            device="cpu", **config)
            m = {k: math.nan for k in SCALAR_METRICS}
            m.update({k: 2.0 * w**e * math.exp(noise * rng.normal()) for k, e in EXPONENTS.items()})
            m["agree_nn_lin_test"] = 1.0 if w >= 512 else 1.0 - 0.1 * 64 / w
            m["test_acc"] = 0.9
            m["weight_rel_change_by_layer"] = [w**-0.5] + [w**-1.0] * (depth - 1) + [0.5 * w**-0.5]
            if metrics:
                m.update(metrics(w, s))
            pack.append(RunResult(cfg, status=status(w, s) if status else "ok", metrics=m))
        store.write_pack(pack)
        rows += [r.row() for r in pack]
    return rows


def fits(results) -> dict:
    aggregate.ensure_aggregates(results)
    table = pq.read_table(aggregate.aggregate_path(results, "scaling")).to_pylist()
    return {(r["depth"], r["measure"]): r for r in table}


def test_fit_recovers_known_exponents_within_their_ci(tmp_path):
    synthetic_results(tmp_path)
    got = fits(tmp_path)
    for measure, exponent in EXPONENTS.items():
        fit = got[(2, measure)]
        assert fit["ci_low"] <= exponent <= fit["ci_high"], (measure, fit)
        assert abs(fit["exponent"] - exponent) < 0.06
        assert 0 < fit["ci_high"] - fit["ci_low"] < 0.2
        assert fit["r2"] > 0.9
        assert (fit["width_min"], fit["width_max"], fit["n_widths"]) == (64, 4096, 7)
        assert fit["n_points"] == 35 and fit["n_dropped"] == 0
        assert fit["prefactor"] == pytest.approx(2.0, rel=0.3)
    # Per-layer weight changes, noise-free: input and output -1/2, hidden -1, exactly.
    assert got[(2, "weight_rel_change_layer0")]["exponent"] == pytest.approx(-0.5)
    assert got[(2, "weight_rel_change_layer1")]["exponent"] == pytest.approx(-1.0)
    assert got[(2, "weight_rel_change_layer2")]["exponent"] == pytest.approx(-0.5)


# Synthetic sweeps like the quickstart's (widths 64..2048): each seed has its own slope (sd 0.03;
# the quickstart's per-seed slopes vary by 0.025-0.043) and its own offset at the middle of the
# width range (sd 0.035; quickstart 0.02-0.04), and each run its own noise (sd 0.06; quickstart
# 0.025-0.17 around its seed's line, 0.04-0.1 for most measures).
SIM_WIDTHS = np.array([64, 128, 256, 512, 1024, 2048])
SIM_EXPONENT, SIM_SLOPE_SD, SIM_OFFSET_SD, SIM_NOISE_SD = -0.5, 0.03, 0.035, 0.06


def simulated_sweep(rng, n_seeds: int, missing: float = 0.0):
    """``(width, value, seed)`` per run: ``0.8 * w**a * exp(b_s (log w - mean log w) + u_s + e)``;
    each run is left out with probability ``missing``."""
    width = np.tile(SIM_WIDTHS, n_seeds)
    seed = np.repeat(np.arange(n_seeds), SIM_WIDTHS.size)
    x = np.log(width) - np.log(SIM_WIDTHS).mean()
    slope_dev, offset = rng.normal(0, SIM_SLOPE_SD, n_seeds), rng.normal(0, SIM_OFFSET_SD, n_seeds)
    value = 0.8 * width**SIM_EXPONENT * np.exp(slope_dev[seed] * x + offset[seed]
                                                + rng.normal(0, SIM_NOISE_SD, width.size))
    keep = rng.random(width.size) >= missing
    return width[keep], value[keep], seed[keep]


def coverage(n_seeds: int, sweeps: int, method: str, rng_seed: int, missing: float = 0.0) -> tuple[float, float]:
    """Share of ``sweeps`` simulated sweeps whose 95% CI holds the true exponent, and the CIs' mean width."""
    rng = np.random.default_rng(rng_seed)
    hits, widths = 0, []
    for _ in range(sweeps):
        width, value, seed = simulated_sweep(rng, n_seeds, missing)
        fit = aggregate.fit_power_law(width, value, seed, method=method, n_boot=400,
                                      seed=int(rng.integers(1 << 30)))
        hits += fit["ci_low"] <= SIM_EXPONENT <= fit["ci_high"]
        widths.append(fit["ci_high"] - fit["ci_low"])
    return hits / sweeps, float(np.mean(widths))


@pytest.mark.parametrize("n_seeds", [3, 5, 10])
def test_exponent_ci_covers_the_true_exponent_with_seed_level_slopes(n_seeds):
    """Over 1000 simulated sweeps, the seed-clustered t CI holds the true exponent in >= 93% of them,
    and is no wider than the exact t interval over per-seed slopes should be; the former within-width
    bootstrap (runs taken as independent) fails the same check."""
    got, mean_width = coverage(n_seeds, 1000, "seed_cluster_t", rng_seed=n_seeds)
    assert got >= 0.93, (n_seeds, got)
    # Each seed's own slope has sd sqrt(slope_sd^2 + noise_sd^2 / Sxx): the t interval over n_seeds of them
    # has expected width 2 t(0.975, n_seeds-1) c4(n_seeds) sd / sqrt(n_seeds).
    x = np.log(SIM_WIDTHS)
    sd = math.sqrt(SIM_SLOPE_SD**2 + SIM_NOISE_SD**2 / ((x - x.mean()) ** 2).sum())
    c4 = math.sqrt(2 / (n_seeds - 1)) * math.gamma(n_seeds / 2) / math.gamma((n_seeds - 1) / 2)
    expected = 2 * stats.t.ppf(0.975, n_seeds - 1) * c4 * sd / math.sqrt(n_seeds)
    assert 0.85 * expected < mean_width < 1.15 * expected, (mean_width, expected)
    old, _ = coverage(n_seeds, 1000, "bootstrap_within_width", rng_seed=n_seeds)
    assert old < 0.9, (n_seeds, old)


def test_exponent_ci_covers_with_missing_runs():
    """Seeds with missing widths (a fifth of the runs lost at random) still cover."""
    got, _ = coverage(5, 600, "seed_cluster_t", rng_seed=7, missing=0.2)
    assert got >= 0.92, got


def test_with_every_width_per_seed_the_ci_is_the_t_interval_over_per_seed_slopes():
    rng = np.random.default_rng(3)
    width, value, seed = simulated_sweep(rng, 4)
    fit = aggregate.fit_power_law(width, value, seed)
    slopes = [np.polyfit(np.log(width[seed == s]), np.log(value[seed == s]), 1)[0] for s in range(4)]
    lo, hi = stats.t.interval(0.95, 3, loc=np.mean(slopes), scale=stats.sem(slopes))
    assert fit["exponent"] == pytest.approx(np.mean(slopes))
    assert (fit["ci_low"], fit["ci_high"]) == pytest.approx((lo, hi))
    assert (fit["ci_method"], fit["n_seeds"], fit["ci_dof"], fit["n_bootstrap"]) == ("seed_cluster_t", 4, 3.0, 0)
    assert fit["note"] == ""


def test_one_seed_gets_no_ci_and_two_seeds_a_wide_one():
    rng = np.random.default_rng(4)
    width, value, seed = simulated_sweep(rng, 2)
    one = aggregate.fit_power_law(width[seed == 0], value[seed == 0], seed[seed == 0])
    assert math.isfinite(one["exponent"]) and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    assert one["n_seeds"] == 1 and "one seed: no CI" in one["note"]
    two = aggregate.fit_power_law(width, value, seed)
    assert two["ci_dof"] == 1 and two["n_seeds"] == 2 and two["note"] == ""
    assert two["ci_low"] < two["exponent"] < two["ci_high"]
    # Without seeds every run counts as its own: the interval of independent runs.
    runs = aggregate.fit_power_law(width, value)
    assert runs["n_seeds"] == width.size and runs["ci_dof"] == width.size - 1
    assert math.isnan(aggregate.fit_power_law([64, 128], [1.0, 0.7], [0, 1])["ci_low"])
    with pytest.raises(ValueError, match="method"):
        aggregate.fit_power_law(width, value, seed, method="jackknife")


def test_seeds_with_missing_widths_keep_their_runs_in_the_fit():
    rng = np.random.default_rng(5)
    width, value, seed = simulated_sweep(rng, 4)
    keep = ~((seed == 0) & (width > 128)) & ~((seed == 1) & (width != 512))  # seed 1: one width only
    fit = aggregate.fit_power_law(width[keep], value[keep], seed[keep])
    assert fit["n_seeds"] == 4 and fit["ci_dof"] == 3 and fit["n_points"] == keep.sum()
    assert fit["ci_low"] < fit["exponent"] < fit["ci_high"] and fit["ci_high"] - fit["ci_low"] < 0.5


def test_by_width_mean_std_count_and_t_interval_over_ok_runs_only(tmp_path):
    status = {(64, 0): "diverged", (64, 1): "failed", (128, 4): "diverged"}
    rows = synthetic_results(tmp_path, widths=(64, 128), status=lambda w, s: status.get((w, s), "ok"))
    aggregate.ensure_aggregates(tmp_path)
    bw = pq.read_table(aggregate.aggregate_path(tmp_path, "by_width")).to_pandas()
    for width, n_ok in ((64, 3), (128, 4)):
        values = np.array([r["kernel_rel_dev_init"] for r in rows if r["width"] == width
                           and status.get((width, r["seed"]), "ok") == "ok"])
        row = bw[(bw.width == width) & (bw.measure == "kernel_rel_dev_init")].iloc[0]
        half = stats.t.ppf(0.975, n_ok - 1) * values.std(ddof=1) / math.sqrt(n_ok)
        assert row["count"] == n_ok and row["n_ok"] == n_ok and row["n_runs"] == 5
        assert row["mean"] == pytest.approx(values.mean())
        assert row["std"] == pytest.approx(values.std(ddof=1))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((values.mean() - half, values.mean() + half))
    counts = bw.drop_duplicates("width").set_index("width")
    assert counts.loc[64, ["n_diverged", "n_failed"]].tolist() == [1, 1]
    assert counts.loc[128, ["n_diverged", "n_failed"]].tolist() == [1, 0]
    # Every group column is there; measurements are rows; never-measured columns are left out.
    assert {"group_id", "dataset", "n_train", "depth", "activation", "parameterization", "w_std", "b_std",
            "optimizer", "lr_scale", "steps", "label_noise"} <= set(bw.columns)
    assert {"seed", "run_id", "lr", "sweep"}.isdisjoint(bw.columns)
    assert {"weight_rel_change_layer0", "weight_rel_change_layer2", "disagree_nn_lin_test", "test_acc",
            "agree_nn_lin_test"} <= set(bw.measure)
    assert "diverged_step" not in set(bw.measure) and "ntk_test_acc" not in set(bw.measure)
    assert (bw.dataset == "digits").all()


def test_non_positive_values_are_dropped_and_counted(tmp_path):
    synthetic_results(tmp_path, seeds=3)  # 1 - agree is exactly 0 from width 512 up
    fit = fits(tmp_path)[(2, "disagree_nn_lin_test")]
    assert fit["n_dropped"] == 3 * 4 and fit["n_points"] == 3 * 3
    assert (fit["width_min"], fit["width_max"]) == (64, 256)
    assert fit["exponent"] == pytest.approx(-1.0)
    # Whole widths left out: no bias within the fitted range, but the note says it.
    assert fit["dropped_bias"] == "none" and "12 value(s) ≤ 0 not fitted" in fit["note"]


@pytest.mark.parametrize(("zero_at", "bias"), [(2048, "up"), (64, "down")])
def test_dropping_some_values_of_a_width_biases_the_exponent_and_says_which_way(zero_at, bias):
    """Zeros among the values of the largest width (a rare event counted on a finite test set) leave
    its larger values only: the fit is shallower than the truth, and the note says so."""
    rng = np.random.default_rng(6)
    width, value, seed = simulated_sweep(rng, 5)
    clean = aggregate.fit_power_law(width, value, seed)
    at = np.flatnonzero(width == zero_at)
    low = at[np.argsort(value[at])[:2]]  # the two smallest values there become 0
    value[low] = 0.0
    fit = aggregate.fit_power_law(width, value, seed)
    assert fit["n_dropped"] == 2 and fit["dropped_bias"] == bias
    assert f"exponent biased {bias}" in fit["note"] and "2 at widths that kept others" in fit["note"]
    assert (fit["exponent"] > clean["exponent"]) == (bias == "up")


def test_scaling_table_and_report_name_the_ci_method_and_the_bias_of_dropped_zeros(tmp_path):
    """``scaling.parquet`` says how its CIs were made and on how many seeds; the report's exponent
    table names the method, and a fit that lost some values of a width to zeros says which way that
    pushes its exponent."""
    from pipeline.report import build_report

    synthetic_results(tmp_path, widths=(64, 128, 256, 512), seeds=4,
                      metrics=lambda w, s: {"rmse_nn_lin_test": 0.0} if (w, s) in ((512, 0), (512, 1)) else {})
    got = fits(tmp_path)
    for fit in got.values():
        assert (fit["ci_method"], fit["n_seeds"], fit["ci_dof"]) == ("seed_cluster_t", 4, 3.0)
    fit = got[(2, "rmse_nn_lin_test")]
    assert (fit["n_dropped"], fit["dropped_bias"]) == (2, "up")
    assert got[(2, "kernel_rel_dev_init")]["dropped_bias"] == ""
    md = build_report(tmp_path, tmp_path / "rep").read_text()
    exponents = md.split("## Fitted width exponents")[1].split("\n## ")[0]
    assert "`seed_cluster_t`" in exponents and "bootstrap" not in exponents
    row = next(line for line in md.splitlines() if line.startswith("| `rmse_nn_lin_test`"))
    assert "exponent biased up" in row and "| 14 (2) |" in row


def test_a_measure_with_positive_values_at_one_width_gets_no_exponent(tmp_path):
    synthetic_results(tmp_path, widths=(64, 128, 256), seeds=2,
                      metrics=lambda w, s: {"relu_flip_frac": 0.1 if w == 64 else 0.0})
    fit = fits(tmp_path)[(2, "relu_flip_frac")]
    assert math.isnan(fit["exponent"]) and fit["n_widths"] == 1 and "fewer than two widths" in fit["note"]


def test_groups_split_on_every_config_field_but_seed_and_width(tmp_path):
    synthetic_results(tmp_path, depth=1, lr_scale=0.5, seeds=2)
    synthetic_results(tmp_path, depth=2, lr_scale=0.5, seeds=2)
    synthetic_results(tmp_path, depth=2, lr_scale=0.25, seeds=2)
    aggregate.ensure_aggregates(tmp_path)
    sc = pq.read_table(aggregate.aggregate_path(tmp_path, "scaling")).to_pandas()
    assert sc.group_id.nunique() == 3
    assert sorted(map(tuple, sc[["depth", "lr_scale"]].drop_duplicates().to_numpy().tolist())) == [
        (1, 0.5), (2, 0.25), (2, 0.5)]
    # A depth-1 net has two weight layers: no layer-2 fit for it.
    layers = sc[sc.measure.str.startswith("weight_rel_change_layer")].groupby("depth").measure.nunique()
    assert layers.to_dict() == {1: 2, 2: 3}
    assert (sc.groupby("group_id").n_points.max() == 2 * len(WIDTHS)).all()


def test_extra_numeric_columns_and_parts_with_new_columns(tmp_path):
    """A column added later by another feature (a newer part has it, an older does not) is aggregated
    like any measurement; the older runs count as missing for it."""
    rows = synthetic_results(tmp_path, widths=(64, 128), seeds=2)
    new = [dict(r, run_id=r["run_id"][:-1] + "x", seed=r["seed"] + 10, ntk_eig_max=float(r["width"]))
           for r in rows]
    for r in new:
        r.pop("dataset")
    table = pa.Table.from_pylist(new).set_column(
        list(new[0]).index("weight_rel_change_by_layer"), "weight_rel_change_by_layer",
        pa.array([r["weight_rel_change_by_layer"] for r in new], pa.list_(pa.float64())))
    write_parquet_atomic(table, tmp_path / "runs" / "dataset=digits" / "part-newer.parquet")
    aggregate.ensure_aggregates(tmp_path)
    bw = pq.read_table(aggregate.aggregate_path(tmp_path, "by_width")).to_pandas()
    eig = bw[bw.measure == "ntk_eig_max"].set_index("width")
    assert eig["mean"].to_dict() == {64: 64.0, 128: 128.0}
    assert eig["count"].to_dict() == {64: 2, 128: 2}
    assert bw[bw.measure == "kernel_rel_dev_init"]["count"].tolist() == [4, 4]


def test_recomputed_only_when_the_runs_change(tmp_path):
    synthetic_results(tmp_path, widths=(64, 128), seeds=2)
    assert aggregate.ensure_aggregates(tmp_path) is True
    paths = [aggregate.aggregate_path(tmp_path, n) for n in ("by_width", "scaling")]
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert aggregate.ensure_aggregates(tmp_path) is False
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    assert aggregate.stored_fingerprint(paths[0]) == aggregate.fingerprint(tmp_path)
    time.sleep(0.01)
    synthetic_results(tmp_path, widths=(256,), seeds=2)  # a resumed sweep commits another part
    assert aggregate.is_stale(tmp_path)
    assert aggregate.ensure_aggregates(tmp_path) is True
    assert 256 in set(aggregate.load(tmp_path, "by_width").width)
    # Touching a part (rewritten in place) also counts as a change.
    part = ResultsStore(tmp_path).parts("runs")[0]
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
    assert aggregate.is_stale(tmp_path)
    assert aggregate.ensure_aggregates(tmp_path, force=False) is True
    assert not [p for p in (tmp_path / "aggregates").iterdir() if p.name.startswith(".")]  # no temp files left


def test_groups_with_no_ok_run_keep_their_counts(tmp_path):
    synthetic_results(tmp_path, widths=(64, 128), seeds=2, status=lambda w, s: "failed")
    aggregate.ensure_aggregates(tmp_path)
    bw = aggregate.load(tmp_path, "by_width")
    assert bw[["width", "count", "n_runs", "n_failed"]].to_numpy().tolist() == [[64, 0, 2, 2], [128, 0, 2, 2]]
    assert aggregate.load(tmp_path, "scaling").empty


def test_no_runs_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no runs yet"):
        aggregate.ensure_aggregates(tmp_path)
    with pytest.raises(UserError, match="not a results directory"):
        aggregate.ensure_aggregates(tmp_path / "missing")
