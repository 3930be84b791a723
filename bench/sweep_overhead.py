"""Parallel efficiency of the local Ray runner against the same runs in a plain loop.

    python bench/sweep_overhead.py [--runs 16] [--steps 150] [--width 512]

Both sides train the same runs (digits, depth 2, one seed per task, no packing) with one torch
thread per run. The loop runs them one after another in this process; the runner runs them as Ray
tasks on a local cluster of ``--cpus`` CPUs (Ray start-up reported separately, not counted).
Efficiency = loop time / (cpus x sweep time). Per-task overhead comes from a sweep of ``steps=0``
runs: (sweep time x cpus - loop time) / tasks. Each sweep runs twice: every pack submitted up front
(the runner's default: Ray limits concurrency by resources) and ``--max-parallel = cpus`` (the driver
keeps only as many tasks in flight as there are CPUs), to compare the two scheduling policies.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from pipeline.data import load_subset  # noqa: E402
from pipeline.limits import analytic_blocks  # noqa: E402
from pipeline.run import train_run  # noqa: E402
from pipeline.runner import init_ray, run_sweep  # noqa: E402
from pipeline.spec import parse_sweep  # noqa: E402


def sweep_for(runs: int, steps: int, width: int) -> dict:
    return {
        "name": f"bench_{steps}", "widths": [width], "seeds": runs,
        "datasets": [{"name": "digits", "n_train": [128], "n_test": 128}],
        "architectures": [{"depth": [2]}],
        "optimizer": {"name": "gd", "steps": steps},
        "resources": {"num_cpus": 1, "pack_seeds": False},
    }


def loop_time(sweep) -> float:
    torch.set_num_threads(1)
    configs = sweep.expand()
    subset = load_subset(configs[0])
    analytic = analytic_blocks(configs[0], subset)
    start = time.perf_counter()
    for c in configs:
        assert train_run(c, subset=subset, analytic=analytic).status == "ok"
    return time.perf_counter() - start


def sweep_time(sweep, max_parallel: int | None = None) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = run_sweep(sweep, out, progress=False, max_parallel=max_parallel)
        assert summary.status["ok"] == len(sweep.expand()), summary.line()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    start = time.perf_counter()
    init_ray(None, args.cpus)
    startup = time.perf_counter() - start
    print(f"# local Ray start-up: {startup:.1f} s ({args.cpus} CPUs, dashboard on 127.0.0.1)")
    print(f"{'case':>28} {'in flight':>10} {'loop s':>8} {'sweep s':>8} {'efficiency':>11} {'overhead/task':>14}")
    for steps in (args.steps, 0):
        sweep = parse_sweep(sweep_for(args.runs, steps, args.width))
        sweep_time(sweep)  # warm the worker pool and caches
        t_loop = loop_time(sweep)
        for max_parallel in (None, args.cpus):
            t_sweep = sweep_time(sweep, max_parallel)
            eff = t_loop / (args.cpus * t_sweep)
            overhead = (t_sweep * args.cpus - t_loop) / args.runs
            label = f"{args.runs} runs x {steps} steps w{args.width}"
            flight = "all" if max_parallel is None else str(max_parallel)
            print(f"{label:>28} {flight:>10} {t_loop:>8.2f} {t_sweep:>8.2f} {eff:>10.1%} {overhead * 1000:>11.0f} ms")
    ray.shutdown()


if __name__ == "__main__":
    main()
