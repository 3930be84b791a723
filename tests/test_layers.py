"""kernels.layers: one description gives the network, its kernels and its structured empirical NTK."""

import numpy as np
import pytest
import torch
from torch import nn

import kernels.empirical as emp
from kernels.activations import get_activation
from kernels.analytic import mlp_kernels_from_dots
from kernels.layers import Dense, KernelState, Nonlinearity, Serial, mlp, serial
from kernels.mlp import MLP

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def test_mlp_description_and_the_network_built_from_it():
    net = mlp(2, 8, 3, "erf", 1.5, 0.1, "mup")
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds == ["Dense", "Nonlinearity", "Dense", "Nonlinearity", "Dense"]
    assert [layer.mup_role for layer in net.layers if isinstance(layer, Dense)] == ["input", "hidden", "output"]
    assert serial(serial(*net.layers[:2]), *net.layers[2:]) == net
    model = MLP(4, 8, 2, 3, "erf", 1.5, 0.1, "mup", seed=2, dtype=F64)
    assert model.net == net
    assert [n for n, _ in model.named_parameters()] == [f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    x = torch.randn(5, 4, dtype=F64)
    assert torch.equal(model(x), net.apply(model.layers, x))
    with pytest.raises(ValueError, match="parameterization must be 'ntk', 'standard' or 'mup'"):
        Dense(3, parameterization="nt")


class _Stack(nn.Module):
    """A network of any layer sequence, built from its description, for the structured empirical NTK."""

    def __init__(self, net: Serial, in_dim: int, seed: int) -> None:
        super().__init__()
        self.net = net
        self.layers = nn.ModuleList(net.init(in_dim, torch.Generator().manual_seed(seed), F64))
        self.depth = len(self.layers) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.apply(self.layers, x)


@pytest.mark.parametrize("param", ["ntk", "standard"])
@pytest.mark.parametrize("trace", [True, False])
def test_structured_rules_compose_beyond_the_mlp(param, trace):
    """Dense after Dense, two activations in a row, an activation under the readout: every cotangent form."""
    tanh, relu = (Nonlinearity(get_activation(a)) for a in ("tanh", "leaky_relu:0.3"))
    net = serial(Dense(6, 1.3, 0.2, param), Dense(5, 0.9, 0.0, param), tanh, relu, Dense(7, 1.1, 0.4, param),
                 tanh, Dense(3, 1.2, 0.3, param))
    model = _Stack(net, 4, seed=5)
    x1 = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    x2 = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    ref = emp.empirical_ntk(model, x1, x2, method="jacobian", trace=trace)
    with torch.no_grad():
        got = emp._structured(model, x1, x2, False, trace, None)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_kernel_rules_compose_beyond_the_mlp():
    """Two Dense layers in a row are one Dense with w_std^2 = w1^2 w2^2 and b_std^2 = w2^2 b1^2 + b2^2 for
    the NNGP; the NTK adds the lower layer's share w2^2 * Theta."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((4, 3)))
    dot, sq = x @ x.T, (x * x).sum(1)
    dot.diagonal().copy_(sq)
    state = KernelState.from_dots(dot, sq, sq, 3, track_ntk=True)
    two = serial(Dense(None, 1.3, 0.2), Dense(None, 0.7, 0.5)).kernel(state)
    nngp1 = 1.3**2 * dot / 3 + 0.2**2
    nngp = 0.7**2 * nngp1 + 0.5**2
    torch.testing.assert_close(two.k12, nngp, rtol=1e-14, atol=0)
    torch.testing.assert_close(two.ntk, nngp + 0.7**2 * nngp1, rtol=1e-14, atol=0)
    one_layer = mlp_kernels_from_dots(dot, sq, sq, 3, depth=1, activation="gelu", w_std=1.2, b_std=0.3)
    net = serial(Dense(None, 1.2, 0.3), Nonlinearity(get_activation("gelu")), Dense(None, 1.2, 0.3))
    out = net.kernel(state)
    assert torch.equal(out.k12, one_layer["nngp"]) and torch.equal(out.ntk, one_layer["ntk"])
