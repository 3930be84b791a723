"""The fused float32 fast path of the analytic NNGP/NTK recursion, one tile at a time.

:mod:`kernels.analytic` is the float64 reference (``mlp_kernels_from_dots``: a dozen full-tile passes per
layer, the diagonal included in the recursion). This module computes the same kernels for a tile
``x1 @ x2.T`` with everything after the input-Gram matmul as one elementwise expression per tile, which
``torch.compile`` (inductor, C++/OpenMP) fuses into a single loop; the eager version of the same expression
is the fallback. :mod:`kernels.gram` only tiles and stores; it calls :func:`fused_tile`.

**Which path.** :func:`fusable` reads :attr:`kernels.activations.Activation.closed_form`:

* closed-form duals (relu, leaky_relu/abrelu, abs, erf, gelu, identity): the activation's own
  ``Activation.dual`` is called *inside* the compiled expression (:func:`_dual_body`), so the dual formulas
  live in :mod:`kernels.activations` only. The per-row variances ``K^l(x, x)`` of every layer and the
  diagonal ``Theta(x, x)`` are computed once per tile in float64 (``O(rows * depth)``, :func:`row_state`);
  the elementwise expression only sees the off-diagonal recursion, and the entries of a diagonal tile's
  diagonal are pinned to the float64 value (cast once to float32).
* ReLU in NTK parameterisation keeps a separate float32 formulation (:func:`_relu_body`), the cosine form
  ``c' = J(c)``, ``t' = c' + (1 - acos(c)/pi) t`` with per-row scales: with ``w_std^2 = 2, b_std = 0`` it
  needs no per-row variances at all and each layer is one ``acos``, one ``sqrt`` and three FMAs, against the
  dual's ``atan2`` of ``sqrt(k11 k22 - k12^2)`` plus the variance products (measured in ``bench/gram.py``
  ``tile`` section and ``bench/RESULTS.md``: the separate code is kept only because it is faster there).
* ReLU in NTK parameterisation *without bias* (``series=True``, ``impl="series"``): the whole recursion is
  one function of the first layer's cosine, evaluated per entry as the series of :mod:`kernels.relu_series`
  (one ``sqrt`` and a Horner recurrence: 6 ms per 2,048² depth-3 tile against 34-38 ms for the cosine
  form); per-row scales from float64 row norms (:func:`row_squares`), which a Gram computes once and
  passes in (``row_sq``).
* activations without a closed form (tanh, sigmoid, softplus, callables): the same expression with the
  dual replaced by :class:`kernels.dual_table.DualTable`, a cubic interpolation table over
  (variance, variance, angle) built by quadrature (see that module for its accuracy).

**Compiled.** ``torch.compile`` with inductor's ``cpp_wrapper``: its C++ wrapper releases the GIL while the
loop runs, so the Gram's worker threads compute in parallel (the default Python wrapper held it, and two
workers' elementwise passes ran one after the other). erf and GELU use a float32-friendly form of their own
dual formula in the loop (:data:`FLOAT32_DUALS`: ``asin`` and ``rsqrt`` instead of ``atan2``, ``sqrt`` and
divisions, 30 % cheaper, same error); every other closed form runs its ``Activation.dual`` unchanged.

**Error in float32** against float64 :func:`kernels.analytic.mlp_kernels`: on random inputs (``tests/
test_fused.py``) at most 5e-7 of the largest entry, every closed form, on and off the diagonal; on
per-image standardised MNIST (depth 3, 2048-row tiles; ``bench/RESULTS.md``) about 1e-5 of the largest
entry for ReLU, erf and GELU alike, all of it from rounding the input Gram ``x1 @ x2.T`` to float32 (the
float64 recursion fed the float32 input Gram has the same error). Diagonal entries of diagonal tiles equal
the float64 diagonal rounded to float32 (ReLU: the cosine pinned to 1, within 1e-6).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from kernels.activations import Activation, get_activation

Tensor = torch.Tensor
_INV_PI = 1.0 / math.pi
PARAMETERIZATIONS = ("ntk", "standard")


def fusable(activation: Any, parameterization: str = "ntk") -> bool:
    """True for an activation with a closed-form dual (the fused path; ``Activation.closed_form``)."""
    return parameterization in PARAMETERIZATIONS and get_activation(activation).closed_form


def is_relu(activation: Any, parameterization: str = "ntk") -> bool:
    """The cosine-form ReLU path applies (ReLU in NTK parameterisation)."""
    name = activation if isinstance(activation, str) else getattr(activation, "name", None)
    return isinstance(name, str) and name.strip().lower() == "relu" and parameterization == "ntk"


# --------------------------------------------------------------------------------------------- per row


def row_state(x: Tensor, depth: int, act: Activation, w2: float, b2: float, *, standard: bool = False,
              width: int | None = None) -> dict[str, Tensor]:
    """Per-row float64 quantities of the recursion for the rows ``x`` (any float dtype):

    ``q``: ``(depth + 1, n)`` variances ``K^l(x, x)``, ``l = 1 .. depth + 1``; ``ntk``/``nngp``: ``(n,)``
    the diagonals ``Theta(x, x)`` and ``K^{depth+1}(x, x)`` (the values a diagonal tile's diagonal is
    pinned to), computed by the activation's own dual in float64.
    """
    sq = row_squares(x)
    d = x.shape[1]
    k = w2 * sq / d + b2
    ntk = (sq + 1.0) if standard else k.clone()
    qs = [k]
    for _ in range(depth):
        t, tdot = _diagonal_dual(act, k)
        k_next = w2 * t + b2
        ntk = ((width * t + 1.0) if standard else k_next) + w2 * tdot * ntk
        k = k_next
        qs.append(k)
    return {"q": torch.stack(qs), "ntk": ntk, "nngp": k}


def _diagonal_dual(act: Activation, k: Tensor) -> tuple[Tensor, Tensor]:
    """``act.dual(k, k, k)``; by quadrature only once per distinct value (per-image standardised rows
    share one variance per layer)."""
    if act.closed_form:
        return act.dual(k, k, k)
    uniq, inverse = torch.unique(k, return_inverse=True)
    t, tdot = act.dual(uniq, uniq, uniq)
    return t[inverse], tdot[inverse]


def _erf_dual_float32(k11: Tensor, k22: Tensor, k12: Tensor) -> tuple[Tensor, Tensor]:
    """erf's dual (``kernels.activations``' ``_erf_dual``, Williams 1997) in the form that compiles to the
    cheaper loop: ``s = 2 k12 / sqrt((1 + 2 k11)(1 + 2 k22))``, ``T = 2/pi asin(s)``,
    ``Tdot = 4/pi rsqrt((1 + 2 k11)(1 + 2 k22)) rsqrt(1 - s^2)`` (one ``asin`` and two ``rsqrt`` against
    ``atan2``, ``sqrt`` and a division). The one dual written twice: measured 9.1 against 13.5 ns per
    entry for depth 3 in the compiled loop (one thread, 1024^2 MNIST tile, same process), same error."""
    scale = torch.rsqrt((1 + 2 * k11) * (1 + 2 * k22))
    s = torch.clamp(2 * k12 * scale, -1.0, 1.0)
    return (2 / math.pi) * torch.asin(s), (4 / math.pi) * scale * torch.rsqrt(torch.clamp(1 - s * s, min=1e-30))


def _gelu_dual_float32(k11: Tensor, k22: Tensor, k12: Tensor) -> tuple[Tensor, Tensor]:
    """GELU's dual (``kernels.activations``' ``_gelu_dual``) with its ``atan2``, ``sqrt`` and four divisions
    rewritten through ``s = k12 / sqrt((k11 + 1)(k22 + 1))``: ``angle = asin(s)``, ``1 / delta =
    rsqrt((k11 + 1)(k22 + 1)) rsqrt(1 - s^2)``, ``delta^2 = (1 - s^2)(k11 + 1)(k22 + 1)``. Written twice for
    the same reason as erf's (measured in ``bench/RESULTS.md``)."""
    prod = k11 * k22
    pp1 = (k11 + 1) * (k22 + 1)
    r = torch.rsqrt(pp1)
    r2 = r * r
    s = torch.clamp(k12 * r, -1.0, 1.0)
    one_m = torch.clamp(1 - s * s, min=1e-30)
    inv_delta = r * torch.rsqrt(one_m)
    angle = torch.asin(s)
    inv_2pi = 1 / (2 * math.pi)
    t = ((k12 * k12 + prod * (one_m * pp1)) * r2 * inv_delta + k12 * angle) * inv_2pi + k12 / 4
    tdot = (inv_delta * inv_delta + (1 - prod) * r2 + 1) * k12 * inv_delta * inv_2pi + 0.25 + angle * inv_2pi
    return t, tdot


