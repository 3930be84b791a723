"""The fully-connected network whose infinite-width kernels :mod:`kernels.analytic` computes.

``MLP(in_dim, width, depth, out_dim, activation, w_std, b_std, parameterization)`` takes exactly the
arguments of :func:`kernels.analytic.mlp_kernels` (plus the finite sizes), and the same activation
names, so a network and its kernel limit are built from one description:

    depth x [Dense(width) -> activation]  ->  Dense(out_dim)

NTK parameterisation (default): ``z = w_std/sqrt(fan_in) * W h + b_std * b`` with ``W, b ~ N(0, 1)``.
Standard parameterisation: ``z = W h + b`` with ``W ~ N(0, w_std^2/fan_in)``, ``b ~ N(0, b_std^2)``.

Maximal-update parameterisation (``"mup"``, μP), for SGD / full-batch GD with one global learning rate:
the abc-parameterisation of Yang & Hu 2021, "Feature Learning in Infinite-Width Neural Networks"
(arXiv 2011.14522), Table 3, row μP: every layer's weight is ``W_l = n^-a_l w_l`` with trained
``w_l ~ N(0, n^-2 b_l)`` and learning rate ``eta n^-c``, with width ``n`` and

    ============  =======  =====  ===
    layer          a_l      b_l    c
    ============  =======  =====  ===
    input (l=1)    -1/2     1/2    0
    hidden         0        1/2    0
    output (L+1)   1/2      1/2    0
    ============  =======  =====  ===

so ``a_{L+1} + b_{L+1} = 1``: the output is ``O(n^-1/2)`` at init, and every layer's features move by
``O(1)`` per coordinate in training. For one hidden layer this is the mean-field parameterisation (by the
abc symmetry ``a += t, b -= t, c -= 2t`` it is ``f = 1/n sum_i v_i phi(u_i . x)``, ``u, v ~ N(0, 1)``, with
learning rate ``eta n``). The finite input and output dimensions and the activation gain keep the NTK
constants: input layer ``z = w_std sqrt(n/d) * w x``, hidden ``z = w_std * w h``, output
``f = w_std/sqrt(n) * w h``, all ``w ~ N(0, 1/n)``. Biases are weights from a constant input (Yang & Hu
treat them so): hidden biases as input weights, ``b_std sqrt(n) * b`` with ``b ~ N(0, 1/n)``; the output
bias, finite on both sides, ``b_std * b`` with ``b ~ N(0, 1)``. With ``depth = 0`` (no width) the single
layer is the NTK one. Consequence used elsewhere: the forward pass of the hidden layers is the NTK
network's for the same draws, the readout is ``n^-1/2`` of it, and the empirical NTK at init (with
respect to these parameters, i.e. what global-rate GD sees) equals the NTK-parameterisation one exactly:
its limit at init is the same analytic ``Theta``. What differs is training: it moves the μP kernel by
``O(1)`` at every width.
Initialisation draws from a private ``torch.Generator`` seeded by ``seed`` on the CPU, so the same
seed gives the same network on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from kernels.activations import Activation, get_activation

Tensor = torch.Tensor


class Dense(nn.Module):
    """``z = weight_scale * h @ W.T + bias_scale * b``, with ``W: (fan_out, fan_in)``, ``b: (fan_out,)``.

    The scales hold the parameterisation: ``(w_std/sqrt(fan_in), b_std)`` for NTK, ``(1, 1)`` for
    standard (where the std lives in the initial values instead). For ``"mup"``, ``mup_role`` ("input",
    "hidden", "output" or "only", a depth-0 network's single layer) and ``width`` (``n``) place the layer in
    Yang & Hu's Table 3 (module docstring): both scales and the initial std carry powers of ``n``.
    """

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        *,
        w_std: float,
        b_std: float,
        parameterization: str,
        generator: torch.Generator,
        dtype: torch.dtype,
        mup_role: str | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__()
        weight = torch.randn(fan_out, fan_in, generator=generator, dtype=dtype)
        bias = torch.randn(fan_out, generator=generator, dtype=dtype)
        if parameterization == "ntk":
            self.weight_scale, self.bias_scale = w_std / math.sqrt(fan_in), float(b_std)
        elif parameterization == "standard":
            self.weight_scale, self.bias_scale = 1.0, 1.0
            weight *= w_std / math.sqrt(fan_in)
            bias *= b_std
        elif parameterization == "mup":
            self.weight_scale, self.bias_scale = _mup_scales(fan_in, w_std, b_std, mup_role, width, weight, bias)
        else:
            raise ValueError(f"parameterization must be 'ntk', 'standard' or 'mup', got {parameterization!r}")
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, h: Tensor) -> Tensor:
        """``h: (N, fan_in) -> (N, fan_out)``."""
        return torch.addmm(self.bias * self.bias_scale, h, self.weight.T, alpha=self.weight_scale)


def _mup_scales(fan_in: int, w_std: float, b_std: float, role: str | None, width: int | None,
                weight: Tensor, bias: Tensor) -> tuple[float, float]:
    """μP multipliers of one layer (Yang & Hu 2021, Table 3); scales ``weight`` and ``bias`` (drawn
    ``N(0, 1)``) in place to their initial std ``n^-b``. Returns ``(weight_scale, bias_scale)``."""
    if role == "only":
        return w_std / math.sqrt(fan_in), float(b_std)
    if role not in ("input", "hidden", "output") or not isinstance(width, int) or width <= 0:
        raise ValueError(f"mup needs mup_role input/hidden/output/only and a width, got {role!r}, {width!r}")
    n = width
    weight /= math.sqrt(n)  # b_l = 1/2 for every layer
    if role == "input":  # a = -1/2 (times the NTK constant 1/sqrt(d) of a finite fan-in)
        w_scale = w_std * math.sqrt(n / fan_in)
    elif role == "hidden":  # a = 0
        w_scale = float(w_std)
    else:  # output, a = 1/2
        w_scale = w_std / math.sqrt(n)
    if role == "output":  # bias from a constant input to a finite output: a = b = 0
        return w_scale, float(b_std)
    bias /= math.sqrt(n)  # hidden biases are input weights: a = -1/2, b = 1/2
    return w_scale, b_std * math.sqrt(n)


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units, then a linear readout to ``out_dim``.

    ``forward(x: (N, in_dim)) -> (N, out_dim)``. ``layers[0..depth-1]`` are hidden, ``layers[-1]`` the
    readout; the activation is applied after every hidden layer.
    """

    def __init__(
        self,
        in_dim: int,
        width: int,
        depth: int,
        out_dim: int,
        activation: str | Callable[[Tensor], Tensor] | Activation = "relu",
        w_std: float = 2**0.5,
        b_std: float = 0.0,
        parameterization: str = "ntk",
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("width", width), ("out_dim", out_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
        self.activation = get_activation(activation)
        self.config = dict(
            in_dim=in_dim, width=width, depth=depth, out_dim=out_dim, activation=self.activation.name,
            w_std=float(w_std), b_std=float(b_std), parameterization=parameterization,
        )
        generator = torch.Generator().manual_seed(int(seed))
        sizes = [in_dim] + [width] * depth + [out_dim]
        roles = ["only"] if depth == 0 else ["input"] + ["hidden"] * (depth - 1) + ["output"]
        self.layers = nn.ModuleList(
            Dense(fan_in, fan_out, w_std=w_std, b_std=b_std, parameterization=parameterization,
                  generator=generator, dtype=dtype, mup_role=role, width=width)
            for fan_in, fan_out, role in zip(sizes[:-1], sizes[1:], roles, strict=True)
        )

    @property
    def depth(self) -> int:
        return len(self.layers) - 1

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.layers[:-1]:
            h = self.activation.fn(layer(h))
        return self.layers[-1](h)

    def forward_with_preactivations(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The output plus what the structured empirical NTK needs.

        Returns ``(out, inputs, preacts)``: ``inputs[l]`` is the input to ``layers[l]``
        (``inputs[0] = x``), ``(N, fan_in_l)``; ``preacts[l]`` its hidden pre-activation
        ``(N, width)`` for ``l < depth``.
        """
        inputs, preacts = [x], []
        h = x
        for layer in self.layers[:-1]:
            z = layer(h)
            preacts.append(z)
            h = self.activation.fn(z)
            inputs.append(h)
        return self.layers[-1](h), inputs, preacts

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
