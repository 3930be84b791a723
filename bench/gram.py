"""Benchmark of the blocked Gram: analytic NTK (depth 3) of real MNIST written to Zarr.

    .venv/bin/python bench/gram.py                      # ReLU, N = 5k, 10k, 20k
    .venv/bin/python bench/gram.py --full               # ... and the full 70k (train+test), ~20 GB on disk
    .venv/bin/python bench/gram.py --nt-python /path/to/venv/bin/python   # + neural-tangents baseline

    # the ratio table: ntk-sweep (Zarr) against nt.batch(kernel_fn, 500) (memory), interleaved, medians
    .venv/bin/python bench/gram.py --compare --activation relu erf gelu --sizes 4000 20000 --repeat 3 \
        --nt-python /tmp/ntvenv/bin/python
    .venv/bin/python bench/gram.py --tile --activation relu erf gelu    # one tile per path, errors vs float64
    .venv/bin/python bench/gram.py --floor 70000        # the 70k ReLU Gram against its floor: 3 runs, median
    .venv/bin/python bench/gram.py --table tanh:4000:1,tanh:600:1.3     # the interpolation-table path

Measures, on this machine:

* the float32 matmul rate (torch sgemm, 1 thread and all cores; and the tile-shaped product);
* one 2048 x 2048 tile by each implementation (generic ``mlp_kernels_from_dots``, fused eager, compiled),
  single-threaded, and its error against float64 :func:`kernels.analytic.mlp_kernels` (off-diagonal and
  diagonal tiles);
* the threading split (2 Dask workers x 1 torch thread vs 1 x 2) at N = 10k;
* end to end for each N, each in a fresh subprocess: wall time, Gram entries written per second (compute
  and write together, the mirrored lower triangle included), entries computed per second, peak RSS
  (sampled during the Gram, and ``ru_maxrss`` over the whole process), bytes on disk, the achieved
  fraction of the single-thread sgemm rate for the input-Gram matmul, and the error of random windows
  against float64;
* optionally ``neural-tangents``' ``nt.batch(kernel_fn, 500)`` on the same inputs, in memory (run with
  another interpreter that has jax and neural-tangents; not a dependency of this project).

Inputs are MNIST train+test (70,000 rows), standardised as ``ntk-sweep gram --n all`` does, saved once as
``.npy`` and opened as a memmap, so every tile reads its rows from disk. Prints a JSON summary and a
Markdown table; ``--json`` writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEPTH = 3


def machine() -> dict:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import dask
    import torch
    import zarr

    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "ram_gib": round(_ram_gib(), 1),
            "python": platform.python_version(), "torch": torch.__version__, "dask": dask.__version__,
            "zarr": zarr.__version__}


def _ram_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


def default_data_dir() -> str | None:
    """``$NTK_SWEEP_DATA``, else ``shared/data`` beside the repository when it is there."""
    if os.environ.get("NTK_SWEEP_DATA"):
        return os.environ["NTK_SWEEP_DATA"]
    shared = REPO.parent / "shared" / "data"
    return str(shared) if shared.is_dir() else None


def prepare_inputs(folder: Path, data_dir: str | None) -> Path:
    """MNIST train+test, standardised with the train statistics, as ``folder/mnist70k.npy``."""
    import numpy as np

    from pipeline.gram_job import load_inputs_labels

    path = folder / "mnist70k.npy"
    if not path.exists():
        x, _, _ = load_inputs_labels("mnist", "train+test", preprocess="per_image", data_dir=data_dir)
        np.save(path, x)
    return path


# --------------------------------------------------------------------------------------------- micro


def matmul_rates(reps: int = 3) -> dict:
    import torch

    out = {}
    cores = len(os.sched_getaffinity(0))
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        for name, (m, k, n) in {"square4096": (4096, 4096, 4096), "tile2048x784": (2048, 784, 2048)}.items():
            a, b = torch.randn(m, k), torch.randn(k, n)
            a @ b
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            dt = (time.perf_counter() - t) / reps
            out[f"{name}_{threads}t_gflops"] = 2 * m * k * n / dt / 1e9
    torch.set_num_threads(cores)
    return out


def tile_impls(x_path: Path, block: int = 2048, activations: tuple[str, ...] = ("relu",), repeat: int = 5) -> dict:
    """One tile by each implementation, 1 thread, for each activation; errors vs float64 on an off-diagonal
    and a diagonal tile. Timings are medians of ``repeat`` interleaved calls (the machine is shared). Also:
    ReLU through its generic dual inside the same compiled body (``relu-dual``, the case for keeping the
    cosine form), and the error of the float32 input Gram alone (``input-gram-f32``: the float64 recursion
    fed the float32 ``x1 @ x2.T``), the part of the error no elementwise code can remove."""
    import numpy as np
    import torch

    from kernels import fused
    from kernels.activations import get_activation
    from kernels.analytic import mlp_kernels, mlp_kernels_from_dots
    from kernels.gram import AnalyticKernel

    torch.set_num_threads(1)
    x = np.load(x_path, mmap_mode="r")
    a, b = np.array(x[:block]), np.array(x[block : 2 * block])
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    res: dict = {}
    for act in activations:
        ref_off = mlp_kernels(a.astype(np.float64), b.astype(np.float64), depth=DEPTH, activation=act,
                              get=("ntk",))["ntk"]
        ref_diag = mlp_kernels(a.astype(np.float64), depth=DEPTH, activation=act, get=("ntk",))["ntk"]

        def errors(off: np.ndarray, diag: np.ndarray, ref_off=ref_off, ref_diag=ref_diag) -> dict:
            return {
                "err_off_max_over_max": float(np.abs(off - ref_off).max() / np.abs(ref_off).max()),
                "err_off_max_rel": float((np.abs(off - ref_off) / np.abs(ref_off)).max()),
                "err_diag_max_over_max": float(np.abs(diag - ref_diag).max() / np.abs(ref_diag).max()),
                "err_diag_max_rel": float((np.abs(diag - ref_diag) / np.abs(ref_diag)).max()),
                "err_diagonal_entries_rel": float((np.abs(np.diag(diag) - np.diag(ref_diag))
                                                   / np.abs(np.diag(ref_diag))).max()),
            }

        sq_a = torch.from_numpy((a.astype(np.float64) ** 2).sum(1))
        dot32 = (ta @ tb.T).double()
        dot32_diag = (ta @ ta.T).double()
        dot32_diag.diagonal().copy_(sq_a)
        only_dot = errors(
            mlp_kernels_from_dots(dot32, sq_a, torch.from_numpy((b.astype(np.float64) ** 2).sum(1)), a.shape[1],
                                  depth=DEPTH, activation=act, get=("ntk",))["ntk"].numpy(),
            mlp_kernels_from_dots(dot32_diag, sq_a, sq_a, a.shape[1], depth=DEPTH, activation=act,
                                  get=("ntk",))["ntk"].numpy())
        res[f"{act} input-gram-f32"] = only_dot
        variants = {}
        for impl in ("generic", "fused", "compiled"):
            k = AnalyticKernel(depth=DEPTH, activation=act, impl=impl)
            t = time.perf_counter()
            k.warm_up()
            variants[impl] = (k.tile, time.perf_counter() - t)
        if fused.is_relu(act):
            relu = get_activation("relu")

            def relu_dual(p, q, stats=None, relu=relu):
                tp = torch.from_numpy(p)
                tq = tp if q is p else torch.from_numpy(q)
                return fused.dual_tile(tp, tq, DEPTH, relu, 2.0, 0.0, True, True, stats)

            t = time.perf_counter()
            relu_dual(a, b)
            variants["relu-dual compiled"] = (relu_dual, time.perf_counter() - t)
        times: dict = {name: [] for name in variants}
        for _ in range(repeat):
            for name, (fn, _) in variants.items():
                stats: dict = {}
                t = time.perf_counter()
                fn(a, b, stats)
                times[name].append((time.perf_counter() - t, stats["matmul_s"], stats["elementwise_s"]))
        for name, (fn, compile_s) in variants.items():
            off = fn(a, b).numpy()
            diag = fn(a, a).numpy()
            diag = (diag + diag.T) / 2
            med = [float(np.median([t[i] for t in times[name]])) for i in range(3)]
            res[f"{act} {name}"] = dict(
                tile_s=med[0], entries_per_s=block * block / med[0], matmul_s=med[1], elementwise_s=med[2],
                compile_s=compile_s if "compiled" in name else 0.0, **errors(off, diag))
        print("tile", act, json.dumps({k: v for k, v in res.items() if k.startswith(act)}), flush=True)
    return res


# --------------------------------------------------------------------------------------------- one run


def _rss_sampler(stop: threading.Event, peak: list) -> None:
    import psutil

    proc = psutil.Process()
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)


def child_run(args: argparse.Namespace) -> None:
    """One end-to-end run (in its own process, so its peak RSS is its own); prints one JSON line."""
    import numpy as np

    from kernels.analytic import mlp_kernels
    from kernels.gram import AnalyticKernel, gram_to_zarr, keep_freed_pages
    from kernels.tiles import choose_block

    keep_freed_pages()  # as ntk-sweep gram does
    n = args.child_run
    x = np.load(args.x, mmap_mode="r")[:n]
    import torch

    cores = len(os.sched_getaffinity(0))
    workers = args.workers or cores
    block = args.block or choose_block(n, workers=workers)
    kernel = AnalyticKernel(depth=DEPTH, activation=args.activation, impl=args.impl).resolved(n * (n + block) // 2)
    torch_threads = args.torch_threads or max(1, cores // workers)
    previous = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    t = time.perf_counter()
    kernel.warm_up()  # compile outside the timed part (reported separately)
    compile_s = time.perf_counter() - t
    torch.set_num_threads(previous)
    rss_before = _rss()
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_rss_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    load0 = os.getloadavg()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    result = gram_to_zarr(kernel, x, store=args.store, path="ntk", block=block, progress=args.progress,
                          workers=workers, torch_threads=torch_threads, attrs={"dataset": "mnist", "n": n})
    stop.set()
    sampler.join()
    load1 = os.getloadavg()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    disk = sum(f.stat().st_size for f in Path(args.store).rglob("*") if f.is_file())
    # error of random windows against float64
    import zarr

    arr = zarr.open_array(args.store, path="ntk", mode="r")
    rng = np.random.default_rng(0)
    errs = []
    w = 256 if kernel.fusable else 48  # the float64 reference by quadrature is ~1 ms per entry
    for _ in range(3):
        i, j = (int(v) for v in rng.integers(0, max(1, n - w), size=2))
        got = arr[i : i + w, j : j + w]
        ref = mlp_kernels(np.asarray(x[i : i + w], np.float64), np.asarray(x[j : j + w], np.float64),
                          depth=DEPTH, activation=args.activation, get=("ntk",))["ntk"]
        errs.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
    s = result.stats
    out = {
        "n": n, "block": block, "impl": kernel.impl, "activation": args.activation, "workers": workers,
        "torch_threads": torch_threads,
        "seconds": result.seconds, "compile_s": compile_s, "tiles": result.tiles_computed,
        "entries_written": result.entries_written, "entries_computed": result.entries_computed,
        "written_per_s": result.entries_per_s, "computed_per_s": result.entries_computed / result.seconds,
        "matmul_gflops_per_thread": s["matmul_flop"] / s["matmul_s"] / 1e9,
        "matmul_share": s["matmul_s"] / s["tile_s"], "elementwise_share": s["elementwise_s"] / s["tile_s"],
        "write_share": s["write_s"] / s["tile_s"], "read_share": s["read_s"] / s["tile_s"],
        "rss_before_gib": rss_before / 2**30, "rss_peak_gram_gib": peak[0] / 2**30,
        "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "disk_gb": disk / 1e9, "compression": n * n * 4 / disk, "window_err_max_over_max": max(errs),
        "loadavg_before": load0[0], "loadavg_after": load1[0], "cpu_s": cpu_s,
        "cpu_utilisation": cpu_s / (result.seconds * len(os.sched_getaffinity(0))),
    }
    print("RESULT " + json.dumps(out), flush=True)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def run_child(x_path: Path, n: int, store: Path, block: int | None, workers: int | None,
              torch_threads: int | None, impl: str, progress: bool, activation: str = "relu") -> dict:
    shutil.rmtree(store, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child-run", str(n), "--x", str(x_path), "--store", str(store),
           "--impl", impl, "--activation", activation]
    if block:
        cmd += ["--block", str(block)]
    if workers:
        cmd += ["--workers", str(workers)]
    if torch_threads:
        cmd += ["--torch-threads", str(torch_threads)]
    if progress:
        cmd += ["--progress"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise RuntimeError(f"child failed (rc {proc.returncode}): {proc.stdout[-2000:]}")
    finally:
        shutil.rmtree(store, ignore_errors=True)


def wait_idle(max_s: float, threshold: float = 0.97, window: float = 5.0) -> float:
    """Wait (at most ``max_s``) until the machine is ``threshold`` idle over ``window`` seconds; returns the
    idle fraction last seen. This machine is shared, so each measurement starts on a quiet machine."""

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:]]
        return v[3] + v[4], sum(v)

    if max_s <= 0 or not os.path.exists("/proc/stat"):
        return float("nan")
    end = time.monotonic() + max_s
    frac = 0.0
    while time.monotonic() < end:
        i0, t0 = ticks()
        time.sleep(window)
        i1, t1 = ticks()
        frac = (i1 - i0) / max(1, t1 - t0)
        if frac >= threshold:
            break
    return frac


def best_of(repeat: int, wait: float, fn, *args) -> dict:
    """The fastest of ``repeat`` runs (each after :func:`wait_idle`), with every run's wall time attached."""
    runs = []
    for _ in range(max(1, repeat)):
        idle = wait_idle(wait)
        r = fn(*args)
        r["idle_before"] = idle
        runs.append(r)
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["all_seconds"] = [r["seconds"] for r in runs]
    return best