# Duals replaced by a float32-friendly form of the same formula in the compiled loop (see each one's note).
FLOAT32_DUALS: dict[str, Callable] = {"erf": _erf_dual_float32, "gelu": _gelu_dual_float32}


# --------------------------------------------------------------------------------------------- generic


def _dual_body(
    dot: Tensor, scale: Tensor, q1: Tensor, q2: Tensor, pin1: Tensor, diag: Tensor, w2: Tensor, b2: Tensor,
    width: Tensor, *, dual: Callable, depth: int, want_ntk: bool, standard: bool,
) -> Tensor:
    """The recursion for one tile as one expression (for torch.compile to fuse into one loop).

    ``dot (n1, n2)`` the input Gram; ``scale`` ``w2 / d``; ``q1 (depth + 1, n1, 1)``, ``q2 (depth + 1, 1,
    n2)`` the per-row variances; ``pin1 (n1, 1)`` the float64-computed diagonal (used where ``diag``, a 0-d
    bool, marks a diagonal tile); ``w2, b2, width`` 0-d tensors, so one compiled kernel serves every
    parameter value; ``dual`` the activation's ``(k11, k22, k12) -> (T, Tdot)``, or a list of one per layer
    (an interpolation table prepared per layer).
    """
    n1, n2 = dot.shape
    rows, cols = torch.arange(n1, device=dot.device), torch.arange(n2, device=dot.device)
    eye = (rows[:, None] == cols[None, :]) & diag
    k12 = dot * scale + b2
    ntk = (dot + 1.0) if standard else k12
    for layer in range(depth):
        t12, tdot = (dual[layer] if isinstance(dual, list) else dual)(q1[layer], q2[layer], k12)
        k_next = w2 * t12 + b2
        if want_ntk:
            fresh = (width * t12 + 1.0) if standard else k_next
            ntk = fresh + w2 * tdot * ntk
        k12 = k_next
    out = ntk if want_ntk else k12
    return torch.where(eye, pin1, out)


