"""How much of the kernel a handful of points carries, per preprocessing: the issue's deciding measure.

For class-balanced MNIST and CIFAR-10 subsets (real files: --data-dir or $NTK_SWEEP_DATA), prints the share
of ``|Theta|_F^2`` (depth-2 ReLU NTK over train ++ test, ``pipeline.preprocess.top_share``) that lies in the
rows and columns of the 1% largest-norm points, and the largest and median ``|x|^2 / d``, for:

* the project's methods (``per_image``, ``standardize``, ``unit_norm``, ``raw01``), and
* the other candidates the choice was made among: a global scalar z-score, a per-pixel z-score with its std
  floored at 10% of the rms std, and regularised ZCA (per-image standardisation, whitening with
  ``eps = 0.1 x`` the mean eigenvalue of the train covariance, then per-image standardisation again).

    NTK_SWEEP_DATA=../shared/data python bench/preprocess_share.py
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import numpy as np

from pipeline.data import PIXEL_MAX, make_subset
from pipeline.preprocess import top_share, train_statistics, transform_rows

Pair = tuple[np.ndarray, np.ndarray]


def project(method: str) -> Callable[[np.ndarray, np.ndarray], Pair]:
    def apply(a: np.ndarray, b: np.ndarray) -> Pair:
        stats = train_statistics(a) if method == "standardize" else None
        return transform_rows(a, method, stats), transform_rows(b, method, stats)
    return apply


def global_z(a: np.ndarray, b: np.ndarray) -> Pair:
    mean, std = a.mean(), a.std()
    return (a - mean) / std, (b - mean) / std


def floored_z(a: np.ndarray, b: np.ndarray, fraction: float = 0.1) -> Pair:
    mean, std = a.mean(axis=0), a.std(axis=0)
    std = np.maximum(std, fraction * np.sqrt((std**2).mean()))
    return (a - mean) / std, (b - mean) / std


def zca(a: np.ndarray, b: np.ndarray, eps: float = 0.1) -> Pair:
    a, b = project("per_image")(a, b)
    mean = a.mean(axis=0)
    lam, vec = np.linalg.eigh((a - mean).T @ (a - mean) / len(a))
    white = (vec / np.sqrt(lam + eps * lam.mean())) @ vec.T
    return project("per_image")((a - mean) @ white, (b - mean) @ white)


METHODS: dict[str, Callable[[np.ndarray, np.ndarray], Pair]] = {
    "per_image": project("per_image"), "standardize": project("standardize"), "unit_norm": project("unit_norm"),
    "raw01": project("raw01"), "global z-score": global_z, "z-score, std floor 10%": floored_z,
    "regularised ZCA": zca,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--sets", nargs="+", default=["mnist:1000:2000", "cifar10:1000:800"],
                        help="name:n_train:n_test (CIFAR-10's test rows here are 1,017 per batch)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, numpy {np.__version__}")
    print(f"{'dataset':10s} {'method':24s} {'top-1% share':>12s} {'max |x|^2/d':>12s} {'median':>8s}")
    for spec in args.sets:
        name, n_train, n_test = spec.split(":")
        s = make_subset(name, args.data_dir, n_train=int(n_train), n_test=int(n_test), seed=0, preprocess="raw01")
        raw = s.x_train.astype(np.float64), s.x_test.astype(np.float64)  # pixels / PIXEL_MAX
        assert PIXEL_MAX[name] > 0
        for label, method in METHODS.items():
            a, b = method(*(m.copy() for m in raw))
            x = np.concatenate([a, b])
            norms = (x**2).mean(axis=1)
            print(f"{name:10s} {label:24s} {100 * top_share(x):11.1f}% {norms.max():12.2f} "
                  f"{np.median(norms):8.2f}", flush=True)


if __name__ == "__main__":
    main()