# ------------------------------------------------------------------------------------------- neural-tangents

_NT_SCRIPT = """
import json, sys, time
import numpy as np
import jax, neural_tangents as nt
from neural_tangents import stax
n, depth, act = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
x = np.load(sys.argv[1], mmap_mode="r")[:n].astype(np.float32)
layers = []
for _ in range(depth):
    layers += [stax.Dense(512, W_std=2**0.5, b_std=0.0), {"relu": stax.Relu, "erf": stax.Erf, "gelu": stax.Gelu}[act]()]
_, _, kernel_fn = stax.serial(*layers, stax.Dense(1, W_std=2**0.5, b_std=0.0))
batched = nt.batch(kernel_fn, 500)
small = batched(x[:1000], None, "ntk"); np.asarray(small)  # compile
t = time.perf_counter()
k = np.asarray(batched(x, None, "ntk"))
dt = time.perf_counter() - t
print("RESULT " + json.dumps({"n": n, "activation": act, "seconds": dt, "entries_per_s": n * n / dt,
                             "jax": jax.__version__, "neural_tangents": nt.__version__, "shape": list(k.shape)}))
"""


def neural_tangents(python: str, x_path: Path, n: int, activation: str = "relu") -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(_NT_SCRIPT)
    try:
        cmd = [python, fh.name, str(x_path), str(n), str(DEPTH), activation]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(fh.name)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr or proc.stdout)[-1500:], "seconds": float("inf")}


