"""Queries and the report: DuckDB views over a results directory, the ``query`` and ``report``
commands, and every plot a real (tiny) sweep produces decoded as a non-blank image."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import pipeline.query
from pipeline import query
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.measures import log_steps
from pipeline.report import build_report
from pipeline.results import SCALAR_METRICS, RunResult
from pipeline.run_config import RunConfig
from pipeline.store import ResultsStore

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny_report",
    "datasets": [{"name": "digits", "n_train": [40], "n_test": 30}],
    "architectures": [{"depth": [2], "activation": "relu"}],
    "widths": [16, 32],
    "seeds": 2,
    "optimizer": {"name": "gd", "lr_scale": 0.5, "steps": 20},
    "kernels": {"store": "init+final"},
    "resources": {"num_cpus": 1},
}
PLOTS = ("deviations.png", "accuracy.png", "curves.png", "ntk_heatmap.png")


@pytest.fixture(scope="module")
def sweep_results(tmp_path_factory) -> Path:
    """A real sweep, laid out as the runner writes it (each pack trained in this process, without Ray: the
    sweep on Ray is tested in test_sweep): digits, widths 16 and 32, 2 seeds, 20 steps, Grams stored."""
    from conftest import write_results_without_ray

    return write_results_without_ray(tmp_path_factory.mktemp("sweep") / "results", TINY)


def write_synthetic(out: Path, widths=(64, 128, 256), seeds=3, curves=False) -> None:
    """Runs with ``kernel_rel_dev_init = width**-0.5`` (times seed noise) and no Grams."""
    rng = np.random.default_rng(0)
    store = ResultsStore(out)
    for w in widths:
        pack = []
        for s in range(seeds):
            m = {k: math.nan for k in SCALAR_METRICS}
            m.update(kernel_rel_dev_init=w**-0.5 * math.exp(0.1 * rng.normal()), test_acc=0.8, lin_test_acc=0.8,
                     agree_nn_lin_test=0.9)
            steps = log_steps(10, 5)
            c = {"step": steps, **{k: [1.0 / (1 + t) for t in steps] for k in ("train_loss", "lin_train_loss")}}
            cfg = RunConfig(dataset="digits", n_train=20, n_test=20, width=w, seed=s, steps=10, device="cpu")
            pack.append(RunResult(cfg, metrics=m, curves=c if curves else {}))
        store.write_pack(pack)


def exponent_row(md: str, measure: str, tail: str) -> tuple[float, float, float, float]:
    """(exponent, CI low, CI high, R²) of the one row of ``measure`` in report.md's exponent table, whose
    last cells (widths, runs used, expected) must read ``tail``."""
    number = r"(-?\d+\.\d{3})"
    pattern = rf"\| `{measure}` \| {number} \| \[{number}, {number}\] \| (\d\.\d\d) \| {re.escape(tail)} \|"
    rows = [m for line in md.splitlines() if (m := re.fullmatch(pattern, line))]
    assert len(rows) == 1, [line for line in md.splitlines() if f"`{measure}`" in line]
    return tuple(float(v) for v in rows[0].groups())


def assert_real_image(path: Path) -> None:
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, image.shape
    assert float(image[..., :3].var()) > 1e-3, f"{path.name} looks blank"


# ----------------------------------------------------------------------------------------------
# The report


def test_report_writes_every_plot_as_a_real_image(sweep_results, tmp_path, capsys):
    assert main(["report", str(sweep_results), "--out", str(tmp_path / "rep")]) == 0
    assert "report.md" in capsys.readouterr().out
    md = (tmp_path / "rep" / "report.md").read_text()
    for name in PLOTS:
        assert_real_image(tmp_path / "rep" / name)
        assert f"]({name})" in md
    # The exponent table: the fit of scaling.parquet, its 95% CI around it, the widths, the runs used, the
    # expectation of Lee et al. (one group: no group column).
    exp, lo, hi, r2 = exponent_row(md, "kernel_rel_dev_init", "16–32 (2) | 4 | -1/2")
    fit = query.query(sweep_results, "SELECT exponent, ci_low, ci_high, r2 FROM scaling "
                                     "WHERE measure = 'kernel_rel_dev_init'").iloc[0]
    assert (exp, lo, hi, r2) == pytest.approx((fit.exponent, fit.ci_low, fit.ci_high, fit.r2), abs=0.0051)
    assert lo < exp < hi and 0 <= r2 <= 1


def test_report_without_grams_or_curves_says_what_it_skipped(tmp_path):
    write_synthetic(tmp_path)
    path = build_report(tmp_path)  # default folder: RESULTS/report
    assert path == tmp_path / "report" / "report.md"
    md = path.read_text()
    assert_real_image(tmp_path / "report" / "deviations.png")
    assert_real_image(tmp_path / "report" / "accuracy.png")
    assert not (tmp_path / "report" / "ntk_heatmap.png").exists()
    assert "No run stored its empirical NTK Gram" in md and "no training-curve plot" in md
    # kernel_rel_dev_init = width^-1/2 times seed noise: the fitted exponent is near -1/2, its CI holds -1/2.
    exp, lo, hi, _ = exponent_row(md, "kernel_rel_dev_init", "64–256 (3) | 9 | -1/2")
    assert -0.6 < exp < -0.4 and lo < -0.5 < hi


def test_run_config_is_rebuilt_from_a_runs_row(sweep_results):
    rows = ds.dataset(sweep_results / "runs", format="parquet", partitioning="hive").to_table().to_pylist()
    for row in rows:
        assert RunConfig.from_row(row).run_id == row["run_id"]


# ----------------------------------------------------------------------------------------------
# Queries


def test_query_returns_the_expected_rows(sweep_results):
    runs = query.query(sweep_results, "SELECT dataset, width, seed, status FROM runs ORDER BY width, seed")
    assert runs.to_dict("records") == [
        {"dataset": "digits", "width": w, "seed": s, "status": "ok"} for w in (16, 32) for s in (0, 1)]
    per_run = query.query(sweep_results, "SELECT run_id, count(*) AS n FROM curves GROUP BY run_id")
    assert len(per_run) == 4 and set(per_run.n) == {len(log_steps(20, 24))}
    bw = query.query(sweep_results, "SELECT width, mean, count, ci_low, ci_high FROM by_width "
                                    "WHERE measure = 'kernel_rel_dev_init' ORDER BY width")
    assert bw.width.tolist() == [16, 32] and bw["count"].tolist() == [2, 2]
    assert (bw.ci_low < bw["mean"]).all() and (bw["mean"] < bw.ci_high).all()
    sc = query.query(sweep_results, "SELECT * FROM scaling WHERE measure = 'kernel_rel_dev_init'")
    assert len(sc) == 1 and sc.exponent.iloc[0] < 0 and sc.width_min.iloc[0] == 16
    # The same numbers straight from the Parquet files.
    direct = pd.read_parquet(sweep_results / "aggregates" / "by_width.parquet")
    assert np.allclose(direct.query("measure == 'kernel_rel_dev_init'").sort_values("width")["mean"], bw["mean"])


def test_the_module_is_callable_as_pipeline_query(tmp_path):
    write_synthetic(tmp_path)
    assert callable(pipeline.query) and pipeline.query is query
    df = pipeline.query(tmp_path, "SELECT count(*) AS n FROM runs")
    assert df.n.tolist() == [9]


def test_query_recomputes_stale_aggregates(tmp_path):
    write_synthetic(tmp_path, widths=(64, 128))
    assert query.query(tmp_path, "SELECT DISTINCT width FROM by_width ORDER BY 1").width.tolist() == [64, 128]
    write_synthetic(tmp_path, widths=(256,))
    assert query.query(tmp_path, "SELECT DISTINCT width FROM by_width ORDER BY 1").width.tolist() == [64, 128, 256]


def test_query_cli_output_formats(tmp_path, capsys):
    write_synthetic(tmp_path)
    sql = "SELECT width, measure, mean FROM by_width WHERE measure = 'kernel_rel_dev_init' ORDER BY width"
    assert main(["query", str(tmp_path), sql]) == 0
    text = capsys.readouterr().out
    assert "kernel_rel_dev_init" in text and "(3 rows)" in text
    expected = query.query(tmp_path, sql)
    for fmt in ("csv", "json", "parquet"):
        out = tmp_path / f"out.{fmt}"
        assert main(["query", str(tmp_path), sql, "--format", fmt, "--output", str(out)]) == 0
        got = {"csv": pd.read_csv, "parquet": pd.read_parquet, "json": lambda p: pd.DataFrame(json.loads(p.read_text()))
               }[fmt](out)
        pd.testing.assert_frame_equal(got.reset_index(drop=True), expected, check_dtype=False)
    assert main(["query", str(tmp_path), sql, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("width,measure,mean\n")


@pytest.mark.parametrize("sql, message", [
    ("SELECT * FROM curves", "no table 'curves'"),
    ("SELECT * FROM spectral", "no table 'spectral'"),
    ("SELEC 1", "SQL error: Parser Error"),
    ("SELECT nonexistent_column FROM runs", "SQL error: Binder Error"),
])
def test_query_errors_exit_2_with_one_line(tmp_path, capsys, sql, message):
    write_synthetic(tmp_path)  # no curves stored
    assert main(["query", str(tmp_path), sql]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(UserError, match=message.split(":")[0]):
        query.query(tmp_path, sql)


def test_query_of_a_missing_directory_and_parquet_without_output(tmp_path, capsys):
    assert main(["query", str(tmp_path / "nope"), "SELECT 1"]) == 2
    assert "not a results directory" in capsys.readouterr().err
    write_synthetic(tmp_path, widths=(64, 128), seeds=2)
    assert main(["query", str(tmp_path), "SELECT 1", "--format", "parquet"]) == 2
    assert "--output" in capsys.readouterr().err


def test_tables_are_plain_parquet_for_pyarrow_and_pandas(tmp_path):
    write_synthetic(tmp_path, widths=(64, 128), seeds=2, curves=True)
    query.query(tmp_path, "SELECT * FROM scaling")  # computes the aggregates
    runs = ds.dataset(tmp_path / "runs", format="parquet", partitioning="hive").to_table()
    assert runs.num_rows == 4 and set(runs.column("dataset").to_pylist()) == {"digits"}
    curves = pd.read_parquet(tmp_path / "curves")
    assert len(curves) == 4 * len(log_steps(10, 5))
    assert pq.read_table(tmp_path / "aggregates" / "scaling.parquet").num_rows >= 1


def test_cli_help_stays_light():
    """``ntk-sweep --help`` builds the parser without importing duckdb, matplotlib or pandas."""
    code = ("import sys; from pipeline.cli import build_parser; build_parser(); "
            "print(','.join(m for m in ('duckdb', 'matplotlib', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
