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
    "weight_distance": r"$\|\theta_T-\theta_0\|_2$ (absolute)",
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
    tables: dict[str, list[str]] = field(default_factory=dict)  # markdown lines of a section's table
    skipped: dict[str, str] = field(default_factory=dict)  # section -> why it is not shown
    threshold: float | None = None  # interpolation-threshold width, where the double descent is drawn


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
    write ``report.md`` there. Returns the path of ``report.md``. A read-only ``results`` works with
    another ``out``: the aggregates are then computed in memory."""
    from pipeline import aggregate
    from pipeline.errors import UserError

    root = Path(results)
    if not root.is_dir():
        raise UserError(f"{root}: not a results directory")
    # Up to date; computed in memory only when the results directory is read-only.
    tables = aggregate.tables(root)
    out = Path(out) if out is not None else root / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot write the report ({exc.strerror or exc}); give a writable --out") from None
    by_width = tables[aggregate.BY_WIDTH].to_pandas()
    scaling = tables[aggregate.SCALING].to_pandas()
    runs_table = aggregate.read_table(root, "runs")
    runs = aggregate.split_runs(runs_table)
    curves = aggregate.read_table(root, "curves")
    spectral = aggregate.read_table(root, "spectral")
    gp, gp_skipped = None, {}
    if aggregate.GP_INIT in tables:
        from pipeline.gp_init import skipped_groups

        gp_table = tables[aggregate.GP_INIT]
        gp, gp_skipped = gp_table.to_pandas(), skipped_groups(gp_table)
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
        _phenomena(g, bw, runs_table, runs, sel, spectral, gp, gp_skipped, out)

    regimes = []
    for i, cluster in enumerate(regime_clusters(groups)):
        name = "regimes.png" if i == 0 else f"regimes_{i + 1}.png"
        if _plot_regimes(by_width, scaling, runs, cluster, out / name):
            regimes.append((cluster, name))
    heatmap, heatmap_note = _plot_heatmap(root, runs_table, runs, groups, out / "ntk_heatmap.png")
    md = _markdown(root, runs, groups[:max_groups], groups, scaling, by_width, heatmap, heatmap_note, notes)
    md = md.replace(REGIMES_MARK, "\n".join(_regimes_markdown(scaling, regimes)))
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


def _param(g: Group) -> str:
    return str(g.settings.get("parameterization", "ntk"))


# ----------------------------------------------------------------------------------------------
# Regimes: groups that differ only in parameterization, side by side

REGIMES_MARK = "<!-- regimes -->"
PARAM_COLORS = {"ntk": "C0", "standard": "C2", "mup": "C3"}
PARAM_NAMES = {"ntk": "NTK", "standard": "standard", "mup": "μP"}
REGIME_MEASURES = ("kernel_rel_change", "kernel_rel_dev_init", "rmse_nn_lin_test", "relu_flip_frac",
                   "weight_rel_change", "weight_distance")


def regime_clusters(groups: list[Group]) -> list[list[Group]]:
    """Sets of groups whose settings differ only in ``parameterization`` (two or more parameterisations),
    ordered ntk, standard, mup within a set; sets in the order of their first group."""
    clusters: dict[str, list[Group]] = {}
    for g in groups:
        key = repr(sorted((k, repr(v)) for k, v in g.settings.items() if k != "parameterization"))
        clusters.setdefault(key, []).append(g)
    order = list(PARAM_COLORS)
    out = []
    for members in clusters.values():
        if len({_param(g) for g in members}) > 1:
            out.append(sorted(members, key=lambda g: order.index(_param(g)) if _param(g) in order else len(order)))
    return out


def _hidden_layers(fits_by_group: list[dict]) -> list[str]:
    names = set().union(*[set(f) for f in fits_by_group]) if fits_by_group else set()
    layers = sorted((m for m in names if m.startswith("weight_rel_change_layer")), key=lambda m: int(m[23:]))
    return layers


def _panel_grid(panels: int):
    """A figure with ``panels`` log-log panels, at most 4 per row: ``(fig, axes)``, axes ``(rows, cols)``."""
    ncols = min(4, panels)
    nrows = math.ceil(panels / ncols)
    fig = _figure(4.4 * ncols, 3.9 * nrows)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _finish_width_panel(ax, widths, visible, soft) -> None:
    """Log width axis, y limits from the drawn series, the x label and a legend when anything is labelled."""
    _log_axes(ax, widths)
    _set_log_ylim(ax, visible, soft)
    ax.set_xlabel("width $n$")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, loc="best", framealpha=0.85)


def _hide_spare_panels(axes, used: int) -> None:
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)


def _layer_role(i: int, layers: int) -> str:
    """``input``, ``hidden`` or ``output``: what weight matrix ``i`` of ``layers`` is."""
    return "input" if i == 0 else "output" if i == layers - 1 else "hidden"


def _plot_regimes(by_width, scaling, runs, cluster: list[Group], path: Path) -> bool:
    """One panel per measure, one colour per parameterisation: seeds, means with CIs and the fits."""
    from pipeline.aggregate import expected_exponent

    fits = [{r["measure"]: r for r in scaling[scaling["group_id"] == g.group_id].to_dict("records")}
            for g in cluster]
    layers = _hidden_layers(fits)
    panels = [m for m in (*REGIME_MEASURES, *layers) if any(m in f for f in fits)]
    if not panels:
        return False
    fig, axes = _panel_grid(len(panels))
    all_widths = runs.width[sum((runs.gid == g.index) for g in cluster).astype(bool)]
    for ax, m in zip(axes.flat, panels, strict=False):
        visible, soft, expected = [], [], []
        for g, f in zip(cluster, fits, strict=True):
            if m not in f:
                continue
            sel = (runs.gid == g.index) & (runs.status == "ok")
            bw = by_width[by_width["group_id"] == g.group_id]
            p = _param(g)
            _, v, c = _draw_measure(ax, bw, f[m], runs, sel, m, PARAM_COLORS.get(p, "C7"), PARAM_NAMES.get(p, p),
                                    references=False)
            visible += v
            soft += c
            e = expected_exponent(m, len(layers), p)
            if e:
                expected.append(f"{PARAM_NAMES.get(p, p)} {e}")
        if m.startswith("weight_rel_change_layer"):
            i = int(m[23:])
            role = _layer_role(i, len(layers))
            ax.set_ylabel(rf"$\|W^{{({i})}}_T-W^{{({i})}}_0\|_F\,/\,\|W^{{({i})}}_0\|_F$ ({role})")
        else:
            ax.set_ylabel(LABELS.get(m, m))
        ax.set_title(m + (f"\nexpected: {'; '.join(expected)}" if expected else ""), fontsize=9.5)
        _finish_width_panel(ax, all_widths, visible, soft)
    _hide_spare_panels(axes, len(panels))
    label = cluster[0].label.replace(f"parameterization={_param(cluster[0])}", "").strip(", ")
    fig.suptitle(f"Lazy (NTK) and rich (μP) regimes vs width: {label}\n"
                 "mean over seeds with 95% CI (seeds faint); fitted exponent per parameterisation", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    return True


def _regimes_markdown(scaling, regimes: list[tuple[list[Group], str]]) -> list[str]:
    if not regimes:
        return []
    from pipeline.aggregate import expected_exponent

    lines = ["## Regimes: parameterisations side by side", "",
             "Groups that differ only in `parameterization`. NTK: lazy training, the kernel and the weights "
             "freeze as the width grows (Lee et al. 2019); μP (Yang & Hu 2021): the features and the kernel keep "
             "moving by O(1) at every width. Each cell: fitted exponent [95% CI] (expected).", ""]
    for cluster, name in regimes:
        fits = [{r["measure"]: r for r in scaling[scaling["group_id"] == g.group_id].to_dict("records")}
                for g in cluster]
        layers = _hidden_layers(fits)
        params = [_param(g) for g in cluster]
        lines += [f"![regimes]({name})", "",
                  "| measure | " + " | ".join(PARAM_NAMES.get(p, p) for p in params) + " |",
                  "|---|" + "---|" * len(params)]
        for m in (*REGIME_MEASURES, *layers):
            if not any(m in f for f in fits):
                continue
            cells = []
            for p, f in zip(params, fits, strict=True):
                r = f.get(m)
                if r is None or not math.isfinite(r["exponent"]):
                    cells.append("–")
                    continue
                ci = f" [{_cell(r['ci_low'], '{:.2f}')}, {_cell(r['ci_high'], '{:.2f}')}]" \
                    if math.isfinite(r["ci_low"]) else ""
                e = expected_exponent(m, len(layers), p)
                cells.append(f"{_cell(r['exponent'], '{:.2f}')}{ci}" + (f" ({e})" if e else ""))
            lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


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
    fig, axes = _panel_grid(len(panels))
    widths = runs.width[sel]
    for ax, panel in zip(axes.flat, panels, strict=False):
        if panel == "layers":
            colors = _colormap("viridis")([i / max(len(layers) - 1, 1) * 0.85 for i in range(len(layers))])
            visible, soft = [], []
            for i, m in enumerate(layers):
                role = _layer_role(i, len(layers))
                expected = expected_exponent(m, len(layers), _param(g))
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
            expected = expected_exponent(panel, parameterization=_param(g))
            title = panel + (f"   (expected {expected})" if expected else "")
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(LABELS.get(panel, panel))
            if note:
                ax.text(0.02, 0.02, note, transform=ax.transAxes, fontsize=7.5, color="0.35", va="bottom")
        _finish_width_panel(ax, widths, visible, soft)
    _hide_spare_panels(axes, len(panels))
    fig.suptitle(f"Deviations from the kernel limit vs width: {g.label}\n"
                 "mean over seeds with 95% CI (seeds faint); fit over the seeds, exponent [95% CI, t over seeds]",
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


def _draw_heatmap(root: Path, rows: list[dict], g: Group, path: Path) -> str:
    import dataclasses

    import numpy as np
    from matplotlib.colors import Normalize

    from pipeline.gp_init import load_recorded_subset
    from pipeline.store import ResultsStore
    from pipeline.train import analytic_kernels

    store = ResultsStore(root)
    config = run_config_from_row(rows[0])
    subset = load_recorded_subset(config)
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
# The NTK phenomena: spectrum and convergence, spectral bias, GP at init, double descent

SPECTRUM = ("ntk_eig_min", "ntk_eig_max", "ntk_cond")
LOSS_RATIOS = ("train_loss_pred_ratio", "train_loss_obs_ratio")
INPUT_DIM = {"mnist": 784, "fashion_mnist": 784, "cifar10": 3072, "digits": 64}  # flattened input size d
SPECTRAL_FLOOR = 1e-8  # fractions of a band's initial energy below this are drawn at it


def _phenomena(g: Group, bw, runs_table, runs, sel, spectral, gp, gp_skipped: dict[str, str], out: Path) -> None:
    """The NTK-phenomena sections of one group: what is drawn goes to ``g.figures`` / ``g.tables``,
    what is not to ``g.skipped`` with the reason. A section that fails is skipped, not the report."""
    def attempt(section: str, draw) -> None:
        try:
            draw()
        except Exception as exc:  # noqa: BLE001 - odd data in one section must not cost the others
            g.skipped[section] = f"failed: {type(exc).__name__}: {exc}"

    def spectrum() -> None:
        lines, why = _spectrum_markdown(bw)
        if why:
            g.skipped["spectrum"] = why
        else:
            g.tables["spectrum"] = lines

    def spectral_bias() -> None:
        name = f"spectral_bias{g.suffix}.png"
        why = _plot_spectral_bias(spectral, runs_table, runs, sel, g, out / name)
        if why:
            g.skipped["spectral_bias"] = why
        else:
            g.figures["spectral_bias"] = name

    def gp_init() -> None:
        if _param(g) == "mup":
            g.skipped["gp_init"] = ("parameterization mup: the outputs at init vanish as n^-1/2 and follow no NNGP "
                                    "limit")
            return
        rows = _gp_rows(gp, g)
        if rows is None:
            g.skipped["gp_init"] = _gp_skip_reason(gp, gp_skipped, g)
            return
        name = f"gp_init{g.suffix}.png"
        _plot_gp_init(rows, g, out / name)
        g.figures["gp_init"] = name
        g.tables["gp_init"] = _gp_markdown(rows)

    def double_descent() -> None:
        widths = sorted(int(w) for w in bw.loc[bw["count"] > 0, "width"].unique())
        if not widths:
            g.skipped["double_descent"] = "no ok run"
            return
        g.threshold, why = _double_descent_reason(g, widths)
        if why:
            g.skipped["double_descent"] = why
            return
        name = f"double_descent{g.suffix}.png"
        if _plot_double_descent(bw, g, g.threshold, out / name):
            g.figures["double_descent"] = name
        else:
            g.skipped["double_descent"] = "no test loss measured (no ok run finished)"

    for section, draw in (("spectrum", spectrum), ("spectral_bias", spectral_bias), ("gp_init", gp_init),
                          ("double_descent", double_descent)):
        attempt(section, draw)


def _fmt_g(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.3g}"


def _means(bw, measures) -> dict[str, dict[int, float]]:
    """measure -> width -> mean over the ok seeds, for the measures with at least one ok value."""
    rows = bw[bw["measure"].isin(list(measures)) & (bw["count"] > 0)]
    return {m: dict(zip(part["width"].astype(int), part["mean"].astype(float), strict=True))
            for m, part in rows.groupby("measure")}


def _spectrum_markdown(bw) -> tuple[list[str], str | None]:
    """The "Spectrum and convergence" table of one group; or ([], why not)."""
    wanted = [f"{k}_{w}" for w in ("init", "final", "analytic") for k in SPECTRUM] + list(LOSS_RATIOS)
    means = _means(bw, wanted)
    if not means:
        return [], ("no `ntk_eig_*` / `train_loss_*_ratio` columns in these runs (written before they existed, "
                    "or n_train above the eigendecomposition limit)")
    ok = bw[bw["count"] > 0]
    widths = sorted(int(w) for w in ok["width"].unique())
    counts = ok.groupby("width")["count"].max().to_dict()

    def get(m: str, w: int) -> float:
        return means.get(m, {}).get(w, math.nan)

    lines = []
    analytic = [tuple(get(f"{k}_analytic", w) for k in SPECTRUM) for w in widths]
    finite = [a for a in analytic if all(math.isfinite(v) for v in a)]
    constant = len(finite) == len(analytic) and all(
        all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, finite[0], strict=True)) for a in finite)
    if constant:
        lo, hi, cond = finite[0]
        lines += [f"Analytic NTK Θ on the training points (the same at every width): λ_min = {_fmt_g(lo)}, "
                  f"λ_max = {_fmt_g(hi)}, condition number κ = {_fmt_g(cond)}.", ""]
    whens = [("init", "Θ̂₀"), ("final", "Θ̂_T")] + ([] if constant else [("analytic", "Θ")])
    header = "| width | seeds | " + " | ".join(f"λ_min {s} | λ_max {s} | κ {s}" for _, s in whens)
    header += " | L_T/L_0 predicted | L_T/L_0 observed | observed / predicted |"
    lines += [header, "|---:|---:|" + "---:|" * (3 * len(whens) + 3)]
    infinite = False
    for w in widths:
        cells = [str(w), str(int(counts.get(w, 0)))]
        for when, _ in whens:
            values = [get(f"{k}_{when}", w) for k in SPECTRUM]
            infinite |= math.isinf(values[2])
            cells += [_fmt_g(v) for v in values]
        pred, obs = get("train_loss_pred_ratio", w), get("train_loss_obs_ratio", w)
        cells += [_fmt_g(pred), _fmt_g(obs), _fmt_g(obs / pred) if pred > 0 else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if infinite:
        lines += ["", "κ = ∞: the smallest eigenvalue was ≤ 0 (to rounding) in at least one seed."]
    return lines, None


def _run_ids(runs_table, runs, sel) -> dict[int, list[str]]:
    """width -> run ids of the selected runs."""
    import numpy as np

    ids = np.array(runs_table.column("run_id").to_pylist(), dtype=object)
    return {int(w): list(ids[sel & (runs.width == w)]) for w in sorted({int(w) for w in runs.width[sel]})}


def _plot_spectral_bias(spectral, runs_table, runs, sel, g: Group, path: Path) -> str | None:
    """Residual energy per eigen-band over training, smallest and largest width: network (solid),
    linearised (dashed), analytic-kernel theory (dotted), each as a fraction of the band's energy at
    step 0 (the same for the three). Returns None when drawn, else why not."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    from matplotlib.lines import Line2D

    if spectral is None or spectral.num_rows == 0:
        return "no spectral table (results written before it existed, or n_train above the eigendecomposition limit)"
    if not sel.any():
        return "no ok run"
    by_width = _run_ids(runs_table, runs, sel)
    widths = sorted(by_width)
    frame = spectral.select([c for c in spectral.column_names if c != "dataset"])
    energies = ("energy_nn", "energy_lin", "energy_theory")
    series = {}
    for w in [widths[0]] + ([widths[-1]] if widths[-1] != widths[0] else []):
        part = frame.filter(pc.is_in(frame.column("run_id"), value_set=pa.array(by_width[w], pa.string())))
        part = part.to_pandas()
        if part.empty:
            continue
        start = part[part["step"] == 0].set_index(["run_id", "band"])["energy_nn"]
        base = start.reindex(pd.MultiIndex.from_arrays([part["run_id"], part["band"]])).to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            for col in energies:
                part[col] = np.where(base > 0, part[col].to_numpy() / base, np.nan)
        agg = part.groupby(["band", "step"])[list(energies)].mean()
        bands = part.drop_duplicates("band").set_index("band")[["band_lo", "band_hi"]].sort_index()
        series[w] = (agg, bands, part["run_id"].nunique())
    if not series:
        return "no spectral rows for this group's runs"
    fig = _figure(5.4 * len(series), 4.9)
    axes = fig.subplots(1, len(series), squeeze=False, sharey=True)[0]
    styles = (("energy_nn", "-", "network"), ("energy_lin", "--", "linearised"),
              ("energy_theory", ":", "theory (analytic NTK)"))
    clipped = False
    for ax, (w, (agg, bands, n_seeds)) in zip(axes, series.items(), strict=True):
        colors = _colormap("viridis")(np.linspace(0.0, 0.88, max(len(bands), 1)))
        for color, (band, (lo, hi)) in zip(colors, bands.iterrows(), strict=True):
            rows = agg.loc[band]
            steps = rows.index.to_numpy()
            name = f"$\\lambda_{{{lo + 1}}}$" if hi - lo == 1 else f"$\\lambda_{{{lo + 1}}}..\\lambda_{{{hi}}}$"
            for col, style, _ in styles:
                values = rows[col].to_numpy(dtype=float)
                clipped |= bool((values < SPECTRAL_FLOOR).any())
                ax.plot(steps, np.clip(values, SPECTRAL_FLOOR, None), style, color=color,
                        lw=1.8 if style == "-" else 1.3, label=f"band {band}: {name}" if col == "energy_nn" else None)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_yscale("log")
        ax.set_xlim(0, max(agg.index.get_level_values("step").max(), 1))
        ax.set_title(f"width {w} ({n_seeds} seed{'s' if n_seeds != 1 else ''}: mean)", fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.25)
    axes[0].set_ylabel("residual energy in the band / at step 0")
    handles, _ = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="0.3", ls=style, label=label) for _, style, label in styles]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=min(len(handles), 4), frameon=False)
    floor = f"; values below {SPECTRAL_FLOOR:.0e} drawn at it" if clipped else ""
    fig.suptitle(f"Spectral bias: training residual per eigen-band of the analytic NTK: {g.label}\n"
                 "bands by decreasing eigenvalue; network (solid), linearised (dashed), "
                 f"theory $(1-\\eta\\lambda_i/n)^{{2t}}$ (dotted){floor}", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    return None


def _gp_rows(gp, g: Group):
    if gp is None or gp.empty or "group_id" not in gp.columns:
        return None
    rows = gp[gp["group_id"] == g.group_id].sort_values("width")
    return rows if len(rows) else None


def _gp_skip_reason(gp, gp_skipped: dict[str, str], g: Group) -> str:
    if g.group_id in gp_skipped:
        return f"the analytic NNGP could not be recomputed here ({gp_skipped[g.group_id]})"
    if gp is None or gp.empty:
        return "no width has two seeds with stored outputs at init (results written before the outputs table existed?)"
    return "no width of this group has two seeds with stored outputs at init"


def _plot_gp_init(rows, g: Group, path: Path) -> None:
    """Relative covariance error vs width with its sampling floor, KS statistic vs width with its
    floor, and the error vs the number of seeds per width."""
    import numpy as np

    by_seeds = [r for r in rows.to_dict("records") if len(r["seeds_by_count"]) > 1]
    fig = _figure(4.6 * (3 if by_seeds else 2), 4.3)
    axes = fig.subplots(1, 3 if by_seeds else 2, squeeze=False)[0]
    widths = rows["width"].to_numpy()
    ax = axes[0]
    err = rows["nngp_cov_rel_err"].to_numpy(dtype=float)
    floor = rows["nngp_cov_rel_err_floor"].to_numpy(dtype=float)
    ax.plot(widths, err, "o-", color="C0", lw=1.8, label=r"$\|C-K\|_F/\|K\|_F$ (all seeds)")
    ax.plot(widths, floor, "--", color="0.4", lw=1.3, label="sampling floor of a true GP")
    excess = np.sqrt(np.clip(err**2 - floor**2, 0, None))
    pos = excess > 0
    if pos.any():
        ax.plot(widths[pos], excess[pos], "s:", color="C1", ms=4, lw=1.1,
                label=r"excess $\sqrt{err^2-floor^2}$ (finite-width effects)")
    if pos.sum() >= 2:
        # The reference slope through the widest positive point: the asymptotic regime, if anywhere.
        w0, y0 = widths[pos][-1], excess[pos][-1]
        w = np.geomspace(widths.min(), widths.max(), 20)
        ax.plot(w, y0 * (w / w0) ** -1.0, "-", color="0.75", lw=1, label=r"$\propto n^{-1}$")
    bias_series = []
    if "nngp_bias_rel" in rows.columns and rows["nngp_bias_rel"].notna().any():
        bias = rows["nngp_bias_rel"].to_numpy(dtype=float)
        lo, hi = rows["nngp_bias_rel_lo"].to_numpy(dtype=float), rows["nngp_bias_rel_hi"].to_numpy(dtype=float)
        ok = bias > 0
        ax.errorbar(widths[ok], bias[ok], yerr=[bias[ok] - lo[ok], hi[ok] - bias[ok]], fmt="D-", color="C3", ms=4,
                    lw=1.5, capsize=2, label=r"bias $\|E[ff^T]-K\|_F/\|K\|_F$ (95% CI)")
        ax.plot(widths, rows["nngp_bias_rel_floor"], ":", color="C3", lw=1.1, alpha=0.7, label="bias: noise floor")
        slope = float(rows["nngp_bias_exponent"].iloc[0])
        if math.isfinite(slope) and ok.any():
            w = np.geomspace(widths.min(), widths.max(), 20)
            w0, y0 = widths[ok][0], bias[ok][0]
            ax.plot(w, y0 * (w / w0) ** slope, "-", color="C3", lw=0.9, alpha=0.6,
                    label=f"bias fit $n^{{{slope:.2f}}}$ "
                          f"[{rows['nngp_bias_exponent_lo'].iloc[0]:.2f}, {rows['nngp_bias_exponent_hi'].iloc[0]:.2f}]")
        bias_series = [bias[ok], rows["nngp_bias_rel_floor"].to_numpy(dtype=float)]
    _log_axes(ax, widths)
    _set_log_ylim(ax, [err, floor, excess[pos], *bias_series], [])
    ax.set_xlabel("width $n$")
    ax.set_ylabel("relative Frobenius error vs NNGP")
    ax.set_title("output covariance over seeds vs $K_{NNGP}$", fontsize=10)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)

    ax = axes[1]
    ax.plot(widths, rows["ks_stat"], "o-", color="C2", lw=1.8, label="KS distance from N(0,1)")
    if "ks_stat_floor" in rows.columns:
        ax.plot(widths, rows["ks_stat_floor"], "--", color="0.4", lw=1.3, label="same, exact GP draws (median)")
    _log_axes(ax, widths)
    ax.set_ylim(bottom=min(float(np.nanmin(rows["ks_stat"])), float(np.nanmin(rows.get("ks_stat_floor", 1.0)))) / 1.3)
    ax.set_xlabel("width $n$")
    ax.set_ylabel(r"KS statistic of $f(x)/\sqrt{K(x,x)}$")
    ax.set_title("normality of the marginals", fontsize=10)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)

    if by_seeds:
        ax = axes[2]
        colors = _colormap("viridis")(np.linspace(0.0, 0.88, len(by_seeds)))
        counts_all = sorted({c for r in by_seeds for c in r["seeds_by_count"]})
        for color, r in zip(colors, by_seeds, strict=True):
            ax.plot(r["seeds_by_count"], r["nngp_cov_rel_err_by_seeds"], "o-", color=color, ms=4, lw=1.4,
                    label=f"width {r['width']}")
        ref = max(by_seeds, key=lambda r: len(r["seeds_by_count"]))
        ax.plot(ref["seeds_by_count"], ref["nngp_cov_rel_err_floor_by_seeds"], "--", color="0.3", lw=1.3,
                label=r"sampling floor ($\propto S^{-1/2}$)")
        _log_axes(ax, counts_all)
        ax.set_xlabel("seeds used $S$ (the first $S$)")
        ax.set_ylabel("relative Frobenius error vs NNGP")
        ax.set_title("error vs seed count", fontsize=10)
        ax.legend(fontsize=7, loc="best", framealpha=0.85, ncol=2 if len(by_seeds) > 5 else 1)
    seeds = sorted(set(rows["seeds"].astype(int)))
    k = int(rows["outputs"].iloc[0])
    fig.suptitle(f"Gaussian process at initialisation: {g.label}\n"
                 f"outputs $f(x;\\theta_0)$ on the test points, {'/'.join(map(str, seeds))} seeds x {k} outputs "
                 "per width", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)


