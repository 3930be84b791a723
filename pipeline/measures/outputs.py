"""What the trained functions and weights did: losses, accuracies, agreement of two predictors, relative
weight change and activation-pattern flips."""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels.mlp import MLP

Tensor = torch.Tensor


def accuracy(pred: Tensor, labels: np.ndarray) -> float:
    lab = torch.as_tensor(labels, device=pred.device)
    cls = (pred[:, 0] > 0).long() if pred.shape[1] == 1 else pred.argmax(dim=1)
    return float((cls == lab).double().mean())


def mse(pred: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    return float(0.5 * ((pred - y) ** 2).sum(-1).mean())


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape[1] == 1:
        return float(np.mean((a[:, 0] > 0) == (b[:, 0] > 0)))
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def flip_fraction(model0: MLP, model_t: MLP, x: Tensor) -> float:
    """Fraction of (hidden unit, training point) pairs whose activation sign flipped in training."""
    with torch.no_grad():
        _, _, z0 = model0.forward_with_preactivations(x)
        _, _, zt = model_t.forward_with_preactivations(x)
    if not z0:
        return math.nan
    flips = sum(int(((a > 0) != (b > 0)).sum()) for a, b in zip(z0, zt, strict=True))
    return flips / sum(a.numel() for a in z0)
