"""The fully-connected network whose infinite-width kernels :mod:`kernels.analytic` computes.

``MLP(in_dim, width, depth, out_dim, activation, w_std, b_std, parameterization)`` takes exactly the
arguments of :func:`kernels.analytic.mlp_kernels` (plus the finite sizes), and the same activation
names, so a network and its kernel limit are built from one description:

    depth x [Dense(width) -> activation]  ->  Dense(out_dim)

NTK parameterisation (default): ``z = w_std/sqrt(fan_in) * W h + b_std * b`` with ``W, b ~ N(0, 1)``.
Standard parameterisation: ``z = W h + b`` with ``W ~ N(0, w_std^2/fan_in)``, ``b ~ N(0, b_std^2)``.
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
    standard (where the std lives in the initial values instead).
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
        else:
            raise ValueError(f"parameterization must be 'ntk' or 'standard', got {parameterization!r}")
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, h: Tensor) -> Tensor:
        """``h: (N, fan_in) -> (N, fan_out)``."""
        return torch.addmm(self.bias * self.bias_scale, h, self.weight.T, alpha=self.weight_scale)


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
        self.layers = nn.ModuleList(
            Dense(fan_in, fan_out, w_std=w_std, b_std=b_std, parameterization=parameterization,
                  generator=generator, dtype=dtype)
            for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)
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
