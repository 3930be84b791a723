"""The NTK-phenomena sections of one group: each drawn into its Group, or skipped with the reason why.

Spectrum and convergence (a table), spectral bias, the Gaussian process at init and double descent
(figures); the figures are in :mod:`pipeline.report.phenomena_plots`, the tables in
:mod:`pipeline.report.tables`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.report.groups import Group, param
from pipeline.report.phenomena_plots import plot_double_descent, plot_gp_init, plot_spectral_bias
from pipeline.report.tables import gp_table, spectrum_table
from pipeline.report.threshold import double_descent_reason


def draw_phenomena(g: Group, bw, runs_table, runs, sel, spectral, gp, gp_skipped: dict[str, str], out: Path) -> None:
    """The NTK-phenomena sections of one group: what is drawn goes to ``g.figures`` / ``g.tables``,
    what is not to ``g.skipped`` with the reason. A section that fails is skipped, not the report."""
    def attempt(section: str, draw) -> None:
        try:
            draw()
        except Exception as exc:  # noqa: BLE001 - odd data in one section must not cost the others
            g.skipped[section] = f"failed: {type(exc).__name__}: {exc}"

    def spectrum() -> None:
        lines, why = spectrum_table(bw)
        if why:
            g.skipped["spectrum"] = why
        else:
            g.tables["spectrum"] = lines

    def spectral_bias() -> None:
        name = f"spectral_bias{g.suffix}.png"
        why = plot_spectral_bias(spectral, runs_table, runs, sel, g, out / name)
        if why:
            g.skipped["spectral_bias"] = why
        else:
            g.figures["spectral_bias"] = name

    def gp_init() -> None:
        if param(g) == "mup":
            g.skipped["gp_init"] = ("parameterization mup: the outputs at init vanish as n^-1/2 and follow no NNGP "
                                    "limit")
            return
        rows = gp_rows(gp, g)
        if rows is None:
            g.skipped["gp_init"] = gp_skip_reason(gp, gp_skipped, g)
            return
        name = f"gp_init{g.suffix}.png"
        plot_gp_init(rows, g, out / name)
        g.figures["gp_init"] = name
        g.tables["gp_init"] = gp_table(rows)

    def double_descent() -> None:
        widths = sorted(int(w) for w in bw.loc[bw["count"] > 0, "width"].unique())
        if not widths:
            g.skipped["double_descent"] = "no ok run"
            return
        g.threshold, why = double_descent_reason(g, widths)
        if why:
            g.skipped["double_descent"] = why
            return
        name = f"double_descent{g.suffix}.png"
        if plot_double_descent(bw, g, g.threshold, out / name):
            g.figures["double_descent"] = name
        else:
            g.skipped["double_descent"] = "no test loss measured (no ok run finished)"

    for section, draw in (("spectrum", spectrum), ("spectral_bias", spectral_bias), ("gp_init", gp_init),
                          ("double_descent", double_descent)):
        attempt(section, draw)


def gp_rows(gp, g: Group):
    """The group's rows of the gp_init table, by width; None when it has none."""
    if gp is None or gp.empty or "group_id" not in gp.columns:
        return None
    rows = gp[gp["group_id"] == g.group_id].sort_values("width")
    return rows if len(rows) else None


def gp_skip_reason(gp, gp_skipped: dict[str, str], g: Group) -> str:
    """Why a group has no rows in the gp_init table."""
    if g.group_id in gp_skipped:
        return f"the analytic NNGP of its test points is not in the results ({gp_skipped[g.group_id]})"
    if gp is None or gp.empty:
        return "no width has two seeds with stored outputs at init (results written before the outputs table existed?)"
    return "no width of this group has two seeds with stored outputs at init"