# --------------------------------------------------------------------------------------------- ReLU


def row_squares(x: Tensor) -> Tensor:
    """``|x_i|^2`` per row in float64 (of ``x``'s values, whatever its dtype): the one place the fused
    paths take row norms from."""
    xd = x.to(torch.float64)
    return (xd * xd).sum(dim=1)


def relu_vectors(x: Tensor, depth: int, w2: float, b2: float, dtype: torch.dtype,
                 sq: Tensor | None = None) -> dict[str, Tensor]:
    """Per-row vectors of the cosine-form ReLU recursion, computed in float64 and cast to ``dtype``;
    ``sq``: the rows' squared norms when the caller has them (:func:`row_squares`; a Gram computes them
    once instead of once per tile).

    With ``q^l = K^l(x, x)`` (``q^1 = w2 |x|^2 / d + b2``, ``q^{l+1} = w2 q^l / 2 + b2``):
    ``s0 = sqrt(w2/d) / sqrt(q^1)`` and ``o0 = sqrt(b2) / sqrt(q^1)`` (so that
    ``c^1 = dot * s0_i s0_j + o0_i o0_j``); for layer ``l``: ``u[l] = sqrt(w2/2) sqrt(q^l / q^{l+1})`` and
    ``p[l] = sqrt(b2) / sqrt(q^{l+1})``; ``r = sqrt(q^{depth+1})``. Zero norms give zero inverses.
    """
    d = x.shape[1]
    q = w2 * (row_squares(x) if sq is None else sq.to(torch.float64)) / d + b2
    r = torch.sqrt(q)

    def inv(v: Tensor) -> Tensor:
        return torch.where(v > 0, 1.0 / torch.where(v > 0, v, 1.0), 0.0)

    inv0 = inv(r)
    us, ps = [], []
    for _ in range(depth):
        q_next = w2 * q / 2 + b2
        r_next = torch.sqrt(q_next)
        us.append(math.sqrt(w2 / 2) * r * inv(r_next))
        ps.append(math.sqrt(b2) * inv(r_next))
        q, r = q_next, r_next
    n = x.shape[0]
    u = torch.stack(us) if us else torch.ones(0, n, dtype=torch.float64)
    p = torch.stack(ps) if ps else torch.zeros(0, n, dtype=torch.float64)
    out = {"s0": math.sqrt(w2 / d) * inv0, "o0": math.sqrt(b2) * inv0, "u": u, "p": p, "r": r}
    return {k: v.to(dtype) for k, v in out.items()}


