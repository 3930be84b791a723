"""The sweep's figures per group and once: deviations, accuracy, training curves, regimes, the NTK heatmap.

Each ``plot_*`` writes one PNG and says whether it drew it (or, for some, why not); matplotlib, numpy
and pyarrow load inside the functions.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.report.axes import (
    LABELS,
    colormap,
    draw_measure,
    figure,
    finish_width_panel,
    hide_spare_panels,
    log_axes,
    panel_grid,
    save,
)
from pipeline.report.groups import (
    PARAM_NAMES,
    REGIME_MEASURES,
    Group,
    hidden_layers,
    layer_role,
    param,
)

MAX_HEATMAP_POINTS = 1200  # larger Grams are shown on an even subsample of the points
PARAM_COLORS = {"ntk": "C0", "standard": "C2", "mup": "C3"}
ACCURACY = (
    ("test_acc", "network", "-", "o"),
    ("lin_test_acc", "linearised network", "--", "s"),
    ("ntk_test_acc", "analytic NTK regression ($t=\\infty$)", "-.", "^"),
    ("nngp_test_acc", "analytic NNGP regression ($t=\\infty$)", ":", "v"),
)


def plot_regimes(by_width, scaling, runs, cluster: list[Group], path: Path) -> bool:
    """One panel per measure, one colour per parameterisation: seeds, means with CIs and the fits."""
    from pipeline.aggregate import expected_exponent

    fits = [{r["measure"]: r for r in scaling[scaling["group_id"] == g.group_id].to_dict("records")}
            for g in cluster]
    layers = hidden_layers(fits)
    panels = [m for m in (*REGIME_MEASURES, *layers) if any(m in f for f in fits)]
    if not panels:
        return False
    fig, axes = panel_grid(len(panels))
    all_widths = runs.width[sum((runs.gid == g.index) for g in cluster).astype(bool)]
    for ax, m in zip(axes.flat, panels, strict=False):
        visible, soft, expected = [], [], []
        for g, f in zip(cluster, fits, strict=True):
            if m not in f:
                continue
            sel = (runs.gid == g.index) & (runs.status == "ok")
            bw = by_width[by_width["group_id"] == g.group_id]
            p = param(g)
            _, v, c = draw_measure(ax, bw, f[m], runs, sel, m, PARAM_COLORS.get(p, "C7"), PARAM_NAMES.get(p, p),
                                    references=False)
            visible += v
            soft += c
            e = expected_exponent(m, len(layers), p)
            if e:
                expected.append(f"{PARAM_NAMES.get(p, p)} {e}")
        if m.startswith("weight_rel_change_layer"):
            i = int(m[23:])
            role = layer_role(i, len(layers))
            ax.set_ylabel(rf"$\|W^{{({i})}}_T-W^{{({i})}}_0\|_F\,/\,\|W^{{({i})}}_0\|_F$ ({role})")
        else:
            ax.set_ylabel(LABELS.get(m, m))
        ax.set_title(m + (f"\nexpected: {'; '.join(expected)}" if expected else ""), fontsize=9.5)
        finish_width_panel(ax, all_widths, visible, soft)
    hide_spare_panels(axes, len(panels))
    label = cluster[0].label.replace(f"parameterization={param(cluster[0])}", "").strip(", ")
    fig.suptitle(f"Lazy (NTK) and rich (μP) regimes vs width: {label}\n"
                 "mean over seeds with 95% CI (seeds faint); fitted exponent per parameterisation", fontsize=11)
    save(fig, path)
    return True


def plot_deviations(bw, sc, runs, sel, g: Group, path: Path) -> bool:
    """One panel per deviation measure (seeds, means with CIs, the fit and reference slopes) and a last
    panel with the relative weight change of each layer."""
    from pipeline.aggregate import deviation_measures, expected_exponent

    fits = {r["measure"]: r for r in sc.to_dict("records")}
    measures = [m for m in deviation_measures(list(fits)) if not m.startswith("weight_rel_change_layer")]
    layers = [m for m in deviation_measures(list(fits)) if m.startswith("weight_rel_change_layer")]
    panels = measures + (["layers"] if layers else [])
    if not panels:
        return False
    fig, axes = panel_grid(len(panels))
    widths = runs.width[sel]
    for ax, panel in zip(axes.flat, panels, strict=False):
        if panel == "layers":
            colors = colormap("viridis")([i / max(len(layers) - 1, 1) * 0.85 for i in range(len(layers))])
            visible, soft = [], []
            for i, m in enumerate(layers):
                role = layer_role(i, len(layers))
                expected = expected_exponent(m, len(layers), param(g))
                label = f"layer {i} ({role}{', exp. ' + expected if expected else ''})"
                _, v, c = draw_measure(ax, bw, fits[m], runs, sel, m, colors[i], label, references=False)
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
            note, visible, soft = draw_measure(ax, bw, fits[panel], runs, sel, panel, "C0", None, references=True)
            expected = expected_exponent(panel, parameterization=param(g))
            title = panel + (f"   (expected {expected})" if expected else "")
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(LABELS.get(panel, panel))
            if note:
                ax.text(0.02, 0.02, note, transform=ax.transAxes, fontsize=7.5, color="0.35", va="bottom")
        finish_width_panel(ax, widths, visible, soft)
    hide_spare_panels(axes, len(panels))
    fig.suptitle(f"Deviations from the kernel limit vs width: {g.label}\n"
                 "mean over seeds with 95% CI (seeds faint); fit over the seeds, exponent [95% CI, t over seeds]",
                 fontsize=11)
    save(fig, path)
    return True


def plot_accuracy(bw, g: Group, path: Path) -> bool:
    """Test accuracy of the network, its linearisation and analytic NTK / NNGP regression vs width."""
    import numpy as np

    present = [a for a in ACCURACY if ((bw["measure"] == a[0]) & (bw["count"] > 0)).any()]
    if not present:
        return False
    fig = figure(6.6, 5.2)
    ax = fig.subplots()
    for i, (measure, label, style, marker) in enumerate(present):
        rows = bw[(bw["measure"] == measure) & (bw["count"] > 0)].sort_values("width")
        mean = rows["mean"].to_numpy()
        half = np.nan_to_num(rows["ci_high"].to_numpy() - mean)
        ax.errorbar(rows["width"], mean, yerr=half, fmt=marker, ls=style, color=f"C{i}", ms=5, capsize=3,
                    label=label)
    log_axes(ax, bw["width"], log_y=False)
    ax.set_xlabel("width $n$")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Test accuracy vs width: {g.label}\nmean over seeds, 95% CI", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    save(fig, path)
    return True


def plot_curves(curves, runs_table, runs, sel, g: Group, path: Path) -> str | None:
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
    fig = figure(5.6 * len(series), 7.2)
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
    save(fig, path)
    return None


def plot_heatmap(root: Path, runs_table, runs, groups: list[Group], path: Path) -> tuple[bool, str]:
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
            drawn = draw_heatmap(root, [rows[i] for i in picked], g, path)
        except Exception as exc:  # noqa: BLE001 - the data may be absent here: say so, draw the rest
            return False, f"Heatmap skipped: could not rebuild the kernels of run {rows[picked[0]]['run_id']} ({exc})."
        return True, drawn
    return False, "No ok run with a stored empirical NTK Gram: heatmap skipped."


def draw_heatmap(root: Path, rows: list[dict], g: Group, path: Path) -> str:
    """The heatmap of the runs in ``rows`` (one seed, one or two widths); returns its caption."""
    import dataclasses

    import numpy as np
    from matplotlib.colors import Normalize

    from pipeline.data import load_recorded_subset
    from pipeline.limits import analytic_kernels
    from pipeline.run_config import RunConfig
    from pipeline.store import ResultsStore

    store = ResultsStore(root)
    config = RunConfig.from_row(rows[0])
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
    fig = figure(4.9 * panels + 0.6, 5.2)
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
    save(fig, path)
    widths = " and ".join(str(w) for w, _, _ in diffs)
    return (f"Group {g.label}, seed {seed}, width {widths} (run {', '.join(r['run_id'] for r in rows)}); "
            f"{note}.")

