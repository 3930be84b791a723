"""``ntk-sweep predict``: infinite-width predictions (NNGP / NTK kernel regression) at dataset scale.

    ntk-sweep predict --dataset mnist --n-train 50000 --n-test all --kernel nngp --depth 1 \\
        --w-std 0.316 --b-std 0.693 --gram grams.zarr

Rows: ``--n-train N`` is the class-balanced, seeded subset of :func:`pipeline.data.make_subset` (``all``: the
whole train split, file order); ``--n-test all`` (the default) is the whole official test split, without class
balancing (an integer: a balanced subset). Inputs are loaded and preprocessed by
:func:`pipeline.gram_job.load_inputs_labels` (the rows ``ntk-sweep gram`` uses). Targets are one-hot minus
``1/K``, as in the sweep.

Grams: ``--gram STORE`` (a Zarr folder) gets two arrays, ``<path>_train`` (train x train, symmetric) and
``<path>_test_train`` (test x train), written by :func:`kernels.gram.gram_to_zarr` (tiled, resumable: a
re-run computes only missing tiles; ``--scheduler threads|sync|ray``). Their attributes carry the provenance
(dataset, split, subset key, preprocessing, row layout, kernel); a stored Gram whose provenance differs from
the flags is refused (one line, exit 2) unless ``--overwrite``. The solve is :func:`kernels.solve.solve`.
Predictions go to ``STORE/<path>_predictions.parquet`` (one row per test image).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from pipeline import gram_job
from pipeline.atomic import atomic_file
from pipeline.errors import UserError

SOLVERS = ("auto", "float64", "float32-pcg")  # kernels.solve.METHODS
DEFAULT_DIAG_REG = 1e-4  # kernels.solve.DEFAULT_DIAG_REG (not imported: keeps --help light)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="mnist, fashion_mnist, cifar10 or digits")
    data.add_argument("--n-train", default="all",
                      help="training rows: an integer (class-balanced seeded subset) or 'all' (default)")
    data.add_argument("--n-test", default="all",
                      help="test rows: 'all' (default: the whole official test split, no balancing) or an integer")
    data.add_argument("--seed", type=int, default=0, help="subset seed (default 0)")
    data.add_argument("--preprocess", default="per_image", choices=gram_job.PREPROCESS,
                      help="per_image (default), standardize, unit_norm or raw01")
    data.add_argument("--data-dir", default=None, help="dataset root (default: $NTK_SWEEP_DATA, else the user cache)")

    gram_job.add_kernel_arguments(parser)

    solve = parser.add_argument_group("solve")
    solve.add_argument("--time", type=float, default=None,
                       help="NTK gradient-descent time t (loss 1/(2n) sum |f-y|^2, f0 = 0); default t = inf")
    solve.add_argument("--diag-reg", type=float, default=DEFAULT_DIAG_REG,
                       help=f"diagonal regularisation, relative to the mean diagonal of the train Gram "
                            f"(default {DEFAULT_DIAG_REG:g})")
    solve.add_argument("--diag-reg-absolute", action="store_true", help="--diag-reg is absolute, not relative")
    solve.add_argument("--solver", default="auto", choices=SOLVERS,
                       help="auto (default: float64 in memory when it fits --memory-budget, else float32-pcg)")
    solve.add_argument("--memory-budget", type=float, default=10.0,
                       help="GiB for the train Gram in the solve (default 10)")

    out = parser.add_argument_group("output")
    out.add_argument("--gram", required=True, help="Zarr store folder for the Grams (written, or reused and resumed)")
    out.add_argument("--path", default=None, help="array name prefix in the store (default: the --kernel name)")
    out.add_argument("--overwrite", action="store_true", help="replace stored Grams of a different provenance")
    out.add_argument("--block", type=int, default=None,
                     help="tile / chunk edge (default: from N and the worker count; a resumed Gram keeps its own)")
    out.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                     help="stored and computed Gram dtype (default float32)")
    out.add_argument("--compressor", default="blosc-lz4", choices=gram_job.COMPRESSORS)
    out.add_argument("--format", default="table", choices=("table", "json"), help="table (default) or json")

    run = parser.add_argument_group("execution")
    run.add_argument("--scheduler", default="threads", choices=gram_job.SCHEDULERS,
                     help="Gram tiles: threads (default), sync, or ray")
    run.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else local)")
    run.add_argument("--workers", type=int, default=None, help="tiles at once (threads; default: cores)")
    run.add_argument("--torch-threads", type=int, default=None, help="torch threads per tile (default 1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--verbose", action="store_true", help="print the solver's iterations")


def _count(flag: str, value: Any) -> int | None:
    """``None`` for 'all', else a positive integer."""
    text = str(value).strip().lower()
    if text == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        raise UserError(f"{flag} {value!r}: expected 'all' or a positive integer") from None
    if count <= 0:
        raise UserError(f"{flag} {count}: must be positive")
    return count


def _check_args(args: argparse.Namespace) -> tuple[int | None, int | None]:
    n_train, n_test = _count("--n-train", args.n_train), _count("--n-test", args.n_test)
    for flag, value in (("--diag-reg", args.diag_reg), ("--memory-budget", args.memory_budget)):
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"{flag} {value}: must be a finite number >= 0")
    if args.memory_budget <= 0:
        raise UserError(f"--memory-budget {args.memory_budget}: must be positive")
    if args.time is not None:
        if not (math.isfinite(args.time) and args.time >= 0):
            raise UserError(f"--time {args.time}: must be a finite number >= 0 (omit it for t = inf)")
        if args.kernel != "ntk":
            raise UserError("--time: gradient-descent time applies to --kernel ntk only")
    if args.block is not None and args.block < 1:
        raise UserError(f"--block {args.block}: must be a positive integer")
    if args.depth < 0:
        raise UserError(f"--depth {args.depth}: must be >= 0")
    for flag, value in (("--w-std", args.w_std), ("--b-std", args.b_std)):
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"{flag} {value}: must be a finite number >= 0")
    for flag, value in (("--workers", args.workers), ("--torch-threads", args.torch_threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be a positive integer")
    if args.preprocess == "standardize" and (n_train is None) != (n_test is None):
        raise UserError("--preprocess standardize needs --n-train and --n-test both 'all' or both integers "
                        "(its statistics would differ between the subset and the whole split)")
    return n_train, n_test


def load_rows(args: argparse.Namespace, n_train: int | None, n_test: int | None) -> dict:
    """Train and test inputs, labels, class count and the provenance of each side."""
    import numpy as np

    common = dict(seed=args.seed, preprocess=args.preprocess, data_dir=args.data_dir)
    if (n_train is None) == (n_test is None):
        x, labels, attrs = gram_job.load_inputs_labels(args.dataset, "train+test", n_train=n_train,
                                                       n_test=n_test, **common)
        rows = {r["split"]: (r["start"], r["stop"]) for r in attrs["rows"]}
        (a0, a1), (b0, b1) = rows["train"], rows["test"]
        x_tr, x_te = np.ascontiguousarray(x[a0:a1]), np.ascontiguousarray(x[b0:b1])
        l_tr, l_te = labels[a0:a1], labels[b0:b1]
        del x
        source = {k: v for k, v in attrs.items() if k != "rows"}
        tr = dict(source, split="train", n_rows=int(a1 - a0))
        te = dict(source, split="test", n_rows=int(b1 - b0))
    else:
        x_tr, l_tr, a_tr = gram_job.load_inputs_labels(args.dataset, "train", n_train=n_train, n_test=None,
                                                       **common)
        x_te, l_te, a_te = gram_job.load_inputs_labels(args.dataset, "test", n_train=None, n_test=n_test,
                                                       **common)
        tr = dict({k: v for k, v in a_tr.items() if k not in ("rows", "n_test")}, n_rows=len(x_tr))
        te = dict({k: v for k, v in a_te.items() if k not in ("rows", "n_train")}, n_rows=len(x_te))
    classes = tr.get("classes") or list(range(10))
    return {"x_train": x_tr, "x_test": x_te, "labels_train": l_tr, "labels_test": l_te,
            "classes": len(classes), "train": tr, "test": te}


def _diff(stored: Any, wanted: Any, prefix: str = "") -> str | None:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        for key in sorted(set(stored) | set(wanted)):
            d = _diff(stored.get(key), wanted.get(key), f"{prefix}{key}.")
            if d:
                return d
        return None
    if stored != wanted:
        return f"{prefix.rstrip('.')}: stored {stored!r}, flags give {wanted!r}"
    return None


_KERNEL_FIELDS = ("kind", "depth", "activation", "w_std", "b_std", "parameterization", "width", "compute_dtype")


def check_provenance(store: str, path: str, data_attrs: dict, kernel_spec: dict) -> None:
    """Raise :class:`UserError` when ``store/path`` holds a Gram of other data or another kernel."""
    from kernels.gram import GramError, gram_status

    try:
        meta = gram_status(store, path)
    except GramError:
        return  # nothing there yet (or not a Gram: gram_to_zarr says so)
    wanted = json.loads(json.dumps(data_attrs))
    diff = _diff(meta.get("data") or {}, wanted)
    if diff is None:
        stored_kernel = {k: (meta.get("kernel") or {}).get(k) for k in _KERNEL_FIELDS}
        diff = _diff(stored_kernel, {k: kernel_spec.get(k) for k in _KERNEL_FIELDS}, "kernel.")
    if diff:
        raise UserError(f"--gram {store}: {path} was computed for other inputs ({diff}); "
                        "use another --gram or --path, or --overwrite")


def main(args: argparse.Namespace) -> int:
    """Run ``ntk-sweep predict``; returns the exit status (bad input raises :class:`UserError`)."""
    t_start = time.perf_counter()
    n_train, n_test = _check_args(args)

    import os

    import numpy as np

    from kernels.gram import GramError, gram_status, gram_to_zarr
    from kernels.solve import SolveError, choose_method, solve
    from pipeline.data import _targets

    kernel = gram_job.build_kernel(args)
    store = os.path.expanduser(args.gram)
    if os.path.exists(store) and not os.path.isdir(store):
        raise UserError(f"--gram {store}: exists and is not a folder")
    rows = load_rows(args, n_train, n_test)
    n_tr, n_te = len(rows["x_train"]), len(rows["x_test"])
    budget = args.memory_budget * 2**30
    try:
        choose_method(n_tr, args.solver, budget, args.time)  # refuse before any Gram is computed
    except SolveError as exc:
        raise UserError(f"--n-train {n_tr}: {exc}") from None
    prefix = args.path or args.kernel
    p_tr, p_te = f"{prefix}_train", f"{prefix}_test_train"
    attrs_tr = {"role": "train x train", "rows": rows["train"], "cols": rows["train"]}
    attrs_te = {"role": "test x train", "rows": rows["test"], "cols": rows["train"]}
    spec = kernel.resolved(n_tr * n_tr).spec()
    if not args.overwrite:
        check_provenance(store, p_tr, attrs_tr, spec)
        check_provenance(store, p_te, attrs_te, spec)

    if args.scheduler == "ray" and args.ray_address:
        import ray

        if not ray.is_initialized():
            ray.init(address=args.ray_address, log_to_driver=False)
    gram_kw = dict(store=store, block=args.block, dtype=args.dtype, compressor=args.compressor,
                   scheduler=args.scheduler, overwrite=args.overwrite, workers=args.workers,
                   torch_threads=args.torch_threads, progress=not args.no_progress)
    t_gram = time.perf_counter()
    tiles = {}
    for path, x1, x2, attrs in ((p_tr, rows["x_train"], None, attrs_tr),
                                (p_te, rows["x_test"], rows["x_train"], attrs_te)):
        try:
            result = gram_to_zarr(kernel, x1, x2, path=path, attrs=attrs, **gram_kw)
        except GramError as exc:
            raise UserError(f"--gram {store}: {exc}") from None
        tiles[path] = {"computed": result.tiles_computed, "skipped": result.tiles_skipped}
        status = gram_status(store, path)
        if status["tiles_done"] < status["tiles_total"]:
            raise UserError(f"--gram {store}: {path} is incomplete ({status['tiles_done']}/{status['tiles_total']})")
    gram_s = time.perf_counter() - t_gram

    import zarr

    k_tr = zarr.open_array(store, path=p_tr, mode="r")
    k_te = zarr.open_array(store, path=p_te, mode="r")
    y_tr = _targets(rows["labels_train"], rows["classes"]).astype(np.float64)
    y_te = _targets(rows["labels_test"], rows["classes"]).astype(np.float64)
    try:
        res = solve(k_tr, y_tr, k_te, diag_reg=args.diag_reg, absolute=args.diag_reg_absolute, time=args.time,
                    method=args.solver, memory_budget=budget, verbose=args.verbose)
    except SolveError as exc:
        raise UserError(f"solve: {exc}") from None
    pred = res.pred
    labels = rows["labels_test"]
    if pred.shape[1] == 1:
        guess = (pred[:, 0] > 0).astype(np.int64)
    else:
        guess = pred.argmax(axis=1)
    acc = float((guess == labels).mean())
    loss = float(0.5 * ((pred - y_te) ** 2).sum(-1).mean())
    pred_path = os.path.join(store, f"{prefix}_predictions.parquet")
    wall = time.perf_counter() - t_start
    out = {
        "test_acc": acc, "test_loss": loss, "n_train": n_tr, "n_test": n_te, "kernel": args.kernel,
        "dataset": args.dataset, "depth": args.depth, "activation": args.activation, "w_std": args.w_std,
        "b_std": args.b_std, "preprocess": args.preprocess, "time": args.time, "diag_reg": args.diag_reg,
        "diag_reg_absolute": bool(args.diag_reg_absolute), "lam": res.lam, "solver": res.method,
        "iterations": res.iterations, "residual": res.residual, "gram_s": round(gram_s, 3),
        "solve_s": round(res.seconds.get("total", 0.0), 3), "wall_s": round(wall, 3), "tiles": tiles,
        "gram": store, "predictions": pred_path,
    }
    _write_predictions(pred_path, pred, labels, guess, out)
    if args.format == "json":
        print(json.dumps(out))
    else:
        t = "inf" if args.time is None else f"{args.time:g}"
        print(f"{args.dataset} {args.kernel} depth {args.depth} (w_std {args.w_std:g}, b_std {args.b_std:g}), "
              f"n_train {n_tr}, n_test {n_te}, t = {t}, diag_reg {args.diag_reg:g}")
        print(f"test_acc {acc:.4f}   test_loss (MSE) {loss:.5f}")
        print(f"solver {res.method}" + (f" ({res.iterations} iterations, residual {res.residual:.2g})"
                                        if res.method == "float32-pcg" else "")
              + f"; Grams {gram_s:.1f} s, solve {res.seconds.get('total', 0.0):.1f} s, total {wall:.1f} s")
        print(f"predictions: {pred_path}")
    return 0


def _write_predictions(path: str, pred: Any, labels: Any, guess: Any, meta: dict) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"row": np.arange(len(labels), dtype=np.int64), "label": np.asarray(labels, dtype=np.int64),
            "pred_class": np.asarray(guess, dtype=np.int64)}
    for j in range(pred.shape[1]):
        cols[f"f{j}"] = pred[:, j]
    table = pa.table(cols).replace_schema_metadata({"ntk_sweep_predict": json.dumps(meta)})
    with atomic_file(path) as fh:
        pq.write_table(table, fh)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="ntk-sweep predict")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
