"""Infinite-width NNGP and NTK of the fully-connected network of :mod:`kernels.mlp`, from the same description.

Network convention (the one of ``neural-tangents``' ``stax.Dense(W_std, b_std)``): ``depth`` hidden
layers, each ``Dense(width) -> activation``, then a linear readout ``Dense(out)``, the description
:func:`kernels.layers.mlp` that :class:`kernels.mlp.MLP` is built from; each layer's ``kernel`` rule
(:mod:`kernels.layers`) does one step. In NTK parameterisation a Dense layer is
``z = w_std/sqrt(fan_in) * W h + b_std * b`` with ``W, b ~ N(0, 1)``. The recursion, with ``(T, Tdot)`` the
activation's Gaussian dual (:mod:`kernels.activations`):

    K^1(x, x') = w_std^2 x.x'/d + b_std^2              Theta^1 = K^1
    K^{l+1}    = w_std^2 T(K^l) + b_std^2              Theta^{l+1} = K^{l+1} + w_std^2 Tdot(K^l) Theta^l

and the returned kernels are ``K^{depth+1}`` (NNGP) and ``Theta^{depth+1}`` (NTK), readout included.
Both are per output unit: the finite network's kernel converges to ``kernel * I_out``.

In standard parameterisation (``z = W h + b``, ``W ~ N(0, w_std^2/fan_in)``, ``b ~ N(0, b_std^2)``) the
NNGP is the same, and the NTK grows with the width; it is
``Theta^{l+1} = fan_in * T(K^l) + 1 + w_std^2 Tdot(K^l) Theta^l`` (``fan_in * T`` is ``x.x'`` at the first
layer), so it needs ``width``. Dividing by the width does *not* give the NTK-parameterised kernel: as the
width grows, ``Theta_std / width`` tends to the same layer sum with the input layer's term (fan-in ``d``)
and every bias term gone, and each remaining fresh term ``w_std^2 T(K) + b_std^2`` replaced by ``T(K)``.
For ReLU (``w_std^2 = 2``, ``b_std = 0``) on Gaussian inputs the entrywise ratio is 0.33-0.66 at depth 2
and 0.38-0.54 at depth 3 (width 16,384), not 1.

Everything is a pure function of a block of inputs, so :mod:`kernels.gram` can tile it; the work
below the input Gram is elementwise, ``O(N1 * N2 * depth)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from kernels.activations import Activation
from kernels.layers import KernelState, mlp

Tensor = torch.Tensor
ArrayLike = Any  # numpy array or torch tensor
KERNELS = ("nngp", "ntk")


def _as_tensor(x: ArrayLike, dtype: torch.dtype) -> Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(dtype)


def _check_args(depth: int, parameterization: str, width: int | None, get: Iterable[str]) -> tuple[str, ...]:
    get = tuple(get)
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
    if parameterization not in ("ntk", "standard"):
        raise ValueError(f"parameterization must be 'ntk' or 'standard', got {parameterization!r}")
    bad = [g for g in get if g not in KERNELS]
    if bad or not get:
        raise ValueError(f"get must name some of {KERNELS}, got {get!r}")
    if parameterization == "standard" and "ntk" in get and (width is None or width <= 0):
        raise ValueError("the standard-parameterisation NTK depends on the width: pass width=")
    return get


def mlp_kernels_from_dots(
    dot12: Tensor,
    sq1: Tensor,
    sq2: Tensor,
    in_dim: int,
    *,
    depth: int,
    activation: str | Callable | Activation = "relu",
    w_std: float = 2**0.5,
    b_std: float = 0.0,
    parameterization: str = "ntk",
    width: int | None = None,
    get: Iterable[str] = KERNELS,
) -> dict[str, Tensor]:
    """The kernels from input inner products: the block primitive that :func:`mlp_kernels` and the
    tiled Gram builder share.

    Args:
        dot12: ``(N1, N2)`` inner products ``x1 @ x2.T`` (unnormalised).
        sq1, sq2: ``(N1,)`` and ``(N2,)`` squared norms of the rows of ``x1`` and ``x2``.
        in_dim: ``d``, the input dimension (the first layer's fan-in).
    Returns:
        ``{"nngp": (N1, N2), "ntk": (N1, N2)}`` (the requested subset), in ``dot12``'s dtype.
    """
    get = _check_args(depth, parameterization, width, get)
    net = mlp(depth, width, None, activation, w_std, b_std, parameterization)
    state = net.kernel(KernelState.from_dots(dot12, sq1, sq2, in_dim, track_ntk="ntk" in get))
    out = {}
    if "nngp" in get:
        out["nngp"] = state.k12
    if state.track_ntk:
        out["ntk"] = state.ntk
    return out


def mlp_kernels(
    x1: ArrayLike,
    x2: ArrayLike | None = None,
    *,
    depth: int,
    activation: str | Callable | Activation = "relu",
    w_std: float = 2**0.5,
    b_std: float = 0.0,
    parameterization: str = "ntk",
    width: int | None = None,
    get: Iterable[str] = KERNELS,
    dtype: torch.dtype = torch.float64,
) -> dict[str, ArrayLike]:
    """Infinite-width NNGP and NTK of the MLP (see the module docstring for the convention).

    Args:
        x1: ``(N1, d)`` inputs; ``x2``: ``(N2, d)`` inputs, or None for ``x2 = x1``.
        depth: number of hidden layers (0 gives the linear model ``w_std^2 x.x'/d + b_std^2``).
        activation: a name parsed by :func:`kernels.activations.get_activation`, or a callable.
        w_std, b_std: weight and bias standard deviations, as in :class:`kernels.mlp.MLP`.
        parameterization: ``"ntk"`` (default) or ``"standard"`` (its NTK needs ``width``).
        get: which kernels to return, any of ``("nngp", "ntk")``.
        dtype: compute dtype; float64 for references, float32 for throughput.
    Returns:
        A dict of ``(N1, N2)`` arrays: numpy when ``x1`` is numpy, torch tensors when it is a tensor.
    """
    as_numpy = not isinstance(x1, torch.Tensor)
    a = _as_tensor(x1, dtype)
    b = a if x2 is None else _as_tensor(x2, dtype).to(a.device)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        shapes = f"{tuple(a.shape)} and {tuple(b.shape)}"
        raise ValueError(f"x1 and x2 must be (N, d) with the same d, got {shapes}")
    sq1 = (a * a).sum(dim=1)
    sq2 = sq1 if x2 is None else (b * b).sum(dim=1)
    dot12 = a @ b.T
    if x2 is None:
        # The angle recursion amplifies rounding near cos = 1 (d angle ~ sqrt(d cos)): a @ a.T's
        # diagonal differing from sq1 in the last bit would cost ~1e-8 relative (float64).
        dot12.diagonal().copy_(sq1)
    out = mlp_kernels_from_dots(
        dot12, sq1, sq2, a.shape[1], depth=depth, activation=activation, w_std=w_std, b_std=b_std,
        parameterization=parameterization, width=width, get=get,
    )
    if x2 is None:  # exact symmetry: the recursion is symmetric, rounding in a @ a.T need not be
        out = {k: 0.5 * (v + v.T) for k, v in out.items()}
    return {k: v.cpu().numpy() for k, v in out.items()} if as_numpy else out


def mlp_kernels_blocked(
    x1: np.ndarray,
    x2: np.ndarray | None = None,
    *,
    block: int = 1024,
    get: Iterable[str] = KERNELS,
    **arch: Any,
) -> dict[str, np.ndarray]:
    """:func:`mlp_kernels` in float64, tile by tile: memory is the ``(N1, N2)`` outputs plus one tile's
    temporaries (``O(block^2)``), not the recursion's dozen ``(N1, N2)`` intermediates.

    ``x2=None``: symmetric, only tiles on and above the diagonal are computed (diagonal tiles by the
    symmetric :func:`mlp_kernels`, so the diagonal is exact) and mirrored. ``arch``: the architecture
    keywords of :func:`mlp_kernels` (``depth``, ``activation``, ``w_std``, ``b_std``, ``parameterization``,
    ``width``). Returns float64 numpy arrays, equal to :func:`mlp_kernels` up to matmul rounding.
    """
    get = tuple(get)
    a = np.asarray(x1, dtype=np.float64)
    b = a if x2 is None else np.asarray(x2, dtype=np.float64)
    symmetric = x2 is None
    out = {k: np.empty((len(a), len(b)), dtype=np.float64) for k in get}
    for r0 in range(0, len(a), block):
        r1 = min(len(a), r0 + block)
        for c0 in range(r0 if symmetric else 0, len(b), block):
            c1 = min(len(b), c0 + block)
            if symmetric and r0 == c0:
                tile = mlp_kernels(a[r0:r1], get=get, **arch)
            else:
                tile = mlp_kernels(a[r0:r1], b[c0:c1], get=get, **arch)
            for k in get:
                out[k][r0:r1, c0:c1] = tile[k]
                if symmetric and r0 != c0:
                    out[k][c0:c1, r0:r1] = tile[k].T
    return out
