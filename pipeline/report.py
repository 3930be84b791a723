"""``ntk-sweep report RESULTS [--out DIR]``: plots of a width sweep and ``report.md`` embedding them.

Per group of runs (one setting of everything but seed and width, see :mod:`pipeline.aggregate`):

* ``deviations*.png``: every deviation from the kernel limit against width, log-log: the seeds
  (faint), their mean with its 95% CI, the fitted power law with its exponent and bootstrap CI in
  the legend, and the ``n^-1/2`` and ``n^-1`` reference slopes through the fit's first point; a last
  panel holds the relative weight change of each layer;
* ``accuracy*.png``: test accuracy of the network, its linearisation, and analytic NTK and NNGP
  kernel regression, against width;
* ``curves*.png``: training and test loss and accuracy of the network and its linearisation over
  the training steps, for the smallest and the largest width.

Once: ``ntk_heatmap.png``: the analytic NTK Gram and ``|Theta_hat_0 - Theta|`` for one seed at the
smallest and the largest width, points sorted by class (needs a stored empirical Gram, i.e. a job
with ``kernels: store: init`` or ``init+final``; skipped with a note otherwise).

Keep this module light: ``ntk-sweep --help`` imports it; matplotlib, pandas etc. load inside functions.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_HEATMAP_POINTS = 1200  # larger Grams are shown on an even subsample of the points
ALWAYS_IN_LABEL = ("dataset", "n_train", "depth", "activation")

LABELS = {
    "kernel_rel_dev_init": r"$\|\hat\Theta_0-\Theta\|_F\,/\,\|\Theta\|_F$",
    "kernel_rel_change": r"$\|\hat\Theta_T-\hat\Theta_0\|_F\,/\,\|\hat\Theta_0\|_F$",
    "weight_rel_change": r"$\|\theta_T-\theta_0\|\,/\,\|\theta_0\|$",
    "rmse_nn_lin_test": r"RMSE$(f, f^{\rm lin})$ on test points",
    "disagree_nn_lin_test": r"$1 -$ agreement$(f, f^{\rm lin})$ on test points",
    "rmse_nn_ntk_test": r"RMSE$(f, f^{\rm NTK})$ on test points",
    "relu_flip_frac": "fraction of ReLU sign flips (train points)",
}
ACCURACY = (
    ("test_acc", "network", "-", "o"),
    ("lin_test_acc", "linearised network", "--", "s"),
    ("ntk_test_acc", "analytic NTK regression ($t=\\infty$)", "-.", "^"),
    ("nngp_test_acc", "analytic NNGP regression ($t=\\infty$)", ":", "v"),
)


@dataclass
class Group:
    """One group of runs: its settings, a label, and what the report wrote for it."""

    index: int
    group_id: str
    settings: dict[str, Any]
    label: str
    suffix: str
    figures: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Entry points


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
    write ``report.md`` there. Returns the path of ``report.md``."""
    import pyarrow.parquet as pq

    from pipeline import aggregate
    from pipeline.errors import UserError

    root = Path(results)
    if not root.is_dir():
        raise UserError(f"{root}: not a results directory")
    aggregate.ensure_aggregates(root)
    out = Path(out) if out is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    by_width = pq.read_table(aggregate.aggregate_path(root, aggregate.BY_WIDTH)).to_pandas()
    scaling = pq.read_table(aggregate.aggregate_path(root, aggregate.SCALING)).to_pandas()
    runs_table = aggregate.read_table(root, "runs")
    runs = aggregate.split_runs(runs_table)
    curves = aggregate.read_table(root, "curves")
    groups = _groups(runs)
    notes: list[str] = []
    if len(groups) > max_groups:
        notes.append(f"{len(groups)} groups: figures drawn for the first {max_groups} only (--max-groups); "
                     "the exponent table lists all.")

    for g in groups[:max_groups]:
        bw = by_width[by_width["group_id"] == g.group_id]
        sc = scaling[scaling["group_id"] == g.group_id]
        sel = (runs.gid == g.index) & (runs.status == "ok")
        name = f"deviations{g.suffix}.png"
        if _plot_deviations(bw, sc, runs, sel, g, out / name):
            g.figures["deviations"] = name
        name = f"accuracy{g.suffix}.png"
        if _plot_accuracy(bw, g, out / name):
            g.figures["accuracy"] = name
        name = f"curves{g.suffix}.png"
        reason = _plot_curves(curves, runs_table, runs, sel, g, out / name)
        if reason is None:
            g.figures["curves"] = name
        else:
            notes.append(f"{g.label}: no training-curve plot ({reason}).")

    heatmap, heatmap_note = _plot_heatmap(root, runs_table, runs, groups, out / "ntk_heatmap.png")
    md = _markdown(root, runs, groups[:max_groups], groups, scaling, by_width, heatmap, heatmap_note, notes)
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text(md)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------
# Groups


