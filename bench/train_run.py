"""Training throughput: runs/second by width, and the speed-up of packing seeds with vmap.

    python bench/train_run.py [--device cpu|cuda] [--steps 100] [--repeats 3] [--quick]

One run = a depth-2 ReLU MLP and its linearisation trained side by side with full-batch GD for
``--steps`` steps on 256 digits (d = 64, K = 10), then every measurement (empirical NTKs, closed
forms). Table 1: seconds per run and runs/second by width. Table 2: 8 seeds of one width as one
vmapped pack (``train_runs``) versus 8 separate ``train_run`` calls, same process, same inputs.
Median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from pipeline.data import load_subset
from pipeline.limits import analytic_blocks
from pipeline.run import train_run, train_runs
from pipeline.run_config import RunConfig


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer widths and steps (smoke test)")
    parser.add_argument("--widths", type=int, nargs="*", help="widths of table 1 (default 64..4096; none: skip it)")
    parser.add_argument("--pack-widths", type=int, nargs="*", help="widths of table 2 (default 64..512)")
    args = parser.parse_args()
    widths = [64, 256, 1024] if args.quick else [64, 128, 256, 512, 1024, 2048, 4096]
    widths = widths if args.widths is None else args.widths
    pack_widths = ([64, 256] if args.quick else [64, 128, 256, 512]) if args.pack_widths is None else args.pack_widths
    steps = 20 if args.quick else args.steps

    def config(width: int, seed: int = 0) -> RunConfig:
        return RunConfig(dataset="digits", n_train=256, n_test=256, depth=2, width=width, steps=steps,
                         device=args.device, seed=seed)

    subset = load_subset(config(64))
    analytic = analytic_blocks(config(64), subset)
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"# train_run: torch {torch.__version__}, {torch.get_num_threads()} threads, cpu {cpu}, gpu {gpu}")
    print(f"# depth 2, n_train 256, n_test 256, d 64, K 10, {steps} GD steps, device {args.device}")
    print(f"{'width':>6} {'params':>10} {'s/run':>8} {'runs/s':>8} {'status':>7}")
    for width in widths:
        holder = {}

        def one(width: int = width, holder: dict = holder) -> None:
            holder["r"] = train_run(config(width), subset=subset, analytic=analytic)

        sec = timed(one, args.repeats)
        params = width * (64 + 10) + width * width + 2 * width + 10
        print(f"{width:>6} {params:>10,} {sec:>8.3f} {1 / sec:>8.2f} {holder['r'].status:>7}")

    print()
    print(f"{'width':>6} {'8 separate s':>13} {'8-seed pack s':>14} {'speed-up':>9}")
    for width in pack_widths:
        configs = [config(width, seed) for seed in range(8)]
        separate = timed(lambda cs=configs: [train_run(c, subset=subset, analytic=analytic) for c in cs],
                         args.repeats)
        packed = timed(lambda cs=configs: train_runs(cs, subset=subset, analytic=analytic), args.repeats)
        print(f"{width:>6} {separate:>13.3f} {packed:>14.3f} {separate / packed:>8.2f}x")


if __name__ == "__main__":
    main()
