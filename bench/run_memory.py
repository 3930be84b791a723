"""Peak memory and time of one run against n_train, measured through a real local sweep.

MNIST (real files: --data-dir or $NTK_SWEEP_DATA), depth 1, width 64, n_test 2000, 20 GD steps, one seed:
the case of issue 12 (n_train 10,000 peaked at 11.7 GB before). Each size is its own one-run sweep on a
local Ray; ``peak_rss_bytes`` is the training task's VmHWM (reset at task start) as the kernel reports it,
``analytic_peak_rss_bytes`` the same for the task that computed the analytic kernels.

    NTK_SWEEP_DATA=../shared/data python bench/run_memory.py [--sizes 1000 2000 5000 10000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from pipeline.runner import run_sweep  # noqa: E402
from pipeline.spec import parse_sweep  # noqa: E402
from pipeline.store import ResultsStore  # noqa: E402

GIB = 1 << 30


def job(n_train: int, n_test: int, width: int, depth: int, steps: int) -> dict:
    return {"name": f"mem-{n_train}", "datasets": [{"name": "mnist", "n_train": [n_train], "n_test": n_test}],
            "architectures": [{"depth": [depth]}], "widths": [width], "seeds": 1,
            "optimizer": {"name": "gd", "lr_scale": 0.5, "steps": steps}, "resources": {"num_cpus": 2},
            "device": "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"{'n_train':>8} {'n_test':>7} {'train task GiB':>15} {'analytic task GiB':>18} {'run s':>7} {'sweep s':>8}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as out:
            sweep = parse_sweep(job(n, args.n_test, args.width, args.depth, args.steps))
            t0 = time.perf_counter()
            summary = run_sweep(sweep, out, num_cpus=2, progress=False)
            wall = time.perf_counter() - t0
            ray.shutdown()  # fresh workers for the next size: a pooled worker keeps the heap it grew
            assert summary.status.get("ok") == 1, summary.line()
            row = ResultsStore(out).table().to_pylist()[0]
        print(f"{n:>8} {args.n_test:>7} {row['peak_rss_bytes'] / GIB:>15.2f} "
              f"{row['analytic_peak_rss_bytes'] / GIB:>18.2f} {row['wall_s']:>7.1f} {wall:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
