"""Empirical (finite-width) neural tangent kernel of a network at its current parameters.

``Theta_hat_{kk'}(x, x') = sum_p d f_k(x)/d theta_p * d f_k'(x')/d theta_p``. With ``trace=True`` (the
default) :func:`empirical_ntk` returns the mean over the output diagonal, ``(1/K) sum_k Theta_hat_kk``,
which is the quantity that converges to :func:`kernels.analytic.mlp_kernels` ``["ntk"]`` (a per-output-unit
kernel) as the width grows; ``trace=False`` gives the full ``(N1, N2, K, K)`` block.

Three methods, all exact (they agree to rounding):

``"structured"``  only for :class:`kernels.mlp.MLP`, from its layers' structured rules
    (:mod:`kernels.layers`). For a fully-connected net the parameter gradients of
    layer ``l`` are outer products, so its contribution is a product of two Grams::

        Theta_hat_kk'(x, x') = sum_l <delta_l^k(x), delta_l^k'(x')> * (cw_l^2 <h_l(x), h_l(x')> + cb_l^2)

    with ``h_l`` the input of ``layers[l]``, ``(cw_l, cb_l)`` its ``(weight_scale, bias_scale)`` and
    ``delta_l^k = d f_k / d z_l`` the back-propagated output gradient at its pre-activation,
    ``delta_l = (delta_{l+1} @ (cw_{l+1} W_{l+1})) * phi'(z_l)``, identity at the readout. Cost per layer:
    ``O(N K width^2)`` for the back-propagation and ``O(N1 N2 K width)`` for the Grams, against
    ``O(N1 N2 K P)`` for the generic methods. With ``trace=True`` the traced delta-Gram
    ``sum_k delta^k(x) . delta^k(x')`` is one ``(N1, K*width) @ (K*width, N2)`` matmul; at the top hidden
    layer ``delta^k = cw W_L[k] * phi'(z)`` so it collapses to a single ``(N1, width) @ (width, N2)`` one,
    and at the readout it is ``K / K = 1``.
``"jacobian"``    any ``torch.nn.Module``: per-sample Jacobians by ``torch.func.vmap(jacrev(...))`` over
    ``functional_call``, contracted parameter by parameter.
``"ntk_vp"``      any ``torch.nn.Module``: NTK-vector products ``Theta v = J1 (J2^T v)``, ``J2^T v`` by
    ``torch.func.vjp`` and the push-forward by ``torch.func.jvp``, for ``v`` running over the output basis.
``"auto"``        ``"structured"`` for an :class:`~kernels.mlp.MLP`, else ``"jacobian"``.

Memory is bounded by working in blocks of inputs: each method computes per-input "features" (the
activations and deltas, the Jacobian rows, the ``J^T v`` cotangents) for a panel of rows and a chunk of
columns at a time and writes that block of the kernel (:func:`plan_blocks`). ``chunk_size`` forces square
blocks of that many inputs; by default everything is one block when all features fit in
:data:`BLOCK_BYTES`, else row panels take about 3/4 of it and column chunks 1/4. Column features are kept
between panels when all of them fit in :data:`CACHE_BYTES`, else recomputed for each panel. The generic
methods first split the parameters into groups whose Jacobian over all inputs fits in the budget
(``Theta = sum_g J_g J_g^T``), so only parameters too large for it need panels and recomputation. With
``x2=None`` (or ``x2 is x1``) the kernel is symmetric: one set of features is computed, only blocks on and
above the diagonal are formed, and the result is symmetrised exactly.

The generic methods evaluate the model per sample (``jacobian``) or per chunk (``ntk_vp``), so the model
must treat the rows of a batch independently (no batch-norm in training mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from kernels.mlp import MLP
from kernels.tiles import ranges  # the project's one tiler (row panels, column chunks)

Tensor = torch.Tensor
ArrayLike = Any  # numpy array or torch tensor

METHODS = ("auto", "structured", "jacobian", "ntk_vp")
BLOCK_BYTES = 1 << 32  # features of the row panel + column chunk being paired (4 GiB)
CACHE_BYTES = 1 << 32  # column features kept between row panels when they all fit (4 GiB)


# ----------------------------------------------------------------------------------------------
# Public entry point.


def empirical_ntk(
    model: nn.Module,
    x1: ArrayLike,
    x2: ArrayLike | None = None,
    *,
    method: str = "auto",
    trace: bool = True,
    chunk_size: int | None = None,
) -> ArrayLike:
    """The empirical NTK of ``model`` between the rows of ``x1`` and of ``x2`` (``x1`` when None).

    Args:
        model: a :class:`kernels.mlp.MLP` (any method) or any ``torch.nn.Module`` mapping ``(N, d)`` to
            ``(N, K)`` (or ``(N,)``, read as ``K = 1``) with rows treated independently.
        x1: ``(N1, d)`` inputs; ``x2``: ``(N2, d)`` inputs or None for the symmetric ``x2 = x1``. Numpy or
            torch; cast to the model's dtype and device.
        method: one of :data:`METHODS` (see the module docstring).
        trace: True for the mean over the output diagonal ``(N1, N2)``; False for ``(N1, N2, K, K)``.
        chunk_size: inputs per (square) block; default: chosen by :func:`plan_blocks` from
            :data:`BLOCK_BYTES` and :data:`CACHE_BYTES`.
    Returns:
        The kernel in the model's dtype: a torch tensor on the model's device when ``x1`` is a tensor,
        a numpy array otherwise. No autograd graph is kept.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ValueError("model has no parameters: its NTK is zero")
    dtype, device = first.dtype, first.device
    is_mlp = isinstance(model, MLP)
    if method == "auto":
        method = "structured" if is_mlp else "jacobian"
    if method == "structured" and not is_mlp:
        raise ValueError(f"method='structured' needs a kernels.mlp.MLP, got {type(model).__name__}; "
                         "use 'jacobian' or 'ntk_vp'")

    as_numpy = not isinstance(x1, torch.Tensor)
    in_dim = model.config["in_dim"] if is_mlp else None
    symmetric = x2 is None or x2 is x1
    a = _as_input(x1, "x1", in_dim, dtype, device)
    b = a if symmetric else _as_input(x2, "x2", in_dim, dtype, device)
    if b.shape[1] != a.shape[1]:
        raise ValueError(
            f"x1 and x2 must have the same number of features, got {a.shape[1]} and {b.shape[1]}"
        )

    with torch.no_grad():
        if method == "structured":
            out = _structured(model, a, b, symmetric, trace, chunk_size)
        else:
            out = _generic(model, a, b, symmetric, trace, chunk_size, method)
    out = out.detach()
    return out.cpu().numpy() if as_numpy else out


