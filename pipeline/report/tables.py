"""The markdown tables of report.md: fitted exponents, runs per width, regimes, spectrum, GP at init.

Each returns the table's lines (with the one-line captions that belong to it, from the template).
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.report import prose
from pipeline.report.groups import PARAM_NAMES, REGIME_MEASURES, Group, hidden_layers, param

SPECTRUM = ("ntk_eig_min", "ntk_eig_max", "ntk_cond")
LOSS_RATIOS = ("train_loss_pred_ratio", "train_loss_obs_ratio")


def cell(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def fmt_g(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.3g}"


def exponents_table(groups: list[Group], scaling) -> list[str]:
    """One row per group and deviation measure: exponent, 95% CI, R², widths, runs used, expected.
    The group column only when there are several groups; [] when nothing was fitted."""
    from pipeline.aggregate import deviation_measures, expected_exponent

    many = len(groups) > 1
    table = []
    for g in groups:
        sc = scaling[scaling["group_id"] == g.group_id]
        fits = {r["measure"]: r for r in sc.to_dict("records")}
        n_layers = sum(m.startswith("weight_rel_change_layer") for m in fits)
        for m in deviation_measures(list(fits)):
            f = fits[m]
            ci = f"[{cell(f['ci_low'])}, {cell(f['ci_high'])}]" if math.isfinite(f["ci_low"]) else "–"
            span = f"{f['width_min']}–{f['width_max']} ({f['n_widths']})" if f["n_widths"] else "–"
            expected = expected_exponent(m, n_layers, param(g))
            used = f"{f['n_points']} ({f['n_dropped']})" if f["n_dropped"] else f"{f['n_points']}"
            label = f"`{m}`" + (f" ({f['note']})" if f["note"] and "dropped" not in f["note"] else "")
            table.append((f"| {g.label} " if many else "") + f"| {label} | {cell(f['exponent'])} | {ci} | "
                         f"{cell(f['r2'], '{:.2f}')} | {span} | {used} | {expected or '–'} |")
    if not table:
        return []
    header = "| measure | exponent | 95% CI | R² | widths | runs used (dropped ≤ 0) | expected |"
    rule = "|---|---:|---|---:|---|---:|---|"
    return [("| group " if many else "") + header, ("|---" if many else "") + rule, *table]


def runs_per_width_table(bw) -> list[str]:
    """Runs, ok, diverged and failed per width of one group; [] when it has no width."""
    cells = bw.drop_duplicates("width").sort_values("width")
    if not len(cells):
        return []
    lines = ["| width | runs | ok | diverged | failed |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.width} | {r.n_runs} | {r.n_ok} | {r.n_diverged} | {r.n_failed} |" for r in cells.itertuples()]
    return lines


def regimes_table(scaling, cluster: list[Group]) -> list[str]:
    """One row per measure, one column per parameterisation: fitted exponent [95% CI] (expected)."""
    from pipeline.aggregate import expected_exponent

    fits = [{r["measure"]: r for r in scaling[scaling["group_id"] == g.group_id].to_dict("records")}
            for g in cluster]
    layers = hidden_layers(fits)
    params = [param(g) for g in cluster]
    lines = ["| measure | " + " | ".join(PARAM_NAMES.get(p, p) for p in params) + " |",
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
            ci = f" [{cell(r['ci_low'], '{:.2f}')}, {cell(r['ci_high'], '{:.2f}')}]" \
                if math.isfinite(r["ci_low"]) else ""
            e = expected_exponent(m, len(layers), p)
            cells.append(f"{cell(r['exponent'], '{:.2f}')}{ci}" + (f" ({e})" if e else ""))
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return lines


def _means(bw, measures) -> dict[str, dict[int, float]]:
    """measure -> width -> mean over the ok seeds, for the measures with at least one ok value."""
    rows = bw[bw["measure"].isin(list(measures)) & (bw["count"] > 0)]
    return {m: dict(zip(part["width"].astype(int), part["mean"].astype(float), strict=True))
            for m, part in rows.groupby("measure")}


def spectrum_table(bw) -> tuple[list[str], str | None]:
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
        lines += [prose.text("spectrum_constant_analytic", lo=fmt_g(lo), hi=fmt_g(hi), cond=fmt_g(cond)), ""]
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
            cells += [fmt_g(v) for v in values]
        pred, obs = get("train_loss_pred_ratio", w), get("train_loss_obs_ratio", w)
        cells += [fmt_g(pred), fmt_g(obs), fmt_g(obs / pred) if pred > 0 else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if infinite:
        lines += ["", prose.text("spectrum_infinite_cond")]
    return lines, None


def gp_table(rows) -> list[str]:
    """Per width: covariance error against the NNGP with its sampling floor, KS with its floor; and, from
    ``gp_seeds`` runs, the finite-width bias of the covariance with its CI and exponent."""
    lines = ["| width | seeds | outputs | rel. error | sampling floor | error / floor | KS | KS floor |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows.to_dict("records"):
        ratio = r["nngp_cov_rel_err"] / r["nngp_cov_rel_err_floor"] if r["nngp_cov_rel_err_floor"] > 0 else math.nan
        lines.append(f"| {r['width']} | {r['seeds']} | {r['outputs']} | {fmt_g(r['nngp_cov_rel_err'])} | "
                     f"{fmt_g(r['nngp_cov_rel_err_floor'])} | {ratio:.2f} | {fmt_g(r['ks_stat'])} | "
                     f"{fmt_g(r.get('ks_stat_floor', math.nan))} |")
    with_bias = [r for r in rows.to_dict("records") if r.get("source") == "gp_seeds"]
    if with_bias:
        first = with_bias[0]
        lines += ["", prose.text("gp_bias", seeds=first["seeds"], points=int(first["bias_points"])), "",
                  "| width | bias ‖E[ffᵀ]−K‖/‖K‖ | 95% CI | noise floor | resolved |", "|---:|---:|---|---:|:---:|"]
        for r in with_bias:
            lines.append(f"| {r['width']} | {fmt_g(r['nngp_bias_rel'])} | [{fmt_g(r['nngp_bias_rel_lo'])}, "
                         f"{fmt_g(r['nngp_bias_rel_hi'])}] | {fmt_g(r['nngp_bias_rel_floor'])} | "
                         f"{'yes' if r['nngp_bias_resolved'] else 'no'} |")
        slope = first.get("nngp_bias_exponent", math.nan)
        if slope is not None and math.isfinite(slope):
            lo, hi = first["nngp_bias_exponent_lo"], first["nngp_bias_exponent_hi"]
            lines += ["", prose.text("gp_bias_exponent", slope=f"{slope:.2f}", lo=f"{lo:.2f}", hi=f"{hi:.2f}")]
    return lines