def _gp_markdown(rows) -> list[str]:
    lines = ["| width | seeds | outputs | rel. error | sampling floor | error / floor | KS | KS floor |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows.to_dict("records"):
        ratio = r["nngp_cov_rel_err"] / r["nngp_cov_rel_err_floor"] if r["nngp_cov_rel_err_floor"] > 0 else math.nan
        lines.append(f"| {r['width']} | {r['seeds']} | {r['outputs']} | {_fmt_g(r['nngp_cov_rel_err'])} | "
                     f"{_fmt_g(r['nngp_cov_rel_err_floor'])} | {ratio:.2f} | {_fmt_g(r['ks_stat'])} | "
                     f"{_fmt_g(r.get('ks_stat_floor', math.nan))} |")
    with_bias = [r for r in rows.to_dict("records") if r.get("source") == "gp_seeds"]
    if with_bias:
        first = with_bias[0]
        lines += ["", f"Finite-width bias of the output covariance, from {first['seeds']} untrained networks per width "
                  f"(`gp_seeds`) on {int(first['bias_points'])} test points (estimator: `kernels.finite_width`; "
                  "the floor is what noise alone would show):", "",
                  "| width | bias ‖E[ffᵀ]−K‖/‖K‖ | 95% CI | noise floor | resolved |", "|---:|---:|---|---:|:---:|"]
        for r in with_bias:
            lines.append(f"| {r['width']} | {_fmt_g(r['nngp_bias_rel'])} | [{_fmt_g(r['nngp_bias_rel_lo'])}, "
                         f"{_fmt_g(r['nngp_bias_rel_hi'])}] | {_fmt_g(r['nngp_bias_rel_floor'])} | "
                         f"{'yes' if r['nngp_bias_resolved'] else 'no'} |")
        slope = first.get("nngp_bias_exponent", math.nan)
        if slope is not None and math.isfinite(slope):
            lo, hi = first["nngp_bias_exponent_lo"], first["nngp_bias_exponent_hi"]
            lines += ["", f"Bias exponent over the resolved widths: **{slope:.2f}** [{lo:.2f}, {hi:.2f}] "
                      "(95%, seeds resampled as units; theory: −1)."]
    return lines


def n_outputs(settings: dict[str, Any]) -> int:
    """K: one output for a binary task, else one per class (10 when ``classes`` is not given)."""
    classes = settings.get("classes")
    n = len(classes) if classes else 10
    return 1 if n == 2 else n


def input_dim(settings: dict[str, Any]) -> int | None:
    """d of the flattened inputs: known per dataset, else from the subset (None if it cannot be loaded)."""
    if settings.get("dataset") in INPUT_DIM:
        return INPUT_DIM[settings["dataset"]]
    try:
        from pipeline.gp_init import load_recorded_subset
        from pipeline.run_config import RunConfig

        fields = {k: v for k, v in settings.items() if k in RunConfig.model_fields}
        return load_recorded_subset(RunConfig(**fields)).dim
    except Exception:  # noqa: BLE001 - no data here: the threshold cannot be placed
        return None


def parameter_count(width, d: int, depth: int, k: int):
    """Parameters of the MLP (weights and biases): ``width*(d+1) + (depth-1)*width*(width+1) + K*(width+1)``
    for ``depth >= 1``; ``K*(d+1)`` for ``depth = 0``. ``width`` may be an array."""
    if depth == 0:
        return k * (d + 1) + 0 * width
    return width * (d + 1) + (depth - 1) * width * (width + 1) + k * (width + 1)


def threshold_width(n_train: int, d: int, depth: int, k: int) -> float | None:
    """The (real) width where the parameter count equals ``n_train * K``: the interpolation threshold.
    None for ``depth = 0`` (no width) or when even width 0 has that many parameters."""
    if depth == 0:
        return None
    target = n_train * k
    a, b, c = depth - 1, d + 1 + (depth - 1) + k, k - target  # a w^2 + b w + c = 0
    if c >= 0:
        return None
    return -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


def _double_descent_reason(g: Group, widths: list[int]) -> tuple[float | None, str | None]:
    """(threshold width, None) when the group's curve is drawn; else (threshold or None, why not)."""
    s = g.settings
    d = input_dim(s)
    k = n_outputs(s)
    depth, n = s.get("depth"), s.get("n_train")
    if d is None or depth is None or n is None:
        return None, "the input dimension, depth or n_train of this group is unknown here"
    w_star = threshold_width(int(n), d, int(depth), k)
    noisy = bool(s.get("label_noise") or 0)
    straddles = w_star is not None and widths and min(widths) < w_star < max(widths)
    if not (noisy or straddles):
        where = f"width ≈ {w_star:.3g}" if w_star is not None else "no width"
        return w_star, (f"no label noise, and the widths {min(widths)}–{max(widths)} do not straddle the interpolation "
                        f"threshold P = n_train·K = {int(n) * k} parameters ({where})")
    return w_star, None


def _plot_double_descent(bw, g: Group, w_star: float | None, path: Path) -> bool:
    """Train and test loss, and accuracy, of the network vs width (mean, 95% CI) with the analytic
    NTK / NNGP regression limits and the interpolation threshold."""
    import numpy as np

    def series(measure: str):
        rows = bw[(bw["measure"] == measure) & (bw["count"] > 0)].sort_values("width")
        mean = rows["mean"].to_numpy(dtype=float)
        half = np.nan_to_num(rows["ci_high"].to_numpy(dtype=float) - mean)
        return rows["width"].to_numpy(), mean, half

    if not ((bw["measure"] == "test_loss") & (bw["count"] > 0)).any():
        return False
    fig = _figure(11.8, 4.9)
    axes = fig.subplots(1, 2)
    s = g.settings
    d, k, depth, n = input_dim(s), n_outputs(s), int(s["depth"]), int(s["n_train"])
    all_widths = sorted(int(w) for w in bw.loc[bw["count"] > 0, "width"].unique())
    panels = (
        (axes[0], "loss", (("test_loss", "network, test", "-", "o", "C0"), ("train_loss", "network, train", "--", "s",
                                                                             "C0")),
         (("ntk_test_loss", "analytic NTK regression, test", "-.", "C2"),
          ("ntk_own_test_loss", "analytic NTK from the nets' own $f_0$, test", (0, (5, 2, 1, 2)), "C1"),
          ("nngp_test_loss", "analytic NNGP regression, test", ":", "C4"))),
        (axes[1], "accuracy", (("test_acc", "network, test", "-", "o", "C0"), ("train_acc", "network, train", "--", "s",
                                                                              "C0")),
         (("ntk_test_acc", "analytic NTK regression, test", "-.", "C2"),
          ("ntk_own_test_acc", "analytic NTK from the nets' own $f_0$, test", (0, (5, 2, 1, 2)), "C1"),
          ("nngp_test_acc", "analytic NNGP regression, test", ":", "C4"))),
    )
    for ax, metric, network, kernels in panels:
        visible = []
        for measure, label, style, marker, color in network:
            w, mean, half = series(measure)
            if not len(w):
                continue
            ax.errorbar(w, mean, yerr=half, fmt=marker, ls=style, color=color, ms=4.5, capsize=3, lw=1.6,
                        label=label, mfc="white" if style == "--" else color)
            visible.append(mean)
        for measure, label, style, color in kernels:
            w, mean, _ = series(measure)
            if not len(w):
                continue
            if np.allclose(mean, mean[0], rtol=1e-6, atol=0):
                ax.axhline(mean[0], ls=style, color=color, lw=1.6, label=label)
            else:
                ax.plot(w, mean, ls=style, color=color, lw=1.6, label=label)
            visible.append(mean)
        _log_axes(ax, all_widths, log_y=metric == "loss")
        if metric == "loss":
            _set_log_ylim(ax, visible, [])
            ax.set_ylabel(r"loss $\frac{1}{2}\,\mathrm{mean}_i\,\|f(x_i)-y_i\|^2$")
        else:
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("accuracy")
        if w_star is not None:
            ax.axvline(w_star, color="C3", lw=1.2, alpha=0.8,
                       label=f"interpolation threshold: P = n·K = {n * k} (width ≈ {w_star:.3g})")
        ax.set_xlabel("width $n$")
        if d is not None and depth >= 1:
            def to_ratio(w, d=d, depth=depth, k=k, target=n * k):
                return parameter_count(np.asarray(w, dtype=float), d, depth, k) / target

            def from_ratio(r, d=d, depth=depth, k=k, n=n):
                r = np.asarray(r, dtype=float)
                a, b = depth - 1, d + 1 + (depth - 1) + k
                c = k - r * n * k
                with np.errstate(invalid="ignore"):
                    return -c / b if a == 0 else (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)

            top = ax.secondary_xaxis("top", functions=(to_ratio, from_ratio))
            top.set_xlabel("parameters / (n_train · K)", fontsize=8)
            top.tick_params(labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (not labels[i].startswith("network"), i))
    fig.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="outside lower center",
               ncol=3, frameon=False)
    noise = s.get("label_noise") or 0
    fig.suptitle(f"Double descent in width: {g.label}\nnetwork mean over seeds with 95% CI; "
                 f"label noise {noise:g} on the training labels (train metrics use the noisy labels)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    return True


# ----------------------------------------------------------------------------------------------
# report.md


def _cell(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def _phenomena_markdown(g: Group) -> list[str]:
    def skipped(section: str) -> list[str]:
        return [f"_Skipped: {g.skipped.get(section, 'not available')}._", ""]

    lines = ["### Spectrum and convergence", ""]
    if "spectrum" in g.tables:
        lines += ["Empirical NTK at init (Θ̂₀) and after training (Θ̂_T), traced over the outputs, and the "
                  "analytic NTK Θ, on the training points: mean over seeds of the smallest and largest "
                  "eigenvalue and the condition number κ = λ_max/λ_min. For full-batch GD on the MSE the "
                  "linearised residual decays as $(1-\\eta\\lambda_i/n)^t$ along each eigenvector, so "
                  "λ_min sets the slowest rate. Predicted: L_T/L_0 of GD under Θ from the network's own "
                  "initial residual and learning rate; observed: the network's.", "", *g.tables["spectrum"], ""]
    else:
        lines += skipped("spectrum")
    lines += ["### Spectral bias", ""]
    if "spectral_bias" in g.figures:
        lines += ["Energy of the training residual in eigen-bands of the analytic NTK (band 0: the top "
                  "eigenvector), as a fraction of its value at step 0, mean over seeds: the top bands "
                  "decay first.", "", f"![spectral bias]({g.figures['spectral_bias']})", ""]
    else:
        lines += skipped("spectral_bias")
    lines += ["### Gaussian process at initialisation", ""]
    if "gp_init" in g.figures:
        lines += ["Across the seeds of one width, the outputs at init on the test points against the "
                  "analytic NNGP: relative Frobenius error of their covariance (the sampling floor: what a "
                  "true GP gives with as many samples), and the KS distance of the standardised marginals "
                  "from N(0, 1) (its floor: the same for exact GP draws). An error near its floor means the "
                  "seeds cannot resolve any finite-width effect (more seeds would); well above it, finite width "
                  "shows: non-Gaussian outputs (excess kurtosis ~1/width, which widens the spread of C beyond "
                  "the Gaussian floor) and, from two hidden layers on, an O(1/width) bias of the covariance "
                  "itself (at one hidden layer E[f f^T] equals the NNGP at every width). "
                  "Table: `aggregates/gp_init.parquet` (`SELECT * FROM gp_init`).", "",
                  f"![gp at init]({g.figures['gp_init']})", "", *g.tables["gp_init"], ""]
    else:
        lines += skipped("gp_init")
    lines += ["### Double descent in width", ""]
    if "double_descent" in g.figures:
        where = f" (width ≈ {g.threshold:.3g})" if g.threshold is not None else ""
        lines += ["Test and train loss and accuracy of the network vs width, beside analytic NTK and NNGP "
                  "kernel regression; the vertical line is the interpolation threshold, parameters = "
                  f"n_train·K{where}.", "", f"![double descent]({g.figures['double_descent']})", ""]
    else:
        lines += skipped("double_descent")
    return lines


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
        "Least squares of log(measure) on log(width) over the individual ok runs; 95% CI with the seeds as the "
        "units (`ci_method` `seed_cluster_t`): Student t with n_seeds − 1 degrees of freedom on the "
        "seed-clustered standard error, i.e. the t interval over the per-seed slopes (a seed's networks at "
        "different widths are not independent); none with one seed, wide with two. Values ≤ 0 cannot be "
        "logged: they are left out, and the note says which way that biases the exponent. "
        "Expected: what Lee et al. (2019) report for NTK parameterisation and a "
        "small learning rate; for μP (`parameterization: mup`) the feature-learning regime of Yang & Hu (2021): "
        "the kernel, the features and the input and output weights keep moving (0), the hidden n × n weights "
        "by O(1) in operator norm, n^-1/2 of their Frobenius norm. No slope is imposed.",
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
            expected = expected_exponent(m, n_layers, _param(g))
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
    lines += ["", REGIMES_MARK]

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
                      "exponent and its 95% CI, t over seeds), and reference slopes $n^{-1/2}$ (dashed) and $n^{-1}$ "
                      "(dotted) through the fit's first point. Lazy training, measured directly: "
                      "`weight_distance` (the absolute $\\|\\theta_T-\\theta_0\\|_2$, which stays O(1) in NTK "
                      "parameterisation while the relative change `weight_rel_change` vanishes) and "
                      "`relu_flip_frac`.", "",
                      f"![deviations]({g.figures['deviations']})", ""]
        if "accuracy" in g.figures:
            lines += ["### Test accuracy vs width", "",
                      "The network and its linearisation after training; analytic NTK and NNGP kernel "
                      "regression (the $t = \\infty$ limit of infinitely wide networks).", "",
                      f"![accuracy]({g.figures['accuracy']})", ""]
        if "curves" in g.figures:
            lines += ["### Training curves: network vs linearised model", "",
                      f"![curves]({g.figures['curves']})", ""]
        lines += _phenomena_markdown(g)
    lines += ["## NTK Gram at initialisation", ""]
    if heatmap:
        lines += [heatmap_note, "", "![ntk heatmap](ntk_heatmap.png)", ""]
    else:
        lines += [heatmap_note, ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
