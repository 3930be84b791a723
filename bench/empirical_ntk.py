"""Benchmark of kernels.empirical: the structured MLP path against the generic torch.func methods.

    python bench/empirical_ntk.py                  # full table on the CPU (< 10 minutes on 2 cores)
    python bench/empirical_ntk.py --device cuda    # on a GPU
    python bench/empirical_ntk.py --quick          # small smoke run, all in one process (~1 minute)

Network: ``MLP(784, width, depth=3, K)``, ReLU, NTK parameterisation, float32; inputs ``(N, 784)``;
``empirical_ntk(model, x)`` (symmetric, ``trace=True``). Every (case, method) runs in its own subprocess
(except with ``--quick``), so that allocator state does not carry over, and its peak memory is read: on
the CPU the high-water RSS minus the RSS just before the timed calls (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``; elsewhere ``getrusage(...).ru_maxrss``, which cannot be reset), on a GPU
``torch.cuda.max_memory_allocated`` minus the allocation before. Times are medians over >= 3 repeats
(cheap cases: until 2 s are timed) after a small warm-up call (N = 8).

The generic methods are calibrated on small problems (the smallest width, N doubling from 100 until two
successive runs take 0.3 s), their cost modelled as
``a * N K P * recompute + b * N^2 K P * blocks_formed`` (Jacobian/cotangent work, then contraction or
push-forward), and a combination estimated to take longer than ``--max-case-s`` (60 s), or to end the
whole run after ``--time-budget-s`` (540 s), is skipped, except ``jacobian`` at width 2048, N = 500, K = 1,
which always runs (the issue's headline comparison).

The structured path's FLOPs are counted analytically (forward, back-propagation and Gram matmuls, as
performed: full N x N Grams) and reported as GFLOP/s next to the float32 ``torch.mm`` rate (4096^3 on
the CPU, 8192^3 on a GPU) measured at the start and again in each structured case's process right after
its timed runs; ``floor x`` is the structured time over the time its FLOPs take at the latter rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels import empirical as emp  # noqa: E402
from kernels.mlp import MLP  # noqa: E402
from kernels.tiles import ranges  # noqa: E402

IN_DIM, DEPTH = 784, 3
FULL = dict(widths=(512, 2048, 4096), ns=(500, 2000), ks=(1, 10), must=(2048, 500, 1))
QUICK = dict(widths=(128, 256), ns=(100,), ks=(1, 4), must=(256, 100, 1))
GENERIC = ("jacobian", "ntk_vp")


# ----------------------------------------------------------------------------------------------
# Helpers shared by the driver and the workers.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def num_params(width: int, k: int, in_dim: int = IN_DIM, depth: int = DEPTH) -> int:
    sizes = [in_dim] + [width] * depth + [k]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def structured_flops(width: int, n: int, k: int, in_dim: int = IN_DIM, depth: int = DEPTH) -> float:
    """Matmul FLOPs of the structured path, symmetric, trace=True, one block (2 per multiply-add).

    forward: every Dense layer; back-propagation: ``delta_l = delta_{l+1} @ W_{l+1}`` for the depth-1
    hidden layers below the top one (the top one is elementwise); Grams (full N x N): the input Gram of
    every layer, and the delta Gram of every hidden layer (K*width wide, width wide at the top)."""
    sizes = [in_dim] + [width] * depth + [k]
    forward = sum(2 * n * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    backprop = (depth - 1) * 2 * n * k * width * width if depth > 1 else 0
    gram_inputs = sum(2 * n * n * a for a in sizes[:-1])
    gram_deltas = (2 * n * n * width + (depth - 1) * 2 * n * n * k * width) if depth else 0
    return float(forward + backprop + gram_inputs + gram_deltas)


def matmul_gflops(device: torch.device, size: int, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the process's RSS high-water mark where Linux allows it; return the current RSS in bytes.

    ``getrusage().ru_maxrss`` cannot be reset and survives ``exec`` (a fresh subprocess starts with its
    parent's high-water mark), so on Linux the peak is read from ``VmHWM``, which ``/proc/self/clear_refs``
    resets to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    rss = _proc_status_kb("VmRSS")
    if rss is not None:
        return rss * 1024
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ----------------------------------------------------------------------------------------------
# Worker: one (method, case) in a fresh process.


def time_case(method: str, width: int, n: int, k: int, repeats: int, device: torch.device,
              min_total_s: float = 2.0) -> dict:
    """Time ``empirical_ntk`` on one case: at least ``repeats`` runs, cheap cases repeated until
    ``min_total_s`` have been timed (at most 25 runs). Peak memory: see the module docstring (on the CPU it
    is meaningful only in a fresh process)."""
    model = MLP(IN_DIM, width, DEPTH, k, seed=0).to(device)
    x = torch.randn(n, IN_DIM, generator=torch.Generator().manual_seed(1)).to(device)
    emp.empirical_ntk(model, x[:8], method=method)  # warm-up: lazy initialisation, first-call costs
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = reset_peak_rss()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_total_s and len(times) < 25):
        sync(device)
        t0 = time.perf_counter()
        out = emp.empirical_ntk(model, x, method=method)
        sync(device)
        times.append(time.perf_counter() - t0)
        del out
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    result = dict(times=times, median=statistics.median(times), peak_mb=max(0, peak - base) / 2**20)
    if method == "structured":  # the matmul floor, measured under the same conditions as the case
        del model, x
        result["mm_gflops"] = matmul_gflops(device, 8192 if device.type == "cuda" else 4096, repeats=3)
    return result


def worker(args: argparse.Namespace) -> None:
    result = time_case(args.method, args.width, args.n, args.k, args.repeats, torch.device(args.device))
    print(json.dumps(result))


WAITED = [0.0]  # seconds spent in wait_for_idle


def wait_for_idle(seconds: float, max_wait: float = 900.0, threshold: float = 90.0) -> None:
    """On a shared machine: block until the CPUs have been at least ``threshold`` % idle for ``seconds``
    in a row (or ``max_wait`` has passed), so a case does not start on top of someone else's job."""
    if seconds <= 0:
        return
    import psutil

    t0 = time.perf_counter()
    quiet = 0.0
    while quiet < seconds and time.perf_counter() - t0 < max_wait:
        idle = 100.0 - psutil.cpu_percent(interval=2.0)
        quiet = quiet + 2.0 if idle >= threshold else 0.0
    WAITED[0] += time.perf_counter() - t0


