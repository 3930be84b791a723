"""One architecture description gives the torch network, its infinite-width kernels and its structured empirical NTK.

The idea is neural-tangents' ``stax``: a layer is an ``(init_fn, apply_fn, kernel_fn)`` triple and
``serial(...)`` composes them, so one expression is both a network and its kernel. Here a layer is a small
frozen dataclass doing those three jobs, plus the one the structured empirical NTK needs:

* ``init(fan_in, generator, dtype) -> (module | None, fan_out)``: its torch parameters (an ``nn.Module``;
  ``None`` for a layer without any), drawn from ``generator`` in a fixed order;
* ``apply(module, h) -> h'``: its torch forward;
* ``kernel(state) -> state``: its infinite-width rule on a :class:`KernelState` (NNGP and NTK, block-wise);
* ``backprop(module, h, cot) -> cot``: its structured empirical-NTK rule, the cotangent
  ``d f / d(input)`` from ``d f / d(output)`` (a :class:`Cotangent`); a layer with parameters also has
  ``param_gram(module, h1, h2)``, the input factor of its parameter gradients' Gram, so that its share of
  the empirical NTK is ``<cot(x), cot(x')> * param_gram(h(x), h(x'))``.

Layers: :class:`Dense` and :class:`Nonlinearity`; :func:`serial` chains them and :func:`mlp` is the
project's network, ``depth x [Dense(width), Nonlinearity] -> Dense(out_dim)``, from which
:class:`kernels.mlp.MLP` (torch), :mod:`kernels.analytic` (kernels) and :mod:`kernels.empirical`
(structured empirical NTK) are all built. A convolution or pooling layer is one more such class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from kernels.activations import Activation, get_activation

Tensor = torch.Tensor
PARAMETERIZATIONS = ("ntk", "standard", "mup")


# ----------------------------------------------------------------------------------------------
# The state the kernel rules act on, and the cotangents the empirical-NTK rules pass down.


@dataclass(frozen=True)
class KernelState:
    """The infinite-width kernels of the features at one point of the network, for the rows of ``x1``
    against those of ``x2``.

    ``k12 (N1, N2)``, ``k11 (N1, 1)``, ``k22 (1, N2)``: the per-unit covariance ``E[h(x) h(x')]`` times
    ``div``. The inputs start as raw inner products with ``div = d``, so the first Dense forms
    ``w_std^2 x.x' / d`` in that order of operations; every layer's output has ``div = 1``. ``width``: the
    number of features (the fan-in of a Dense placed here), None where unknown (only the
    standard-parameterisation NTK needs it). ``ntk``: the NTK of these features with respect to the
    parameters below them, None while there are none (zero) or when ``track_ntk`` is False.
    """

    k11: Tensor
    k22: Tensor
    k12: Tensor
    div: float = 1
    width: int | None = None
    ntk: Tensor | None = None
    track_ntk: bool = True

    @classmethod
    def from_dots(cls, dot12: Tensor, sq1: Tensor, sq2: Tensor, in_dim: int, track_ntk: bool) -> KernelState:
        """The inputs' state from their inner products ``(N1, N2)`` and squared norms ``(N1,)``, ``(N2,)``."""
        return cls(sq1[:, None], sq2[None, :], dot12, div=in_dim, width=in_dim, track_ntk=track_ntk)

    def covariances(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(k11, k22, k12)`` divided by ``div``: the per-unit covariances themselves."""
        if self.div == 1:
            return self.k11, self.k22, self.k12
        return self.k11 / self.div, self.k22 / self.div, self.k12 / self.div


class Cotangent:
    """``delta[n, k, j] = d f_k(x_n) / d h_j``: the output's gradient at some features ``h`` of ``n`` inputs.

    Three forms, so that no layer materialises more than it must: :class:`Eye` at the output (the
    identity), :class:`Shared` just below a Dense on it (``scale * W[k, j]``, the same for every input,
    times an optional per-input factor ``dphi[n, j]``), and :class:`Full`, an ``(n, K, width)`` tensor.
    """

    def full(self) -> Tensor:
        """The ``(n, K, width)`` tensor."""
        raise NotImplementedError

    def gram_features(self, trace: bool) -> Tensor | None:
        """``F`` with ``F1 @ F2.T`` the cotangents' Gram between two sets of inputs: traced, the mean over
        outputs ``(1/K) sum_k delta^k(x) . delta^k(x')`` as ``(n, .)`` rows; untraced, every ``(k, k')`` as
        ``(n*K, width)`` rows. None for :class:`Eye`, whose Gram is the identity (traced: 1)."""
        full = self.full()
        n, k, width = full.shape
        if not trace:
            return full.view(n * k, width)
        # divide by sqrt(K) once so that the Gram is already the output mean
        return full.view(n, k * width) if k == 1 else full.view(n, k * width) * (1.0 / math.sqrt(k))


@dataclass
class Eye(Cotangent):
    """``d f / d f``: the identity over ``K`` outputs."""

    n: int
    k: int
    dtype: torch.dtype
    device: torch.device

    def full(self) -> Tensor:
        eye = torch.eye(self.k, dtype=self.dtype, device=self.device)
        return eye[None].expand(self.n, self.k, self.k).clone()

    def gram_features(self, trace: bool) -> Tensor | None:
        return None


@dataclass
class Shared(Cotangent):
    """``delta[n, k, j] = scale * weight[k, j] * dphi[n, j]`` (``dphi`` None: 1)."""

    weight: Tensor
    scale: float
    n: int
    dphi: Tensor | None = None
    _full: Tensor | None = field(default=None, repr=False, compare=False)

    def full(self) -> Tensor:
        if self._full is None:
            if self.dphi is None:
                delta = self.weight[None, :, :].expand(self.n, *self.weight.shape).clone()
            else:
                delta = self.weight[None, :, :] * self.dphi[:, None, :]
            self._full = delta.mul_(self.scale)
        return self._full

    def gram_features(self, trace: bool) -> Tensor | None:
        if not trace:
            return super().gram_features(trace)
        # sum_k delta^k(x) . delta^k(x') = sum_j s_j dphi_j(x) dphi_j(x') with s_j = scale^2 sum_k W[k, j]^2:
        # one (n, width) feature dphi * sqrt(s / K) instead of a K x width one.
        k = self.weight.shape[0]
        root = (self.weight.square().sum(dim=0) * (float(self.scale) ** 2 / k)).sqrt_()
        return root.expand(self.n, -1) if self.dphi is None else self.dphi * root


@dataclass
class Full(Cotangent):
    """``delta = scale * tensor``, ``tensor (n, K, width)``; the scale is applied when first needed."""

    tensor: Tensor
    scale: float = 1.0

    def full(self) -> Tensor:
        if self.scale != 1.0:
            self.tensor.mul_(self.scale)
            self.scale = 1.0
        return self.tensor


# ----------------------------------------------------------------------------------------------
# Layers.


class DenseModule(nn.Module):
    """``z = weight_scale * h @ W.T + bias_scale * b``, with ``W: (fan_out, fan_in)``, ``b: (fan_out,)``.

    The scales hold the parameterisation (see :class:`Dense`); ``weight`` and ``bias`` are the trained
    parameters.
    """

    def __init__(self, weight: Tensor, bias: Tensor, weight_scale: float, bias_scale: float) -> None:
        super().__init__()
        self.weight_scale, self.bias_scale = weight_scale, bias_scale
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, h: Tensor) -> Tensor:
        """``h: (N, fan_in) -> (N, fan_out)``."""
        return torch.addmm(self.bias * self.bias_scale, h, self.weight.T, alpha=self.weight_scale)


@dataclass(frozen=True)
class Dense:
    """A fully-connected layer to ``out`` units (None: any, for the kernel alone).

    NTK parameterisation: ``z = w_std/sqrt(fan_in) * W h + b_std * b`` with ``W, b ~ N(0, 1)``; standard:
    ``z = W h + b`` with ``W ~ N(0, w_std^2/fan_in)``, ``b ~ N(0, b_std^2)``; ``"mup"``: Yang & Hu's μP,
    where ``mup_role`` (``"input"``, ``"hidden"``, ``"output"`` or ``"only"``, a depth-0 network's single
    layer) places the layer in their Table 3 (see :mod:`kernels.mlp`) and the width ``n`` is the layer's
    ``out`` (its fan-in for the output layer).
    """

    out: int | None
    w_std: float = 2**0.5
    b_std: float = 0.0
    parameterization: str = "ntk"
    mup_role: str | None = None
    has_params = True

    def __post_init__(self) -> None:
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be 'ntk', 'standard' or 'mup', got {self.parameterization!r}"
            )

    def init(self, fan_in: int, generator: torch.Generator, dtype: torch.dtype) -> tuple[DenseModule, int]:
        """Draw ``W`` then ``b`` from ``generator`` (``N(0, 1)``), scaled for the parameterisation."""
        if self.out is None:
            raise ValueError("a Dense layer needs its number of units to build a network")
        weight = torch.randn(self.out, fan_in, generator=generator, dtype=dtype)
        bias = torch.randn(self.out, generator=generator, dtype=dtype)
        if self.parameterization == "ntk":
            scales = self.w_std / math.sqrt(fan_in), float(self.b_std)
        elif self.parameterization == "standard":
            scales = 1.0, 1.0
            weight *= self.w_std / math.sqrt(fan_in)
            bias *= self.b_std
        else:
            width = fan_in if self.mup_role == "output" else self.out
            scales = _mup_scales(fan_in, self.w_std, self.b_std, self.mup_role, width, weight, bias)
        return DenseModule(weight, bias, *scales), self.out

    def apply(self, module: DenseModule, h: Tensor) -> Tensor:
        return module(h)

    def kernel(self, s: KernelState) -> KernelState:
        """``K' = w_std^2 K + b_std^2``; NTK ``Theta' = K' + w_std^2 Theta`` (NTK parameterisation) or
        ``fan_in K + 1 + w_std^2 Theta`` (standard, where the parameter gradients are not rescaled)."""
        if self.parameterization not in ("ntk", "standard"):
            raise ValueError(f"parameterization must be 'ntk' or 'standard', got {self.parameterization!r}")
        w2, b2 = float(self.w_std) ** 2, float(self.b_std) ** 2

        def affine(k: Tensor) -> Tensor:
            return (w2 * k + b2) if s.div == 1 else (w2 * k / s.div + b2)

        k12 = affine(s.k12)
        ntk = None
        if s.track_ntk:
            if self.parameterization == "standard":
                if s.width is None:
                    raise ValueError("the standard-parameterisation NTK depends on the width: pass width=")
                fan_in = s.width / s.div  # 1 at the inputs, where k12 is x.x' itself
                fresh = (s.k12 + 1.0) if fan_in == 1 else (s.k12 * fan_in + 1.0)
            else:
                fresh = k12 if s.ntk is not None else k12.clone()
            ntk = fresh if s.ntk is None else fresh + w2 * s.ntk
        return replace(s, k11=affine(s.k11), k22=affine(s.k22), k12=k12, div=1, width=self.out, ntk=ntk)

    def param_gram(self, module: DenseModule, h1: Tensor, h2: Tensor) -> Tensor:
        """``cw^2 h1 @ h2.T + cb^2``: the weight gradients' Gram is ``delta delta'^T`` times ``cw^2 h . h'``,
        the bias gradients' times ``cb^2``."""
        cw2, cb2 = float(module.weight_scale) ** 2, float(module.bias_scale) ** 2
        if cb2 == 0.0:
            out = torch.mm(h1, h2.T)
            return out.mul_(cw2) if cw2 != 1.0 else out
        bias = torch.full((), cb2, dtype=h1.dtype, device=h1.device)
        return torch.addmm(bias, h1, h2.T, alpha=cw2)

    def backprop(self, module: DenseModule, h: Tensor, cot: Cotangent) -> Cotangent:
        """``delta_in = delta_out @ (cw W)``."""
        if isinstance(cot, Eye):
            return Shared(module.weight, module.weight_scale, cot.n)
        delta = cot.full()
        n, k, width = delta.shape
        back = torch.mm(delta.view(n * k, width), module.weight).view(n, k, module.weight.shape[1])
        return Full(back, module.weight_scale)


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


@dataclass(frozen=True)
class Nonlinearity:
    """An elementwise activation ``h = phi(z)`` (:class:`kernels.activations.Activation`)."""

    act: Activation
    has_params = False

    def init(self, fan_in: int, generator: torch.Generator, dtype: torch.dtype) -> tuple[None, int]:
        return None, fan_in

    def apply(self, module: None, z: Tensor) -> Tensor:
        return self.act.fn(z)

    def kernel(self, s: KernelState) -> KernelState:
        """``K' = T(K)``, ``Theta' = Tdot(K) Theta`` with ``(T, Tdot)`` the activation's Gaussian dual."""
        k11, k22, k12 = s.covariances()
        t12, tdot = self.act.dual(k11, k22, k12)
        t11 = self.act.dual(k11, k11, k11)[0]  # diagonals: the same rule at k12 = k11
        t22 = self.act.dual(k22, k22, k22)[0]
        ntk = None if s.ntk is None else tdot * s.ntk
        return replace(s, k11=t11, k22=t22, k12=t12, div=1, ntk=ntk)

    def backprop(self, module: None, z: Tensor, cot: Cotangent) -> Cotangent:
        """``delta_z = delta_h * phi'(z)``."""
        dphi = self.act.deriv(z)
        if isinstance(cot, Shared):
            return Shared(cot.weight, cot.scale, cot.n, dphi if cot.dphi is None else cot.dphi * dphi)
        if isinstance(cot, Full):
            delta, scale = cot.tensor, cot.scale
        else:
            delta, scale = cot.full(), 1.0
        delta.mul_(dphi[:, None, :])
        if scale != 1.0:
            delta.mul_(scale)
        return Full(delta)


Layer = Dense | Nonlinearity


# ----------------------------------------------------------------------------------------------
# Composition.


@dataclass(frozen=True)
class Serial:
    """Layers applied one after the other; :func:`serial` builds it."""

    layers: tuple[Layer, ...]

    def init(self, fan_in: int, generator: torch.Generator, dtype: torch.dtype) -> list[nn.Module]:
        """The torch modules of the layers with parameters, in order (drawn in that order)."""
        modules = []
        for layer in self.layers:
            module, fan_in = layer.init(fan_in, generator, dtype)
            if module is not None:
                modules.append(module)
        return modules

    def apply(self, modules: Any, x: Tensor, record: list[Tensor] | None = None) -> Tensor:
        """The forward pass with ``modules`` (as from :meth:`init`); ``record`` collects every layer's input."""
        parts = iter(modules)
        h = x
        for layer in self.layers:
            if record is not None:
                record.append(h)
            h = layer.apply(next(parts) if layer.has_params else None, h)
        return h

    def kernel(self, state: KernelState) -> KernelState:
        for layer in self.layers:
            state = layer.kernel(state)
        return state

    def entk_features(self, modules: Any, x: Tensor, n_out: int, trace: bool) -> list[tuple]:
        """What the structured empirical NTK pairs between two sets of inputs: per layer with parameters,
        bottom first, ``(layer, module, h, F)`` with ``h`` its input and ``F`` the
        :meth:`Cotangent.gram_features` of ``d f / d(its output)``. Its NTK share is
        ``(F1 @ F2.T) * layer.param_gram(module, h1, h2)`` (``F`` None: the identity)."""
        record: list[Tensor | None] = []
        self.apply(modules, x, record)
        parts = list(modules)
        owners = [parts.pop() if layer.has_params else None for layer in reversed(self.layers)][::-1]
        cot: Cotangent = Eye(x.shape[0], n_out, x.dtype, x.device)
        features = []
        for i in range(len(self.layers) - 1, -1, -1):
            layer, module, h = self.layers[i], owners[i], record[i]
            record[i] = None  # a Nonlinearity's input is needed only for its backprop: free it after
            if layer.has_params:
                features.append((layer, module, h, cot.gram_features(trace)))
            if i > 0:
                cot = layer.backprop(module, h, cot)
        return features[::-1]


def serial(*layers: Layer | Serial) -> Serial:
    """Chain layers (nested :class:`Serial` are flattened)."""
    flat: list[Layer] = []
    for layer in layers:
        flat.extend(layer.layers if isinstance(layer, Serial) else (layer,))
    return Serial(tuple(flat))


def mlp(depth: int, width: int | None, out_dim: int | None, activation: str | Callable | Activation = "relu",
        w_std: float = 2**0.5, b_std: float = 0.0, parameterization: str = "ntk") -> Serial:
    """``depth x [Dense(width) -> activation] -> Dense(out_dim)``, every Dense with ``(w_std, b_std)``.

    ``width`` and ``out_dim`` may be None for the kernel alone (except the standard-parameterisation NTK,
    which needs ``width``).
    """
    act = Nonlinearity(get_activation(activation))
    roles = ["only"] if depth == 0 else ["input"] + ["hidden"] * (depth - 1) + ["output"]
    sizes = [width] * depth + [out_dim]
    dense = [Dense(n, w_std, b_std, parameterization, role) for n, role in zip(sizes, roles, strict=True)]
    return serial(*[part for layer in dense[:-1] for part in (layer, act)], dense[-1])
