"""The planner's memory model against measured peaks: ``ntk-sweep plan`` estimates vs ``peak_rss_bytes``.

Runs a grid of (n_train, n_test, width, depth) on MNIST (real files: --data-dir or $NTK_SWEEP_DATA) as
real sweeps on a local Ray, one seed per run, and prints per run the estimated and measured peak resident
set of the training task (VmHWM, reset at task start, as the runs table records it), their ratio, the same
for the analytic-kernel task, and the estimated vs measured wall time.

    NTK_SWEEP_DATA=../shared/data python bench/plan_memory.py                       # the default grid
    NTK_SWEEP_DATA=../shared/data python bench/plan_memory.py --n-train 500 2000 --n-test 500 \\
        --widths 64 --depths 1 --steps 5 --extra 2000,2000,4096,2

``--extra n_train,n_test,width,depth`` adds single cells (e.g. a wide network, where the parameters and not
the (N, N) kernels dominate). ``--seeds S`` packs S seeds into one task. ``--store init`` also writes the
init Grams (their bytes on disk are compared with the plan's too).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pipeline.plan import estimate_analytic, estimate_pack, gram_bytes, io_dims, make_packs  # noqa: E402
from pipeline.run_config import RunConfig  # noqa: E402
from pipeline.runner import run_sweep  # noqa: E402
from pipeline.spec import parse_sweep  # noqa: E402
from pipeline.store import ResultsStore  # noqa: E402

GIB = 1 << 30


def job(name: str, cells: list[tuple[int, int, int, int]], steps: int, seeds: int, store: str,
        num_cpus: float) -> dict:
    """One sweep per cell (a sweep is a product grid; cells are arbitrary)."""
    (n, m, w, d), = cells
    return {"name": name, "datasets": [{"name": "mnist", "n_train": [n], "n_test": m}],
            "architectures": [{"depth": [d]}], "widths": [w], "seeds": seeds,
            "optimizer": {"name": "gd", "lr_scale": 0.5, "steps": steps, "log_points": 6},
            "kernels": {"store": store}, "device": "cpu",
            "resources": {"num_cpus": num_cpus, "pack_seeds": True, "pack_max_width": 1 << 20}}


def reestimate(row: dict) -> dict:
    """A saved measurement with the current model's estimates."""
    seeds = [RunConfig(dataset="mnist", n_train=row["n_train"], n_test=row["n_test"], width=row["width"],
                       depth=row["depth"], seed=s, steps=row.get("steps", 5), log_points=6, device="cpu")
             for s in range(row["seeds"])]
    in_dim, out_dim = io_dims(seeds[0])
    store = row.get("store", "none")
    est = estimate_pack(seeds, in_dim, out_dim, store=store, device="cpu", num_cpus=row.get("num_cpus", 2))
    return {**row, "est": est.host_peak_bytes, "est_analytic": estimate_analytic(seeds[0], in_dim, out_dim),
            "est_s": est.seconds, "est_grams": sum(gram_bytes(c, store) for c in seeds),
            "phase": max(est.host_phases, key=est.host_phases.get) if est.host_phases else ""}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def measure(cells: list[tuple[int, int, int, int]], steps: int, seeds: int, store: str, num_cpus: float,
            data_dir: str | None) -> list[dict]:
    """Run every cell as its own sweep (all in one local Ray) and return one row per task."""
    import ray

    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-mem-") as out:
        for i, cell in enumerate(cells):
            sweep = parse_sweep(job(f"planmem{i}", [cell], steps, seeds, store, num_cpus))
            # A fresh local Ray per cell (its own, even when another one runs on this machine): a pooled worker
            # keeps the object-store pages an earlier task touched in its resident set, which would inflate
            # the next task's VmHWM (see bench/RESULTS.md).
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                     log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="rpm", dir="/tmp"))
            try:
                t0 = time.perf_counter()
                summary = run_sweep(sweep, out, num_cpus=2, progress=False, data_dir=data_dir)
                wall = time.perf_counter() - t0
            finally:
                ray.shutdown()
            if summary.interrupted:
                raise KeyboardInterrupt
            runs = sweep.expand(data_dir)
            table = {r["run_id"]: r for r in ResultsStore(out).table().to_pylist()}
            for pack in make_packs(runs, True, 1 << 20):
                c = pack[0]
                in_dim, out_dim = io_dims(c)
                est = estimate_pack(pack, in_dim, out_dim, store=store, device="cpu", num_cpus=num_cpus)
                row = table.get(c.run_id, {})
                grams = sum(dir_bytes(Path(out) / "grams.zarr" / "empirical" / r.run_id) for r in pack)
                rows.append({
                    "n_train": c.n_train, "n_test": c.n_test, "width": c.width, "depth": c.depth, "seeds": len(pack),
                    "status": row.get("status", "missing"), "est": est.host_peak_bytes,
                    "peak": row.get("peak_rss_bytes"), "est_analytic": estimate_analytic(c, in_dim, out_dim),
                    "peak_analytic": row.get("analytic_peak_rss_bytes"), "est_s": est.seconds,
                    "wall_s": (row.get("wall_s") or float("nan")) * len(pack), "sweep_s": wall,
                    "est_grams": sum(gram_bytes(r, store) for r in pack), "grams": grams,
                    "phase": max(est.host_phases, key=est.host_phases.get) if est.host_phases else "",
                    "steps": steps, "store": store, "num_cpus": num_cpus,
                })
            print(_line(rows[-1]), flush=True)
            del summary
    return rows