def _relu_body(
    dot: Tensor, s1: Tensor, s2: Tensor, o1: Tensor, o2: Tensor, u1: Tensor, u2: Tensor, p1: Tensor,
    p2: Tensor, r1: Tensor, r2: Tensor, diag: Tensor, *, depth: int, want_ntk: bool, unit: bool, bias: bool,
) -> Tensor:
    """The cosine-form ReLU recursion as one expression.

    Shapes: ``dot (n1, n2)``; ``s1, o1, r1 (n1, 1)``; ``s2, o2, r2 (1, n2)``; ``u1, p1 (depth, n1, 1)``;
    ``u2, p2 (depth, 1, n2)``; ``diag`` a 0-d bool tensor, True on a diagonal tile. Only the structure
    (depth, kind, unit, bias) is baked in, so one compiled kernel serves every input dimension and std.
    """
    n1, n2 = dot.shape
    rows, cols = torch.arange(n1, device=dot.device), torch.arange(n2, device=dot.device)
    eye = (rows[:, None] == cols[None, :]) & diag
    k = dot * s1 * s2 + o1 * o2 if bias else dot * s1 * s2
    c = torch.where(eye, 1.0, torch.clamp(k, -1.0, 1.0))
    t = c
    for layer in range(depth):
        tdot = 1.0 - torch.acos(c) * _INV_PI
        j = torch.sqrt(torch.clamp(1.0 - c * c, min=0.0)) * _INV_PI + tdot * c
        if unit:
            c_next = j
        else:
            alpha = u1[layer] * u2[layer]
            c_next = alpha * j + p1[layer] * p2[layer] if bias else alpha * j
            tdot = alpha * tdot
        c_next = torch.where(eye, 1.0, torch.clamp(c_next, -1.0, 1.0))
        if want_ntk:
            t = c_next + tdot * t
        c = c_next
    out = t if want_ntk else c
    return out * r1 * r2


def _relu_eager(
    dot: Tensor, v1: dict[str, Tensor], v2: dict[str, Tensor], diag: bool, *, depth: int, want_ntk: bool,
    unit: bool, bias: bool,
) -> Tensor:
    """:func:`_relu_body` with in-place torch ops (few full-tile temporaries); consumes ``dot``."""
    c = dot.mul_(v1["s0"][:, None]).mul_(v2["s0"][None, :])
    if bias:
        c.addr_(v1["o0"], v2["o0"])
    c.clamp_(-1.0, 1.0)
    if diag:
        c.fill_diagonal_(1.0)
    t = c.clone() if want_ntk else None
    for layer in range(depth):
        tdot = torch.acos(c).mul_(-_INV_PI).add_(1.0)
        j = torch.mul(c, c).neg_().add_(1.0).clamp_(min=0.0).sqrt_().mul_(_INV_PI).addcmul_(tdot, c)
        if not unit:
            u1, u2 = v1["u"][layer][:, None], v2["u"][layer][None, :]
            j.mul_(u1).mul_(u2)
            if bias:
                j.addr_(v1["p"][layer], v2["p"][layer])
            tdot.mul_(u1).mul_(u2)
        c = j.clamp_(-1.0, 1.0)
        if diag:
            c.fill_diagonal_(1.0)
        if want_ntk:
            t = t.mul_(tdot).add_(c)
        del tdot
    out = t if want_ntk else c
    return out.mul_(v1["r"][:, None]).mul_(v2["r"][None, :])


