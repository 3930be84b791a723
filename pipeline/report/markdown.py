"""report.md: the template's prose (``report.md.tmpl``) and the tables, put together section by section.

Sections: the header and the fitted exponents of every group; the regime sets; per drawn group its
runs per width, figures and NTK-phenomena sections (a skipped one keeps its heading and says why); the
NTK heatmap; notes.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.report import prose
from pipeline.report.groups import Group
from pipeline.report.tables import exponents_table, regimes_table, runs_per_width_table

PHENOMENA = ("spectrum", "spectral_bias", "gp_init", "double_descent")  # in report order


def report_markdown(root: Path, runs, drawn: list[Group], groups: list[Group], scaling, by_width,
                    regimes: list[tuple[list[Group], str]], heatmap: bool, heatmap_note: str,
                    notes: list[str]) -> str:
    """The text of report.md. ``drawn``: the groups whose figures were drawn; ``regimes``: each regime
    set with the name of its figure; ``heatmap``: whether ntk_heatmap.png was drawn, ``heatmap_note`` its
    caption or why not."""
    status = {s: int((runs.status == s).sum()) for s in ("ok", "diverged", "failed")}
    other = len(runs.status) - sum(status.values())
    statuses = (f"{status['ok']} ok, {status['diverged']} diverged, {status['failed']} failed"
                + (f", {other} other" if other else ""))
    lines = [*prose.lines("header", root=root, n_runs=len(runs.status), statuses=statuses, n_groups=len(groups)),
             ""]
    table = exponents_table(groups, scaling)
    lines += table if table else prose.lines("no_exponents")
    lines += ["", *_regimes_markdown(scaling, regimes)]
    for g in drawn:
        lines += _group_markdown(g, by_width[by_width["group_id"] == g.group_id])
    lines += [prose.heading("heatmap"), "", heatmap_note, ""]
    if heatmap:
        lines += ["![ntk heatmap](ntk_heatmap.png)", ""]
    if notes:
        lines += [prose.heading("notes"), ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _regimes_markdown(scaling, regimes: list[tuple[list[Group], str]]) -> list[str]:
    """The regimes section: its figure and table per regime set ([""] when there is no set)."""
    if not regimes:
        return [""]
    lines = [*prose.lines("regimes"), ""]
    for cluster, name in regimes:
        lines += [f"![regimes]({name})", "", *regimes_table(scaling, cluster), ""]
    return lines


def _group_markdown(g: Group, bw) -> list[str]:
    """One drawn group: runs per width, its figures, its NTK-phenomena sections."""
    lines = [f"## {g.label}", ""]
    counts = runs_per_width_table(bw)
    if counts:
        lines += [*counts, ""]
    for section in ("deviations", "accuracy", "curves"):
        if section in g.figures:
            lines += [*prose.lines(section, figure=g.figures[section]), ""]
    for section in PHENOMENA:
        lines += _phenomenon_markdown(g, section)
    return lines


def _phenomenon_markdown(g: Group, section: str) -> list[str]:
    """One NTK-phenomena section of a group: caption, figure and table; or its heading and why it is skipped."""
    table = g.tables.get(section, [])
    if section == "spectrum":  # a table, no figure
        shown, fields = section in g.tables, {}
    else:
        shown, fields = section in g.figures, {"figure": g.figures.get(section)}
    if section == "double_descent":
        fields["where"] = f" (width ≈ {g.threshold:.3g})" if g.threshold is not None else ""
    if not shown:
        return [prose.heading(section), "", *prose.lines("skipped", why=g.skipped.get(section, "not available")), ""]
    return [*prose.lines(section, **fields), "", *([*table, ""] if table else [])]