def _groups(runs) -> list[Group]:
    settings = runs.groups.to_pylist()
    varying = [c for c in runs.groups.column_names
               if c not in ALWAYS_IN_LABEL and len({repr(s[c]) for s in settings}) > 1]
    groups = []
    for i, s in enumerate(settings):
        parts = [str(s.get("dataset", "?"))]
        parts += [f"{c}={_fmt_value(s[c])}" for c in ("n_train", "depth") if c in s]
        parts += [str(s["activation"])] if "activation" in s else []
        parts += [f"{c}={_fmt_value(s[c])}" for c in varying]
        suffix = "" if len(settings) == 1 else f"_g{i + 1}"
        groups.append(Group(i, runs.group_ids[i], s, ", ".join(parts), suffix))
    return groups


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def _is_ntk_param(g: Group) -> bool:
    return g.settings.get("parameterization", "ntk") == "ntk"


# ----------------------------------------------------------------------------------------------
# Plots


def _figure(width: float, height: float):
    """A figure outside pyplot: no global backend or state is touched (a notebook's backend stays),
    nothing to close, and ``savefig`` to PNG renders with Agg."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _fit_label(fit) -> str:
    text = f"fit: $n^{{{fit['exponent']:.2f}}}$"
    if math.isfinite(fit["ci_low"]):
        text += f"  [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]"
    if math.isfinite(fit["r2"]):
        text += f", $R^2$={fit['r2']:.2f}"
    return text


def _draw_measure(ax, bw, fit, runs, sel, measure: str, color: str, label: str | None,
                  references: bool) -> tuple[str, list, list]:
    """Seeds, means with CI bars and the fit of one measure on log-log axes. Returns a note about
    dropped points ('' if none), the y values that must be visible, and the CI ends (shown if near)."""
    import numpy as np

    values = runs.measures[measure][sel]
    widths = runs.width[sel]
    keep = np.isfinite(values) & (values > 0)
    ax.scatter(widths[keep], values[keep], s=10, color=color, alpha=0.3, linewidths=0, zorder=2)
    rows = bw[(bw["measure"] == measure) & (bw["count"] > 0)].sort_values("width")
    pos = rows[rows["mean"] > 0]
    mean = pos["mean"].to_numpy()
    lo = np.where(np.isfinite(pos["ci_low"]), mean - pos["ci_low"].to_numpy(), 0.0)
    hi = np.where(np.isfinite(pos["ci_high"]), pos["ci_high"].to_numpy() - mean, 0.0)
    # A lower CI end at or below zero cannot be drawn on a log axis: stop the bar just above zero.
    lo = np.minimum(lo, mean * 0.999)
    no_fit = fit is None or not math.isfinite(fit["exponent"])
    if no_fit:
        why = fit["note"] if fit is not None and fit["note"] else "not fitted"
        label = f"{label}: no fit ({why})" if label else f"mean, 95% CI; no fit ({why})"
    ax.errorbar(pos["width"], mean, yerr=[lo, hi], fmt="o", ms=5, color=color, capsize=3, zorder=3,
                label=label if no_fit else None)
    note = ""
    visible, soft = [values[keep], mean], [pos["ci_low"].to_numpy(), pos["ci_high"].to_numpy()]
    dropped = int((np.isfinite(values) & (values <= 0)).sum())
    if dropped:
        note = f"{dropped} zero value(s) not shown"
    if fit is not None and math.isfinite(fit["exponent"]):
        w = np.geomspace(fit["width_min"], fit["width_max"], 50)
        y = fit["prefactor"] * w ** fit["exponent"]
        fit_label = _fit_label(fit) if label is None else f"{label}: fit $n^{{{fit['exponent']:.2f}}}$"
        ax.plot(w, y, "-", color=color, lw=1.8, zorder=4, label=fit_label)
        visible.append(y)
        if references:
            w0, y0 = w[0], y[0]
            ax.plot(w, y0 * (w / w0) ** -0.5, "--", color="0.45", lw=1.1, zorder=1, label=r"$\propto n^{-1/2}$")
            ax.plot(w, y0 * (w / w0) ** -1.0, ":", color="0.3", lw=1.3, zorder=1, label=r"$\propto n^{-1}$")
            visible.append(y0 * (w / w0) ** -1.0)
    return note, visible, soft


def _set_log_ylim(ax, visible: list, soft: list, reach: float = 4.0) -> None:
    """y limits around the data, fits and reference lines; CI ends only when within a factor
    ``reach`` of those (a CI reaching to zero or far above is cut by the axes, not the data squashed)."""
    import numpy as np

    hard = np.concatenate([np.ravel(v) for v in visible]) if visible else np.array([])
    hard = hard[np.isfinite(hard) & (hard > 0)]
    if not hard.size:
        return
    lo, hi = hard.min(), hard.max()
    extra = np.concatenate([np.ravel(v) for v in soft]) if soft else np.array([])
    extra = extra[np.isfinite(extra) & (extra > 0)]
    if extra.size:
        lo = min(lo, extra[extra >= lo / reach].min(initial=lo))
        hi = max(hi, extra[extra <= hi * reach].max(initial=hi))
    ax.set_ylim(lo / 1.3, hi * 1.3)


def _log_axes(ax, widths, log_y: bool = True) -> None:
    """Log width axis ticked at the widths; log y axis ticked at 1, 2, 5 x 10^k, plain numbers."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator

    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(_num_formatter())
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ws = sorted({int(w) for w in widths})
    if ws:
        ax.xaxis.set_major_locator(FixedLocator(ws))
        ax.xaxis.set_major_formatter(_int_formatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        pad = (ws[-1] / ws[0]) ** 0.06 if ws[-1] > ws[0] else 1.5
        ax.set_xlim(ws[0] / pad, ws[-1] * pad)
    ax.grid(True, which="major", alpha=0.25)
    ax.grid(True, which="minor", axis="y", alpha=0.1)


def _int_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{int(round(v))}")


def _num_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v:.0e}".replace("e-0", "e-") if v < 1e-3 or v >= 1e4 else f"{v:g}")