# --------------------------------------------------------------------------------------------- compile


_COMPILED: dict[tuple, Callable] = {}
_COMPILE_LOCK = threading.Lock()


def _compile(key: tuple, body: Callable, warm: Callable[[Callable], None]) -> Callable:
    """``torch.compile(body)``, compiled and warmed up once per process and key (the key includes the torch
    thread count, which the generated code bakes in), under a lock so that concurrent worker threads never
    compile it twice; tile shapes are dynamic."""
    key = key + (torch.get_num_threads(),)
    with _COMPILE_LOCK:
        fn = _COMPILED.get(key)
        if fn is None:
            # every structure is a recompile of the same body's code object: lift dynamo's per-code limit (8)
            dyn = torch._dynamo.config
            dyn.recompile_limit = max(dyn.recompile_limit, 256)
            dyn.accumulated_recompile_limit = max(dyn.accumulated_recompile_limit, 4096)
            # cpp_wrapper: the generated C++ wrapper releases the GIL while the kernel runs; the default
            # Python wrapper holds it, so two Dask worker threads ran their elementwise passes one at a time
            # (measured: 34 ms each with two threads against 18 ms alone; 16-18 ms each with cpp_wrapper)
            fn = torch.compile(body, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})
            warm(fn)
            _COMPILED[key] = fn
    return fn


