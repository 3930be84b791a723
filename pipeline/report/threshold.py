"""The interpolation threshold of an MLP: its parameter count, the width where that reaches ``n_train * K``.

Also whether a group's double-descent figure is drawn: with label noise, or widths around the threshold.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.report.groups import Group

INPUT_DIM = {"mnist": 784, "fashion_mnist": 784, "cifar10": 3072, "digits": 64}  # flattened input size d


def n_outputs(settings: dict[str, Any]) -> int:
    """K: one output for a binary task, else one per class (10 when ``classes`` is not given)."""
    classes = settings.get("classes")
    n = len(classes) if classes else 10
    return 1 if n == 2 else n


def input_dim(settings: dict[str, Any]) -> int | None:
    """d of the flattened inputs: known per dataset, else from the subset (None if it cannot be loaded)."""
    if settings.get("dataset") in INPUT_DIM:
        return INPUT_DIM[settings["dataset"]]
    try:
        from pipeline.data import load_recorded_subset
        from pipeline.run_config import RunConfig

        return load_recorded_subset(RunConfig.from_row(settings)).dim
    except Exception:  # noqa: BLE001 - no data here: the threshold cannot be placed
        return None


def threshold_width(n_train: int, d: int, depth: int, k: int) -> float | None:
    """The (real) width where the parameter count equals ``n_train * K``: the interpolation threshold.
    None for ``depth = 0`` (no width) or when even width 0 has that many parameters."""
    if depth == 0:
        return None
    target = n_train * k
    a, b, c = depth - 1, d + 1 + (depth - 1) + k, k - target  # a w^2 + b w + c = 0
    if c >= 0:
        return None
    return -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


def double_descent_reason(g: Group, widths: list[int]) -> tuple[float | None, str | None]:
    """(threshold width, None) when the group's curve is drawn; else (threshold or None, why not)."""
    s = g.settings
    d = input_dim(s)
    k = n_outputs(s)
    depth, n = s.get("depth"), s.get("n_train")
    if d is None or depth is None or n is None:
        return None, "the input dimension, depth or n_train of this group is unknown here"
    w_star = threshold_width(int(n), d, int(depth), k)
    noisy = bool(s.get("label_noise") or 0)
    straddles = w_star is not None and widths and min(widths) < w_star < max(widths)
    if not (noisy or straddles):
        where = f"width ≈ {w_star:.3g}" if w_star is not None else "no width"
        return w_star, (f"no label noise, and the widths {min(widths)}–{max(widths)} do not straddle the interpolation "
                        f"threshold P = n_train·K = {int(n) * k} parameters ({where})")
    return w_star, None