def run_worker(method: str, width: int, n: int, k: int, repeats: int, device: str, timeout: float,
               in_process: bool = False) -> dict:
    """``time_case`` in a fresh subprocess (for its peak memory), or here when ``in_process``."""
    if in_process:
        result = time_case(method, width, n, k, repeats, torch.device(device))
        if device == "cpu" and _proc_status_kb("VmHWM") is None:  # ru_maxrss cannot be reset in-process
            result.pop("peak_mb")
        return result
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--width", str(width), "--n", str(n),
           "--k", str(k), "--repeats", str(repeats), "--device", device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f}s")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return dict(error=f"failed (rc={proc.returncode}): {tail[0][:120]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Cost model for the generic methods.


def block_factors(n: int, k: int, p: int, itemsize: int = 4) -> tuple[float, float]:
    """(feature recomputation factor, fraction of the N x N kernel formed) under the default budgets."""
    plan = emp.plan_blocks(n, n, k * p * itemsize, symmetric=True, bytes_per_pair=2 * itemsize * k * k)
    if plan.rows >= n:
        return 1.0, 1.0
    formed = sum((r1 - r0) * (n - r0) for r0, r1 in ranges(n, plan.rows)) / n**2
    return plan.feature_inputs(n, n, True) / n, formed


def estimate(coef: tuple[float, float], width: int, n: int, k: int) -> float:
    a, b = coef
    p = num_params(width, k)
    recompute, formed = block_factors(n, k, p)
    return a * n * k * p * recompute + b * n * n * k * p * formed


def calibrate(method: str, device: str, width: int) -> tuple[float, float]:
    """Fit ``t = a N K P + b N^2 K P`` (K = 1, one block) on the last two of N = 100, 200, 400, ...,
    stopping once both take at least 0.3 s, so that fixed per-call costs do not dominate the fit."""
    p = num_params(width, 1)
    points: list[tuple[int, float]] = []
    n = 100
    while True:
        res = time_case(method, width, n, 1, 1, torch.device(device), min_total_s=0.0)
        points.append((n, res["median"]))
        if (len(points) >= 2 and points[-2][1] >= 0.3) or n >= 3200:
            break
        n *= 2
    (n1, t1), (n2, t2) = points[-2:]
    u1, v1, u2, v2 = n1 * p, n1 * n1 * p, n2 * p, n2 * n2 * p
    det = u1 * v2 - u2 * v1
    a = (t1 * v2 - t2 * v1) / det
    b = (u1 * t2 - u2 * t1) / det
    if a < 0 or b < 0:  # noisy fit: attribute everything to the quadratic term
        a, b = 0.0, max(t1 / v1, t2 / v2)
    return a, b


# ----------------------------------------------------------------------------------------------
# Driver.


def machine_description(device: torch.device) -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    text = (f"CPU: {model}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}; "
            f"load average at start {load}")
    if device.type == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name(device)}"
    return text


