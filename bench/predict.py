"""Wall-clock and peak RSS of ``ntk-sweep predict`` (and of a plain in-memory float64 numpy solve), measured
from outside the process with ``/usr/bin/time -v``.

    NTK_SWEEP_DATA=/work/shared/data nice -n 10 .venv/bin/python bench/predict.py --n-train 10000 20000 \\
        --kernel nngp --depth 1 --w-std 0.3162 --b-std 0.6928 --root /tmp/bench_predict --numpy

Each ``--n-train`` runs ``ntk-sweep predict ... --n-test all --format json`` in a child process (Grams
written to ``ROOT/n<N>.zarr``; a re-run reuses them, so run once with a fresh ROOT for Gram times), then with
``--numpy`` a child that reads the same stored train Gram into one float64 array and solves it with
``numpy.linalg.solve`` (skipped when ``8 n^2`` exceeds ``--numpy-max-gib``), and prints one JSON line per
measurement (appended to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

_NUMPY_CHILD = r"""
import json, sys, time
import numpy as np, zarr
from pipeline.data import _targets
store, prefix, reg = sys.argv[1], sys.argv[2], float(sys.argv[3])
t0 = time.perf_counter()
k = zarr.open_array(store, path=prefix + "_train", mode="r")
n = k.shape[0]
a = np.empty((n, n))
for i in range(0, n, 2048):
    a[i:i + 2048] = k[i:i + 2048]
t1 = time.perf_counter()
a.flat[::n + 1] += reg * np.trace(a) / n
y = np.random.default_rng(0).standard_normal((n, 10))
alpha = np.linalg.solve(a, y)
t2 = time.perf_counter()
print(json.dumps({"numpy_load_s": t1 - t0, "numpy_solve_s": t2 - t1}))
"""


def _timed(cmd: list[str], env: dict) -> tuple[dict, float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    peak = int(m.group(1)) * 1024 if m else -1
    out = {}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            out = json.loads(line)
            break
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    return out, wall, peak, proc.stderr


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n-train", type=int, nargs="+", required=True)
    p.add_argument("--root", required=True, help="folder for the Gram stores")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--numpy", action="store_true", help="also time an in-memory float64 numpy solve")
    p.add_argument("--numpy-max-gib", type=float, default=12.0)
    args, rest = p.parse_known_args()
    env = dict(os.environ)
    exe = os.path.join(os.path.dirname(sys.executable), "ntk-sweep")
    for n in args.n_train:
        store = os.path.join(args.root, f"n{n}.zarr")
        cmd = [exe, "predict", "--n-train", str(n), "--n-test", "all", "--gram", store, "--format", "json",
               "--no-progress", *rest]
        out, wall, peak, _ = _timed(cmd, env)
        row = dict(out, measured="ntk-sweep predict", outside_wall_s=round(wall, 2), peak_rss_bytes=peak,
                   peak_rss_gib=round(peak / 2**30, 2), args=" ".join(rest), host=os.uname().nodename,
                   cpus=os.cpu_count())
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        if args.numpy and 8.0 * n * n / 2**30 <= args.numpy_max_gib and out:
            kernel = next((rest[i + 1] for i, a in enumerate(rest) if a == "--kernel"), "ntk")
            reg = next((rest[i + 1] for i, a in enumerate(rest) if a == "--diag-reg"), "1e-4")
            out2, wall2, peak2, _ = _timed([sys.executable, "-c", _NUMPY_CHILD, store, kernel, reg], env)
            row2 = dict(out2, measured="numpy float64 solve", n_train=n, outside_wall_s=round(wall2, 2),
                        peak_rss_bytes=peak2, peak_rss_gib=round(peak2 / 2**30, 2))
            print(json.dumps(row2), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
