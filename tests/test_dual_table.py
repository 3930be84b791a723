"""The interpolation table for duals without a closed form (kernels.dual_table) against float64
mlp_kernels: exact variance nodes (rows of one norm) and the log-variance grid (rows of many norms)."""

from __future__ import annotations

import numpy as np
import torch

from kernels.analytic import mlp_kernels
from kernels.dual_table import DualTable
from kernels.fused import fused_tile
from kernels.gram import AnalyticKernel, gram_to_zarr, open_gram


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((torch.as_tensor(out).double() - torch.as_tensor(ref)).abs().max() / torch.as_tensor(ref).abs().max())


def _unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True) * d**0.5


def test_grid_nodes_interpolate_closed_forms_to_float32():
    """Rows of many norms: 4-point interpolation in log-variance and angle; erf and gelu have closed forms,
    so the table's own error is measured (slices are cheap)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 9, generator=g) * (0.8 + 0.4 * torch.rand(30, 1, generator=g))
    y = torch.randn(20, 9, generator=g) * (0.8 + 0.4 * torch.rand(20, 1, generator=g))
    for act in ("erf", "gelu"):
        table = DualTable(act)
        out = fused_tile(x, y, depth=2, activation=act, b_std=0.1, dual=table)
        diag = fused_tile(x, x, depth=2, activation=act, b_std=0.1, dual=table)
        ref = mlp_kernels(x.double(), y.double(), depth=2, activation=act, b_std=0.1)["ntk"]
        ref_diag = mlp_kernels(x.double(), depth=2, activation=act, b_std=0.1)["ntk"]
        assert _rel(out, ref) < 1e-6 and _rel(diag, ref_diag) < 1e-6
        assert torch.equal(diag.diagonal(), ref_diag.diagonal().float())  # pinned
        assert len(table._slices) > 50  # grid mode, not exact nodes


def test_tanh_by_table_in_a_gram(tmp_path):
    """tanh (quadrature only): rows of one norm use exact variance nodes; auto picks the table for
    float32; the Gram matches the float64 quadrature recursion."""
    x = _unit_rows(24, 10, seed=1).numpy()
    kernel = AnalyticKernel(depth=2, activation="tanh")
    assert kernel.resolved(10**6).impl == "table"
    gram_to_zarr(kernel, x, store=tmp_path / "g.zarr", path="k", block=16, progress=False)
    g = open_gram(tmp_path / "g.zarr", "k").compute()
    ref = mlp_kernels(x.astype(np.float64), depth=2, activation="tanh")["ntk"]
    assert _rel(g, ref) < 1e-6
    assert np.array_equal(g, g.T)


def test_tanh_grid_rule_within_1e6_of_an_accurate_quadrature():
    """Grid mode for tanh (variances log-uniform in [2/1.1^2, 2 * 1.1^2], correlations up to |c| = 1): T and
    Tdot within 1e-6 of the graded quadrature (~1e-8), evaluated in float32 as a Gram does. The node slices
    use 160 Hermite points: with the activation's 96-point dual, Tdot was off by 1.3e-6 near |c| = 1."""
    from kernels.activations import gaussian_expectations

    g = torch.Generator().manual_seed(0)
    k = 30
    lo, hi = np.log(2 / 1.1**2), np.log(2 * 1.1**2)
    v1 = torch.exp(lo + (hi - lo) * torch.rand(k, 1, generator=g, dtype=torch.float64))
    v2 = torch.exp(lo + (hi - lo) * torch.rand(1, k, generator=g, dtype=torch.float64))
    c = torch.cat([torch.rand(k, k - 4, generator=g, dtype=torch.float64) * 2 - 1,
                   torch.tensor([[-1.0, -0.97, 0.98, 1.0]], dtype=torch.float64).expand(k, 4)], dim=1)
    k12 = c * torch.sqrt(v1 * v2)
    table = DualTable("tanh")
    got_t, got_d = table.prepare_layer(v1.reshape(-1), v2.reshape(-1))(v1.float(), v2.float(), k12.float())
    act = table.act
    ref_t, ref_d = gaussian_expectations(act.fn, act.deriv, v1.expand(k, k), v2.expand(k, k), k12, rule="graded")
    assert len(table._slices) > 20  # grid mode
    assert _rel(got_t, ref_t) < 1e-6 and _rel(got_d, ref_d) < 1e-6
