"""`gp_seeds`: the init-only GP check of a sweep, end to end on a local Ray. Untrained networks per width
resolve the finite-width bias of E[f f^T] at two hidden layers, and its exponent comes out near -1."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.aggregate import ensure_aggregates
from pipeline.cli import main

JOB = {
    "name": "gptiny",
    "datasets": [{"name": "digits", "n_train": [50], "n_test": 60}],
    "architectures": [{"depth": [2]}],
    "widths": [32, 64, 128],
    "seeds": 2,
    "gp_seeds": 64,
    "optimizer": {"steps": 5},
    "resources": {"num_cpus": 1},
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_gp_seeds_resolves_the_depth_two_bias_and_resumes_without_writing(tmp_path):
    import ray

    ray.shutdown()
    out = tmp_path / "r"
    job = _write(tmp_path, JOB)
    try:
        assert main(["run", str(job), "--out", str(out), "--num-cpus", "2"]) == 0
        parts = sorted((out / "gp_samples").rglob("*.parquet"))
        assert len(parts) == 3  # one per width
        stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        assert main(["run", str(job), "--out", str(out), "--num-cpus", "2"]) == 0
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp  # nothing rewritten
    finally:
        ray.shutdown()
    ensure_aggregates(out)
    gp = pq.read_table(out / "aggregates" / "gp_init.parquet").to_pandas().sort_values("width")
    assert list(gp["width"]) == [32, 64, 128]
    assert set(gp["source"]) == {"gp_seeds"} and set(gp["seeds"]) == {64}
    assert gp["nngp_bias_resolved"].all()
    assert (gp["nngp_bias_rel"] > 2 * gp["nngp_bias_rel_floor"]).all()  # ~3x at 64 networks
    exponent, lo, hi = gp[["nngp_bias_exponent", "nngp_bias_exponent_lo", "nngp_bias_exponent_hi"]].iloc[0]
    assert lo < -1 < hi and abs(exponent + 1) < 0.25 and hi - lo < 0.6, (exponent, lo, hi)
    # The trained seeds alone (2) could not have said anything: their floor is above the bias many times.
    assert (gp["nngp_cov_rel_err_floor"] > 5 * gp["nngp_bias_rel"]).all()


def test_plan_counts_the_gp_tasks():
    from pipeline.plan import format_table, plan_sweep
    from pipeline.spec import parse_sweep

    plan = plan_sweep(parse_sweep({**JOB, "gp_max_width": 64}))
    assert [g.config.width for g in plan.gp] == [32, 64] and all(g.seeds == 64 for g in plan.gp)
    assert plan.totals()["gp_tasks"] == 2 and "gp_seeds: 2 init-only tasks of 64 networks" in format_table(plan)
    assert not plan_sweep(parse_sweep({**JOB, "gp_seeds": 0})).gp


@pytest.mark.parametrize("value", [1, 2, -1, 5000])
def test_gp_seeds_out_of_range_is_one_line_and_writes_nothing(tmp_path, capsys, value):
    out = tmp_path / "r"
    assert main(["run", str(_write(tmp_path, {**JOB, "gp_seeds": value})), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "gp_seeds" in err and len(err.splitlines()) == 1 and not out.exists()


def test_the_stored_nngp_test_block_is_the_float64_analytic_nngp(small_results):
    """gp_init compares outputs at init with the NNGP the limits task stored once per subset (it reloads no
    data): that array is the float64 analytic NNGP of the run's test points."""
    import numpy as np

    from kernels.analytic import mlp_kernels
    from pipeline.data import load_subset
    from pipeline.run_config import RunConfig
    from pipeline.store import RUNS, ResultsStore, nngp_test_path

    store = ResultsStore(small_results)
    rows = store.table(RUNS).to_pylist()
    configs = {nngp_test_path(RunConfig.from_row(r)): RunConfig.from_row(r) for r in rows}
    assert len(configs) == 1  # one subset and architecture: stored once, shared by every width and seed
    (path, config), = configs.items()
    stored = store.read_array(path)
    x_test = load_subset(config).x_test.astype(np.float64)
    expected = mlp_kernels(x_test, **config.kernel_args(), get=("nngp",))["nngp"]
    assert stored.dtype == np.float64 and stored.shape == (config.n_test, config.n_test)
    np.testing.assert_allclose(stored, expected, rtol=1e-12, atol=1e-14)


def test_the_nngp_block_is_skipped_only_where_no_grams_are_stored_and_the_workers_cannot_see_the_results(tmp_path):
    """A worker that does not see the driver's results directory: a job storing no Grams runs on (the block is
    not written, gp_init names the group); a job storing Grams stops, as for the Grams themselves."""
    import numpy as np

    from pipeline.run_config import RunConfig
    from pipeline.store import GramWriter, ResultsNotShared, ResultsStore, nngp_test_path

    store = ResultsStore(tmp_path)
    store.probe_token()
    config = RunConfig(dataset="digits", n_train=8, n_test=6)
    x_test = np.random.default_rng(0).normal(size=(6, 64))
    GramWriter(tmp_path, "none", "not-the-driver's").write_nngp_test(config, x_test)
    assert not (tmp_path / "grams.zarr").exists()
    with pytest.raises(ResultsNotShared):
        GramWriter(tmp_path, "init", "not-the-driver's").write_nngp_test(config, x_test)
    GramWriter(tmp_path, "none", store.probe_token()).write_nngp_test(config, x_test)
    assert store.read_array(nngp_test_path(config)).shape == (6, 6)