# --------------------------------------------------------------------------------------------- floor


def floor_rates(x_path: Path, reps: int = 5) -> dict:
    """This machine's rates for the Gram's two unavoidable parts, measured now: the tile-shaped float32
    input-Gram matmul on all cores (one 2048 x 784 x 2048 product per core in parallel, as the workers run
    it) and blosc-lz4 + shuffle encoding (the Gram's codec) of a real NTK tile on one thread."""
    import numpy as np
    import torch
    from numcodecs import Blosc, blosc

    cores = len(os.sched_getaffinity(0))
    a, b = torch.randn(2048, 784), torch.randn(2048, 784)

    def one() -> None:
        torch.set_num_threads(1)
        for _ in range(reps):
            a @ b.T

    one()
    threads = [threading.Thread(target=one) for _ in range(cores)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    matmul = cores * reps * 2 * 2048 * 784 * 2048 / dt
    from kernels.gram import AnalyticKernel

    x = np.load(x_path, mmap_mode="r")
    tile = AnalyticKernel(depth=DEPTH, impl="fused").tile(np.array(x[:2048]), np.array(x[2048:4096])).numpy()
    blosc.set_nthreads(1)
    codec = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE, typesize=4)
    codec.encode(tile)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        enc = codec.encode(tile)
        times.append(time.perf_counter() - t)
    compress = tile.nbytes / float(np.median(times))
    return {"matmul_flops_all_cores": matmul, "compress_bytes_per_s_one_core": compress, "cores": cores,
            "compression_ratio": tile.nbytes / len(enc)}


