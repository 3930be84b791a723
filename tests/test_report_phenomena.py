"""The NTK-phenomena sections of the report and the gp_init aggregate: every new plot from a tiny real
sweep decoded as a non-blank image, the GP-at-init numbers on outputs whose law is known, the
interpolation threshold of a known architecture, and the sections skipped with a note on results
written before the new tables and columns existed."""

import math
import time
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kernels.analytic import mlp_kernels
from pipeline import aggregate, query
from pipeline.data import load_subset
from pipeline.gp_init import gp_sqrt, seed_counts
from pipeline.plan import num_params
from pipeline.report import build_report, threshold_width
from pipeline.results import SCALAR_METRICS, RunResult
from pipeline.run_config import RunConfig
from pipeline.store import GramWriter, ResultsStore, pack_id, write_parquet_atomic

# One hidden layer on digits (d = 64, K = 10), n_train = 40: threshold P = 400 at width 10*39/75 = 5.2,
# straddled by the widths; label noise too. 2 seeds: GP-at-init rows need two.
TINY = {
    "name": "tiny_phenomena",
    "datasets": [{"name": "digits", "n_train": [40], "n_test": 30, "label_noise": 0.2}],
    "architectures": [{"depth": [1], "activation": "relu"}],
    "widths": [2, 8, 64],
    "seeds": 2,
    "optimizer": {"name": "gd", "lr_scale": 0.5, "steps": 30},
    "kernels": {"store": "none"},
    "resources": {"num_cpus": 1},
}
NEW_PLOTS = ("spectral_bias.png", "gp_init.png", "double_descent.png")
NEW_COLUMNS = tuple(c for c in SCALAR_METRICS if c.startswith(("ntk_eig", "ntk_cond", "train_loss_")))


def assert_real_image(path: Path) -> None:
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, image.shape
    assert float(image[..., :3].var()) > 1e-3, f"{path.name} looks blank"


@pytest.fixture(scope="module")
def sweep_results(tmp_path_factory) -> Path:
    """The runs of TINY, trained and stored pack by pack as the runner does (without starting Ray)."""
    from pipeline.limits import analytic_blocks
    from pipeline.run import train_runs
    from pipeline.run_config import make_packs
    from pipeline.spec import parse_sweep

    out = tmp_path_factory.mktemp("phenomena") / "results"
    store = ResultsStore(out)
    grams = GramWriter(out, "none")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a runner task with num_cpus 1: tiny matrices, no thread hand-offs
    try:
        for pack in make_packs(parse_sweep(TINY).expand(), pack_seeds=True):
            subset = load_subset(pack[0])
            results = train_runs(pack, subset=subset, analytic=analytic_blocks(pack[0], subset))
            grams.write_nngp_test(pack[0], subset.x_test)  # as the runner's limits task does
            assert [r.status for r in results] == ["ok"] * len(pack), [r.error for r in results]
            store.write_pack(results)
    finally:
        torch.set_num_threads(threads)
    return out


