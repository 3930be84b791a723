"""Figures and axes shared by the report's plots: log-log width panels, tick formats, a measure with its fit.

matplotlib and numpy load inside the functions (the report package is imported by ``ntk-sweep --help``).
"""

from __future__ import annotations

import math

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


def figure(width: float, height: float):
    """A figure outside pyplot: no global backend or state is touched (a notebook's backend stays),
    nothing to close, and ``savefig`` to PNG renders with Agg."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save(fig, path) -> None:
    """Write ``fig`` as the report's PNGs are written: 110 dpi, tight box."""
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)


def colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def panel_grid(panels: int):
    """A figure with ``panels`` log-log panels, at most 4 per row: ``(fig, axes)``, axes ``(rows, cols)``."""
    ncols = min(4, panels)
    nrows = math.ceil(panels / ncols)
    fig = figure(4.4 * ncols, 3.9 * nrows)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def finish_width_panel(ax, widths, visible, soft) -> None:
    """Log width axis, y limits from the drawn series, the x label and a legend when anything is labelled."""
    log_axes(ax, widths)
    set_log_ylim(ax, visible, soft)
    ax.set_xlabel("width $n$")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, loc="best", framealpha=0.85)


def hide_spare_panels(axes, used: int) -> None:
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)


def fit_label(fit) -> str:
    text = f"fit: $n^{{{fit['exponent']:.2f}}}$"
    if math.isfinite(fit["ci_low"]):
        text += f"  [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]"
    if math.isfinite(fit["r2"]):
        text += f", $R^2$={fit['r2']:.2f}"
    return text


def draw_measure(ax, bw, fit, runs, sel, measure: str, color: str, label: str | None,
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
        label_ = fit_label(fit) if label is None else f"{label}: fit $n^{{{fit['exponent']:.2f}}}$"
        ax.plot(w, y, "-", color=color, lw=1.8, zorder=4, label=label_)
        visible.append(y)
        if references:
            w0, y0 = w[0], y[0]
            ax.plot(w, y0 * (w / w0) ** -0.5, "--", color="0.45", lw=1.1, zorder=1, label=r"$\propto n^{-1/2}$")
            ax.plot(w, y0 * (w / w0) ** -1.0, ":", color="0.3", lw=1.3, zorder=1, label=r"$\propto n^{-1}$")
            visible.append(y0 * (w / w0) ** -1.0)
    return note, visible, soft


def set_log_ylim(ax, visible: list, soft: list, reach: float = 4.0) -> None:
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


def log_axes(ax, widths, log_y: bool = True) -> None:
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
