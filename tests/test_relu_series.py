"""ReLU without bias as one Chebyshev series in the cosine (kernels.relu_series, impl="series"): the
angle-space recursion against float64 mlp_kernels, the series against the recursion, the float32 tile
against float64, which kernels take the path, and a Gram through it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels import relu_series
from kernels.analytic import mlp_kernels
from kernels.fused import fused_tile
from kernels.gram import AnalyticKernel, gram_to_zarr, open_gram


def _pair_with_cosines(cos: np.ndarray, d: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows x_i, y_i in R^d with x_i . y_i = cos_i (float64)."""
    x = np.zeros((len(cos), d))
    x[:, 0] = 1.0
    y = np.zeros((len(cos), d))
    y[:, 0] = cos
    y[:, 1] = np.sqrt(np.clip(1 - cos**2, 0, None))
    return x, y


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize("depth", [0, 1, 2, 3, 6])
def test_angle_recursion_equals_float64_mlp_kernels(kind, depth):
    cos = np.concatenate([np.linspace(-1, 1, 41), [1 - 1e-9, -1 + 1e-9, 0.999999]])
    x, y = _pair_with_cosines(cos)
    d = x.shape[1]
    # rows of norm sqrt(d) with w_std^2 = 2: every layer's variance is 2, so the kernel is 2 F_L(c)
    ref = np.array([mlp_kernels(x[i : i + 1] * math.sqrt(d), y[i : i + 1] * math.sqrt(d), depth=depth,
                                get=(kind,))[kind][0, 0] for i in range(len(cos))]) / 2
    got = relu_series.angle_recursion(np.arccos(np.clip(cos, -1, 1)), depth, kind)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * (depth + 1))


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize("depth", [1, 3, 10, 32])
def test_series_fits_the_recursion(kind, depth):
    pos, neg, f1 = relu_series.coefficients(depth, kind)
    assert len(pos) == len(neg) <= relu_series.MAX_DEGREE + 1
    assert f1 == (depth + 1 if kind == "ntk" else 1)
    theta = np.linspace(0, math.pi, 50001)
    exact = relu_series.angle_recursion(theta, depth, kind)
    got = relu_series.evaluate(np.cos(theta), depth, kind)
    assert np.abs(got - exact).max() <= 2 * relu_series.FIT_TOL * f1
    assert relu_series.evaluate(np.array([1.0]), depth, kind)[0] == pytest.approx(f1, abs=1e-8 * f1)


def _inputs(n: int, d: int = 11, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * (0.3 + 2 * torch.rand(n, 1, generator=g))


@pytest.mark.parametrize(("kind", "depth", "w_std"), [("ntk", 3, 2**0.5), ("ntk", 5, 1.3), ("nngp", 3, 1.7),
                                                      ("ntk", 0, 2**0.5), ("ntk", 48, 2**0.5)])
def test_series_tile_matches_float64(kind, depth, w_std):
    """Horner's rule on the power coefficients through depth 32, Clenshaw's beyond (depth 48 NTK)."""
    assert (relu_series.power_coefficients(depth, kind) is None) == (depth == 48)
    x, y = _inputs(57, seed=1), _inputs(33, seed=2)
    x[4] = 0.0  # a zero-norm row
    arch = dict(depth=depth, w_std=w_std, b_std=0.0)
    ref = mlp_kernels(x.double(), y.double(), get=(kind,), **arch)[kind]
    ref_sym = mlp_kernels(x.double(), get=(kind,), **arch)[kind]
    out = fused_tile(x, y, kind=kind, series=True, compiled=True, **arch)
    sym = fused_tile(x, x, kind=kind, series=True, compiled=True, **arch)
    assert out.dtype == torch.float32
    for got, want in ((out, ref), (sym, ref_sym)):
        assert float((got.double() - want).abs().max() / want.abs().max()) < 5e-7
    nonzero = ref_sym.diagonal() > 0
    np.testing.assert_allclose(sym.diagonal().double()[nonzero], ref_sym.diagonal()[nonzero], rtol=4e-7)
    # the caller's row norms give the same tile
    sq = (x.double() ** 2).sum(1), (y.double() ** 2).sum(1)
    again = fused_tile(x, y, kind=kind, series=True, compiled=True, row_sq=sq, **arch)
    assert float((again - out).abs().max() / out.abs().max()) < 3e-7


def test_which_kernels_take_the_series():
    big = 10**9
    assert AnalyticKernel().resolved(big).impl == "series"
    assert AnalyticKernel(kind="nngp", w_std=1.2).resolved(big).impl == "series"
    assert AnalyticKernel(b_std=0.1).resolved(big).impl == "compiled"  # bias: not a function of the cosine
    assert AnalyticKernel(activation="erf").resolved(big).impl == "compiled"
    assert AnalyticKernel().resolved(10**6).impl == "fused"  # small: no compile
    for bad in (dict(b_std=0.1), dict(activation="erf"), dict(parameterization="standard", width=10)):
        with pytest.raises(ValueError, match="impl='series' needs ReLU"):
            AnalyticKernel(impl="series", **bad)


def test_series_gram_resumes_bit_for_bit(tmp_path):
    x = _inputs(150, d=9, seed=5).numpy()
    kernel = AnalyticKernel(depth=3, impl="series")
    store = tmp_path / "g.zarr"
    part = gram_to_zarr(kernel, x, store=store, path="ntk", block=32, progress=False, max_tiles=4)
    assert part.tiles_computed == 4
    gram_to_zarr(kernel, x, store=store, path="ntk", block=32, progress=False)
    fresh = gram_to_zarr(kernel, x, store=tmp_path / "f.zarr", path="ntk", block=32, progress=False)
    assert fresh.tiles_computed == 15
    a, b = open_gram(store, "ntk").compute(), open_gram(tmp_path / "f.zarr", "ntk").compute()
    assert np.array_equal(a, b) and np.array_equal(a, a.T)
    ref = mlp_kernels(x.astype(np.float64), depth=3, get=("ntk",))["ntk"]
    assert float(np.abs(a - ref).max() / np.abs(ref).max()) < 5e-7