def _as_input(
    x: ArrayLike, name: str, in_dim: int | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(t.shape)}")
    if in_dim is not None and t.shape[1] != in_dim:
        raise ValueError(f"{name} has {t.shape[1]} features, the model expects in_dim={in_dim}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    return t.detach().to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Blocked evaluation shared by all methods.


def _mirror(block: Tensor) -> Tensor:
    """Theta(x', x) from Theta(x, x'): swap the input axes, and the output axes when present."""
    block = block.transpose(0, 1)
    return block.transpose(2, 3) if block.ndim == 4 else block


@dataclass(frozen=True)
class BlockPlan:
    """How the ``(N1, N2)`` kernel is tiled: row panels of ``rows`` inputs, column chunks of ``cols``
    inputs (``rows`` a multiple of ``cols``), column features kept between panels when ``cache``."""

    rows: int
    cols: int
    cache: bool

    def feature_inputs(self, n1: int, n2: int, symmetric: bool, same_features: bool = True) -> int:
        """How many inputs' features are computed in all (``n1 + n2`` or ``n`` when nothing is redone)."""
        if self.cache:  # every column chunk once; a symmetric one's first panel needs none of its own
            return n1 + n2 - (min(self.rows, n1) if (symmetric and same_features) else 0)
        total = 0
        for r0, r1 in ranges(n1, self.rows):
            total += r1 - r0
            if symmetric:
                total += n2 - (r1 if same_features else r0)
            else:
                total += n2
        return total


def plan_blocks(
    n1: int,
    n2: int,
    bytes_per_input: float,
    *,
    symmetric: bool,
    chunk_size: int | None = None,
    bytes_per_pair: float = 0.0,
) -> BlockPlan:
    """Choose the tiling for ``n1 x n2`` inputs whose features take ``bytes_per_input`` each.

    ``chunk_size`` given: square ``chunk_size`` blocks. Otherwise one block when all features fit in
    :data:`BLOCK_BYTES`; else row panels of about 3/4 of the budget and column chunks of 1/4, the column
    features cached when they all fit in :data:`CACHE_BYTES` and recomputed per panel when not (with a
    panel as large as possible, the recomputation is ``~ n^2 / (2 rows)`` inputs for a symmetric kernel).
    ``bytes_per_pair``: memory per kernel entry of one block's temporaries, bounding ``rows * cols``.
    """
    if chunk_size is not None:
        rows, cols = (min(chunk_size, n1),) * 2 if symmetric else (min(chunk_size, n1), min(chunk_size, n2))
        return BlockPlan(rows=rows, cols=cols, cache=n2 * bytes_per_input <= CACHE_BYTES)
    f = max(1.0, float(bytes_per_input))
    n_feat = n1 if symmetric else n1 + n2
    pair_ok = bytes_per_pair * n1 * n2 <= BLOCK_BYTES
    if n_feat * f <= BLOCK_BYTES and pair_ok:
        return BlockPlan(rows=n1, cols=n2, cache=True)
    cols = max(1, int(BLOCK_BYTES / (4 * f)))
    rows = max(cols, int(3 * BLOCK_BYTES / (4 * f)) // cols * cols)
    if bytes_per_pair > 0:  # keep the (rows, cols) temporaries within the budget too
        side = max(1, int(math.sqrt(BLOCK_BYTES / (3 * bytes_per_pair))))
        cols = min(cols, side)
        rows = max(cols, min(rows, 3 * side) // cols * cols)
    rows, cols = min(rows, n1), min(cols, n2)
    if symmetric:
        rows = max(cols, rows // cols * cols)
    return BlockPlan(rows=rows, cols=cols, cache=n2 * f <= CACHE_BYTES)


def _blocked(
    n1: int,
    n2: int,
    plan: BlockPlan,
    symmetric: bool,
    row_features: Callable[[int, int], Any],
    col_features: Callable[[int, int], Any],
    pair: Callable[[Any, Any], Tensor],
    *,
    same_features: bool,
) -> Tensor:
    """Assemble the kernel from ``pair(row_features(rows), col_features(cols))`` blocks.

    ``same_features``: row and column features are the same thing, so a symmetric kernel's diagonal panel
    pairs the row panel with itself. Symmetric kernels form only the blocks on and above the diagonal.
    Column chunks lie on a fixed grid of ``plan.cols`` (panel edges are on it), so cached ones are reused.
    """
    if plan.rows >= n1 and plan.cols >= n2:  # the common case: one block
        f1 = row_features(0, n1)
        f2 = f1 if (symmetric and same_features) else col_features(0, n2)
        return pair(f1, f2)
    out = None
    cache: dict[int, Any] = {}

    def put(r0: int, r1: int, c0: int, c1: int, block: Tensor, mirror: bool) -> None:
        nonlocal out
        if out is None:
            out = block.new_empty((n1, n2) + tuple(block.shape[2:]))
        out[r0:r1, c0:c1] = block
        if mirror:
            out[c0:c1, r0:r1] = _mirror(block)

    for r0, r1 in ranges(n1, plan.rows):
        f1 = row_features(r0, r1)
        first = 0
        if symmetric and same_features:
            put(r0, r1, r0, r1, pair(f1, f1), False)
            first = r1
        elif symmetric:
            first = r0
        for c0, c1 in ranges(n2, plan.cols):
            if c0 < first:
                continue
            f2 = cache.get(c0)
            if f2 is None:
                f2 = col_features(c0, c1)
                if plan.cache:
                    cache[c0] = f2
            put(r0, r1, c0, c1, pair(f1, f2), symmetric and c0 >= r1)
            del f2
        del f1
    return out


def _symmetrise(out: Tensor) -> Tensor:
    return (out + _mirror(out)).mul_(0.5)


# ----------------------------------------------------------------------------------------------
# Structured path for kernels.mlp.MLP.


def _structured(
    model: MLP, a: Tensor, b: Tensor, symmetric: bool, trace: bool, chunk_size: int | None
) -> Tensor:
    """The layers' structured rules (:meth:`kernels.layers.Serial.entk_features`), paired block by block."""
    net, modules = model.net, model.layers
    depth, K = model.depth, modules[-1].weight.shape[0]
    width = modules[0].weight.shape[0] if depth else 0

    def features(x: Tensor) -> list[tuple]:
        return net.entk_features(modules, x, K, trace)

    def pair(f1: list[tuple], f2: list[tuple]) -> Tensor:
        """``sum_l G_l * A_l`` over the layers with parameters, the readout's first (as it always was)."""
        n1, n2 = f1[0][2].shape[0], f2[0][2].shape[0]
        theta = None
        for (layer, module, h1, d1), (_, _, h2, d2) in zip(f1[-1:] + f1[:-1], f2[-1:] + f2[:-1], strict=True):
            A = layer.param_gram(module, h1, h2)
            if d1 is None:  # the identity cotangent: G = I_K (traced: its mean, 1)
                if not trace:
                    eye = torch.eye(K, dtype=A.dtype, device=A.device)
                    A = A[:, None, :, None] * eye[None, :, None, :]  # (n1, K, n2, K)
                theta = A if theta is None else theta.add_(A)
                continue
            G = torch.mm(d1, d2.T)
            if not trace:
                G, A = G.view(n1, K, n2, K), A[:, None, :, None]
            theta = G.mul_(A) if theta is None else theta.addcmul_(G, A)
            del A, G
        return theta if trace else theta.permute(0, 2, 1, 3)

    itemsize = a.element_size()
    hidden_per_input = depth * width * (2 + (K if depth > 1 or not trace else 1))
    plan = plan_blocks(
        a.shape[0], b.shape[0], itemsize * (a.shape[1] + hidden_per_input + K), symmetric=symmetric,
        chunk_size=chunk_size, bytes_per_pair=itemsize * (3 if trace else 2 * K * K + 1),
    )
    out = _blocked(
        a.shape[0], b.shape[0], plan, symmetric,
        lambda r0, r1: features(a[r0:r1]), lambda c0, c1: features(b[c0:c1]), pair, same_features=True,
    )
    if not trace:
        out = out.contiguous()
    return _symmetrise(out) if symmetric else out


# ----------------------------------------------------------------------------------------------
# Generic paths: torch.func Jacobians and NTK-vector products.


def _generic(
    model: nn.Module, a: Tensor, b: Tensor, symmetric: bool, trace: bool, chunk_size: int | None, method: str
) -> Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    with torch.no_grad():
        K = functional_call(model, (params, buffers), (a[:1],)).reshape(1, -1).shape[1]
    # Theta = sum over parameter groups of J_g J_g^T. When the whole Jacobian of the inputs does not fit the
    # budget, work group by group: a group whose Jacobian fits needs no recomputation at all, and a larger
    # one recomputes only its own (smaller) rows.
    n_feat = a.shape[0] if symmetric else a.shape[0] + b.shape[0]
    groups = _param_groups(params, n_feat * K * a.element_size(), chunk_size)
    out = None
    for names in groups:
        part = _generic_group(model, params, buffers, names, K, a, b, symmetric, trace, chunk_size, method)
        out = part if out is None else out.add_(part)
    return _symmetrise(out) if symmetric else out


def _param_groups(
    params: dict[str, Tensor], bytes_per_element: int, chunk_size: int | None
) -> list[list[str]]:
    """Consecutive parameters, grouped so that a group's Jacobian over all inputs fits in BLOCK_BYTES
    (a parameter larger than that is a group of its own); one group when everything fits or when the
    caller fixed ``chunk_size``."""
    limit = BLOCK_BYTES // max(1, bytes_per_element)
    if chunk_size is not None or sum(p.numel() for p in params.values()) <= limit:
        return [list(params)]
    groups: list[list[str]] = []
    size = 0
    for name, p in params.items():
        if groups and size + p.numel() <= limit:
            groups[-1].append(name)
            size += p.numel()
        else:
            groups.append([name])
            size = p.numel()
    return groups


def _generic_group(
    model: nn.Module,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    names: list[str],
    K: int,
    a: Tensor,
    b: Tensor,
    symmetric: bool,
    trace: bool,
    chunk_size: int | None,
    method: str,
) -> Tensor:
    """``sum_{p in names} J_p(a) J_p(b)^T`` (traced mean or full), not yet symmetrised."""
    group = {k: params[k] for k in names}
    fixed = {k: v for k, v in params.items() if k not in group}
    num_params = sum(p.numel() for p in group.values())
    itemsize = a.element_size()
    plan = plan_blocks(
        a.shape[0], b.shape[0], K * num_params * itemsize, symmetric=symmetric, chunk_size=chunk_size,
        bytes_per_pair=2 * itemsize * K * K,
    )

    def batched(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, ({**fixed, **p}, buffers), (x,)).reshape(x.shape[0], -1)

    def single(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, ({**fixed, **p}, buffers), (x[None],)).reshape(-1)

    if method == "jacobian":
        per_sample = vmap(jacrev(single), in_dims=(None, 0))  # name -> (m, K, *shape)
    else:
        # The cotangents J^T e_(m, k') for every input m and output k': one vjp per input (vmapped),
        # pulled back from the K output basis vectors.
        eye = torch.eye(K, dtype=a.dtype, device=a.device)

        def pullbacks(p: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
            _, pullback = vjp(lambda q: single(q, x), p)
            return vmap(pullback)(eye)[0]  # name -> (K, *shape)

        per_sample = vmap(pullbacks, in_dims=(None, 0))

    # vmap needs about twice its output in temporaries: fill a chunk's Jacobian in sub-batches of at most
    # 1/8 of the budget, so the transient memory stays small next to the chunk itself.
    sub = max(1, int(BLOCK_BYTES / (8 * K * num_params * itemsize)))

    def jacobian_rows(x: Tensor) -> list[Tensor]:
        """``[(n, K, numel) per parameter]``: d f_k(x_n) / d theta."""
        n = x.shape[0]
        if n <= sub:
            return [j.reshape(n, K, -1) for j in per_sample(group, x).values()]
        out = [x.new_empty((n, K, p.numel())) for p in group.values()]
        for lo, hi in ranges(n, sub):
            for buf, j in zip(out, per_sample(group, x[lo:hi]).values(), strict=True):
                buf[lo:hi] = j.reshape(hi - lo, K, -1)
        return out

    if method == "jacobian":
        def pair(j1: list[Tensor], j2: list[Tensor]) -> Tensor:
            return _contract(j1, j2, trace)

        return _blocked(
            a.shape[0], b.shape[0], plan, symmetric,
            lambda r0, r1: jacobian_rows(a[r0:r1]), lambda c0, c1: jacobian_rows(b[c0:c1]), pair,
            same_features=True,
        )

    def cotangents(x: Tensor) -> dict[str, Tensor]:
        """Tangent directions ``J^T e_(m, k')`` as parameter-shaped ``(m*K, *shape)`` tensors."""
        pairs = zip(group.items(), jacobian_rows(x), strict=True)
        return {name: j.reshape((-1,) + p.shape) for (name, p), j in pairs}

    activations = _activation_size(model, a[:1], buffers, params)

    def push_forward(x1c: Tensor, tangents: dict[str, Tensor]) -> Tensor:
        n1, m = x1c.shape[0], next(iter(tangents.values())).shape[0]

        def push(t: dict[str, Tensor]) -> Tensor:
            return jvp(lambda p: batched(p, x1c), (group,), (t,))[1]  # (n1, K)

        per_tangent = 4 * itemsize * n1 * max(activations, 1)
        batch = max(1, min(m, int(BLOCK_BYTES // 4 // per_tangent)))
        # (m*K, n1, K): Theta[n, m, k, k'] sits at [(m, k'), n, k]
        cols = vmap(push, chunk_size=batch)(tangents)
        n2 = m // K
        theta = cols.reshape(n2, K, n1, K).permute(2, 0, 3, 1)  # (n1, n2, K, K')
        if trace:
            return theta.diagonal(dim1=2, dim2=3).mean(dim=2)
        return theta.contiguous()

    return _blocked(
        a.shape[0], b.shape[0], plan, symmetric,
        lambda r0, r1: a[r0:r1], lambda c0, c1: cotangents(b[c0:c1]), push_forward, same_features=False,
    )


def _contract(j1: list[Tensor], j2: list[Tensor], trace: bool) -> Tensor:
    """``sum_p J1[n, k, p] J2[m, k', p]``: traced mean ``(n, m)`` or full ``(n, m, K, K)``."""
    n1, K = j1[0].shape[:2]
    n2 = j2[0].shape[0]
    out = None
    for a, b in zip(j1, j2, strict=True):
        if trace:
            block = torch.mm(a.reshape(n1, -1), b.reshape(n2, -1).T)
        else:
            block = torch.mm(a.reshape(n1 * K, -1), b.reshape(n2 * K, -1).T)
        out = block if out is None else out.add_(block)
    if trace:
        return out.div_(K)
    return out.view(n1, K, n2, K).permute(0, 2, 1, 3).contiguous()


def _activation_size(
    model: nn.Module, x: Tensor, buffers: dict[str, Tensor], params: dict[str, Tensor]
) -> int:
    """Elements of all submodule outputs for one input: a rough size of the forward-mode tangents."""
    total = 0

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            functional_call(model, (params, buffers), (x,))
    finally:
        for h in handles:
            h.remove()
    return 2 * total + x.numel()
