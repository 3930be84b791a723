"""Parse an activation name into its family and parameters, without importing torch.

The config layer (``pipeline/run_config.py``) validates and canonicalises a job's activation string
with :func:`canonical_activation`; :func:`kernels.activations.get_activation` builds the torch
:class:`~kernels.activations.Activation` from the same :func:`parse_activation`, so both accept the
same strings, give the same canonical names and raise the same messages. Accepted: ``relu``,
``leaky_relu[:<alpha>]`` (alpha 0.01 by default), ``abrelu:<a>,<b>``, ``abs``, ``erf``, ``gelu``,
``identity`` (or ``linear``), ``tanh``, ``sigmoid``, ``softplus``; case and surrounding blanks are
ignored.
"""

from __future__ import annotations

import math
from typing import NamedTuple

CLOSED_FORM = ("relu", "leaky_relu:<alpha>", "abrelu:<a>,<b>", "abs", "erf", "gelu", "identity")
BY_QUADRATURE = ("tanh", "sigmoid", "softplus")
# Families without a parameter; "abrelu" (relu, abs, leaky_relu, abrelu) is the one with two.
PLAIN = ("erf", "gelu", "identity", "tanh", "sigmoid", "softplus")


class ActivationSpec(NamedTuple):
    """A parsed activation: canonical ``name``, ``family`` (``"abrelu"`` or one of :data:`PLAIN`) and,
    for the ``abrelu`` family, ``params = (a, b)`` of phi(z) = a*min(z, 0) + b*max(z, 0)."""

    name: str
    family: str
    params: tuple[float, ...] = ()


def _parse_floats(spec: str, arg: str, count: int) -> list[float]:
    try:
        values = [float(v) for v in arg.split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ValueError(f"activation {spec!r}: expected {count} number(s) after ':'")
    return values


def abrelu_name(a: float, b: float) -> str:
    """The canonical name of an ``abrelu`` activation given only its slopes."""
    return f"abrelu:{a:g},{b:g}"


def parse_activation(spec: str) -> ActivationSpec:
    """Parse an activation name (see the module docstring); a bad one raises ``ValueError``."""
    if not isinstance(spec, str):
        raise ValueError(f"activation must be a name or a callable, got {type(spec).__name__}")
    base, _, arg = spec.strip().lower().partition(":")
    if base == "relu" and not arg:
        return ActivationSpec("relu", "abrelu", (0.0, 1.0))
    if base == "abs" and not arg:
        return ActivationSpec("abs", "abrelu", (-1.0, 1.0))
    if base == "leaky_relu":
        (alpha,) = _parse_floats(spec, arg or "0.01", 1)
        return ActivationSpec(f"leaky_relu:{alpha:g}", "abrelu", (alpha, 1.0))
    if base == "abrelu":
        a, b = _parse_floats(spec, arg, 2)
        return ActivationSpec(abrelu_name(a, b), "abrelu", (a, b))
    if arg:
        raise ValueError(f"activation {spec!r} takes no parameter")
    if base == "linear":
        base = "identity"
    if base in PLAIN:
        return ActivationSpec(base, base)
    known = ", ".join(CLOSED_FORM + BY_QUADRATURE)
    raise ValueError(f"unknown activation {spec!r}; known: {known}, or a torch callable")


def canonical_activation(spec: str) -> str:
    """The canonical name of an activation string, e.g. ``"Leaky_ReLU"`` -> ``"leaky_relu:0.01"``."""
    return parse_activation(spec).name
