"""Image preprocessing: flattened images -> the float32 inputs of the networks and kernels.

One function per method; :func:`preprocess_images` applies one to a train and a test set (statistics,
where a method has any, come from the train rows only).
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import UserError

PREPROCESSING = ("standardize", "unit_norm", "raw01")


def preprocess_images(
    x_train: np.ndarray, x_test: np.ndarray, method: str, pixel_max: float
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten images to ``(n, d)`` and preprocess them; returns float32 arrays.

    ``standardize``: per-feature z-score with mean/std of the train rows (std 1 for constant features).
    ``unit_norm``: every row scaled to squared norm ``d`` (all-zero rows stay zero). ``raw01``: pixels
    divided by ``pixel_max`` (255, or 16 for digits).
    """
    a = x_train.reshape(len(x_train), -1).astype(np.float64) / pixel_max
    b = x_test.reshape(len(x_test), -1).astype(np.float64) / pixel_max
    if method == "standardize":
        mean, std = a.mean(axis=0), a.std(axis=0)
        std[std < 1e-12] = 1.0
        a, b = (a - mean) / std, (b - mean) / std
    elif method == "unit_norm":
        a, b = (_scale_rows(m) for m in (a, b))
    elif method != "raw01":
        raise UserError(f"preprocess={method!r}: expected one of {', '.join(PREPROCESSING)}")
    return a.astype(np.float32), b.astype(np.float32)


def _scale_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * (np.sqrt(x.shape[1]) / np.where(norms > 0, norms, 1.0))