def _warm_inputs(dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(5, 4, generator=gen, dtype=dtype)
    x2 = torch.randn(7, 4, generator=gen, dtype=dtype)
    y = torch.randn(6, 4, generator=gen, dtype=dtype)
    return [(x1, x2), (y, y)]  # compile here for both tile kinds


# --------------------------------------------------------------------------------------------- tiles


def _relu_args(a: Tensor, b: Tensor, depth: int, w2: float, b2: float) -> tuple:
    diag = b is a
    v1 = relu_vectors(a, depth, w2, b2, a.dtype)
    v2 = v1 if diag else relu_vectors(b, depth, w2, b2, a.dtype)
    col, row = (slice(None), None), (None, slice(None))
    return (v1["s0"][col], v2["s0"][row], v1["o0"][col], v2["o0"][row], v1["u"][:, :, None],
            v2["u"][:, None, :], v1["p"][:, :, None], v2["p"][:, None, :], v1["r"][col], v2["r"][row],
            torch.tensor(diag))


def _relu_structure(w2: float, b2: float) -> tuple[bool, bool]:
    """``(unit, bias)``: ``w^2 = 2, b = 0`` keeps every K11 fixed (u = 1, no bias term). Decided from the
    parameters, not the data, so every tile of a Gram runs the same code (a zero row only has r = 0, which
    zeroes its entries anyway)."""
    bias = b2 != 0.0
    return not bias and abs(w2 - 2.0) < 1e-12, bias


def relu_tile(
    a: Tensor, b: Tensor, depth: int, w2: float, b2: float, want_ntk: bool, compiled: bool,
    stats: dict | None = None,
) -> Tensor:
    """One tile of the cosine-form ReLU kernel; ``b is a`` marks a diagonal tile."""
    t0 = time.perf_counter()
    dot = a @ b.T
    t1 = time.perf_counter()
    unit, bias = _relu_structure(w2, b2)
    if not compiled:
        v1 = relu_vectors(a, depth, w2, b2, a.dtype)
        v2 = v1 if b is a else relu_vectors(b, depth, w2, b2, a.dtype)
        out = _relu_eager(dot, v1, v2, b is a, depth=depth, want_ntk=want_ntk, unit=unit, bias=bias)
    else:
        out = _compiled_relu(depth, want_ntk, unit, bias, a.dtype)(dot, *_relu_args(a, b, depth, w2, b2))
    _account(stats, a, b, t0, t1)
    return out


def _compiled_relu(depth: int, want_ntk: bool, unit: bool, bias: bool, dtype: torch.dtype) -> Callable:
    body = functools.partial(_relu_body, depth=depth, want_ntk=want_ntk, unit=unit, bias=bias)
    w2, b2 = (2.0, 0.0) if unit else (1.5, 0.25 if bias else 0.0)

    def warm(fn: Callable) -> None:
        for x1, x2 in _warm_inputs(dtype):
            fn(x1 @ x2.T, *_relu_args(x1, x2, depth, w2, b2))

    return _compile(("relu", depth, want_ntk, unit, bias, dtype), body, warm)


def series_applies(activation: Any, parameterization: str = "ntk", b_std: float = 0.0) -> bool:
    """ReLU in NTK parameterisation without bias: the kernel is one function of the cosine
    (:mod:`kernels.relu_series`)."""
    return is_relu(activation, parameterization) and float(b_std) == 0.0


def _series_body(dot: Tensor, s1: Tensor, s2: Tensor, r1: Tensor, r2: Tensor, *, pos: tuple[float, ...],
                 neg: tuple[float, ...], horner: bool) -> Tensor:
    """``r1 r2 F_L(c)`` with ``c = dot s1 s2``: the series of :mod:`kernels.relu_series` in
    ``z = 2 sqrt(1 - |c|) - 1``, by Horner's rule on the power coefficients (``horner``) or Clenshaw's on
    the Chebyshev ones, each step picking the half's coefficient with one blend (measured cheaper than
    evaluating both halves; Horner 6.0 against Clenshaw 6.9 ms per 2,048² depth-3 tile). Shapes:
    ``dot (n1, n2)``; ``s1, r1 (n1, 1)``; ``s2, r2 (1, n2)``. The diagonal is pinned by the caller.
    (Writing the mirrored tile from this kernel too, ``out.T.contiguous()``, measured slower than the
    Gram's strip-wise transposing copy: 13.8 against 6.0 + 5.2 ms.)"""
    c = torch.clamp(dot * s1 * s2, -1.0, 1.0)
    z = 2.0 * torch.sqrt(1.0 - c.abs()) - 1.0
    positive = c >= 0
    if horner:
        f = torch.where(positive, pos[-1], neg[-1])
        for k in range(len(pos) - 2, -1, -1):
            f = f * z + torch.where(positive, pos[k], neg[k])
    else:
        z2 = 2.0 * z
        b1 = torch.where(positive, pos[-1], neg[-1])
        b2 = torch.zeros_like(z)
        for k in range(len(pos) - 2, 0, -1):
            b1, b2 = z2 * b1 - b2 + torch.where(positive, pos[k], neg[k]), b1
        f = z * b1 - b2 + torch.where(positive, pos[0], neg[0])
    return f * r1 * r2


def _series_scales(x: Tensor, depth: int, w2: float, sq: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(1 / |x|, r)`` per row in ``x``'s dtype, from the float64 squared norms ``sq`` (:func:`row_squares`
    when None): the cosine is ``dot s_i s_j`` and, without bias, :func:`relu_vectors`' ``r = sqrt(K^{L+1})``
    is ``|x| sqrt(w2 / d) (w2 / 2)^{L/2}`` in closed form (0.16 against 1.3 ms per tile pair for the
    general vectors, which build every layer's ``u`` and ``p``). Zero rows get ``s = 0``."""
    norm = torch.sqrt(row_squares(x) if sq is None else sq.to(torch.float64))
    inv = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, 1.0), 0.0)
    r = norm * math.sqrt(w2 / x.shape[1]) * (w2 / 2) ** (depth / 2)
    return inv.to(x.dtype), r.to(x.dtype)