def test_report_draws_every_phenomenon_from_a_real_sweep(sweep_results, tmp_path):
    md = build_report(sweep_results, tmp_path / "rep").read_text()
    for name in NEW_PLOTS:
        assert_real_image(tmp_path / "rep" / name)
        assert f"]({name})" in md
    # The spectrum and convergence table: one row per width, every column measured.
    spectrum = md.split("### Spectrum and convergence")[1].split("###")[0]
    rows = [line for line in spectrum.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["2", "8", "64"]
    assert all(r.count("|") == 12 and "–" not in r for r in rows), rows  # the analytic Θ: one line above
    assert "Analytic NTK Θ on the training points (the same at every width)" in spectrum
    # The GP table, one row per width, and the threshold width in the double-descent caption.
    gp = md.split("### Gaussian process at initialisation")[1].split("###")[0]
    assert sum(line.startswith(("| 2 | 2 |", "| 8 | 2 |", "| 64 | 2 |")) for line in gp.splitlines()) == 3
    assert "width ≈ 5.2)" in md
    assert "_Skipped" not in md
    # Lazy training: the absolute weight distance gets a fit beside the relative change.
    assert "| `weight_distance` |" in md and "| `relu_flip_frac` |" in md


def test_gp_init_aggregate_is_written_with_the_others_and_queryable(sweep_results):
    aggregate.ensure_aggregates(sweep_results)
    gp = query.query(sweep_results, "SELECT group_id, dataset, depth, label_noise, width, seeds, outputs, "
                                    "nngp_cov_rel_err, nngp_cov_rel_err_floor, ks_stat, ks_stat_floor, "
                                    "seeds_by_count FROM gp_init ORDER BY width")
    assert gp.width.tolist() == [2, 8, 64] and set(gp.seeds) == {2} and set(gp.outputs) == {10}
    assert (gp.nngp_cov_rel_err > 0).all() and (gp.nngp_cov_rel_err_floor > 0).all()
    assert ((gp.ks_stat > 0) & (gp.ks_stat < 1)).all() and gp.ks_stat_floor.nunique() == 1
    assert [list(v) for v in gp.seeds_by_count] == [[2]] * 3
    # The same group ids as by_width: the report joins them.
    bw = query.query(sweep_results, "SELECT DISTINCT group_id FROM by_width")
    assert set(gp.group_id) == set(bw.group_id)
    meta = pq.read_schema(aggregate.aggregate_path(sweep_results, "gp_init")).metadata
    assert meta[aggregate.FINGERPRINT_KEY].decode() == aggregate.fingerprint(sweep_results)


# ----------------------------------------------------------------------------------------------
# GP at init on outputs whose law is known


def _config(width: int, seed: int, **kw) -> RunConfig:
    return RunConfig(dataset="digits", n_train=20, n_test=20, depth=1, width=width, seed=seed, steps=10,
                     device="cpu", **kw)


def _metrics(width: int) -> dict:
    m = {k: math.nan for k in SCALAR_METRICS}
    m.update(kernel_rel_dev_init=width**-0.5, test_acc=0.8, test_loss=0.4, train_loss=0.1)
    m["weight_rel_change_by_layer"] = [0.1, 0.1]
    return m


def write_gp_runs(out: Path, widths_scales: dict[int, float], seeds: int = 40) -> np.ndarray:
    """Runs whose outputs at init are ``scale *`` exact draws of the GP N(0, K_NNGP) on the test points.
    Returns the NNGP."""
    subset = load_subset(_config(64, 0))
    nngp = mlp_kernels(subset.x_test.astype(np.float64), depth=1, get=("nngp",))["nngp"]
    GramWriter(out, "none").write_nngp_test(_config(64, 0), subset.x_test)  # what gp_init compares with
    root = gp_sqrt(nngp)
    rng = np.random.default_rng(0)
    store = ResultsStore(out)
    for width, scale in widths_scales.items():
        pack = []
        for s in range(seeds):
            f0 = scale * root @ rng.normal(size=(len(nngp), 10))
            pack.append(RunResult(_config(width, s), metrics=_metrics(width), f0_test=f0.astype(np.float32)))
        store.write_pack(pack)
    return nngp


def test_gp_errors_sit_at_the_sampling_floor_for_a_true_gp_and_far_above_it_otherwise(tmp_path):
    write_gp_runs(tmp_path, {64: 1.0, 128: 1.5})
    assert aggregate.ensure_aggregates(tmp_path) is True
    gp = aggregate.load(tmp_path, "gp_init").set_index("width")
    exact, scaled = gp.loc[64], gp.loc[128]
    assert exact.seeds == 40 and exact.outputs == 10
    assert 0.5 * exact.nngp_cov_rel_err_floor < exact.nngp_cov_rel_err < 1.6 * exact.nngp_cov_rel_err_floor
    assert exact.ks_stat < 3 * exact.ks_stat_floor
    # 1.5 x the GP: covariance 2.25 K, relative error ~1.25, marginals N(0, 2.25).
    assert scaled.nngp_cov_rel_err == pytest.approx(1.25, abs=0.25)
    assert scaled.ks_stat > 5 * scaled.ks_stat_floor
    assert list(exact.seeds_by_count) == seed_counts(40) == [2, 4, 8, 16, 32, 40]
    errs, floors = np.array(exact.nngp_cov_rel_err_by_seeds), np.array(exact.nngp_cov_rel_err_floor_by_seeds)
    assert floors[-1] == pytest.approx(exact.nngp_cov_rel_err_floor) and np.all(np.diff(floors) < 0)
    assert errs[-1] == pytest.approx(exact.nngp_cov_rel_err) and errs[0] > errs[-1]


def test_gp_init_is_recomputed_only_when_the_runs_change(tmp_path):
    write_gp_runs(tmp_path, {64: 1.0}, seeds=4)
    assert aggregate.ensure_aggregates(tmp_path) is True
    path = aggregate.aggregate_path(tmp_path, "gp_init")
    stamp = path.stat().st_mtime_ns
    assert aggregate.ensure_aggregates(tmp_path) is False and path.stat().st_mtime_ns == stamp
    time.sleep(0.01)
    write_gp_runs(tmp_path, {128: 1.0}, seeds=4)
    assert aggregate.is_stale(tmp_path) and aggregate.ensure_aggregates(tmp_path) is True
    assert query.query(tmp_path, "SELECT width FROM gp_init ORDER BY width").width.tolist() == [64, 128]
    # A stored gp_init whose fingerprint is older than the runs makes the aggregates stale on its own.
    table = pq.read_table(path)
    write_parquet_atomic(table.replace_schema_metadata({aggregate.FINGERPRINT_KEY: b"old"}), path)
    assert aggregate.is_stale(tmp_path)


def test_a_group_without_its_stored_nngp_is_skipped_and_named(tmp_path):
    write_gp_runs(tmp_path, {64: 1.0}, seeds=3)
    # Outputs recorded for MNIST runs whose limits task never stored the NNGP of their test points (results
    # written by an earlier version): gp_init cannot compare them, and says so instead of loading data.
    rows = [dict(r) for r in ResultsStore(tmp_path).table("runs").to_pylist()]
    mnist = [RunResult(_config(64, r["seed"], data_dir=str(tmp_path / "nowhere")).model_copy(
        update={"dataset": "mnist"}), metrics=_metrics(64), f0_test=np.zeros((20, 10), np.float32)) for r in rows]
    ResultsStore(tmp_path).write_pack(mnist)
    aggregate.ensure_aggregates(tmp_path)
    md = build_report(tmp_path).read_text()
    gp = aggregate.load(tmp_path, "gp_init", refresh=False)
    assert gp.dataset.tolist() == ["digits"]
    assert "the analytic NNGP of its test points is not in the results" in md and "![gp at init](gp_init_g1.png)" in md


# ----------------------------------------------------------------------------------------------
# The interpolation threshold


def test_threshold_width_of_known_architectures():
    # jobs/double_descent.yaml: one hidden layer, n_train 500, K 10: width 10 * 499 / (784 + 1 + 10) ~ 6.28.
    assert threshold_width(500, 784, 1, 10) == pytest.approx(10 * 499 / 795)
    assert threshold_width(500, 3072, 1, 10) == pytest.approx(10 * 499 / 3083)
    for n, d, depth, k in ((500, 784, 1, 10), (1000, 64, 2, 10), (200, 3072, 3, 1)):
        w = threshold_width(n, d, depth, k)
        assert num_params(d, w, depth, k) == pytest.approx(n * k)  # the planner's count, tested against MLP
    assert threshold_width(100, 64, 0, 10) is None  # no width to vary
    assert threshold_width(1, 64, 1, 10) is None  # the readout bias alone has n * K parameters


# ----------------------------------------------------------------------------------------------
# Older results: every new section skipped with a note


def write_old_style(out: Path, widths=(64, 128, 256), seeds=2) -> None:
    """Runs parts as written before the spectrum columns, the spectral and the outputs tables existed."""
    store = ResultsStore(out)
    for w in widths:
        pack = [RunResult(_config(w, s, label_noise=0.0), metrics=_metrics(w)) for s in range(seeds)]
        rows = [{k: v for k, v in r.row().items() if k not in NEW_COLUMNS + ("weight_distance", "dataset")}
                for r in pack]
        table = pa.Table.from_pylist(rows)
        table = table.set_column(table.schema.get_field_index("classes"), "classes",
                                 pa.array([None] * len(rows), pa.list_(pa.int64())))
        write_parquet_atomic(table, store.part_path("runs", "digits", pack_id(r.run_id for r in pack)))


def test_old_results_get_every_new_section_skipped_with_a_note(tmp_path):
    write_old_style(tmp_path)
    md = build_report(tmp_path).read_text()
    report = tmp_path / "report"
    assert_real_image(report / "deviations.png")
    for name in NEW_PLOTS:
        assert not (report / name).exists()
    for section, why in (("Spectrum and convergence", "no `ntk_eig_*`"), ("Spectral bias", "no spectral table"),
                         ("Gaussian process at initialisation", "no width has two seeds with stored outputs"),
                         ("Double descent in width", "do not straddle the interpolation threshold")):
        body = md.split(f"### {section}\n\n")[1].split("\n")[0]
        assert body.startswith("_Skipped: ") and why in body, (section, body)
    gp = query.query(tmp_path, "SELECT * FROM gp_init")
    assert gp.empty and {"width", "nngp_cov_rel_err", "ks_stat"} <= set(gp.columns)


def test_a_section_that_fails_is_skipped_not_the_report(tmp_path, monkeypatch):
    import pipeline.report.phenomena as phenomena

    write_gp_runs(tmp_path, {64: 1.0, 128: 1.0}, seeds=3)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(phenomena, "plot_gp_init", broken)
    md = build_report(tmp_path).read_text()
    assert "_Skipped: failed: RuntimeError: boom._" in md
    assert_real_image(tmp_path / "report" / "deviations.png")
