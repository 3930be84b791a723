"""The finite-width bias of the NNGP: ``B = E[f f^T] - K`` over random initialisations of an MLP.

At one hidden layer ``E[f f^T]`` equals the NNGP ``K`` at every width; from two hidden layers on it differs
by ``O(1/width)`` (the layer maps are nonlinear in the empirical covariance of the layer below, so Jensen's
gap survives the average). Sampling ``f f^T`` directly cannot resolve that: at width 64 one network's
``f f^T`` is off by ~40% of ``|K|_F`` while ``B`` is ~0.3%, so millions of networks would be needed. This
module estimates ``B`` without bias from a few hundred networks, with noise of the same order as ``B``:

1. **Rao-Blackwellisation over the readout and the last hidden layer.** Given hidden layers ``1..L-1``,
   ``E[f f^T | layers < L] = G(P_{L-1})``, where ``P_l = phi_l phi_l^T / width`` is the empirical
   (post-activation) Gram of hidden layer ``l`` and ``G`` is one infinite-width layer (the NNGP map at
   depth 1 applied to ``P``; :func:`layer_map`).
2. **Martingale control variates.** With ``H_m(P)`` the NNGP of ``m`` infinite-width layers on top of
   ``P``, ``P_l^inf = E[P_l]`` at infinite width and ``M_l = E[P_l | layer l-1]`` (``M_1 = P_1^inf``
   exactly; ``M_l = (G(P_{l-1}) - b_std^2) / w_std^2``), every term
   ``c_l = DH_{L-l}(P_l^inf)[P_l - M_l]`` has mean zero, and subtracting ``sum_l c_l`` removes the
   first-order fluctuations of every layer. The per-network residual
   ``R = G(P_{L-1}) - K - sum_l c_l`` has mean exactly ``B`` and fluctuations of second order,
   ``O(1/width)``, like ``B`` itself. (The directional derivatives are central differences in float64.)

The residuals of ``S`` networks give ``|B|_F^2`` without the noise's upward bias through the U-statistic
``U = sum_{s != t} <R_s, R_t> / (S (S-1))``, with a jackknife standard error (:mod:`kernels.bias_statistics`);
all of it is a function of the ``S x S`` Gram ``<R_s, R_t>``, so resampling seeds needs no residual matrices.

Convention: NTK or standard parameterisation alike (the forward function at init is the same in
distribution), weights and biases ``N(0, 1)`` scaled as in :class:`kernels.mlp.MLP`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kernels.activations import Activation
from kernels.analytic import mlp_kernels
from kernels.layers import KernelState, mlp
from kernels.mlp import MLP

Tensor = torch.Tensor
FD_STEP = 1e-5  # central-difference step: the largest entry of the perturbation of P, in P's units


def layer_map(p: Tensor, layers: int, *, activation: str | Callable | Activation, w_std: float,
              b_std: float) -> Tensor:
    """``H_layers(P)``: the NNGP after ``layers`` infinite-width layers fed by the features with Gram ``P``.

    ``p: (n, n)`` float64, a post-activation Gram per unit (``phi phi^T / width``); the next layer's
    pre-activation covariance is ``w_std^2 P + b_std^2``: the kernel rules of :func:`kernels.layers.mlp`
    with ``layers`` hidden layers, fed ``P`` in place of the inputs' Gram. Returns ``(n, n)``.
    """
    d = torch.diagonal(p)
    state = KernelState(d[:, None], d[None, :], p, track_ntk=False)
    return mlp(layers, None, None, activation, w_std, b_std).kernel(state).k12


@dataclass(frozen=True)
class LimitGrams:
    """The infinite-width quantities on the points ``x``: ``k`` the NNGP ``(n, n)`` at the network's depth,
    ``p[l]`` the per-unit post-activation Gram ``E[phi_l phi_l^T] (n, n)`` of hidden layer ``l = 1..L-1``."""

    k: Tensor
    p: dict[int, Tensor]


def limit_grams(x: np.ndarray, *, depth: int, activation: str | Callable | Activation, w_std: float,
                b_std: float) -> LimitGrams:
    """:class:`LimitGrams` of ``x: (n, d)`` (float64 throughout)."""
    x64 = np.asarray(x, dtype=np.float64)
    args = dict(activation=activation, w_std=w_std, b_std=b_std, get=("nngp",))
    k = torch.from_numpy(mlp_kernels(x64, depth=depth, **args)["nngp"])
    p = {layer: (torch.from_numpy(mlp_kernels(x64, depth=layer, **args)["nngp"]) - b_std**2) / w_std**2
         for layer in range(1, depth)}
    return LimitGrams(k=k, p=p)


def hidden_grams(model: MLP, x: Tensor) -> list[Tensor]:
    """``[P_1, ..., P_{L-1}]``: the per-unit Grams ``phi_l phi_l^T / width`` of ``model``'s hidden layers
    ``1..L-1`` on ``x: (n, d)`` (the last hidden layer's is not needed), float64 ``(n, n)`` each."""
    with torch.no_grad():
        _, inputs, _ = model.forward_with_preactivations(x)
    return [(h @ h.T / h.shape[1]).to(torch.float64) for h in inputs[1 : model.depth]]


def bias_residual(grams: list[Tensor], limit: LimitGrams, *, activation: str | Callable | Activation,
                  w_std: float, b_std: float) -> Tensor:
    """One network's residual ``R (n, n)``, with ``E[R] = E[f f^T] - K`` (module docstring).

    ``grams``: :func:`hidden_grams` of the network (empty for one hidden layer, where ``R = 0``).
    """
    depth = len(grams) + 1
    if depth == 1:
        return torch.zeros_like(limit.k)
    args = dict(activation=activation, w_std=w_std, b_std=b_std)
    control = torch.zeros_like(limit.k)
    for layer, p in enumerate(grams, start=1):
        mean = limit.p[1] if layer == 1 else (layer_map(grams[layer - 2], 1, **args) - b_std**2) / w_std**2
        delta = p - mean
        scale = float(delta.abs().max())
        if scale == 0.0:
            continue
        eps = FD_STEP / scale
        base, up = limit.p[layer], depth - layer
        control += (layer_map(base + eps * delta, up, **args) - layer_map(base - eps * delta, up, **args)) / (2 * eps)
    return layer_map(grams[-1], 1, **args) - limit.k - control
