"""ReLU's whole depth-L NNGP/NTK recursion without bias as one Chebyshev series in the input cosine.

With ``b_std = 0`` ReLU is positively homogeneous, so every layer maps the cosine alone,
``c' = J(c) = (sqrt(1 - c^2) + (pi - acos c) c) / pi``, and the kernel is ``r1 r2 F_L(c)`` with the row
scales ``r = sqrt(K^{L+1}(x, x))`` and one fixed function ``F_L`` of the first layer's cosine
``c = x1.x2 / (|x1| |x2|)`` (any ``w_std``: it only moves ``r``). ``F_L`` (NTK: ``t' = c' + (1 - acos(c)/pi)
t``, ``t^1 = c^1``; NNGP: ``c^{L+1}``) is smooth in the angle but has square-root branch points at
``c = +-1``; in ``s = sqrt(1 - |c|)`` each half, ``c >= 0`` and ``c < 0``, is analytic on ``s in [0, 1]``
(``theta = 2 asin(s / sqrt 2)``, or ``pi`` minus it), so each half is a short Chebyshev series in
``z = 2 s - 1``, fitted here once per (depth, kind) in float64 from an angle-space recursion that keeps
``1 - c`` accurate near ``c = 1``.

A tile then costs one ``sqrt`` and a Horner recurrence per entry (Clenshaw's for the NTK deeper than 32,
where the power coefficients cancel) instead of ``depth`` rounds of ``acos``, ``sqrt`` and FMAs (one 2,048²
tile, depth 3, one core of the 2-core Xeon: see ``bench/RESULTS.md``). The series' own error is below 1e-8
of ``F_L(1)`` (checked on a dense grid when it is fitted; depth <= 32); in float32 the recurrence adds a
few ulps, within 5e-7 of the largest entry like the other fused paths (``tests/test_relu_series.py``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numpy.polynomial import chebyshev

MAX_DEGREE = 96
# of F_L(1), the largest value (F_L is increasing in c): a sixth of float32's rounding there; 1e-9 took
# 17 coefficients for depth 3 (10.2 ms per 2,048² tile) where this takes 13 (8.1 ms), same float32 error
FIT_TOL = 1e-8
HORNER_TOL = 2.5e-7  # float32 Horner error allowed, of F_L(1) (Clenshaw's own is 0.4-2.4e-7 through depth 32)


def angle_recursion(theta: np.ndarray, depth: int, kind: str) -> np.ndarray:
    """``F_L`` of the first layer's angle ``theta`` (radians, ``[0, pi]``), float64.

    ``1 - J`` is formed as ``(pi (1 - cos t) + t cos t - sin t) / pi`` and the next angle as
    ``2 asin(sqrt((1 - J) / 2))``, so angles near 0 (cosines near 1) keep full relative precision.
    """
    theta = np.asarray(theta, dtype=np.float64)
    t = np.cos(theta)
    for _ in range(depth):
        sin, cos = np.sin(theta), np.cos(theta)
        tdot = (math.pi - theta) / math.pi
        j = (sin + (math.pi - theta) * cos) / math.pi
        one_minus_j = (2 * math.pi * np.sin(theta / 2) ** 2 + theta * cos - sin) / math.pi
        t = j + tdot * t
        theta = 2 * np.arcsin(np.sqrt(np.clip(one_minus_j / 2, 0.0, 1.0)))
    return t if kind == "ntk" else np.cos(theta)


def _half(s: np.ndarray, positive: bool, depth: int, kind: str) -> np.ndarray:
    theta = 2 * np.arcsin(s / math.sqrt(2))
    return angle_recursion(theta if positive else math.pi - theta, depth, kind)


@functools.lru_cache(maxsize=64)
def coefficients(depth: int, kind: str) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """``(pos, neg, f1)``: the Chebyshev coefficients (in ``z = 2 sqrt(1 - |c|) - 1``) of ``F_L`` for
    ``c >= 0`` and ``c < 0``, padded to one length, and ``f1 = F_L(1)`` (``depth + 1`` for the NTK, 1 for
    the NNGP), the value pinned on a diagonal. Raises ValueError when no degree up to :data:`MAX_DEGREE`
    reaches :data:`FIT_TOL`."""
    if kind not in ("ntk", "nngp"):
        raise ValueError(f"kind must be 'ntk' or 'nngp', got {kind!r}")
    f1 = float(depth + 1) if kind == "ntk" else 1.0
    grid = np.linspace(0.0, 1.0, 20001)
    halves = []
    for positive in (True, False):
        exact = _half(grid, positive, depth, kind)
        for degree in range(4, MAX_DEGREE + 1, 4):
            nodes = (np.cos(np.pi * (np.arange(2 * degree + 2) + 0.5) / (2 * degree + 2)) + 1) / 2
            coef = chebyshev.chebfit(2 * nodes - 1, _half(nodes, positive, depth, kind), degree)
            if np.abs(chebyshev.chebval(2 * grid - 1, coef) - exact).max() <= FIT_TOL * f1:
                halves.append(coef)
                break
        else:
            raise ValueError(f"no Chebyshev series of degree <= {MAX_DEGREE} fits the depth-{depth} ReLU "
                             f"{kind} to {FIT_TOL:g}")
    size = max(len(h) for h in halves)
    pos, neg = (tuple(float(v) for v in np.pad(h, (0, size - len(h)))) for h in halves)
    return pos, neg, f1


@functools.lru_cache(maxsize=64)
def power_coefficients(depth: int, kind: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The two series as plain polynomials in ``z`` (for Horner's rule: one FMA per degree, against
    Clenshaw's two steps), or None where that loses accuracy: only when Horner in float32 stays within
    :data:`HORNER_TOL` of ``F_L(1)`` on a dense grid (true through depth 32; the deep NTK's power
    coefficients grow like ``2^degree`` and cancel, e.g. to 1.8e-5 at depth 48)."""
    pos, neg, f1 = coefficients(depth, kind)
    z = np.linspace(-1.0, 1.0, 100001)
    z32 = z.astype(np.float32)
    out = []
    for cheb in (pos, neg):
        power = chebyshev.cheb2poly(np.asarray(cheb))
        y = np.full_like(z32, np.float32(power[-1]))
        for a in power[-2::-1]:
            y = y * z32 + np.float32(a)
        if np.abs(y.astype(np.float64) - chebyshev.chebval(z, cheb)).max() > HORNER_TOL * f1:
            return None
        out.append(tuple(float(v) for v in power))
    return out[0], out[1]


def evaluate(c: np.ndarray, depth: int, kind: str) -> np.ndarray:
    """``F_L(c)`` from the series, in float64 (a reference for the float32 kernel and the tests)."""
    pos, neg, _ = coefficients(depth, kind)
    c = np.clip(np.asarray(c, dtype=np.float64), -1.0, 1.0)
    z = 2 * np.sqrt(1 - np.abs(c)) - 1
    return np.where(c >= 0, chebyshev.chebval(z, pos), chebyshev.chebval(z, neg))
