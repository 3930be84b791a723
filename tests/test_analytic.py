"""Infinite-width kernels: closed forms against quadrature, exact special cases, PSD, edge cases."""

import math

import numpy as np
import pytest
import torch

from kernels.activations import gaussian_expectations, get_activation
from kernels.analytic import mlp_kernels, mlp_kernels_from_dots


def _inputs(n: int = 7, d: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


@pytest.mark.parametrize("name", ["erf", "gelu", "identity"])
def test_smooth_closed_forms_match_quadrature_to_1e6(name):
    """The same activation through its closed form and through Gauss-Hermite quadrature (a
    torch callable of the same function) agrees to 1e-6 relative after a depth-3 recursion."""
    act = get_activation(name)
    x = _inputs()
    closed = mlp_kernels(x, depth=3, activation=name, b_std=0.3)
    by_quad = mlp_kernels(x, depth=3, activation=lambda z: act.fn(z), b_std=0.3)
    for key in ("nngp", "ntk"):
        scale = np.abs(closed[key]).max()
        np.testing.assert_allclose(by_quad[key], closed[key], rtol=1e-6, atol=1e-9 * scale)


@pytest.mark.parametrize("name", ["erf", "gelu"])
def test_quadrature_stays_accurate_at_large_variance(name):
    """Inputs with |x|^2/d from 0.1 to ~400 (like the outlier rows of standardised MNIST): pre-activations
    whose variance is far past where a fixed Gauss-Hermite rule resolves phi(sqrt(k) z); the graded rule
    must still match the closed form to 1e-6 relative through a depth-2 recursion."""
    act = get_activation(name)
    x = _inputs(n=9, d=6, seed=3) * np.geomspace(0.3, 20.0, 9)[:, None]
    closed = mlp_kernels(x, depth=2, activation=name, b_std=0.1)
    by_quad = mlp_kernels(x, depth=2, activation=lambda z: act.fn(z), b_std=0.1)
    for key in ("nngp", "ntk"):
        np.testing.assert_allclose(by_quad[key], closed[key], rtol=1e-6, atol=1e-9 * np.abs(closed[key]).max())


@pytest.mark.parametrize("rule", ["hermite", "graded"])
@pytest.mark.parametrize("variance", [0.3, 2.0])
def test_both_quadrature_rules_agree_where_hermite_is_exact(rule, variance):
    act = get_activation("erf")
    k11 = torch.full((5,), variance, dtype=torch.float64)
    k12 = variance * torch.tensor([-1.0, -0.3, 0.0, 0.7, 1.0], dtype=torch.float64)
    t, tdot = act.dual(k11, k11, k12)
    tq, tdq = gaussian_expectations(act.fn, act.deriv, k11, k11, k12, rule=rule)
    torch.testing.assert_close(tq, t, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(tdq, tdot, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", ["relu", "abs", "leaky_relu:0.2", "abrelu:-0.5,2"])
def test_kinked_closed_forms_match_dense_quadrature(name):
    """Quadrature converges only algebraically across a kink (about 1e-3 relative at 96 points for
    T, worse for the step-function Tdot), so check the closed form against a 200-point rule (numpy's
    Hermite nodes overflow beyond ~250) at a tolerance that rule achieves."""
    act = get_activation(name)
    x = torch.tensor(_inputs(), dtype=torch.float64)
    k = 2 * x @ x.T / x.shape[1]
    d = torch.diagonal(k)
    k11, k22 = d[:, None].expand_as(k), d[None, :].expand_as(k)
    t, tdot = act.dual(k11, k22, k)
    tq, tdq = gaussian_expectations(act.fn, act.deriv, k11, k22, k, points=200)
    assert torch.allclose(t, tq, rtol=2e-3, atol=2e-3 * t.abs().max())
    assert torch.allclose(tdot, tdq, rtol=0, atol=5e-2 * tdot.abs().max())


def test_abrelu_special_cases_are_the_named_ones():
    x = _inputs()
    a = mlp_kernels(x, depth=2, activation="abrelu:0,1")
    b = mlp_kernels(x, depth=2, activation="relu")
    np.testing.assert_allclose(a["ntk"], b["ntk"], rtol=1e-14)
    c = mlp_kernels(x, depth=2, activation="abrelu:1,1")
    e = mlp_kernels(x, depth=2, activation="identity")
    np.testing.assert_allclose(c["ntk"], e["ntk"], rtol=1e-12)


def test_relu_diagonal_closed_form():
    """ReLU with w_std^2 = 2, b_std = 0 preserves the norm: K^l(x, x) = 2|x|^2/d at every layer, and
    each of the depth+1 layers adds one such term to the NTK: Theta(x, x) = (depth+1) 2|x|^2/d."""
    x = _inputs(n=4, d=9)
    q = 2 * (x * x).sum(1) / 9
    for depth in (0, 1, 4):
        out = mlp_kernels(x, depth=depth)
        np.testing.assert_allclose(np.diag(out["nngp"]), q, rtol=1e-13)
        np.testing.assert_allclose(np.diag(out["ntk"]), (depth + 1) * q, rtol=1e-13)


def test_relu_one_layer_arc_cosine_formula():
    """depth=1 ReLU NNGP is w^2 T with T the degree-1 arc-cosine kernel (Cho & Saul 2009)."""
    x = _inputs(n=2, d=3, seed=3)
    k = 2 * x @ x.T / 3
    cos = k[0, 1] / math.sqrt(k[0, 0] * k[1, 1])
    theta = math.acos(cos)
    t = math.sqrt(k[0, 0] * k[1, 1]) * (math.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi)
    tdot = (math.pi - theta) / (2 * math.pi)
    out = mlp_kernels(x, depth=1)
    assert out["nngp"][0, 1] == pytest.approx(2 * t, rel=1e-13)
    assert out["ntk"][0, 1] == pytest.approx(2 * t + 2 * tdot * k[0, 1], rel=1e-13)


def test_erf_one_layer_williams_formula():
    x = _inputs(n=2, d=4, seed=5)
    k = 2 * x @ x.T / 4
    t = (2 / math.pi) * math.asin(2 * k[0, 1] / math.sqrt((1 + 2 * k[0, 0]) * (1 + 2 * k[1, 1])))
    out = mlp_kernels(x, depth=1, activation="erf")
    assert out["nngp"][0, 1] == pytest.approx(2 * t, rel=1e-13)


@pytest.mark.parametrize("name", ["relu", "erf", "gelu", "leaky_relu:0.1", "tanh"])
def test_symmetric_and_psd(name):
    x = _inputs(n=12, d=6, seed=1)
    out = mlp_kernels(x, depth=3, activation=name, b_std=0.1)
    for key, k in out.items():
        assert np.array_equal(k, k.T), key
        eig = np.linalg.eigvalsh(k)
        assert eig.min() > -1e-12 * eig.max(), (key, eig.min())


def test_parallel_antiparallel_and_zero_inputs_give_no_nan():
    rng = np.random.default_rng(2)
    v = rng.normal(size=5)
    x = np.stack([v, 3.0 * v, -v, np.zeros(5), 1e-170 * v])
    for name in ("relu", "erf", "gelu", "abs", "tanh"):
        out = mlp_kernels(x, depth=3, activation=name)
        for key, k in out.items():
            assert np.isfinite(k).all(), (name, key)
    relu = mlp_kernels(x[:3], depth=1)
    # Anti-parallel inputs never co-activate a ReLU: both kernels vanish after one layer.
    assert relu["nngp"][0, 2] == pytest.approx(0.0, abs=1e-15)
    assert relu["ntk"][0, 2] == pytest.approx(0.0, abs=1e-15)
    # Parallel inputs: the kernel is bilinear in the norms.
    assert relu["nngp"][0, 1] == pytest.approx(3 * relu["nngp"][0, 0], rel=1e-12)


def test_blocks_compose_to_the_full_matrix():
    """A pure function of (x1_block, x2_block): tiles of a cross kernel equal the full kernel's."""
    x = _inputs(n=10, d=4, seed=7)
    full = mlp_kernels(x, depth=2, activation="gelu", b_std=0.2)["ntk"]
    tile = mlp_kernels(x[2:5], x[6:10], depth=2, activation="gelu", b_std=0.2)["ntk"]
    np.testing.assert_allclose(tile, full[2:5, 6:10], rtol=1e-14)
    xt = torch.tensor(x)
    dots = mlp_kernels_from_dots(xt @ xt.T, (xt * xt).sum(1), (xt * xt).sum(1), 4, depth=2, activation="gelu",
                                 b_std=0.2)["ntk"]
    np.testing.assert_allclose(dots.numpy(), full, rtol=1e-13)


def test_standard_parameterisation():
    """Same NNGP as NTK parameterisation; the NTK grows with the width, explicitly."""
    x = _inputs()
    ntk_p = mlp_kernels(x, depth=2, b_std=0.1)
    std_small = mlp_kernels(x, depth=2, b_std=0.1, parameterization="standard", width=100)
    std_big = mlp_kernels(x, depth=2, b_std=0.1, parameterization="standard", width=10_000)
    np.testing.assert_allclose(std_small["nngp"], ntk_p["nngp"], rtol=1e-14)
    assert np.all(std_big["ntk"] > std_small["ntk"])
    with pytest.raises(ValueError, match="width"):
        mlp_kernels(x, depth=2, parameterization="standard")


def test_torch_in_torch_out_and_float32():
    x = torch.tensor(_inputs(), dtype=torch.float32)
    out = mlp_kernels(x, depth=2, dtype=torch.float32)
    assert isinstance(out["ntk"], torch.Tensor) and out["ntk"].dtype == torch.float32
    ref = mlp_kernels(x.double().numpy(), depth=2)
    np.testing.assert_allclose(out["ntk"].numpy(), ref["ntk"], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=-1), "depth"),
        (dict(depth=1, activation="swishy"), "unknown activation"),
        (dict(depth=1, activation="leaky_relu:x"), "expected 1 number"),
        (dict(depth=1, parameterization="mup"), "parameterization"),
        (dict(depth=1, get=("ntk", "cntk")), "get"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlp_kernels(_inputs(), **kwargs)