def gram_floor(n: int, block: int, rates: dict, d: int = 784) -> dict:
    """The floor of an n x n symmetric Gram: its computed tiles' matmul flops at the all-core rate plus the
    whole array's bytes encoded on all cores."""
    from kernels.tiles import tile_bounds, tile_grid, tile_pairs

    nt = tile_grid(n, n, block)[0]
    entries = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in
                  (tile_bounds(i, j, block, n, n) for i, j in tile_pairs(nt, nt, symmetric=True)))
    flop = 2.0 * d * entries
    matmul_s = flop / rates["matmul_flops_all_cores"]
    compress_s = 4.0 * n * n / (rates["compress_bytes_per_s_one_core"] * rates["cores"])
    return {"n": n, "block": block, "flop": flop, "matmul_s": matmul_s, "compress_s": compress_s,
            "floor_s": matmul_s + compress_s}


# --------------------------------------------------------------------------------------------- compare


def compare(args: argparse.Namespace, x_path: Path, work: Path) -> list[dict]:
    """ntk-sweep against neural-tangents, interleaved in this one run: for each activation and N,
    ``--repeat`` pairs of (our Gram written to Zarr, nt.batch in memory); medians and their ratio."""
    import statistics

    from kernels.fused import fusable, series_applies

    rows = []
    for act in args.activation:
        # what auto picks for a large Gram, compiled even at these sizes (its compile is reported apart)
        impl = args.impl if args.impl != "auto" else (
            "series" if series_applies(act) else "compiled" if fusable(act) else "table")
        for n in args.sizes:
            ours, theirs = [], []
            for _ in range(max(1, args.repeat)):
                wait_idle(args.wait_idle)
                ours.append(run_child(x_path, n, work / f"cmp{n}.zarr", args.block, args.workers,
                                      args.torch_threads, impl, False, act))
                if args.nt_python:
                    wait_idle(args.wait_idle)
                    theirs.append(neural_tangents(args.nt_python, x_path, n, act))
            row = {"activation": act, "n": n, "impl": impl, "block": ours[0]["block"],
                   "ours_s": [r["seconds"] for r in ours], "compile_s": [r["compile_s"] for r in ours],
                   "err": max(r["window_err_max_over_max"] for r in ours),
                   "cpu_utilisation": [r["cpu_utilisation"] for r in ours],
                   "loadavg": [r["loadavg_before"] for r in ours],
                   "nt_s": [r["seconds"] for r in theirs]}
            row["ours_median_s"] = statistics.median(row["ours_s"])
            if theirs:
                row["nt_median_s"] = statistics.median(row["nt_s"])
                row["ratio"] = row["nt_median_s"] / row["ours_median_s"]
                row["nt_versions"] = {k: theirs[0].get(k) for k in ("jax", "neural_tangents")}
            rows.append(row)
            print("compare", json.dumps(row), flush=True)
    return rows


