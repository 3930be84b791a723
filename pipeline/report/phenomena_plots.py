"""The figures of the NTK-phenomena sections of a group: spectral bias, the GP at init, double descent.

matplotlib, numpy, pandas and pyarrow load inside the functions.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.report.axes import colormap, figure, log_axes, save, set_log_ylim
from pipeline.report.groups import Group
from pipeline.report.threshold import input_dim, n_outputs

SPECTRAL_FLOOR = 1e-8  # fractions of a band's initial energy below this are drawn at it


def run_ids(runs_table, runs, sel) -> dict[int, list[str]]:
    """width -> run ids of the selected runs."""
    import numpy as np

    ids = np.array(runs_table.column("run_id").to_pylist(), dtype=object)
    return {int(w): list(ids[sel & (runs.width == w)]) for w in sorted({int(w) for w in runs.width[sel]})}


def plot_spectral_bias(spectral, runs_table, runs, sel, g: Group, path: Path) -> str | None:
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
    by_width = run_ids(runs_table, runs, sel)
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
    fig = figure(5.4 * len(series), 4.9)
    axes = fig.subplots(1, len(series), squeeze=False, sharey=True)[0]
    styles = (("energy_nn", "-", "network"), ("energy_lin", "--", "linearised"),
              ("energy_theory", ":", "theory (analytic NTK)"))
    clipped = False
    for ax, (w, (agg, bands, n_seeds)) in zip(axes, series.items(), strict=True):
        colors = colormap("viridis")(np.linspace(0.0, 0.88, max(len(bands), 1)))
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
    save(fig, path)
    return None


def plot_gp_init(rows, g: Group, path: Path) -> None:
    """Relative covariance error vs width with its sampling floor, KS statistic vs width with its
    floor, and the error vs the number of seeds per width."""
    import numpy as np

    by_seeds = [r for r in rows.to_dict("records") if len(r["seeds_by_count"]) > 1]
    fig = figure(4.6 * (3 if by_seeds else 2), 4.3)
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
    log_axes(ax, widths)
    set_log_ylim(ax, [err, floor, excess[pos], *bias_series], [])
    ax.set_xlabel("width $n$")
    ax.set_ylabel("relative Frobenius error vs NNGP")
    ax.set_title("output covariance over seeds vs $K_{NNGP}$", fontsize=10)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)

    ax = axes[1]
    ax.plot(widths, rows["ks_stat"], "o-", color="C2", lw=1.8, label="KS distance from N(0,1)")
    if "ks_stat_floor" in rows.columns:
        ax.plot(widths, rows["ks_stat_floor"], "--", color="0.4", lw=1.3, label="same, exact GP draws (median)")
    log_axes(ax, widths)
    ax.set_ylim(bottom=min(float(np.nanmin(rows["ks_stat"])), float(np.nanmin(rows.get("ks_stat_floor", 1.0)))) / 1.3)
    ax.set_xlabel("width $n$")
    ax.set_ylabel(r"KS statistic of $f(x)/\sqrt{K(x,x)}$")
    ax.set_title("normality of the marginals", fontsize=10)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)

    if by_seeds:
        ax = axes[2]
        colors = colormap("viridis")(np.linspace(0.0, 0.88, len(by_seeds)))
        counts_all = sorted({c for r in by_seeds for c in r["seeds_by_count"]})
        for color, r in zip(colors, by_seeds, strict=True):
            ax.plot(r["seeds_by_count"], r["nngp_cov_rel_err_by_seeds"], "o-", color=color, ms=4, lw=1.4,
                    label=f"width {r['width']}")
        ref = max(by_seeds, key=lambda r: len(r["seeds_by_count"]))
        ax.plot(ref["seeds_by_count"], ref["nngp_cov_rel_err_floor_by_seeds"], "--", color="0.3", lw=1.3,
                label=r"sampling floor ($\propto S^{-1/2}$)")
        log_axes(ax, counts_all)
        ax.set_xlabel("seeds used $S$ (the first $S$)")
        ax.set_ylabel("relative Frobenius error vs NNGP")
        ax.set_title("error vs seed count", fontsize=10)
        ax.legend(fontsize=7, loc="best", framealpha=0.85, ncol=2 if len(by_seeds) > 5 else 1)
    seeds = sorted(set(rows["seeds"].astype(int)))
    k = int(rows["outputs"].iloc[0])
    fig.suptitle(f"Gaussian process at initialisation: {g.label}\n"
                 f"outputs $f(x;\\theta_0)$ on the test points, {'/'.join(map(str, seeds))} seeds x {k} outputs "
                 "per width", fontsize=10)
    save(fig, path)


def plot_double_descent(bw, g: Group, w_star: float | None, path: Path) -> bool:
    """Train and test loss, and accuracy, of the network vs width (mean, 95% CI) with the analytic
    NTK / NNGP regression limits and the interpolation threshold."""
    import numpy as np

    from pipeline.plan import num_params

    def series(measure: str):
        rows = bw[(bw["measure"] == measure) & (bw["count"] > 0)].sort_values("width")
        mean = rows["mean"].to_numpy(dtype=float)
        half = np.nan_to_num(rows["ci_high"].to_numpy(dtype=float) - mean)
        return rows["width"].to_numpy(), mean, half

    if not ((bw["measure"] == "test_loss") & (bw["count"] > 0)).any():
        return False
    fig = figure(11.8, 4.9)
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
        log_axes(ax, all_widths, log_y=metric == "loss")
        if metric == "loss":
            set_log_ylim(ax, visible, [])
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
                return num_params(d, np.asarray(w, dtype=float), depth, k) / target

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
    save(fig, path)
    return True

