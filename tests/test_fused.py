"""The fused float32 recursion (kernels.fused) against float64 mlp_kernels: every closed-form activation,
on and off the diagonal, NNGP and NTK, both parameterisations; diagonal entries pinned to the float64
value; the compiled kernel equal to the eager one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.analytic import mlp_kernels
from kernels.fused import fusable, fused_tile, is_relu

CLOSED = ["relu", "leaky_relu:0.2", "abs", "abrelu:-0.5,2", "erf", "gelu", "identity"]


def _inputs(n: int, d: int = 11, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    return x


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("activation", CLOSED)
@pytest.mark.parametrize(("kind", "w_std", "b_std", "par"), [
    ("ntk", 2**0.5, 0.0, "ntk"), ("nngp", 1.3, 0.4, "ntk"), ("ntk", 1.3, 0.4, "ntk"), ("ntk", 1.1, 0.2, "standard"),
])
def test_fused_matches_float64(activation, kind, w_std, b_std, par):
    x, y = _inputs(37, seed=1), _inputs(23, seed=2)
    x[5] = 0.0  # a zero-norm row
    arch = dict(depth=3, activation=activation, w_std=w_std, b_std=b_std, parameterization=par, width=50)
    ref = mlp_kernels(x.double(), y.double(), get=(kind,), **arch)[kind]
    ref_diag = mlp_kernels(x.double(), get=(kind,), **arch)[kind]
    out = fused_tile(x, y, kind=kind, **arch)
    diag = fused_tile(x, x, kind=kind, **arch)
    assert out.dtype == torch.float32 and out.shape == (37, 23)
    assert _rel(out, ref) < 2e-6
    assert _rel(diag, ref_diag) < 2e-6
    if is_relu(activation, par):  # cosine form: c = 1 pinned, the diagonal within float32 rounding
        np.testing.assert_allclose(diag.diagonal().double(), ref_diag.diagonal(), rtol=1e-6, atol=1e-30)
    else:  # pinned: exactly the float64 diagonal rounded to float32
        assert torch.equal(diag.diagonal(), ref_diag.diagonal().float())


@pytest.mark.parametrize("activation", ["erf", "gelu", "leaky_relu:0.2"])
def test_compiled_equals_eager_and_float64(activation):
    """The torch.compile'd single pass (a few seconds to compile per activation)."""
    x, y = _inputs(41, seed=3), _inputs(29, seed=4)
    for b in (y, x):
        eager = fused_tile(x, b, depth=3, activation=activation, b_std=0.3)
        comp = fused_tile(x, b, depth=3, activation=activation, b_std=0.3, compiled=True)
        ref = mlp_kernels(x.double(), None if b is x else b.double(), depth=3, activation=activation,
                          b_std=0.3)["ntk"]
        assert _rel(comp, ref) < 2e-6
        np.testing.assert_allclose(comp, eager, rtol=2e-6, atol=1e-6 * float(eager.abs().max()))
        if b is x:
            assert torch.equal(comp.diagonal(), eager.diagonal())


def test_dispatch_reads_closed_form():
    for name in CLOSED:
        assert fusable(name)
    for name in ("tanh", "sigmoid", "softplus"):
        assert not fusable(name)
    with pytest.raises(ValueError, match="closed-form"):
        fused_tile(_inputs(3), _inputs(3), depth=1, activation="tanh")