def _series_args(a: Tensor, b: Tensor, depth: int, w2: float, sq: tuple | None = None) -> tuple:
    sq_a, sq_b = sq if sq is not None else (None, None)
    s1, r1 = _series_scales(a, depth, w2, sq_a)
    s2, r2 = (s1, r1) if b is a else _series_scales(b, depth, w2, sq_b)
    return s1[:, None], s2[None, :], r1[:, None], r2[None, :]


def _compiled_series(depth: int, want_ntk: bool, dtype: torch.dtype) -> Callable:
    from kernels.relu_series import coefficients, power_coefficients

    kind = "ntk" if want_ntk else "nngp"
    power = power_coefficients(depth, kind)
    pos, neg = power if power is not None else coefficients(depth, kind)[:2]
    body = functools.partial(_series_body, pos=pos, neg=neg, horner=power is not None)

    def warm(fn: Callable) -> None:
        for x1, x2 in _warm_inputs(dtype):
            fn(x1 @ x2.T, *_series_args(x1, x2, depth, 2.0))

    return _compile(("relu-series", depth, want_ntk, dtype), body, warm)


def series_tile(a: Tensor, b: Tensor, depth: int, w2: float, want_ntk: bool, stats: dict | None = None,
                row_sq: tuple | None = None) -> Tensor:
    """One tile of ReLU's NNGP/NTK without bias through its cosine series (compiled); ``b is a`` marks a
    diagonal tile, whose diagonal is pinned to ``F_L(1) r_i^2``. ``row_sq``: the rows' float64 squared
    norms ``(|a_i|^2, |b_j|^2)`` when the caller has them (a Gram computes them once, not once per tile)."""
    from kernels.relu_series import coefficients

    t0 = time.perf_counter()
    dot = a @ b.T
    t1 = time.perf_counter()
    args = _series_args(a, b, depth, w2, row_sq)
    diag = b is a
    out = _compiled_series(depth, want_ntk, a.dtype)(dot, *args)
    if diag:  # c = 1 exactly: F_L(1) r r, rounded as the kernel rounds (F r1) r2
        f1 = coefficients(depth, "ntk" if want_ntk else "nngp")[2]
        r = args[2][:, 0]
        out.diagonal().copy_(torch.full_like(r, f1) * r * r)
    _account(stats, a, b, t0, t1)
    return out


def _dual_args(a: Tensor, b: Tensor, depth: int, act: Activation, w2: float, b2: float, kind: str,
               standard: bool, width: int | None) -> tuple:
    diag = b is a
    s1 = row_state(a, depth, act, w2, b2, standard=standard, width=width)
    s2 = s1 if diag else row_state(b, depth, act, w2, b2, standard=standard, width=width)
    dtype = a.dtype
    return (torch.tensor(w2 / a.shape[1], dtype=dtype), s1["q"].to(dtype)[:, :, None],
            s2["q"].to(dtype)[:, None, :], s1[kind].to(dtype)[:, None], torch.tensor(diag),
            torch.tensor(w2, dtype=dtype), torch.tensor(b2, dtype=dtype),
            torch.tensor(float(width or 0), dtype=dtype))


