"""Image preprocessing: flattened images -> the float32 inputs of the networks and kernels.

Methods (pixels are first divided by the dataset's maximum, 255 or 16 for digits):

* ``per_image`` (the default): each image centred and scaled to unit variance over its own features
  (per-image standardisation), so ``|x|^2 / d = 1`` for every image and no point outweighs another in the
  kernel. Needs no statistics, so train and test rows are treated alike and block-wise evaluation is exact.
* ``standardize``: per-feature z-score with the mean and std of the train rows (std 1 for constant
  features). Kept for comparison: on MNIST, pixels that are almost constant in the train rows get a tiny std,
  and test images with ink there reach ``|x|^2/d`` in the thousands; the 1% largest-norm points then carry
  99.7% of ``|Theta|_F^2`` (measured by ``bench/preprocess_share.py``). :func:`warn_if_dominated` says so.
* ``unit_norm``: every row scaled to squared norm ``d`` (not centred; all-zero rows stay zero).
* ``raw01``: pixels divided by the maximum only.

Why ``per_image``: among the candidates the issue named (variance floor, global scalar standardisation,
per-image normalisation, regularised ZCA), measured as the share of the depth-2 ReLU NTK's ``|Theta|_F^2``
(train ++ test) in the rows and columns of the 1% largest-norm points (``bench/preprocess_share.py``):
MNIST 1,000 + 2,000 -> per_image 1.9%, ZCA 2.0%, global 4.8%, variance floor (10% of the rms std) 16%,
standardize 99.7%; CIFAR-10 1,000 + 800 -> per_image 2.0%, ZCA 2.0%, standardize 8.4%. Per-image is as
flat as ZCA without a ``d x d`` whitening fitted on the train rows (which an MLP does not need), and the
same rule Lee et al. 2020 apply before their ZCA.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.errors import UserError

log = logging.getLogger(__name__)

PREPROCESSING = ("per_image", "standardize", "unit_norm", "raw01")
DEFAULT_PREPROCESS = "per_image"
NEEDS_TRAIN_STATISTICS = ("standardize",)
SHARE_LIMIT = 0.10  # the largest share of |Theta|_F^2 the 1% largest-norm points may carry without a warning
SHARE_SAMPLE = 2000  # points (sampled without replacement, seeded) behind the share estimate


def check_method(method: str) -> None:
    if method not in PREPROCESSING:
        raise UserError(f"preprocess={method!r}: expected one of {', '.join(PREPROCESSING)}")


def train_statistics(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std ``(d,) float64`` of ``x_train: (n, d)`` (already divided by the pixel max)."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std < 1e-12] = 1.0
    return mean, std


def transform_rows(a: np.ndarray, method: str, stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``a: (n, d) float64`` pixels divided by the max -> preprocessed ``(n, d) float64``, row by row.

    ``stats``: :func:`train_statistics` of the train rows, needed by ``standardize`` only.
    """
    check_method(method)
    if method == "per_image":
        centred = a - a.mean(axis=1, keepdims=True)
        std = centred.std(axis=1, keepdims=True)
        return centred / np.where(std > 1e-12, std, 1.0)
    if method == "standardize":
        if stats is None:
            raise ValueError("standardize needs the train statistics")
        return (a - stats[0]) / stats[1]
    if method == "unit_norm":
        norms = np.linalg.norm(a, axis=1, keepdims=True)
        return a * (np.sqrt(a.shape[1]) / np.where(norms > 0, norms, 1.0))
    return a


def preprocess_images(
    x_train: np.ndarray, x_test: np.ndarray, method: str, pixel_max: float
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten images to ``(n, d)`` and preprocess them (see the module docstring); returns float32 arrays.

    ``standardize`` logs a one-line warning when :func:`top_share` of the result exceeds ``SHARE_LIMIT``.
    """
    check_method(method)
    a = x_train.reshape(len(x_train), -1).astype(np.float64) / pixel_max
    b = x_test.reshape(len(x_test), -1).astype(np.float64) / pixel_max
    stats = train_statistics(a) if method in NEEDS_TRAIN_STATISTICS else None
    a, b = transform_rows(a, method, stats), transform_rows(b, method, stats)
    if method != DEFAULT_PREPROCESS:
        warn_if_dominated(np.concatenate([a, b]), method)
    return a.astype(np.float32), b.astype(np.float32)


def top_share(x: np.ndarray, *, fraction: float = 0.01, sample: int = SHARE_SAMPLE, seed: int = 0) -> float:
    """Share of ``|Theta|_F^2`` in the rows and columns of the ``fraction`` largest-norm points.

    ``x: (n, d)`` preprocessed inputs; ``Theta``: the depth-2 ReLU NTK (NTK parameterisation, ``w_std^2 = 2``,
    no bias) over ``x`` or, when ``n > sample``, over ``sample`` rows drawn without replacement (seeded), which
    keeps the share's expectation and costs one ``sample^2`` kernel. Uniform data gives 2-4% at 1%.
    """
    from kernels.analytic import mlp_kernels

    if len(x) > sample:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), sample, replace=False))]
    theta = mlp_kernels(np.asarray(x, dtype=np.float64), depth=2, get=("ntk",))["ntk"]
    top = np.argsort(-np.einsum("ij,ij->i", x, x))[: max(1, round(fraction * len(x)))]
    inside = np.zeros(len(x), dtype=bool)
    inside[top] = True
    sq = theta**2
    total = sq.sum()
    return float((sq[inside].sum() + sq[~inside][:, inside].sum()) / total) if total > 0 else 0.0


def warn_if_dominated(x: np.ndarray, method: str) -> float:
    """Log one line when the 1% largest-norm rows of ``x: (n, d)`` carry more than ``SHARE_LIMIT`` of the
    kernel (:func:`top_share`); returns the share."""
    if len(x) < 100:  # 1% of fewer than 100 points is not a point
        return 0.0
    share = top_share(x)
    if share > SHARE_LIMIT:
        log.warning(
            "warning: preprocess=%s lets the 1%% largest-norm points carry %.0f%% of the NTK's squared "
            "Frobenius norm (limit %.0f%%): the kernel measures are dominated by a few points; "
            "preprocess=%s bounds every point's weight",
            method, 100 * share, 100 * SHARE_LIMIT, DEFAULT_PREPROCESS,
        )
    return share