def _floor_table(runs: list[dict]) -> str:
    rows = ["| run | Gram s (+compile) | matmul GFLOP/s before / after (both cores) | blosc GB/s per core "
            "before / after | floor s (matmul + blosc) | ratio | tile time: matmul / elementwise / write | "
            "CPU use | peak RSS GiB |", "|" + "---|" * 9]
    for k, f in enumerate(runs, 1):
        b, a, fl, r = f["rates_before"], f["rates_after"], f["floor"], f["run"]
        rows.append(
            f"| {k} | {r['seconds']:.1f} (+{r['compile_s']:.1f}) | {b['matmul_flops_all_cores'] / 1e9:.0f} / "
            f"{a['matmul_flops_all_cores'] / 1e9:.0f} | {b['compress_bytes_per_s_one_core'] / 1e9:.2f} / "
            f"{a['compress_bytes_per_s_one_core'] / 1e9:.2f} | {fl['floor_s']:.1f} ({fl['matmul_s']:.1f} + "
            f"{fl['compress_s']:.1f}) | **{f['ratio']:.2f}x** | {r['matmul_share']:.0%} / "
            f"{r['elementwise_share']:.0%} / {r['write_share']:.0%} | {r['cpu_utilisation']:.0%} | "
            f"{r['rss_peak_gram_gib']:.2f} |")
    ratios = sorted(f["ratio"] for f in runs)
    rows.append(f"\nmedian ratio over {len(ratios)} runs: **{ratios[len(ratios) // 2]:.2f}x** "
                f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    return "\n".join(rows)


def _compare_table(rows: list[dict]) -> str:
    out = ["| activation | N | impl (block) | ntk-sweep s, median (runs) | compile s | neural-tangents s, median "
           "(runs) | ratio | max err / max | load avg |", "|" + "---|" * 9]
    for r in rows:
        runs = ", ".join(f"{v:.2f}" for v in r["ours_s"])
        nt_runs = ", ".join(f"{v:.2f}" for v in r["nt_s"])
        ratio = f"**{r['ratio']:.2f}x**" if "ratio" in r else "-"
        nt = f"{r['nt_median_s']:.2f} ({nt_runs})" if "nt_median_s" in r else "-"
        out.append(f"| {r['activation']} | {r['n']:,} | {r['impl']} ({r['block']}) | {r['ours_median_s']:.2f} "
                   f"({runs}) | {max(r['compile_s']):.1f} | {nt} | {ratio} | {r['err']:.1e} | "
                   f"{min(r['loadavg']):.1f}-{max(r['loadavg']):.1f} |")
    return "\n".join(out)


def table_bench(x_path: Path, n: int, activation: str, spread: float) -> dict:
    """The interpolation-table path (``impl="table"``) for an activation without a closed form: a whole
    n x n Gram to Zarr, its error on random windows against the float64 quadrature recursion, and the
    quadrature recursion's own cost per entry (float64 ``mlp_kernels`` and float32 generic on a block).
    ``spread > 1`` scales the rows by factors in [1/spread, spread], so the rows' variances differ and the
    table interpolates in variance too (grid nodes); 1 keeps per-image standardised rows (exact nodes)."""
    import numpy as np

    from kernels.analytic import mlp_kernels
    from kernels.gram import AnalyticKernel, gram_to_zarr, open_gram

    x = np.array(np.load(x_path, mmap_mode="r")[:n])
    if spread > 1:
        rng = np.random.default_rng(0)
        x *= np.exp(rng.uniform(-np.log(spread), np.log(spread), size=(n, 1))).astype(np.float32)
    store = x_path.parent / "table.zarr"
    shutil.rmtree(store, ignore_errors=True)
    t = time.perf_counter()
    res = gram_to_zarr(AnalyticKernel(depth=DEPTH, activation=activation, impl="table"), x, store=store,
                       path="k", progress=False)
    table_s = time.perf_counter() - t
    g = open_gram(store, "k")
    rng = np.random.default_rng(1)
    errs, ref_s, ref_entries = [], 0.0, 0
    for w in (40, 40, 40):
        i, j = (int(v) for v in rng.integers(0, n - w, size=2))
        t = time.perf_counter()
        ref = mlp_kernels(x[i : i + w].astype(np.float64), x[j : j + w].astype(np.float64), depth=DEPTH,
                          activation=activation, get=("ntk",))["ntk"]
        ref_s += time.perf_counter() - t
        ref_entries += w * w
        errs.append(float(np.abs(np.asarray(g[i : i + w, j : j + w]) - ref).max() / np.abs(ref).max()))
    shutil.rmtree(store, ignore_errors=True)
    per_entry = ref_s / ref_entries
    rule = rule_error(activation, spread)
    return {"activation": activation, "n": n, "spread": spread, "table_s": table_s, "block": res.block,
            "written_per_s": res.entries_per_s, "err_max_over_max": max(errs), **rule,
            "quadrature_s_per_entry": per_entry, "quadrature_extrapolated_s": per_entry * n * n / 2,
            "speedup": per_entry * n * n / 2 / table_s}


def rule_error(activation: str, spread: float, points: int = 4000) -> dict:
    """The table rule alone against the activation's float64 quadrature dual, at random correlations and
    variances around 2 (the first layer's on per-image standardised rows): max |error| / max |value| of
    ``T`` and ``Tdot``. ``spread > 1``: variances log-uniform in [2/spread^2, 2 spread^2] (grid nodes)."""
    import torch

    from kernels.dual_table import DualTable

    gen = torch.Generator().manual_seed(0)
    if spread > 1:
        lo, hi = math.log(2 / spread**2), math.log(2 * spread**2)
        v1 = torch.exp(lo + (hi - lo) * torch.rand(points, 1, generator=gen, dtype=torch.float64))
        v2 = torch.exp(lo + (hi - lo) * torch.rand(1, points, generator=gen, dtype=torch.float64))
    else:
        v1, v2 = torch.full((points, 1), 2.0, dtype=torch.float64), torch.full((1, points), 2.0, dtype=torch.float64)
    k = 60  # a 60 x 60 grid of (row, column) pairs out of the samples keeps the reference cheap
    v1, v2 = v1[:k], v2[:, :k]
    c = torch.cat([torch.rand(k, k - 4, generator=gen, dtype=torch.float64) * 2 - 1,
                   torch.tensor([[-1.0, 0.0, 0.999999, 1.0]], dtype=torch.float64).expand(k, 4)], dim=1)
    k12 = c * torch.sqrt(v1 * v2)
    table = DualTable(activation)
    t = time.perf_counter()
    dual = table.prepare_layer(v1.reshape(-1), v2.reshape(-1))
    build_s = time.perf_counter() - t
    got_t, got_d = dual(v1.float(), v2.float(), k12.float())
    # the reference: the graded rule (~1e-8 at any variance), not the activation's 96-point Hermite dual,
    # whose own Tdot error near |c| = 1 reaches 5e-6 at variance 2.5 (tanh)
    from kernels.activations import gaussian_expectations

    if table.act.closed_form:
        ref_t, ref_d = table.act.dual(v1.expand(k, k), v2.expand(k, k), k12)
    else:
        ref_t, ref_d = gaussian_expectations(table.act.fn, table.act.deriv, v1.expand(k, k), v2.expand(k, k), k12,
                                             rule="graded")
    return {"rule_err_T": float((got_t.double() - ref_t).abs().max() / ref_t.abs().max()),
            "rule_err_Tdot": float((got_d.double() - ref_d).abs().max() / ref_d.abs().max()),
            "rule_build_s": build_s, "rule_slices": len(table._slices)}


# --------------------------------------------------------------------------------------------- main


def _table(runs: list[dict]) -> str:
    rows = ["| N | impl | workers x torch threads | wall s | Gram entries/s (written) | computed entries/s | "
            "peak RSS during Gram (GiB) | ru_maxrss (GiB) | disk GB (ratio) | sgemm GFLOP/s per thread | "
            "max err / max | CPU use of the cores |", "|" + "---|" * 12]
    for r in runs:
        rows.append(
            f"| {r['n']:,} | {r['impl']} | {r['workers']} x {r['torch_threads']} | {r['seconds']:.1f} | "
            f"{r['written_per_s']:.3g} | {r['computed_per_s']:.3g} | {r['rss_peak_gram_gib']:.2f} | "
            f"{r['ru_maxrss_gib']:.2f} | {r['disk_gb']:.2f} ({r['compression']:.2f}x) | "
            f"{r['matmul_gflops_per_thread']:.0f} | {r['window_err_max_over_max']:.1e} | "
            f"{r['cpu_utilisation']:.0%} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[5000, 10000, 20000])
    p.add_argument("--full", action="store_true", help="also N = 70,000 (MNIST train+test)")
    p.add_argument("--block", type=int, default=None, help="tile edge (default: kernels.tiles.choose_block)")
    p.add_argument("--impl", default="auto")
    p.add_argument("--activation", nargs="*", default=["relu"],
                   help="activations for --compare (relu, erf, gelu, ...) and the child runs")
    p.add_argument("--compare", action="store_true",
                   help="only the ratio table: ntk-sweep vs neural-tangents per activation and --sizes")
    p.add_argument("--floor", type=int, default=None,
                   help="also the full-MNIST Gram of this N (70000) with its floor measured in the same run")
    p.add_argument("--tile", action="store_true", help="only the single-tile comparison (per --activation)")
    p.add_argument("--table", default=None, metavar="ACT:N:SPREAD[,...]",
                   help="interpolation-table benchmarks, e.g. tanh:2000:1,tanh:600:1.5")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--no-split", action="store_true", help="skip the threading-split comparison")
    p.add_argument("--no-micro", action="store_true", help="skip the matmul and single-tile measurements")
    p.add_argument("--nt-python", default=None, help="interpreter with jax + neural-tangents (baseline)")
    p.add_argument("--nt-n", type=int, default=5000)
    p.add_argument("--workdir", default=None, help="folder for inputs and stores (default: a temp folder)")
    p.add_argument("--json", default=None, help="write the raw numbers here")
    p.add_argument("--data-dir", default=default_data_dir(), help="MNIST root (default: $NTK_SWEEP_DATA)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs per configuration (default 1; --floor: 3, each with its own floor, median ratio)")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before each measurement wait up to this many seconds for an idle machine")
    # internal: one end-to-end run in a subprocess
    p.add_argument("--child-run", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--x", default=None, help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_run is not None:
        args.activation = args.activation[0] if isinstance(args.activation, list) else args.activation
        child_run(args)
        return 0

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gram-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine(), "loadavg_start": os.getloadavg()}
    print(json.dumps(report["machine"]), flush=True)
    x_path = prepare_inputs(work, args.data_dir)
    floor_repeat, args.repeat = args.repeat, args.repeat or 1
    if args.compare or args.floor or args.table or args.tile:
        if args.tile:
            report["tile"] = tile_impls(x_path, args.block or 2048, tuple(args.activation))
        if args.compare:
            report["compare"] = compare(args, x_path, work)
            print(_compare_table(report["compare"]), flush=True)
        if args.table:
            report["table"] = []
            for item in args.table.split(","):
                act, n, spread = item.split(":")
                r = table_bench(x_path, int(n), act, float(spread))
                report["table"].append(r)
                print("table", json.dumps(r), flush=True)
        if args.floor:
            # The machine's speed drifts by tens of percent over minutes (shared host), so each repeat
            # measures its own floor right before and after its Gram; the median ratio is the result.
            report["floor"] = []
            for _ in range(floor_repeat or 3):
                rates = floor_rates(x_path)
                run = run_child(x_path, args.floor, work / "floor.zarr", args.block, args.workers,
                                args.torch_threads, args.impl, args.progress, "relu")
                rates_after = floor_rates(x_path)
                best = {k: max(rates[k], rates_after[k]) for k in rates}
                floor = gram_floor(args.floor, run["block"], best)
                one = {"rates_before": rates, "rates_after": rates_after, "floor": floor, "run": run,
                       "ratio": run["seconds"] / floor["floor_s"]}
                report["floor"].append(one)
                print("floor", json.dumps(one), flush=True)
            print(_floor_table(report["floor"]), flush=True)
        report["loadavg_end"] = os.getloadavg()
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    if not args.no_micro:
        wait_idle(args.wait_idle)
        report["matmul"] = matmul_rates()
        print("matmul", json.dumps(report["matmul"]), flush=True)
        wait_idle(args.wait_idle)
        report["tile"] = tile_impls(x_path, args.block or 2048, tuple(args.activation))
        print("tile", json.dumps(report["tile"], indent=1), flush=True)
    if not args.no_split:
        report["split"] = [
            best_of(args.repeat, args.wait_idle, run_child, x_path, 10000, work / "split.zarr", args.block,
                    w, t, args.impl, False)
            for w, t in ((2, 1), (1, 2))
        ]
        for r in report["split"]:
            print("split", json.dumps(r), flush=True)
    sizes = list(args.sizes) + ([70000] if args.full else [])
    report["runs"] = []
    for n in sizes:
        repeat = 1 if n >= 50000 else args.repeat
        r = best_of(repeat, args.wait_idle, run_child, x_path, n, work / f"n{n}.zarr", args.block,
                    args.workers, args.torch_threads, args.impl, args.progress)
        report["runs"].append(r)
        print("run", json.dumps(r), flush=True)
    if args.nt_python:
        report["neural_tangents"] = best_of(args.repeat, args.wait_idle, neural_tangents, args.nt_python,
                                            x_path, args.nt_n)
        print("neural-tangents", json.dumps(report["neural_tangents"]), flush=True)
    report["loadavg_end"] = os.getloadavg()
    print(_table(report["runs"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
