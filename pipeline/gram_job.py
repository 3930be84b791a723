"""``ntk-sweep gram``: the analytic NNGP/NTK Gram of a dataset, tiled into a Zarr store.

    ntk-sweep gram --dataset mnist --split train+test --n all --depth 3 --activation relu \\
        --kernel ntk --out grams.zarr

Rows of the Gram: the chosen split(s) in file order, train rows first, then test rows.

* ``--n all`` (the default): every image of the split(s), no class balancing. Images are flattened and
  preprocessed by ``--preprocess`` (default ``per_image``: pixels divided by the dataset's maximum, 255 or 16
  for digits, then each image centred and scaled to unit variance over its features). ``standardize``
  z-scores each feature with the mean and standard deviation of the *train* split (read for its statistics
  even when only ``test`` is asked for; constant features get std 1), ``unit_norm`` scales every row to
  squared norm ``d``, ``raw01`` only divides. These are the definitions of :mod:`pipeline.preprocess`,
  evaluated here in row blocks (float64 per block, float32 out) so that the 70,000 x 784 MNIST inputs cost
  220 MB and no float64 copy of the whole set. Methods other than ``per_image`` print a one-line warning when
  the 1% largest-norm rows carry more than 10% of the NTK (:func:`pipeline.preprocess.warn_if_dominated`).
* ``--n-train A --n-test B``: the class-balanced, seeded subset of :func:`pipeline.data.make_subset`
  (``--seed``, same preprocessing names); the split(s) choose which of its parts become rows. ``--n N`` with
  ``--split train`` (or ``test``) is a shorthand for ``--n-train N`` (``--n-test N``).

The store's array (``--path``, default the ``--kernel`` name) records the kernel, the data (dataset, split,
subset key, preprocessing, the row layout) and the inputs' fingerprint in its attributes; re-running the
same command resumes an interrupted run (only unfinished tiles are computed), and a different Gram at the
same path is refused unless ``--overwrite``. See :mod:`kernels.gram` for the store layout and the readers.
Heavy imports (torch, dask, zarr) happen inside :func:`main` so ``ntk-sweep --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.errors import UserError

SPLIT_CHOICES = ("train", "test", "train+test")
KINDS = ("ntk", "nngp")
PREPROCESS = ("per_image", "standardize", "unit_norm", "raw01")  # pipeline.preprocess.PREPROCESSING
COMPRESSORS = ("blosc-lz4", "blosc-zstd", "zstd", "none")  # kernels.gram.COMPRESSORS, without importing it
IMPLS = ("auto", "compiled", "fused", "generic", "series", "table")  # kernels.gram.IMPLS, without importing torch
SCHEDULERS = ("threads", "sync", "ray")
_ROWS_PER_STEP = 8192


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``gram`` command's options (argparse errors, e.g. a bad choice, exit with status 2)."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="mnist, fashion_mnist, cifar10 or digits")
    data.add_argument("--split", default="train", choices=SPLIT_CHOICES,
                      help="rows of the Gram: train, test, or train+test (train rows first); default train")
    data.add_argument("--n", default=None,
                      help="'all' (default): the whole split(s), no class balancing; an integer N: a "
                           "class-balanced subset of N from a single split (like --n-train/--n-test)")
    data.add_argument("--n-train", type=int, default=None, help="class-balanced train subset size")
    data.add_argument("--n-test", type=int, default=None, help="class-balanced test subset size")
    data.add_argument("--seed", type=int, default=0, help="subset seed (with --n-train/--n-test); default 0")
    data.add_argument("--preprocess", default="per_image", choices=PREPROCESS,
                      help="per_image (default: each image centred, unit variance), standardize (per pixel, "
                           "train statistics), unit_norm or raw01")
    data.add_argument("--data-dir", default=None,
                      help="dataset root (default: $NTK_SWEEP_DATA, else the user cache)")

    add_kernel_arguments(parser)

    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, help="Zarr store folder (created if absent)")
    out.add_argument("--path", default=None, help="array name in the store (default: the --kernel name)")
    out.add_argument("--block", type=int, default=None,
                     help="tile / chunk edge (default: from N and the worker count; a resumed Gram keeps its own)")
    out.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                     help="stored and computed dtype (default float32)")
    out.add_argument("--compressor", default="blosc-lz4", choices=COMPRESSORS)
    out.add_argument("--overwrite", action="store_true", help="replace a different Gram found at --path")

    run = parser.add_argument_group("execution")
    run.add_argument("--scheduler", default="threads", choices=SCHEDULERS,
                     help="threads (default, local Dask), sync, or ray (Ray's Dask scheduler)")
    run.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else local)")
    run.add_argument("--workers", type=int, default=None, help="tiles at once (threads; default: cores)")
    run.add_argument("--torch-threads", type=int, default=None, help="torch threads per tile (default 1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_kernel_arguments(parser: argparse.ArgumentParser) -> None:
    """The kernel options, shared with ``ntk-sweep predict``."""
    kern = parser.add_argument_group("kernel")
    kern.add_argument("--kernel", default="ntk", choices=KINDS, help="ntk (default) or nngp")
    kern.add_argument("--depth", type=int, default=3, help="hidden layers (default 3)")
    kern.add_argument("--activation", default="relu", help="relu (default), erf, gelu, tanh, ...")
    kern.add_argument("--w-std", type=float, default=2**0.5, help="weight std (default sqrt 2)")
    kern.add_argument("--b-std", type=float, default=0.0, help="bias std (default 0)")
    kern.add_argument("--parameterization", default="ntk", choices=("ntk", "standard"))
    kern.add_argument("--width", type=int, default=None, help="width (standard-parameterisation NTK only)")
    kern.add_argument("--impl", default="auto", choices=IMPLS,
                      help="auto (default): in float32 the fused path for closed-form activations (compiled for large "
                           "Grams; for ReLU without bias as one series in the cosine), the interpolation table for "
                           "the others; in float64 the generic recursion")


def build_kernel(args: argparse.Namespace) -> Any:
    """The :class:`kernels.gram.AnalyticKernel` of the kernel options (bad values: :class:`UserError`)."""
    from kernels.gram import AnalyticKernel

    try:
        return AnalyticKernel(
            kind=args.kernel, depth=args.depth, activation=args.activation, w_std=args.w_std,
            b_std=args.b_std, parameterization=args.parameterization, width=args.width, dtype=args.dtype,
            impl=args.impl,
        )
    except ValueError as exc:
        raise UserError(f"kernel options: {exc}") from None


# --------------------------------------------------------------------------------------------- inputs


def _parse_n(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """``(n_train, n_test)`` for a subset, or ``(None, None)`` for the whole split(s)."""
    subset = args.n_train is not None or args.n_test is not None
    n = args.n
    if n is not None and subset:
        raise UserError("--n cannot be combined with --n-train/--n-test")
    if n is None or str(n).strip().lower() == "all":
        if not subset:
            return None, None
        parts = args.split.split("+")
        if "train" in parts and args.n_train is None:
            raise UserError(f"--split {args.split} with a subset needs --n-train")
        if "test" in parts and args.n_test is None:
            raise UserError(f"--split {args.split} with a subset needs --n-test")
        return args.n_train, args.n_test
    try:
        count = int(str(n))
    except ValueError:
        raise UserError(f"--n {n!r}: expected 'all' or a positive integer") from None
    if count <= 0:
        raise UserError(f"--n {count}: must be positive")
    if args.split == "train+test":
        raise UserError("--n N with --split train+test is ambiguous: give --n-train and --n-test")
    return (count, None) if args.split == "train" else (None, count)


def _standardize_stats(x_train: Any, pixel_max: float) -> tuple[Any, Any]:
    """Per-feature mean and std (float64) of ``x_train / pixel_max``, accumulated in row blocks."""
    import numpy as np

    flat = x_train.reshape(len(x_train), -1)
    total = np.zeros(flat.shape[1])
    for lo in range(0, len(flat), _ROWS_PER_STEP):
        total += (flat[lo : lo + _ROWS_PER_STEP].astype(np.float64) / pixel_max).sum(axis=0)
    mean = total / len(flat)
    sq = np.zeros(flat.shape[1])
    for lo in range(0, len(flat), _ROWS_PER_STEP):
        sq += ((flat[lo : lo + _ROWS_PER_STEP].astype(np.float64) / pixel_max - mean) ** 2).sum(axis=0)
    std = np.sqrt(sq / len(flat))
    std[std < 1e-12] = 1.0
    return mean, std


def _preprocess_rows(images: Any, method: str, pixel_max: float, stats: tuple | None, out: Any) -> None:
    """Flatten and preprocess ``images`` into the float32 array ``out`` (same rows), block by block."""
    import numpy as np

    from pipeline.preprocess import transform_rows

    flat = images.reshape(len(images), -1)
    for lo in range(0, len(flat), _ROWS_PER_STEP):
        a = flat[lo : lo + _ROWS_PER_STEP].astype(np.float64) / pixel_max
        out[lo : lo + len(a)] = transform_rows(a, method, stats)


def load_inputs_labels(
    dataset: str,
    split: str,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    preprocess: str = "per_image",
    data_dir: str | None = None,
) -> tuple[Any, Any, dict]:
    """The Gram's input rows ``(N, d) float32``, their labels ``(N,) int64`` (class indices into the subset's
    classes) and the attributes that identify the rows.

    ``n_train = n_test = None``: the whole split(s) (see the module docstring for the preprocessing);
    otherwise the class-balanced subset of :func:`pipeline.data.make_subset`.
    """
    import numpy as np

    from pipeline import data

    parts = split.split("+")
    root = data.resolve_data_root(data_dir)
    attrs: dict = {"dataset": dataset, "split": split, "preprocess": preprocess}
    if n_train is None and n_test is None:
        needed = sorted(set(parts) | ({"train"} if preprocess == "standardize" else set()))
        loaded = {s: data.load_dataset(dataset, root, s) for s in needed}
        images = {s: v[0] for s, v in loaded.items()}
        labels = np.concatenate([np.asarray(loaded[s][1], dtype=np.int64) for s in parts])
        pixel_max = data.PIXEL_MAX[dataset]
        stats = _standardize_stats(images["train"], pixel_max) if preprocess == "standardize" else None
        sizes = [len(images[s]) for s in parts]
        d = int(np.prod(images[parts[0]].shape[1:]))
        x = np.empty((sum(sizes), d), dtype=np.float32)
        rows, start = [], 0
        for s, size in zip(parts, sizes, strict=True):
            _preprocess_rows(images[s], preprocess, pixel_max, stats, x[start : start + size])
            rows.append({"split": s, "start": start, "stop": start + size})
            start += size
        if preprocess != "per_image":
            from pipeline.preprocess import warn_if_dominated

            warn_if_dominated(x, preprocess)
        attrs.update(n="all", rows=rows, pixel_max=pixel_max,
                     statistics="train split" if preprocess == "standardize" else None)
        return x, labels, attrs
    k = data.NUM_CLASSES
    subset = data.make_subset(
        dataset, root, n_train=k if n_train is None else n_train, n_test=k if n_test is None else n_test,
        seed=seed, preprocess=preprocess,
    )
    blocks = {"train": subset.x_train, "test": subset.x_test}
    x = np.concatenate([blocks[s] for s in parts]).astype(np.float32, copy=False)
    rows, start = [], 0
    for s in parts:
        rows.append({"split": s, "start": start, "stop": start + len(blocks[s])})
        start += len(blocks[s])
    attrs.update(n="subset", subset_key=subset.key, seed=seed, n_train=subset.n_train, n_test=subset.n_test,
                 classes=list(subset.classes), rows=rows)
    label_blocks = {"train": subset.labels_train, "test": subset.labels_test}
    labels = np.concatenate([np.asarray(label_blocks[s], dtype=np.int64) for s in parts])
    return x, labels, attrs


# --------------------------------------------------------------------------------------------- command


def _check_args(args: argparse.Namespace) -> None:
    if args.block is not None and args.block < 1:
        raise UserError(f"--block {args.block}: must be a positive integer")
    if args.depth < 0:
        raise UserError(f"--depth {args.depth}: must be >= 0")
    for flag, value in (("--w-std", args.w_std), ("--b-std", args.b_std)):
        if not value >= 0 or value == float("inf"):
            raise UserError(f"{flag} {value}: must be a finite number >= 0")
    for flag, value in (("--workers", args.workers), ("--torch-threads", args.torch_threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be a positive integer")


def main(args: argparse.Namespace) -> int:
    """Run ``ntk-sweep gram``; returns the exit status (bad input raises :class:`UserError`)."""
    _check_args(args)
    n_train, n_test = _parse_n(args)

    import os

    from kernels.gram import GramError, gram_to_zarr, keep_freed_pages

    keep_freed_pages()  # this process only computes the Gram
    kernel = build_kernel(args)
    out = os.path.expanduser(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a folder")
    x, _, attrs = load_inputs_labels(
        args.dataset, args.split, n_train=n_train, n_test=n_test, seed=args.seed, preprocess=args.preprocess,
        data_dir=args.data_dir,
    )
    scheduler = args.scheduler
    if scheduler == "ray" and args.ray_address:
        import ray

        if not ray.is_initialized():
            ray.init(address=args.ray_address, log_to_driver=False)
    path = args.path or args.kernel
    try:
        result = gram_to_zarr(
            kernel, x, store=out, path=path, block=args.block, dtype=args.dtype, compressor=args.compressor,
            scheduler=scheduler, attrs=attrs, overwrite=args.overwrite, workers=args.workers,
            torch_threads=args.torch_threads, progress=not args.no_progress,
        )
    except GramError as exc:
        raise UserError(f"--out {out} --path {path}: {exc}") from None
    n1, n2 = result.shape
    rate = f"{result.entries_per_s:.3g} entries/s" if result.tiles_computed else "nothing to do"
    print(
        f"{out}/{path}: {args.kernel} Gram {n1} x {n2} ({args.dataset} {args.split}), "
        f"{result.tiles_computed} tiles computed, {result.tiles_skipped} already done, "
        f"{result.seconds:.1f} s, {rate}",
        file=sys.stdout,
    )
    return 0
