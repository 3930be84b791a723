"""``ntk-sweep report RESULTS [--out DIR]``: plots of a width sweep and ``report.md`` embedding them.

Per group of runs (one setting of everything but seed and width, see :mod:`pipeline.aggregate`):

* ``deviations*.png``: every deviation from the kernel limit against width, log-log: the seeds
  (faint), their mean with its 95% CI, the fitted power law with its exponent and 95% CI (t over
  seeds) in the legend, and the ``n^-1/2`` and ``n^-1`` reference slopes through the fit's first point; a last
  panel holds the relative weight change of each layer;
* ``accuracy*.png``: test accuracy of the network, its linearisation, and analytic NTK and NNGP
  kernel regression, against width;
* ``curves*.png``: training and test loss and accuracy of the network and its linearisation over
  the training steps, for the smallest and the largest width;
* a "Spectrum and convergence" table (report.md): per width, the mean over seeds of the smallest and
  largest eigenvalue and the condition number of the empirical NTK at init and after training and
  of the analytic NTK on the training points, and the train-loss ratio ``L_T/L_0`` predicted from the
  analytic NTK's eigen-decomposition beside the observed one;
* ``spectral_bias*.png``: the training residual's energy per eigen-band of the analytic NTK over the
  steps (as a fraction of its value at step 0), network / linearised / theory, smallest and largest
  width (the ``spectral`` table);
* ``gp_init*.png`` and a table: the outputs at init over seeds against the NNGP, relative covariance
  error with its sampling floor, KS statistic, error vs seed count (``aggregates/gp_init.parquet``);
* ``double_descent*.png``, for a group with label noise or widths around the interpolation threshold
  ``P = n_train * K`` (P: parameters): train/test loss and accuracy vs width, the analytic NTK and
  NNGP regression limits, the threshold marked.

Each section is skipped with a one-line note in report.md when its table or columns are missing
(e.g. results written by an older version).

Per set of groups that differ only in ``parameterization`` (e.g. ``jobs/regimes.yaml``, NTK beside μP):
``regimes.png``, the deviations against width coloured by parameterisation, and a table of the fitted
exponents side by side with each parameterisation's expected ones.

Once: ``ntk_heatmap.png``: the analytic NTK Gram and ``|Theta_hat_0 - Theta|`` for one seed at the
smallest and the largest width, points sorted by class (needs a stored empirical Gram, i.e. a job
with ``kernels: store: init`` or ``init+final``; skipped with a note otherwise).

The package: this module runs the report; :mod:`~pipeline.report.groups` splits the runs into groups,
:mod:`~pipeline.report.plots`, :mod:`~pipeline.report.phenomena_plots` (on :mod:`~pipeline.report.axes`)
draw the figures, :mod:`~pipeline.report.phenomena` decides the NTK-phenomena sections,
:mod:`~pipeline.report.threshold` places the interpolation threshold, :mod:`~pipeline.report.tables` and
:mod:`~pipeline.report.markdown` write report.md with the prose of ``report.md.tmpl``
(:mod:`~pipeline.report.prose`). The report reads ``RESULTS/`` only, through :mod:`pipeline.store` and the
aggregates.

Keep this package light: ``ntk-sweep --help`` imports it; matplotlib, pandas etc. load inside functions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.atomic import atomic_file
from pipeline.errors import UserError
from pipeline.report.groups import Group, make_groups, regime_clusters
from pipeline.report.markdown import report_markdown
from pipeline.report.phenomena import draw_phenomena
from pipeline.report.plots import plot_accuracy, plot_curves, plot_deviations, plot_heatmap, plot_regimes
from pipeline.report.threshold import threshold_width

__all__ = ["Group", "add_arguments", "build_report", "main", "regime_clusters", "threshold_width"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Aggregate a results directory (if the runs changed) and draw its report: PNGs + report.md."
    parser.add_argument("results", help="results directory (as given to ntk-sweep run --out)")
    parser.add_argument("--out", default=None, help="folder for the PNGs and report.md (default: RESULTS/report)")
    parser.add_argument("--max-groups", type=int, default=8,
                        help="draw the figures of at most this many groups (default 8); the table lists all")


def main(args: argparse.Namespace) -> int:
    path = build_report(args.results, args.out, max_groups=args.max_groups)
    print(f"report: {path}")
    return 0


def build_report(results: str | Path, out: str | Path | None = None, *, max_groups: int = 8) -> Path:
    """Aggregate ``results`` if stale, draw every plot into ``out`` (default ``RESULTS/report``) and
    write ``report.md`` there. Returns the path of ``report.md``. A read-only ``results`` works with
    another ``out``: the aggregates are then computed in memory."""
    from pipeline import aggregate
    from pipeline.gp_init import skipped_groups
    from pipeline.groups import split_runs
    from pipeline.store import CURVES, RUNS, SPECTRAL, ResultsStore

    root = Path(results)
    if not root.is_dir():
        raise UserError(f"{root}: not a results directory")
    # Up to date; computed in memory only when the results directory is read-only.
    tables = aggregate.tables(root)
    out = Path(out) if out is not None else root / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot write the report ({exc.strerror or exc}); give a writable --out") \
            from None
    by_width = tables[aggregate.BY_WIDTH].to_pandas()
    scaling = tables[aggregate.SCALING].to_pandas()
    store = ResultsStore(root)
    runs_table = store.table(RUNS)
    runs = split_runs(runs_table)
    curves, spectral = store.table(CURVES), store.table(SPECTRAL)
    gp, gp_skipped = None, {}
    if aggregate.GP_INIT in tables:
        gp_table = tables[aggregate.GP_INIT]
        gp, gp_skipped = gp_table.to_pandas(), skipped_groups(gp_table)
    groups = make_groups(runs)
    notes: list[str] = []
    if len(groups) > max_groups:
        notes.append(f"{len(groups)} groups: figures drawn for the first {max_groups} only (--max-groups); "
                     "the exponent table lists all.")

    for g in groups[:max_groups]:
        bw = by_width[by_width["group_id"] == g.group_id]
        sc = scaling[scaling["group_id"] == g.group_id]
        sel = (runs.gid == g.index) & (runs.status == "ok")
        name = f"deviations{g.suffix}.png"
        if plot_deviations(bw, sc, runs, sel, g, out / name):
            g.figures["deviations"] = name
        name = f"accuracy{g.suffix}.png"
        if plot_accuracy(bw, g, out / name):
            g.figures["accuracy"] = name
        name = f"curves{g.suffix}.png"
        reason = plot_curves(curves, runs_table, runs, sel, g, out / name)
        if reason is None:
            g.figures["curves"] = name
        else:
            notes.append(f"{g.label}: no training-curve plot ({reason}).")
        draw_phenomena(g, bw, runs_table, runs, sel, spectral, gp, gp_skipped, out)

    regimes = []
    for i, cluster in enumerate(regime_clusters(groups)):
        name = "regimes.png" if i == 0 else f"regimes_{i + 1}.png"
        if plot_regimes(by_width, scaling, runs, cluster, out / name):
            regimes.append((cluster, name))
    heatmap, heatmap_note = plot_heatmap(root, runs_table, runs, groups, out / "ntk_heatmap.png")
    md = report_markdown(root, runs, groups[:max_groups], groups, scaling, by_width, regimes, heatmap, heatmap_note,
                         notes)
    path = out / "report.md"
    with atomic_file(path, "w") as fh:
        fh.write(md)
    return path