HEADER = (f"{'n_train':>7} {'n_test':>6} {'width':>5} {'depth':>5} {'S':>2} {'steps':>5} {'est GiB':>8} "
          f"{'meas GiB':>8} {'ratio':>6} {'an est':>7} {'an meas':>7} {'an ratio':>8} {'est s':>7} {'run s':>7}"
          "  peak phase")


def _ratio(est: float | None, meas: float | None) -> str:
    return f"{est / meas:.2f}" if est and meas else "-"


def _line(r: dict) -> str:
    gib = (lambda v: f"{v / GIB:.2f}" if v else "-")  # noqa: E731
    return (f"{r['n_train']:>7} {r['n_test']:>6} {r['width']:>5} {r['depth']:>5} {r['seeds']:>2} "
            f"{r.get('steps', ''):>5} {gib(r['est']):>8} "
            f"{gib(r['peak']):>8} {_ratio(r['est'], r['peak']):>6} {gib(r['est_analytic']):>7} "
            f"{gib(r['peak_analytic']):>7} {_ratio(r['est_analytic'], r['peak_analytic']):>8} "
            f"{r['est_s']:>7.1f} {r['wall_s']:>7.1f}  {r['phase']}"
            + (f"  grams est {r['est_grams'] / 1e6:.1f} MB, disk {r['grams'] / 1e6:.1f} MB" if r["grams"] else "")
            + ("" if r["status"] == "ok" else f"  [{r['status']}]"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, nargs="+", default=[400, 500, 2000, 5000, 10000])
    parser.add_argument("--n-test", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--extra", nargs="*", default=[], help="more cells: n_train,n_test,width,depth")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--store", default="none", choices=("none", "init", "init+final"))
    parser.add_argument("--num-cpus", type=float, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--save", default=None, help="write the measurements to this JSON file")
    parser.add_argument("--load", nargs="*", default=None,
                        help="re-estimate saved measurements (JSON files of --save) instead of running")
    args = parser.parse_args()
    cells = list(itertools.product(args.n_train, args.n_test, args.widths, args.depths))
    cells += [tuple(int(v) for v in e.split(",")) for e in args.extra]
    if args.load is not None:
        print(f"# plan_memory: measurements of {', '.join(args.load)}, estimates of this model")
    else:
        print(f"# plan_memory: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"{args.steps} steps, {args.seeds} seed(s) per task, num_cpus {args.num_cpus:g}, store {args.store}")
    print(HEADER)
    if args.load is not None:
        rows = [reestimate(r) for path in args.load for r in json.loads(Path(path).read_text())]
        for r in rows:
            print(_line(r))
    else:
        rows = measure(cells, args.steps, args.seeds, args.store, args.num_cpus, args.data_dir)
    if args.save:
        Path(args.save).write_text(json.dumps(rows, indent=1))
    ok = [r for r in rows if r["peak"]]
    ratios = [r["est"] / r["peak"] for r in ok]
    an = [r["est_analytic"] / r["peak_analytic"] for r in ok if r["peak_analytic"]]
    if ratios:
        print(f"# training task: estimate / measured in [{min(ratios):.2f}, {max(ratios):.2f}] over {len(ratios)} "
              f"tasks; worst {max(ratios, key=lambda x: abs(x - 1)):.2f}")
    if an:
        print(f"# analytic task: estimate / measured in [{min(an):.2f}, {max(an):.2f}]")


if __name__ == "__main__":
    main()
