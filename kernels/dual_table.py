"""Interpolation tables for the Gaussian duals of activations without a closed form (tanh, sigmoid,
softplus, callables), as Lee et al. 2018 (Appendix C) did for the NNGP: the 2-D quadrature of
:func:`kernels.activations.gaussian_expectations` (~10^4 function evaluations per entry) is done once per
table node, and each Gram entry only interpolates.

**Coordinates.** The dual ``(T, Tdot)(k11, k22, k12)`` is tabulated over the two variances and the angle
``theta = acos(k12 / sqrt(k11 k22))``: in ``theta`` the dual stays smooth even when ``phi`` is step-like at
large variance (``arcsin(cos theta) = pi/2 - theta``), and it is even about ``theta = 0`` and ``theta = pi``
(``c = cos theta``), so the end nodes are padded by reflection. ``theta`` has :data:`ANGLES` uniform
intervals and 4-point (cubic) Lagrange interpolation.

**Variances.** A tile's rows carry the variances ``K^l(x, x)`` of every layer (known per row before the
tile is computed, :func:`kernels.fused.row_state`). When the rows and columns of a tile hold at most
:data:`EXACT_MAX` distinct float32 variances (per-image standardised data: one per layer), the table's
variance nodes are exactly those values and only ``theta`` is interpolated (4 gathers per entry). Otherwise
the nodes lie on a global grid in ``log(variance)`` with step :data:`LOG_STEP`, interpolated by 4-point
Lagrange in each variance too (64 gathers per entry); variances below ``max / 2^20`` are clamped to it.

Every node's slice over ``theta`` is computed once per process (float64; closed forms by their own dual,
quadrature activations by :func:`kernels.activations.gaussian_expectations` with :data:`NODE_POINTS`
Hermite points, finer than the activation's default rule, whose own Tdot error near ``|c| = 1`` would
otherwise dominate the table's) and cached, so the values at a node do not depend on which tile asked first: tiles are
deterministic and a resumed Gram equals an uninterrupted one. Accuracy against the float64 quadrature
(``kernels.analytic.mlp_kernels``) and speed are measured in ``bench/gram.py`` (``--table``) and stated in
``bench/RESULTS.md``; ``tests/test_dual_table.py`` checks both node modes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch

from kernels.activations import Activation, gaussian_expectations, get_activation

Tensor = torch.Tensor
ANGLES = 128  # uniform intervals of theta over [0, pi]
LOG_STEP = 1.0 / 16  # grid step in log(variance)
EXACT_MAX = 16  # at most this many distinct variances in a tile: exact variance nodes
FLOOR_RATIO = 2.0**-20
# Gauss-Hermite points per axis for the node slices of quadrature activations. The activations' own dual
# (96 points) is off by up to 5e-6 in Tdot near |c| = 1 at variance 2.5 for tanh (against the graded rule);
# 160 points: 4e-8, at 2.8x the cost of a slice (variances above 2.5 take the graded rule either way)
NODE_POINTS = 160
# variances within this relative distance share an exact node (the spread of one value's float32 roundings;
# the dual changes by at most about this much relative to it)
MERGE_RTOL = 2.5e-7  # grid mode: variances below max * this are clamped to it


def _cubic_weights(f: Tensor) -> list[Tensor]:
    """4-point Lagrange weights for nodes -1, 0, 1, 2 at offset ``f`` in [0, 1]."""
    return [-f * (f - 1) * (f - 2) / 6, (f + 1) * (f - 1) * (f - 2) / 2, -(f + 1) * f * (f - 2) / 2,
            (f + 1) * f * (f - 1) / 6]


class DualTable:
    """The interpolated dual of one activation (see the module docstring). ``prepare(q_rows, q_cols)`` with
    the float64 per-row variances of a tile (``(layers, n)`` each) returns the ``dual(k11, k22, k12) ->
    (T, Tdot)`` that :func:`kernels.fused.fused_tile` calls for that tile."""

    def __init__(self, activation: Any, *, angles: int = ANGLES, log_step: float = LOG_STEP,
                 exact_max: int = EXACT_MAX) -> None:
        self.act: Activation = get_activation(activation)
        self.angles = int(angles)
        self.log_step = float(log_step)
        self.exact_max = int(exact_max)
        self._slices: dict[tuple[float, float], Tensor] = {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------- node slices

    def _slice_values(self, pairs: list[tuple[float, float]]) -> Tensor:
        """``(len(pairs), angles + 3, 2)`` float64: (T, Tdot) at theta nodes, padded by reflection."""
        m = self.angles
        theta = torch.arange(m + 1, dtype=torch.float64) * (math.pi / m)
        v = torch.tensor(pairs, dtype=torch.float64)
        k11 = v[:, :1].expand(-1, m + 1)
        k22 = v[:, 1:].expand(-1, m + 1)
        k12 = torch.sqrt(k11 * k22) * torch.cos(theta)[None, :]
        k12[:, 0] = torch.sqrt(v[:, 0] * v[:, 1])  # cos 0 = 1 exactly
        if self.act.closed_form:
            t, tdot = self.act.dual(k11.contiguous(), k22.contiguous(), k12)
        else:
            t, tdot = gaussian_expectations(self.act.fn, self.act.deriv, k11.contiguous(), k22.contiguous(), k12,
                                            points=NODE_POINTS)
        vals = torch.stack([t, tdot], dim=-1)  # (p, m + 1, 2)
        return torch.cat([vals[:, 1:2], vals, vals[:, m - 1 : m]], dim=1)

    def _dense(self, rows: list[float], cols: list[float]) -> Tensor:
        """``(len(rows), len(cols), angles + 3)`` float64 view of the float32 (T, Tdot) pairs at those
        variance nodes (slices computed once per unordered pair and cached)."""
        def key(a: float, b: float) -> tuple[float, float]:
            return (a, b) if a <= b else (b, a)

        with self._lock:
            missing = sorted({key(a, b) for a in rows for b in cols} - self._slices.keys())
            if missing:
                vals = self._slice_values(missing)
                for k, pair in enumerate(missing):
                    self._slices[pair] = vals[k].to(torch.float32)
            dense = torch.empty(len(rows), len(cols), self.angles + 3, 2, dtype=torch.float32)
            for i, a in enumerate(rows):
                for j, b in enumerate(cols):
                    dense[i, j] = self._slices[key(a, b)]
        return dense.view(torch.float64).reshape(len(rows), len(cols), self.angles + 3)

    # -------------------------------------------------------------------------------- per tile

    def prepare(self, q_rows: Tensor, q_cols: Tensor) -> list[Callable[[Tensor, Tensor, Tensor], tuple]]:
        """The duals, one per layer, for a tile whose rows/columns have the float64 variances ``q_rows``/
        ``q_cols`` (``(layers, n)``): layer ``l``'s table covers only the variances of layer ``l``."""
        return [self.prepare_layer(q_rows[layer], q_cols[layer]) for layer in range(q_rows.shape[0])]

    def _axis(self, q: Tensor) -> tuple[list[float], Callable[[Tensor], tuple[list[Tensor], list[Tensor]]]]:
        """Variance nodes for the float64 variances ``q`` and the function giving, for float32 variances,
        the node indices and interpolation weights."""
        seen = torch.unique(q.reshape(-1).to(torch.float64))
        # clusters of variances within MERGE_RTOL of their first member (float32 rounding of one value)
        starts = [0]
        for i in range(1, seen.numel()):
            if len(starts) > self.exact_max:
                break
            if float(seen[i]) > float(seen[starts[-1]]) * (1 + MERGE_RTOL):
                starts.append(i)
        if len(starts) <= self.exact_max:
            ends = starts[1:] + [seen.numel()]
            nodes = [float(seen[a : b].mean()) for a, b in zip(starts, ends, strict=True)]
            # float32 boundaries halfway between consecutive clusters
            edges = torch.tensor([(float(seen[b - 1]) + float(seen[b])) / 2 for b in ends[:-1]],
                                 dtype=torch.float32)

            def exact(k: Tensor) -> tuple[list[Tensor], list[Tensor]]:
                return [torch.bucketize(k.contiguous(), edges.to(k.dtype))], [torch.ones_like(k)]

            return nodes, exact
        top = float(seen.max())
        floor = max(float(seen[seen > 0].min()) if bool((seen > 0).any()) else top, top * FLOOR_RATIO)
        k0 = math.floor(math.log(floor) / self.log_step) - 1
        k1 = math.ceil(math.log(top) / self.log_step) + 2
        nodes = [math.exp(k * self.log_step) for k in range(k0, k1 + 1)]
        n = len(nodes)

        def grid(k: Tensor) -> tuple[list[Tensor], list[Tensor]]:
            u = torch.log(torch.clamp(k, min=floor).double()) / self.log_step - k0
            base = torch.floor(u)
            f = (u - base).to(k.dtype)
            base = base.long()
            return [(base + d).clamp_(0, n - 1) for d in (-1, 0, 1, 2)], _cubic_weights(f)

        return nodes, grid

    def prepare_layer(self, q_rows: Tensor, q_cols: Tensor) -> Callable[[Tensor, Tensor, Tensor], tuple]:
        """The dual for one layer whose rows/columns have the float64 variances ``q_rows``/``q_cols``."""
        row_nodes, row_weights = self._axis(q_rows)
        col_nodes, col_weights = self._axis(q_cols)
        flat = self._dense(row_nodes, col_nodes).reshape(-1)
        nc, p = len(col_nodes), self.angles + 3
        h_theta = math.pi / self.angles

        def dual(k11: Tensor, k22: Tensor, k12: Tensor) -> tuple[Tensor, Tensor]:
            i_idx, i_w = row_weights(k11)
            j_idx, j_w = col_weights(k22)
            prod = k11 * k22
            c = torch.where(prod > 0, k12 * torch.rsqrt(torch.where(prod > 0, prod, 1.0)), 0.0)
            theta = torch.acos(torch.clamp(c, -1.0, 1.0)) / h_theta
            j = torch.clamp(torch.floor(theta), 0, self.angles - 1)
            t_w = _cubic_weights(theta - j)
            j = j.long()  # node j - 1 sits at padded index j
            single = len(i_idx) == 1 and len(j_idx) == 1
            out = None
            for ia, wa in zip(i_idx, i_w, strict=True):
                for jb, wb in zip(j_idx, j_w, strict=True):
                    base = (ia * nc + jb) * p + j
                    acc = None
                    for c_off, wc in enumerate(t_w):
                        pair = flat[base + c_off].view(torch.float32).reshape(*base.shape, 2)
                        term = pair * wc[..., None]
                        acc = term if acc is None else acc.add_(term)
                    if not single:
                        acc.mul_((wa * wb)[..., None])
                    out = acc if out is None else out.add_(acc)
            return out[..., 0], out[..., 1]

        return dual


_TABLES: dict[str, DualTable] = {}
_TABLES_LOCK = threading.Lock()


def get_table(activation: str) -> DualTable:
    """The process-wide table of a named activation (its node slices are shared by all Grams)."""
    name = get_activation(activation).name
    with _TABLES_LOCK:
        table = _TABLES.get(name)
        if table is None:
            table = _TABLES[name] = DualTable(name)
    return table