def dual_tile(
    a: Tensor, b: Tensor, depth: int, act: Activation, w2: float, b2: float, want_ntk: bool, compiled: bool,
    stats: dict | None = None, *, standard: bool = False, width: int | None = None,
    dual: Callable | None = None, dual_key: Any = None,
) -> Tensor:
    """One tile by the activation's dual (or ``dual``, e.g. a :class:`~kernels.dual_table.DualTable`'s,
    identified by ``dual_key`` for the compile cache); ``b is a`` marks a diagonal tile."""
    t0 = time.perf_counter()
    dot = a @ b.T
    t1 = time.perf_counter()
    kind = "ntk" if want_ntk else "nngp"
    args = _dual_args(a, b, depth, act, w2, b2, kind, standard, width)
    prepare = getattr(dual, "prepare", None)
    if prepare is not None:  # a table: its nodes follow this tile's variances (eager only)
        if compiled:
            raise ValueError("an interpolation table's dual runs eagerly: pass compiled=False")
        dual = prepare(row_state(a, depth, act, w2, b2, standard=standard, width=width)["q"],
                       row_state(b, depth, act, w2, b2, standard=standard, width=width)["q"])
    dual_name = act.name if dual is None else dual_key
    if dual is None:
        dual = FLOAT32_DUALS.get(act.name, act.dual) if a.dtype == torch.float32 else act.dual
    body = functools.partial(_dual_body, dual=dual, depth=depth, want_ntk=want_ntk, standard=standard)
    if compiled:
        dtype = a.dtype

        def warm(fn: Callable) -> None:
            for x1, x2 in _warm_inputs(dtype):
                fn(x1 @ x2.T, *_dual_args(x1, x2, depth, act, 1.5, 0.1, kind, standard, 7))

        key = ("dual", dual_name, depth, want_ntk, standard, dtype)
        out = _compile(key, body, warm)(dot, *args)
    else:
        with torch.no_grad():
            out = body(dot, *args)
    _account(stats, a, b, t0, t1)
    return out


def _account(stats: dict | None, a: Tensor, b: Tensor, t0: float, t1: float) -> None:
    if stats is not None:
        stats["matmul_s"] = stats.get("matmul_s", 0.0) + (t1 - t0)
        stats["matmul_flop"] = stats.get("matmul_flop", 0.0) + 2.0 * a.shape[0] * b.shape[0] * a.shape[1]
        stats["elementwise_s"] = stats.get("elementwise_s", 0.0) + (time.perf_counter() - t1)


def fused_tile(
    a: Tensor, b: Tensor, *, depth: int, activation: Any = "relu", w_std: float = 2**0.5, b_std: float = 0.0,
    kind: str = "ntk", parameterization: str = "ntk", width: int | None = None, compiled: bool = False,
    stats: dict | None = None, dual: Callable | None = None, dual_key: Any = None, series: bool = False,
    row_sq: tuple | None = None,
) -> Tensor:
    """One tile of the NNGP/NTK (``kind``) of :func:`kernels.analytic.mlp_kernels` in ``a``'s dtype.

    ``b is a`` marks a diagonal tile (its diagonal is pinned to the float64 value). ReLU in NTK
    parameterisation takes the cosine form, other closed forms their ``Activation.dual``; ``dual`` replaces
    the activation's dual (the interpolation table of :mod:`kernels.dual_table`). ``compiled``: the
    torch.compile'd single-pass kernel (compiled once per process and structure), else eager torch.
    ``series``: ReLU without bias through its cosine series (:mod:`kernels.relu_series`; compiled), which
    takes the rows' float64 squared norms ``row_sq = (|a_i|^2, |b_j|^2)`` when given.
    """
    act = get_activation(activation)
    w2, b2 = float(w_std) ** 2, float(b_std) ** 2
    want_ntk = kind == "ntk"
    if series:
        if dual is not None or not series_applies(act.name, parameterization, b_std):
            raise ValueError("the cosine series needs ReLU in NTK parameterisation with b_std = 0")
        return series_tile(a, b, depth, w2, want_ntk, stats, row_sq)
    if dual is None and is_relu(act.name, parameterization):
        return relu_tile(a, b, depth, w2, b2, want_ntk, compiled, stats)
    if dual is None and not act.closed_form:
        raise ValueError(f"activation {act.name!r} has no closed-form dual: pass dual= (kernels.dual_table)")
    return dual_tile(a, b, depth, act, w2, b2, want_ntk, compiled, stats,
                     standard=parameterization == "standard", width=width, dual=dual, dual_key=dual_key)


def warm_up(**kwargs: Any) -> None:
    """Compile the kernel :func:`fused_tile` would use with these arguments (``compiled=True``), now."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=gen, dtype=kwargs.pop("dtype", torch.float32))
    fused_tile(x, x, compiled=True, **kwargs)