def fmt_s(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--max-case-s", type=float, default=60.0,
                        help="skip generic runs estimated to take longer than this (seconds)")
    parser.add_argument("--time-budget-s", type=float, default=540.0,
                        help="skip optional generic runs that would end the benchmark after this (seconds)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before each case wait until the CPUs have been >= 90%% idle for S seconds "
                             "(shared machines); the waits are excluded from --time-budget-s")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU visible to torch")
    grid = QUICK if args.quick else FULL
    started = time.perf_counter()
    wait_for_idle(args.wait_idle)
    print(f"# Empirical NTK benchmark ({'quick' if args.quick else 'full'}, device {device})")
    print(machine_description(device))
    mm = matmul_gflops(device, 1024 if args.quick else (8192 if device.type == "cuda" else 4096))
    print(f"float32 torch.mm: {mm:.1f} GFLOP/s")
    print(f"MLP(784, width, depth={DEPTH}, K), ReLU, NTK parameterisation, float32; symmetric, trace=True\n")

    coef = {m: calibrate(m, args.device, grid["widths"][0]) for m in GENERIC}
    in_process = args.quick  # quick: no subprocesses

    rows = []
    header = ("| width | N | K | P | structured s | GFLOP | GFLOP/s | floor x | jacobian s | speed-up "
              "| ntk_vp s | speed-up | peak MB (s / j / v) |")
    print(header)
    print("|" + "|".join(["---"] * 13) + "|")
    for width in grid["widths"]:
        for n in grid["ns"]:
            for k in grid["ks"]:
                row = dict(width=width, n=n, k=k, params=num_params(width, k))
                flops = structured_flops(width, n, k)
                wait_for_idle(args.wait_idle)
                res = run_worker("structured", width, n, k, 3, args.device, timeout=600,
                                 in_process=in_process)
                row["structured"] = res
                for method in GENERIC:
                    est = estimate(coef[method], width, n, k)
                    must = method == "jacobian" and (width, n, k) == grid["must"]
                    if est > args.max_case_s and not must:
                        row[method] = dict(skipped=f"est. {est:.0f}s")
                        continue
                    repeats = 3 if 3 * est <= args.max_case_s else 1
                    elapsed = time.perf_counter() - started - WAITED[0]
                    if not must and elapsed + repeats * est > args.time_budget_s:
                        row[method] = dict(skipped=f"time budget (est. {est:.0f}s)")
                        continue
                    wait_for_idle(args.wait_idle)
                    row[method] = run_worker(method, width, n, k, repeats, args.device,
                                             timeout=max(120.0, 4 * est * repeats), in_process=in_process)
                    row[method]["estimate"] = est
                rows.append(row)
                t_s = res.get("median")
                cells = [str(width), str(n), str(k), f"{row['params'] / 1e6:.2f}M"]
                if t_s is None:
                    cells += [res["error"], f"{flops / 1e9:.1f}", "-", "-"]
                else:
                    floor = flops / (res.get("mm_gflops", mm) * 1e9)
                    cells += [fmt_s(t_s), f"{flops / 1e9:.1f}", f"{flops / t_s / 1e9:.1f}",
                              f"{t_s / floor:.2f}"]
                mems = [f"{res['peak_mb']:.0f}" if "peak_mb" in res else "-"]  # "-": not measured
                for method in GENERIC:
                    r = row[method]
                    if "median" in r:
                        reps = len(r["times"])
                        cells += [fmt_s(r["median"]) + ("" if reps >= 3 else f" ({reps} run)"),
                                  f"{r['median'] / t_s:.0f}x" if t_s else "-"]
                        mems.append(f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-")
                    elif "skipped" in r:
                        cells += [f"skipped: {r['skipped']}", "-"]
                        mems.append("-")
                    else:
                        cells += [r["error"], "-"]
                        mems.append("-")
                cells.append(" / ".join(mems))
                print("| " + " | ".join(cells) + " |", flush=True)

    case_mm = [r["structured"]["mm_gflops"] for r in rows if "mm_gflops" in r["structured"]]
    if case_mm:
        print(f"\nfloat32 torch.mm measured after each structured case: {min(case_mm):.0f}-"
              f"{max(case_mm):.0f} GFLOP/s ('floor x' uses the case's own figure; a wide range means a busy "
              "machine).")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    waited = f", of which {WAITED[0]:.0f}s waiting for an idle CPU" if WAITED[0] else ""
    print(f"Total wall time {time.perf_counter() - started:.0f}s{waited} (load average at end {load}). "
          "Times are medians of >= 3 runs (cheap ones repeated until 2 s) unless marked; 'skipped: est. Xs' "
          f"means the cost model predicted more than {args.max_case_s:.0f}s.")
    must = next(r for r in rows if (r["width"], r["n"], r["k"]) == grid["must"])
    if "median" in must["jacobian"] and "median" in must["structured"]:
        t_s, t_j = must["structured"]["median"], must["jacobian"]["median"]
        floor = structured_flops(*grid["must"]) / (must["structured"].get("mm_gflops", mm) * 1e9)
        print(f"Headline (width {grid['must'][0]}, N {grid['must'][1]}, K {grid['must'][2]}): structured "
              f"{t_s:.3g}s, jacobian {t_j:.3g}s -> {t_j / t_s:.0f}x (target >= 100x); structured at "
              f"{t_s / floor:.2f}x the matmul floor (target <= 3x).")
    if args.json:
        args.json.write_text(json.dumps(dict(matmul_gflops=mm, rows=rows), indent=1))


if __name__ == "__main__":
    main()