def _plot_deviations(bw, sc, runs, sel, g: Group, path: Path) -> bool:

    from pipeline.aggregate import deviation_measures, expected_exponent

    fits = {r["measure"]: r for r in sc.to_dict("records")}
    measures = [m for m in deviation_measures(list(fits)) if not m.startswith("weight_rel_change_layer")]
    layers = [m for m in deviation_measures(list(fits)) if m.startswith("weight_rel_change_layer")]
    panels = measures + (["layers"] if layers else [])
    if not panels:
        return False
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(4.4 * ncols, 3.9 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    widths = runs.width[sel]
    for ax, panel in zip(axes.flat, panels, strict=False):
        if panel == "layers":
            colors = _colormap("viridis")([i / max(len(layers) - 1, 1) * 0.85 for i in range(len(layers))])
            visible, soft = [], []
            for i, m in enumerate(layers):
                role = "input" if i == 0 else "output" if i == len(layers) - 1 else "hidden"
                expected = expected_exponent(m, len(layers)) if _is_ntk_param(g) else ""
                label = f"layer {i} ({role}{', exp. ' + expected if expected else ''})"
                _, v, c = _draw_measure(ax, bw, fits[m], runs, sel, m, colors[i], label, references=False)
                visible += v
                soft += c
            first = fits[layers[0]]
            if math.isfinite(first["exponent"]):
                import numpy as np

                w = np.geomspace(first["width_min"], first["width_max"], 50)
                top = max(fits[m]["prefactor"] * w[0] ** fits[m]["exponent"] for m in layers
                          if math.isfinite(fits[m]["exponent"]))
                ax.plot(w, top * (w / w[0]) ** -0.5, "--", color="0.45", lw=1.1, label=r"$\propto n^{-1/2}$")
                ax.plot(w, top * (w / w[0]) ** -1.0, ":", color="0.3", lw=1.3, label=r"$\propto n^{-1}$")
                visible.append(top * (w / w[0]) ** -1.0)
            ax.set_title("weight_rel_change_layer<l>", fontsize=10)
            ax.set_ylabel(r"$\|W^{(l)}_T-W^{(l)}_0\|_F\,/\,\|W^{(l)}_0\|_F$")
        else:
            note, visible, soft = _draw_measure(ax, bw, fits[panel], runs, sel, panel, "C0", None, references=True)
            expected = expected_exponent(panel) if _is_ntk_param(g) else ""
            title = panel + (f"   (expected {expected})" if expected else "")
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(LABELS.get(panel, panel))
            if note:
                ax.text(0.02, 0.02, note, transform=ax.transAxes, fontsize=7.5, color="0.35", va="bottom")
        _log_axes(ax, widths)
        _set_log_ylim(ax, visible, soft)
        ax.set_xlabel("width $n$")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"Deviations from the kernel limit vs width: {g.label}\n"
                 "mean over seeds with 95% CI (seeds faint); fit over the seeds, exponent [bootstrap 95% CI]",
                 fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    return True


def _plot_accuracy(bw, g: Group, path: Path) -> bool:
    import numpy as np

    present = [a for a in ACCURACY if ((bw["measure"] == a[0]) & (bw["count"] > 0)).any()]
    if not present:
        return False
    fig = _figure(6.6, 5.2)
    ax = fig.subplots()
    for i, (measure, label, style, marker) in enumerate(present):
        rows = bw[(bw["measure"] == measure) & (bw["count"] > 0)].sort_values("width")
        mean = rows["mean"].to_numpy()
        half = np.nan_to_num(rows["ci_high"].to_numpy() - mean)
        ax.errorbar(rows["width"], mean, yerr=half, fmt=marker, ls=style, color=f"C{i}", ms=5, capsize=3,
                    label=label)
    _log_axes(ax, bw["width"], log_y=False)
    ax.set_xlabel("width $n$")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Test accuracy vs width: {g.label}\nmean over seeds, 95% CI", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    return True


def _plot_curves(curves, runs_table, runs, sel, g: Group, path: Path) -> str | None:
    """Network vs linearised model over training, smallest and largest width. Returns None when
    drawn, else why not."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if curves is None or curves.num_rows == 0:
        return "no curves table"
    if not sel.any():
        return "no ok run"
    widths = sorted({int(w) for w in runs.width[sel]})
    shown = [widths[0]] + ([widths[-1]] if widths[-1] != widths[0] else [])
    run_ids = np.array(runs_table.column("run_id").to_pylist(), dtype=object)
    frame = curves.select([c for c in curves.column_names if c != "dataset"])
    series = {}
    for w in shown:
        ids = run_ids[sel & (runs.width == w)]
        part = frame.filter(pc.is_in(frame.column("run_id"), value_set=pa.array(list(ids), pa.string()))).to_pandas()
        if part.empty:
            continue
        series[w] = (part.drop(columns=["run_id"]).groupby("step").agg(["mean", "min", "max"]), len(ids))
    if not series:
        return "no curve rows for this group's runs"
    fig = _figure(5.6 * len(series), 7.2)
    axes = fig.subplots(2, len(series), squeeze=False, sharex=True)
    lines = (("train", "-"), ("test", "--"))
    models = (("network", "", "C0"), ("linearised", "lin_", "C3"))
    for col, (w, (agg, n_seeds)) in enumerate(series.items()):
        steps = agg.index.to_numpy()
        for row, metric in enumerate(("loss", "acc")):
            ax = axes[row, col]
            for model, prefix, color in models:
                for split, style in lines:
                    name = f"{prefix}{split}_{metric}"
                    if name not in agg.columns.get_level_values(0):
                        continue
                    ax.plot(steps, agg[(name, "mean")], style, color=color, lw=1.6, label=f"{model}, {split}")
                    if n_seeds > 1:
                        ax.fill_between(steps, agg[(name, "min")], agg[(name, "max")], color=color, alpha=0.12,
                                        lw=0)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(0, max(steps.max(), 1))
            if metric == "loss":
                ax.set_yscale("log")
                ax.set_title(f"width {w} ({n_seeds} seed{'s' if n_seeds != 1 else ''}: mean, min–max band)",
                             fontsize=10)
                ax.set_ylabel(r"loss $\frac{1}{2}\,\mathrm{mean}_i\,\|f(x_i)-y_i\|^2$")
            else:
                ax.set_ylabel("accuracy")
                ax.set_xlabel("training step")
            ax.grid(True, alpha=0.25)
            if row == 0 and col == 0:
                ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Network vs linearised model during training: {g.label}", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    return None


def run_config_from_row(row: dict[str, Any]):
    """Rebuild the :class:`RunConfig` of a runs-table row. The row's ``lr`` is the rate used, not the
    configured one: the candidate whose ``run_id`` matches the row's is taken."""
    from pipeline.run_config import RunConfig

    fields = {k: row[k] for k in RunConfig.model_fields if k in row and row[k] is not None}
    if isinstance(fields.get("classes"), list):
        fields["classes"] = tuple(fields["classes"])
    fields.pop("lr", None)
    candidates = [RunConfig(**fields)]
    if fields.get("lr_scale") is None and row.get("lr") is not None and math.isfinite(row["lr"]):
        candidates.append(RunConfig(**fields, lr=row["lr"]))
    for c in candidates:
        if c.run_id == row.get("run_id"):
            return c
    return candidates[0]


def _plot_heatmap(root: Path, runs_table, runs, groups: list[Group], path: Path) -> tuple[bool, str]:
    """Analytic NTK and |Theta_hat_0 - Theta| (smallest and largest width, one seed), sorted by class."""
    import numpy as np

    from pipeline.store import GRAMS

    gram_dir = root / GRAMS / "empirical"
    stored = {p.parent.name for p in gram_dir.glob("*/init")} if gram_dir.is_dir() else set()
    if not stored:
        return False, ("No run stored its empirical NTK Gram (set `kernels: store: init` or `init+final` in the "
                       "job to get the heatmap).")
    rows = runs_table.to_pylist()
    ok = runs.status == "ok"
    for g in groups:
        idx = [i for i in np.flatnonzero((runs.gid == g.index) & ok) if rows[i]["run_id"] in stored]
        if not idx:
            continue
        seed = min(runs.seed[i] for i in idx)
        idx = sorted((i for i in idx if runs.seed[i] == seed), key=lambda i: runs.width[i])
        picked = [idx[0]] + ([idx[-1]] if len(idx) > 1 else [])
        try:
            drawn = _draw_heatmap(root, [rows[i] for i in picked], g, path)
        except Exception as exc:  # noqa: BLE001 - the data may be absent here: say so, draw the rest
            return False, f"Heatmap skipped: could not rebuild the kernels of run {rows[picked[0]]['run_id']} ({exc})."
        return True, drawn
    return False, "No ok run with a stored empirical NTK Gram: heatmap skipped."


def _load_subset(config):
    from pipeline.train import load_subset

    try:
        return load_subset(config)
    except Exception:  # noqa: BLE001 - a data_dir recorded on another machine: try the default root
        if config.data_dir is None:
            raise
        return load_subset(config.model_copy(update={"data_dir": None}))


def _draw_heatmap(root: Path, rows: list[dict], g: Group, path: Path) -> str:
    import dataclasses

    import numpy as np
    from matplotlib.colors import Normalize

    from pipeline.store import ResultsStore
    from pipeline.train import analytic_kernels

    store = ResultsStore(root)
    config = run_config_from_row(rows[0])
    subset = _load_subset(config)
    labels = np.concatenate([subset.labels_train, subset.labels_test])
    n_all = len(labels)
    order = np.argsort(labels, kind="stable")
    if n_all > MAX_HEATMAP_POINTS:
        order = order[np.linspace(0, n_all - 1, MAX_HEATMAP_POINTS).round().astype(int)]
    x_all = np.concatenate([subset.x_train, subset.x_test])[order]
    # The analytic kernel of the shown points only (it depends on the inputs, not on the split).
    shown = dataclasses.replace(subset, x_train=x_all, x_test=x_all[:0])
    theta = analytic_kernels(config, shown)["ntk"]
    diffs = []
    for row in rows:
        emp = store.read_array(f"empirical/{row['run_id']}/init")
        if emp.shape != (n_all, n_all):
            raise ValueError(f"stored Gram has shape {emp.shape}, expected {(n_all, n_all)}")
        emp = emp.astype(np.float64)[np.ix_(order, order)]
        rel = float(np.linalg.norm(emp - theta) / np.linalg.norm(theta))
        diffs.append((int(row["width"]), np.abs(emp - theta), rel))

    sorted_labels = labels[order]
    edges = np.flatnonzero(np.diff(sorted_labels)) + 0.5
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_labels)) + 1, [len(sorted_labels)]])
    centres = (starts[:-1] + starts[1:] - 1) / 2
    class_ids = [subset.classes[int(sorted_labels[s])] for s in starts[:-1]]

    panels = 1 + len(diffs)
    fig = _figure(4.9 * panels + 0.6, 5.2)
    axes = fig.subplots(1, panels, squeeze=False)
    axes = axes[0]
    vmax = max(float(np.percentile(d, 99.5)) for _, d, _ in diffs)
    # A few points of large norm make a few huge diagonal entries: scale the colours to the bulk.
    lo, hi = np.percentile(theta, [0.5, 99.5])
    images = [axes[0].imshow(theta, cmap="viridis", norm=Normalize(lo, hi), interpolation="nearest")]
    axes[0].set_title(r"analytic NTK $\Theta$" + "\n(colours clipped to the 0.5–99.5th percentiles)", fontsize=10)
    for ax, (w, d, rel) in zip(axes[1:], diffs, strict=True):
        images.append(ax.imshow(d, cmap="magma", norm=Normalize(0, vmax), interpolation="nearest"))
        ax.set_title(rf"$|\hat\Theta_0-\Theta|$, width {w}" + "\n" +
                     rf"$\|\hat\Theta_0-\Theta\|_F/\|\Theta\|_F$ = {rel:.3f}", fontsize=10)
    for ax, im in zip(axes, images, strict=True):
        for e in edges:
            ax.axhline(e, color="w", lw=0.5, alpha=0.7)
            ax.axvline(e, color="w", lw=0.5, alpha=0.7)
        ax.set_xticks(centres, [str(c) for c in class_ids], fontsize=7)
        ax.set_yticks(centres, [str(c) for c in class_ids], fontsize=7)
        ax.tick_params(length=0)
        ax.set_xlabel("points, sorted by class (tick: class)", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.85)
    seed = int(rows[0]["seed"])
    note = f"{len(order)} of {n_all} points" if len(order) < n_all else f"all {n_all} points (train and test)"
    fig.suptitle(f"NTK at initialisation vs its infinite-width limit: {g.label}, seed {seed}; {note}; "
                 "the difference panels share one colour scale", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    widths = " and ".join(str(w) for w, _, _ in diffs)
    return (f"Group {g.label}, seed {seed}, width {widths} (run {', '.join(r['run_id'] for r in rows)}); "
            f"{note}.")


# ----------------------------------------------------------------------------------------------
# report.md


def _cell(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def _markdown(root: Path, runs, drawn: list[Group], groups: list[Group], scaling, by_width, heatmap: bool,
              heatmap_note: str, notes: list[str]) -> str:
    from pipeline.aggregate import deviation_measures, expected_exponent

    status = {s: int((runs.status == s).sum()) for s in ("ok", "diverged", "failed")}
    other = len(runs.status) - sum(status.values())
    lines = [
        f"# Width-sweep report: `{root}`",
        "",
        f"{len(runs.status)} runs ({status['ok']} ok, {status['diverged']} diverged, {status['failed']} failed"
        + (f", {other} other" if other else "") + f") in {len(groups)} group(s) "
        "(a group: one setting of every config field but seed and width). Statistics use the ok runs; the "
        "tables behind this report are `aggregates/by_width.parquet` and `aggregates/scaling.parquet` "
        f"(`ntk-sweep query {root} \"SELECT * FROM scaling\"`).",
        "",
        "## Fitted width exponents",
        "",
        "Least squares of log(measure) on log(width) over the individual ok runs; 95% CI: bootstrap over "
        "seeds within each width. Expected: what Lee et al. (2019) report for NTK parameterisation and a "
        "small learning rate. No slope is imposed.",
        "",
    ]
    many = len(groups) > 1
    table = []
    for g in groups:
        sc = scaling[scaling["group_id"] == g.group_id]
        fits = {r["measure"]: r for r in sc.to_dict("records")}
        n_layers = sum(m.startswith("weight_rel_change_layer") for m in fits)
        for m in deviation_measures(list(fits)):
            f = fits[m]
            ci = f"[{_cell(f['ci_low'])}, {_cell(f['ci_high'])}]" if math.isfinite(f["ci_low"]) else "–"
            span = f"{f['width_min']}–{f['width_max']} ({f['n_widths']})" if f["n_widths"] else "–"
            expected = expected_exponent(m, n_layers) if _is_ntk_param(g) else ""
            used = f"{f['n_points']} ({f['n_dropped']})" if f["n_dropped"] else f"{f['n_points']}"
            label = f"`{m}`" + (f" ({f['note']})" if f["note"] and "dropped" not in f["note"] else "")
            table.append((f"| {g.label} " if many else "") + f"| {label} | {_cell(f['exponent'])} | {ci} | "
                         f"{_cell(f['r2'], '{:.2f}')} | {span} | {used} | {expected or '–'} |")
    if table:
        header = "| measure | exponent | 95% CI | R² | widths | runs used (dropped ≤ 0) | expected |"
        rule = "|---|---:|---|---:|---|---:|---|"
        lines += [("| group " if many else "") + header, ("|---" if many else "") + rule, *table]
    else:
        lines.append("No exponent could be fitted: no deviation measure has ok runs.")
    lines.append("")

    for g in drawn:
        lines += [f"## {g.label}", ""]
        bw = by_width[by_width["group_id"] == g.group_id]
        cells = bw.drop_duplicates("width").sort_values("width")
        if len(cells):
            lines += ["| width | runs | ok | diverged | failed |", "|---:|---:|---:|---:|---:|"]
            lines += [f"| {r.width} | {r.n_runs} | {r.n_ok} | {r.n_diverged} | {r.n_failed} |"
                      for r in cells.itertuples()]
            lines.append("")
        if "deviations" in g.figures:
            lines += ["### Deviations from the kernel limit vs width", "",
                      "Mean over seeds with 95% CI, individual seeds faint, the fitted power law (legend: "
                      "exponent and its bootstrap CI), and reference slopes $n^{-1/2}$ (dashed) and $n^{-1}$ "
                      "(dotted) through the fit's first point.", "",
                      f"![deviations]({g.figures['deviations']})", ""]
        if "accuracy" in g.figures:
            lines += ["### Test accuracy vs width", "",
                      "The network and its linearisation after training; analytic NTK and NNGP kernel "
                      "regression (the $t = \\infty$ limit of infinitely wide networks).", "",
                      f"![accuracy]({g.figures['accuracy']})", ""]
        if "curves" in g.figures:
            lines += ["### Training curves: network vs linearised model", "",
                      f"![curves]({g.figures['curves']})", ""]
    lines += ["## NTK Gram at initialisation", ""]
    if heatmap:
        lines += [heatmap_note, "", "![ntk heatmap](ntk_heatmap.png)", ""]
    else:
        lines += [heatmap_note, ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
