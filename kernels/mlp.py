"""The fully-connected torch network, built from the architecture description :func:`kernels.layers.mlp`.

``MLP(in_dim, width, depth, out_dim, activation, w_std, b_std, parameterization)`` takes exactly the
arguments of :func:`kernels.analytic.mlp_kernels` (plus the finite sizes), and both are built from the
same description, so the network and its kernel limit cannot drift apart:

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

from collections.abc import Callable

import torch
from torch import nn

from kernels.activations import Activation, get_activation
from kernels.layers import Nonlinearity, mlp

Tensor = torch.Tensor


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units, then a linear readout to ``out_dim``.

    ``forward(x: (N, in_dim)) -> (N, out_dim)``. ``layers[0..depth-1]`` are the hidden Dense modules
    (:class:`kernels.layers.DenseModule`), ``layers[-1]`` the readout; the activation is applied after every
    hidden layer. ``net`` is the architecture description (:class:`kernels.layers.Serial`) they come from.
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
        self.net = mlp(depth, width, out_dim, self.activation, w_std, b_std, parameterization)
        generator = torch.Generator().manual_seed(int(seed))
        self.layers = nn.ModuleList(self.net.init(in_dim, generator, dtype))

    @property
    def depth(self) -> int:
        return len(self.layers) - 1

    def forward(self, x: Tensor) -> Tensor:
        return self.net.apply(self.layers, x)

    def forward_with_preactivations(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The output plus what the structured empirical NTK needs.

        Returns ``(out, inputs, preacts)``: ``inputs[l]`` is the input to ``layers[l]``
        (``inputs[0] = x``), ``(N, fan_in_l)``; ``preacts[l]`` its hidden pre-activation
        ``(N, width)`` for ``l < depth``.
        """
        record: list[Tensor] = []
        out = self.net.apply(self.layers, x, record)
        inputs = [h for layer, h in zip(self.net.layers, record, strict=True) if layer.has_params]
        preacts = [h for layer, h in zip(self.net.layers, record, strict=True) if isinstance(layer, Nonlinearity)]
        return out, inputs, preacts

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
