"""What a sweep costs, before anything runs: ``ntk-sweep plan JOB [--cluster cluster.yaml]``.

Per run (more exactly, per Ray task: a vmapped pack of seeds, or one run) it estimates

* ``host_peak_bytes``: the peak resident set (VmHWM) of the Ray worker process while it trains the pack,
  shared object-store pages it touches included: what ``peak_rss_bytes`` in the runs table measures and
  what the runner declares as the task's Ray ``memory=``;
* ``device_peak_bytes``: the peak GPU memory of that task (CUDA context included), 0 on a CPU;
* FLOPs of the network and its linearisation (forward + backward per step, times steps), the empirical
  NTKs at init and at the end, the Grams the worker writes, and the kernel solves and spectra;
* seconds on a device class (this machine's CPU, or a GPU class such as ``A10G``), from stated rates;
* ``gram_bytes``: the empirical-NTK Grams the job stores (``kernels.store``), one float32 ``(N, N)`` array
  per stored Gram, ``N = n_train + n_test``, compressed by :data:`GRAM_COMPRESSION`;

and per sweep the totals (GPU-hours, CPU-hours, disk) and, given a Ray cluster-launcher YAML, whether each
task shape fits each node type (CPUs, GPU share, host and GPU memory for as many tasks as the node runs at
once) and how many nodes the sweep can keep busy.

Nothing is run or read but the two YAML files: the input dimension comes from :data:`DATASET_DIMS`, the
output dimension from ``classes`` (one output for two classes, as :func:`pipeline.data._targets` does).

**The memory model** (:func:`host_memory`, :func:`estimate_analytic`) is built from the arrays each phase of
:func:`pipeline.run.train_runs` and :func:`pipeline.limits.analytic_blocks` holds, in bytes, plus a measured
constant per process and glibc's retention of freed blocks under 32 MiB, and checked against
``peak_rss_bytes`` of real sweeps on this machine (``bench/plan_memory.py``, ``bench/RESULTS.md``): estimate
/ measured 0.84-1.10 over 51 training tasks (``n_train`` 400..10,000, ``n_test`` 500..2,000, widths 64..4096,
depths 1..3, packs of 10 seeds, MNIST), 0.85-1.10 for the analytic tasks. The device model uses the same
array inventory for the tensors that live on the GPU; it has not been measured on a GPU (none was
available): a first-principles estimate, used with :data:`GPU_MEMORY_MARGIN` to spare.

Ray is never imported: the cluster YAML is read as data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernels.tiles import MAX_BLOCK
from pipeline.errors import UserError
from pipeline.measures import MAX_EIGH, MAX_FULL_NTK, log_steps, norm_panels
from pipeline.run_config import RunConfig, analytic_args, make_packs
from pipeline.yaml_file import read_yaml_file

if TYPE_CHECKING:  # pipeline.spec calls check_sizes; only the type comes back this way
    from pipeline.spec import Sweep

GIB = 1 << 30
MIB = 1 << 20

# --------------------------------------------------------------------------------------------- data shapes

DATASET_DIMS = {"digits": 64, "mnist": 784, "fashion_mnist": 784, "cifar10": 3072}
NUM_CLASSES = 10

# Gram compression: float32 empirical NTK Grams of MNIST subsets (N = 2,000; widths 64 and 1024, depths 1
# and 3), measured once: blosc-lz4 + byte shuffle 1.14-1.24x, zstd level 3 1.12-1.15x. The estimate takes
# the low end (more bytes, not fewer).
GRAM_COMPRESSION = {"blosc-lz4": 1.14, "zstd": 1.12, "none": 1.0}
GRAM_CODEC = "blosc-lz4"


def io_dims(config: RunConfig) -> tuple[int, int]:
    """``(in_dim, out_dim)`` of a run's network: the dataset's flattened input size and K outputs
    (the number of classes, 1 for a binary task)."""
    try:
        in_dim = DATASET_DIMS[config.dataset]
    except KeyError:
        raise UserError(f"dataset {config.dataset!r}: no input size known to the planner") from None
    k = len(config.classes) if config.classes else NUM_CLASSES
    return in_dim, 1 if k == 2 else k


def num_params(in_dim: int, width: int, depth: int, out_dim: int) -> int:
    """Weights and biases of ``depth`` hidden layers of ``width`` and a linear readout."""
    if depth == 0:
        return out_dim * (in_dim + 1)
    return width * (in_dim + 1) + (depth - 1) * width * (width + 1) + out_dim * (width + 1)


# --------------------------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class DeviceClass:
    """Where a training task runs, and the rates its time estimate assumes.

    ``matmul_flops``: sustained float32 rate of the torch work (training, empirical NTKs), FLOP/s, for the
    whole device (GPU) or per thread (CPU, times the task's ``num_cpus``). ``host_flops_per_cpu``: float64
    LAPACK/BLAS rate of the numpy work (spectra, closed forms) per CPU thread. ``step_overhead_s``: fixed
    cost of one training step (kernel launches, ``torch.func`` dispatch) for the network plus its
    linearisation. ``memory_bytes``: device memory (GPU) as ``nvidia-smi`` reports it; None on a CPU.
    """

    name: str
    kind: str  # "cpu" or "gpu"
    matmul_flops: float
    host_flops_per_cpu: float
    step_overhead_s: float
    memory_bytes: int | None = None
    note: str = ""


# This machine: 2-core AMD EPYC, torch 2.13 CPU. bench/RESULTS.md: float32 sgemm 64-79 GFLOP/s per thread on
# large products; training-sized matmuls (thin, vmapped) run at about half of that.
CPU = DeviceClass("cpu", "cpu", matmul_flops=40e9, host_flops_per_cpu=15e9, step_overhead_s=5e-3,
                  note="this machine's CPU: float32 40 GFLOP/s and float64 LAPACK 15 GFLOP/s per thread, 5 ms per step")

# (float32 peak without tensor cores, TFLOP/s; memory in MiB as nvidia-smi reports it). torch keeps TF32
# off for matmuls by default, so the float32 peak is the relevant one; the estimate assumes half of it.
GPU_SPECS = {
    "T4": (8.1, 15_360), "A10G": (31.2, 23_028), "L4": (30.3, 23_034), "L40S": (91.6, 46_068),
    "V100": (15.7, 16_384), "A100": (19.5, 40_960), "A100-80GB": (19.5, 81_920), "H100": (67.0, 81_559),
    "H200": (67.0, 143_771),
}
# The memory-bound numpy work per entry of each (N, N) empirical NTK a task forms (float64 conversion, the
# analytic panel, differences and squares; measured: 4.6 s for two NTKs at N = 12,000 on this machine).
HOST_SECONDS_PER_NTK_ENTRY = 1.6e-8
GPU_EFFICIENCY = 0.5
GPU_STEP_OVERHEAD_S = 8e-3  # ~a hundred small kernels per vmapped step of network + linearisation (launch-bound)
GPU_HOST_FLOPS_PER_CPU = 15e9  # numpy float64 on the node's CPU (g5: AMD EPYC 7R32), per thread
CUDA_CONTEXT_BYTES = 500 * MIB  # per process that touches the GPU, outside torch's allocator
# A task fits a GPU share only with this much room over its estimate: the caching allocator's fragmentation,
# and an estimate that was not measured on a GPU.
GPU_MEMORY_MARGIN = 1.1


def gpu_class(name: str) -> DeviceClass:
    """A :class:`DeviceClass` for a GPU named as in :data:`GPU_SPECS` (case-insensitive)."""
    key = {k.lower(): k for k in GPU_SPECS}.get(name.lower())
    if key is None:
        raise UserError(f"--gpu {name}: unknown GPU class (known: {', '.join(GPU_SPECS)})")
    peak, mib = GPU_SPECS[key]
    return DeviceClass(
        key, "gpu", matmul_flops=peak * 1e12 * GPU_EFFICIENCY, host_flops_per_cpu=GPU_HOST_FLOPS_PER_CPU,
        step_overhead_s=GPU_STEP_OVERHEAD_S, memory_bytes=mib * MIB,
        note=f"{key}: float32 {peak:g} TFLOP/s peak, {GPU_EFFICIENCY:.0%} sustained; {mib / 1024:.1f} GiB; "
             f"{GPU_STEP_OVERHEAD_S * 1e3:g} ms launch overhead per step; numpy float64 on the host "
             f"{GPU_HOST_FLOPS_PER_CPU / 1e9:g} GFLOP/s per CPU",
    )


DEFAULT_GPU = "A10G"


def device_class(name: str | DeviceClass | None, config: RunConfig | None = None) -> DeviceClass:
    """Resolve ``"cpu"``, ``"gpu"`` (:data:`DEFAULT_GPU`), a GPU class name (:data:`GPU_SPECS`), or None: a CPU
    unless the config asks for ``cuda``."""
    if isinstance(name, DeviceClass):
        return name
    if name is None:
        name = "gpu" if config is not None and config.device == "cuda" else "cpu"
    if name.lower() == "gpu":
        name = DEFAULT_GPU
    return CPU if name.lower() == "cpu" else gpu_class(name)


# --------------------------------------------------------------------------------------------- estimates


@dataclass
class RunEstimate:
    """The cost of one Ray training task (a pack of ``seeds`` runs that differ only in seed).

    Bytes are bytes; ``flops`` counts multiply and add separately; ``seconds`` is wall time on
    ``device``. ``host_phases``: the bytes above the baseline in each phase of the task
    (:func:`host_memory`; the peak is the baseline plus the largest phase).
    """

    seeds: int
    params: int
    host_peak_bytes: int
    device_peak_bytes: int
    flops: float
    device_flops: float
    host_flops: float
    gram_bytes: int
    seconds: float
    device: str
    host_phases: dict[str, int] = field(default_factory=dict)


# Memory model constants (bytes), fitted once to bench/plan_memory.py on this machine (bench/RESULTS.md).
# Baselines: the resident set of a Ray worker at the start of a task (interpreter, torch, numpy, scipy, Ray's
# core worker; VmHWM is reset there) plus what the task pages in (pipeline.run, LAPACK, the allocator's
# retained heap). On a GPU node the CUDA runtime maps its libraries into the host process too (not measured).
TRAIN_BASELINE_BYTES = 600 * MIB
ANALYTIC_BASELINE_BYTES = 440 * MIB
GRAM_WRITER_BYTES = 120 * MIB  # dask, zarr and blosc paged in by the first Gram a worker writes
CUDA_HOST_BYTES = 1536 * MIB
# The training step's working set beyond the state it updates (measured with torch.func on this CPU): about
# 3.5 copies of the parameters (gradients, update temporaries) and depth + 6 (S, n, width) activations.
STEP_PARAM_COPIES = 3.5
STEP_ACTIVATIONS = 6
# glibc's malloc serves blocks under its mmap threshold (32 MiB once raised) from the heap and keeps them
# when freed: the training loop's (S, n, width) temporaries then hold about 3x their live size in the
# resident set, larger ones about 1.3x (measured with the training step on this CPU).
MMAP_THRESHOLD = 32 * MIB
HEAP_RETENTION_SMALL = 3.0
HEAP_RETENTION_LARGE = 1.3


def heap_retention(block_bytes: float) -> float:
    """Resident bytes per live byte of repeatedly allocated and freed blocks of this size (glibc malloc)."""
    return HEAP_RETENTION_SMALL if block_bytes < MMAP_THRESHOLD else HEAP_RETENTION_LARGE
# numpy's eigh (with vectors): a working copy of the matrix plus dsyevd's 2 n^2 workspace.
EIGH_COPIES = 3


def _itemsize(config: RunConfig) -> int:
    return 8 if config.dtype == "float64" else 4


def ntk_memory(n1: int, n2: int, in_dim: int, width: int, depth: int, k: int, itemsize: int, *,
               trace: bool = True, symmetric: bool = False) -> float:
    """Bytes of one :func:`kernels.empirical.empirical_ntk` call (structured, ``n1 x n2`` inputs): its output
    (``(n1, n2)``, or ``(n1, n2, K, K)`` untraced, plus the final copy of a symmetrised or permuted output),
    the per-input features of the row panel and column chunk (or of every column, when they are cached) and
    the pair temporaries, tiled by the function's own :func:`~kernels.empirical.plan_blocks`."""
    from kernels.empirical import plan_blocks  # the trainer's tiling, exactly

    per_input = itemsize * (in_dim + depth * width * (2 + (k if depth > 1 or not trace else 1)) + k)
    per_pair = itemsize * (3 if trace else 2 * k * k + 1)
    plan = plan_blocks(n1, n2, per_input, symmetric=symmetric, bytes_per_pair=per_pair)
    out = float(n1) * n2 * itemsize * (1 if trace else k * k)
    copy = symmetric or not trace  # symmetrised, or made contiguous after the (N1, N2, K, K) permute
    if plan.rows >= n1 and plan.cols >= n2:  # one block: its temporaries hold the output
        feats = (n1 if symmetric else n1 + n2) * per_input
        return feats + max(n1 * n2 * per_pair, out * (2 if copy else 1))
    feats = (plan.rows + (n2 if plan.cache else plan.cols)) * per_input
    return max(feats + out + plan.rows * plan.cols * per_pair, out * (2 if copy else 1))


def panel_rows(n: int, big_n: int, width: int) -> list[int]:
    """Row counts of the panels in which the run forms its empirical NTKs for their norms
    (:func:`pipeline.measures.norm_panels`)."""
    return [r1 - r0 for r0, r1 in norm_panels(n, big_n, width)]


def _panel_memory(n: int, big_n: int, in_dim: int, width: int, depth: int, k: int, b: int, t: float) -> float:
    """Peak bytes of the kernel-norm panels: for panel ``i`` of ``R_i`` rows, the float64 ``(R_i, N)`` panels
    alive together (this panel's init NTK, the analytic panel, their difference and its square, and the
    previous panel's final NTK, not yet rebound: ``(32 R_i + 8 R_{i-1}) N``), or one empirical NTK being
    formed (``t`` x :func:`ntk_memory`) beside the float64 panels still held."""
    peak, prev = 0.0, 0
    for rows in panel_rows(n, big_n, width):
        forming = t * ntk_memory(rows, big_n, in_dim, width, depth, k, b)
        peak = max(peak, (32.0 * rows + 8.0 * prev) * big_n, 16.0 * prev * big_n + forming,
                   8.0 * (rows + prev) * big_n + forming)
        prev = rows
    return peak


def host_memory(configs: list[RunConfig], in_dim: int, out_dim: int, on_gpu: bool = False,
                store: str = "none") -> dict[str, float]:
    """Bytes the training task of a pack holds in each phase of :func:`pipeline.run.train_runs`, above
    :data:`TRAIN_BASELINE_BYTES`; its peak is the baseline plus the largest phase.

    Every phase counts the object-store pages touched by then (the subset, ``N d`` float32; the analytic
    blocks, ``8 (N^2 + n m)`` bytes once the measurements read them: a worker's resident set includes the
    shared pages it reads), the torch state alive (``S`` seeds' parameters: modules and ``params0``, then
    ``params``, ``delta`` and the last gradients) and the phase's own arrays:

    ``init_blocks`` (``n K <= 4096``): per seed the ``(N, n, K, K)`` empirical NTK, in float64 and its
    transposed copy (``16 N n K^2``); ``init_power``: the power iteration's activations; ``tracker`` (``n <=
    4096``): eigh of the analytic train NTK; ``train``: a GD step of network and linearisation (its
    activation-sized temporaries times :func:`heap_retention`);
    ``closed_form`` (``gd`` with ``steps >= n``): eigh of the analytic train NTK again; ``measure``: a row
    panel of both empirical NTKs against all ``N`` points, in the model dtype and in float64 with the analytic
    panel and their differences; ``spectrum`` (``n <= 4096``): the train-set empirical NTK and its eigenvalues;
    ``grams`` (``store`` not none): a 2048-tile of the Gram the worker writes. ``on_gpu``: torch tensors live
    on the device and do not count here.
    """
    c, s = configs[0], len(configs)
    n, m, k, b = c.n_train, c.n_test, out_dim, _itemsize(c)
    big_n, w, depth = n + m, c.width, c.depth
    t = 0.0 if on_gpu else 1.0  # torch tensors count on the host only on a CPU
    p = float(num_params(in_dim, w, depth, k))
    subset = big_n * (in_dim + 2 * k) * 4.0
    shm_all = subset + 8.0 * (big_n * big_n + n * m)
    acts = float(s) * n * w * b  # one (S, n, width) tensor
    tracked = n <= MAX_EIGH
    vec = 8.0 * n * n if tracked else 0.0
    ph: dict[str, float] = {}
    state0 = t * 2 * s * p * b
    if n * k <= MAX_FULL_NTK:
        blocks = float(big_n) * n * k * k
        ntk = ntk_memory(big_n, n, in_dim, w, depth, k, b, trace=False)
        ph["init_blocks"] = subset + state0 + max(t * ntk, (4 * t + 8) * blocks, 16 * blocks)
    else:
        one = float(n) * w * b
        ph["init_power"] = subset + state0 + t * (3 * p * b + heap_retention(one) * (depth + STEP_ACTIVATIONS) * one)
    if tracked:
        ph["tracker"] = subset + state0 + 8.0 * n * n * (1 + EIGH_COPIES)
    ph["train"] = subset + (2 * vec) + t * ((4 + STEP_PARAM_COPIES) * s * p * b
                                            + heap_retention(acts) * (depth + STEP_ACTIVATIONS) * acts)
    state = t * 6 * s * p * b  # modules, params0, params, delta, the last two gradients
    if c.optimizer == "gd" and c.steps >= n:
        ph["closed_form"] = subset + 8.0 * (n * n + n * m) + vec + state + 8.0 * n * n * EIGH_COPIES
    state += t * 2 * p * b  # model0 and model_t of the seed being measured
    ph["measure"] = shm_all + vec + state + _panel_memory(n, big_n, in_dim, w, depth, k, b, t)
    if tracked:
        ph["spectrum"] = shm_all + vec + state + t * ntk_memory(n, n, in_dim, w, depth, k, b, symmetric=True) \
            + (16 + 4 * t) * n * n
    if store != "none":
        tile = min(big_n, 2048)
        ph["grams"] = shm_all + vec + state + GRAM_WRITER_BYTES + big_n * in_dim * 4.0 + \
            t * ntk_memory(tile, tile, in_dim, w, depth, k, b) + 4.0 * tile * tile * 4
    return ph


def device_memory(configs: list[RunConfig], in_dim: int, out_dim: int, store: str = "none") -> float:
    """Peak GPU bytes of a pack's training task: the CUDA context plus the torch tensors of
    :func:`host_memory`'s phases (parameters and their copies, activations, empirical-NTK features, outputs
    and the float64 copies made on the device before they move to the host). Not measured (no GPU)."""
    c, s = configs[0], len(configs)
    n, m, k, b = c.n_train, c.n_test, out_dim, _itemsize(c)
    big_n, w, depth = n + m, c.width, c.depth
    p = float(num_params(in_dim, w, depth, k))
    data = big_n * (in_dim + 2 * k) * b * 2.0  # x, y and x_all = train ++ test
    acts = float(s) * n * w * b
    ph = [(4 + STEP_PARAM_COPIES) * s * p * b + (depth + STEP_ACTIVATIONS) * acts]
    if n * k <= MAX_FULL_NTK:
        blocks = float(big_n) * n * k * k
        ph.append(2 * s * p * b + ntk_memory(big_n, n, in_dim, w, depth, k, b, trace=False) + 8 * blocks)
    else:
        ph.append(2 * s * p * b + 3 * p * b + (depth + STEP_ACTIVATIONS) * n * w * b)
    state = (6 * s + 2) * p * b
    rows = max(panel_rows(n, big_n, w))
    ph.append(state + ntk_memory(rows, big_n, in_dim, w, depth, k, b) + 8.0 * rows * big_n)
    if n <= MAX_EIGH:
        ph.append(state + ntk_memory(n, n, in_dim, w, depth, k, b, symmetric=True) + 8.0 * n * n)
    if store != "none":
        tile = min(big_n, 2048)
        ph.append(state + ntk_memory(tile, tile, in_dim, w, depth, k, b))
    return CUDA_CONTEXT_BYTES + data + max(ph)


def _features_flops(points: int, in_dim: int, width: int, depth: int, k: int) -> float:
    """The structured empirical NTK's per-input features: a forward pass and the back-propagated deltas."""
    return 2.0 * points * num_params(in_dim, width, depth, k) + 2.0 * points * k * width * width * max(depth - 1, 0)


def _ntk_flops(n1: int, n2: int, in_dim: int, width: int, depth: int, k: int, trace: bool) -> float:
    """Structured empirical NTK between ``n1`` and ``n2`` inputs: features (forward passes, back-propagated
    deltas) and the per-layer Gram products (``2 n1 n2`` per feature)."""
    feats = _features_flops(n1 + n2 if n1 != n2 else n1, in_dim, width, depth, k)
    fans = [in_dim] + [width] * depth
    deltas = ([width] + [k * width] * (depth - 1) if trace else [k * width] * depth) if depth else []
    gram = 2.0 * n1 * n2 * (sum(fans) + sum(deltas)) * (1 if trace else k)
    return feats + gram


def flops(configs: list[RunConfig], in_dim: int, out_dim: int, store: str = "none") -> tuple[float, float]:
    """``(device_flops, host_flops)`` of a pack's training task.

    Device (torch, the model dtype): per step and seed ``6 b P`` for the network (forward ``2 b P``, backward
    ``4 b P``) and ``8 b P`` for the linearised model (jvp forward ``4 b P``, its gradient ``4 b P``) over a
    batch of ``b`` points; ``6 N P`` per logged evaluation; the empirical NTK at init and at the end (and once
    more per Gram stored, the worker recomputing it tile by tile); the init ``(N, n, K, K)`` blocks when
    ``n K <= 4096``, else 60 power iterations (``8 n P`` each); the features recomputed per kernel-norm panel.
    Host (numpy float64): eigendecompositions
    (``4 m^3`` with vectors, ``4/3 m^3`` values only), the closed forms (``2 t m^2 K`` when iterated), the
    per-seed NTK-from-own-f0 solve product.
    """
    c, s = configs[0], len(configs)
    n, m, k = c.n_train, c.n_test, out_dim
    big_n = n + m
    p = num_params(in_dim, c.width, c.depth, k)
    batch = c.batch_size or n
    evals = len(log_steps(c.steps, c.log_points))
    dev = s * (c.steps * 14.0 * batch * p + evals * 6.0 * big_n * p)
    grams = {"none": 0, "init": 1, "init+final": 2}.get(store, 0)
    dev += s * (2 + grams) * _ntk_flops(big_n, big_n, in_dim, c.width, c.depth, k, trace=True)
    # The kernel norms form both NTKs in row panels, recomputing the N column points' features for each.
    panels = len(panel_rows(n, big_n, c.width))
    dev += s * 2 * (panels - 1) * _features_flops(big_n, in_dim, c.width, c.depth, k)
    host = 0.0
    if n * k <= MAX_FULL_NTK:
        dev += s * _ntk_flops(big_n, n, in_dim, c.width, c.depth, k, trace=False)
        nk = n * k
        host += s * (200.0 * nk * nk)  # Lanczos top eigenvalue
        if c.optimizer == "gd":
            host += s * (2.0 * c.steps * nk * nk if c.steps < nk else 4.0 * nk**3) + s * 2.0 * m * k * nk
    else:
        dev += s * 60 * 8.0 * n * p
    if n <= MAX_EIGH:
        host += 4.0 * n**3 + s * 2 * (4.0 / 3.0) * n**3  # tracker eigenbasis; init and final spectra per seed
        host += evals * s * 2 * 2.0 * n * n * k  # residual energies per band
    if c.optimizer == "gd":
        rhs = k * (s + 1)
        host += 2.0 * c.steps * n * n * rhs if c.steps < n else 4.0 * n**3 + 4.0 * n * n * rhs
        host += 2.0 * m * n * rhs
    host += s * (2.0 * m * n * k + 3 * 8.0 * big_n * big_n)  # own-f0 prediction; float64 norms of three (N, N)
    return dev, host


def analytic_flops(config: RunConfig, in_dim: int) -> float:
    """The analytic task: input Grams (``2 N^2 d``), ~30 flops per entry and layer of the recursion for NTK
    and NNGP, the top eigenvalue, a Cholesky and solve of the NTK (``n^3/3 + 2 n^2 m``) and of the NNGP."""
    n, m = config.n_train, config.n_test
    big_n = n + m
    work = 2.0 * big_n * big_n * in_dim * 2 + 30.0 * big_n * big_n * max(config.depth, 1) * 2
    work += 200.0 * n * n + 2 * (n**3 / 3.0) + 2.0 * n * n * m
    if n <= MAX_EIGH:
        work += (4.0 / 3.0) * n**3
    return work


def estimate_analytic(config: RunConfig, in_dim: int, out_dim: int) -> int:
    """Peak host bytes of the Ray task that computes the analytic kernels of a (subset, architecture)
    (:func:`pipeline.limits.analytic_blocks`): :data:`ANALYTIC_BASELINE_BYTES`, the float64 inputs, tile
    temporaries (a dozen ``1024^2`` float64), the NTK blocks it returns (``8 (n^2 + n m + m^2)``, then the
    ``n m`` solver) and at its largest either a Cholesky factorisation (the regularised copy and LAPACK's
    Fortran-ordered copy, ``16 n^2``) with its solve, the copy of the result into the object store, or the
    write of the NNGP test block (a dozen float64 tiles of ``min(m, 2048)^2`` beside the blocks)."""
    n, m = config.n_train, config.n_test
    big_n = n + m
    inputs = 8.0 * big_n * in_dim + big_n * (in_dim + 2 * out_dim) * 4.0
    blocks = 8.0 * (n * n + n * m + m * m)  # ntk_tr, ntk_te_tr, ntk_te_te
    factor = 2 * 8.0 * n * n  # the regularised copy and LAPACK's Fortran-ordered copy
    solve = blocks + factor + 8.0 * n * m
    spectrum = blocks + 2 * 8.0 * n * n if n <= MAX_EIGH else 0.0
    outputs = blocks + 8.0 * n * m  # with ntk_solver
    nngp = outputs + factor + 8.0 * n * m
    ship = 2 * outputs  # the result copied into the object store
    tile = min(m, MAX_BLOCK)  # the largest tile kernels.tiles chooses for the NNGP test block
    write = outputs + 12 * 8.0 * tile * tile  # then the NNGP test block is written, tile by tile (float64)
    tiles = 12 * 8.0 * 1024 * 1024
    return int(ANALYTIC_BASELINE_BYTES + inputs + tiles + max(solve, spectrum, nngp, ship, write))


def nngp_test_bytes(config: RunConfig, codec: str = GRAM_CODEC) -> int:
    """Bytes on disk of the analytic NNGP on a run's test points (float64 ``(m, m)``, compressed), stored once
    per (subset, architecture) by the task that computes the limits (``GramWriter.write_nngp_test``)."""
    return int(8.0 * config.n_test**2 / GRAM_COMPRESSION.get(codec, 1.0))


GP_POINTS = 256  # pipeline.gp_sample.GP_POINTS (test points behind the bias), without importing torch
GP_BASELINE_BYTES = 400 * MIB


@dataclass
class GpPlan:
    """One init-only task of ``gp_seeds`` (:mod:`pipeline.gp_sample`): ``seeds`` float64 networks of
    ``config``'s width; peak host bytes, FLOPs and seconds on ``num_cpus`` CPU threads."""

    config: RunConfig
    seeds: int
    peak_bytes: int
    flops: float
    seconds: float


def estimate_gp(config: RunConfig, n_test: int, out_dim: int, in_dim: int, seeds: int, num_cpus: float) -> GpPlan:
    """Cost of a ``gp_seeds`` task: per network a float64 forward on the test points, the hidden Grams on the
    first ``GP_POINTS`` of them and ~6 kernel-map evaluations per hidden layer; it holds every residual
    (``seeds x points^2`` float64) and their Gram. Used for the task's Ray ``memory=`` too."""
    points = min(n_test, GP_POINTS)
    w, depth = config.width, max(config.depth, 1)
    forward = 2 * n_test * (in_dim * w + (depth - 1) * w * w + w * out_dim)
    grams = 2 * points**2 * w * (depth - 1)
    maps = 6 * 30 * points**2 * depth * max(depth - 1, 0)
    flops = seeds * (forward + grams + maps) + 2 * seeds**2 * points**2
    held = 8 * (seeds * points**2 + seeds**2) + 4 * seeds * n_test * out_dim + 8 * w * w * depth
    return GpPlan(config, seeds, int(GP_BASELINE_BYTES + 3 * held), flops,
                  flops / (CPU.host_flops_per_cpu * max(1, int(num_cpus))) + 1.0)


def gp_configs(sweep: Sweep, runs: list[RunConfig]) -> list[RunConfig]:
    """The run each ``gp_seeds`` task stands beside: per (group, width) its lowest seed, widths up to
    ``gp_max_width``; none without ``gp_seeds``."""
    if not sweep.gp_seeds:
        return []
    firsts: dict[str, RunConfig] = {}
    for r in runs:
        if sweep.gp_max_width is not None and r.width > sweep.gp_max_width:
            continue
        key = r.model_copy(update={"seed": 0}).run_id  # the (group, width) the run belongs to
        if key not in firsts or r.seed < firsts[key].seed:
            firsts[key] = r
    return list(firsts.values())


def gram_bytes(config: RunConfig, store: str, codec: str = GRAM_CODEC) -> int:
    """Bytes on disk of one run's stored empirical-NTK Grams: float32 ``(N, N)`` per Gram, compressed."""
    count = {"none": 0, "init": 1, "init+final": 2}[store]
    big_n = config.n_train + config.n_test
    return int(count * big_n * big_n * 4 / GRAM_COMPRESSION[codec])


def estimate_pack(configs: list[RunConfig], in_dim: int, out_dim: int, *, store: str = "none",
                  device: str | DeviceClass | None = None, num_cpus: float = 1.0,
                  num_gpus: float = 0.0) -> RunEstimate:
    """Estimate the Ray task that trains ``configs`` (runs equal but for ``seed``) as one pack.

    ``in_dim``/``out_dim``: the network's input size and outputs (:func:`io_dims`). ``store``: the job's
    ``kernels.store`` (the Gram bytes, the FLOPs and memory of writing them). ``device``: where the task
    trains: ``"cpu"``, ``"gpu"`` or a GPU class (:data:`GPU_SPECS`; the class sets only the time), or None:
    where Ray runs it, i.e. on a GPU when the task is given one (``num_gpus > 0``) and the configs' ``device``
    is not ``cpu``, or asks for ``cuda``; else on a CPU. On a CPU every tensor counts in ``host_peak_bytes``
    (far above the same task's host memory on a GPU node, for wide networks). ``num_cpus``, ``num_gpus``: the
    task's Ray resources (``num_cpus`` threads set the CPU rate, and that of the numpy work on a GPU node).
    """
    if not configs:
        raise ValueError("estimate_pack needs at least one config")
    if device is None and num_gpus > 0 and configs[0].device != "cpu":
        device = "gpu"
    dev = device_class(device, configs[0])
    on_gpu = dev.kind == "gpu"
    parts = host_memory(configs, in_dim, out_dim, on_gpu=on_gpu, store=store)
    baseline = TRAIN_BASELINE_BYTES + (CUDA_HOST_BYTES if on_gpu else 0)
    host_peak = baseline + max(parts.values(), default=0.0)
    dev_peak = device_memory(configs, in_dim, out_dim, store) if on_gpu else 0
    dev_flops, host_flops = flops(configs, in_dim, out_dim, store)
    threads = max(1, int(num_cpus))
    c = configs[0]
    if on_gpu:
        compute = dev_flops / dev.matmul_flops
    else:
        compute = dev_flops / (dev.matmul_flops * threads)
    big_n = c.n_train + c.n_test
    formed = len(configs) * (2 + {"none": 0, "init": 1, "init+final": 2}.get(store, 0))
    memory_bound = formed * big_n * big_n * HOST_SECONDS_PER_NTK_ENTRY  # float64 panels, norms, Gram writes
    seconds = (compute + host_flops / (dev.host_flops_per_cpu * threads) + memory_bound
               + dev.step_overhead_s * c.steps + 2.0)
    return RunEstimate(
        seeds=len(configs), params=num_params(in_dim, c.width, c.depth, out_dim), host_peak_bytes=int(host_peak),
        device_peak_bytes=int(dev_peak), flops=dev_flops + host_flops, device_flops=dev_flops,
        host_flops=host_flops, gram_bytes=sum(gram_bytes(r, store) for r in configs), seconds=seconds,
        device=dev.name, host_phases={k: int(v) for k, v in parts.items()},
    )


# --------------------------------------------------------------------------------------------- sizes


def largest_host_memory() -> tuple[int, str]:
    """The most memory any node the planner knows gives its tasks, and which node that is: Ray's default
    share (:data:`RAY_TASK_MEMORY_FRACTION`) of the largest instance type in :data:`INSTANCE_TYPES`."""
    name, spec = max(INSTANCE_TYPES.items(), key=lambda item: item[1][1])
    return int(spec[1] * GIB * RAY_TASK_MEMORY_FRACTION), name


def largest_gpu_memory() -> tuple[int, str]:
    """The memory of the largest GPU class in :data:`GPU_SPECS`, and its name."""
    name, spec = max(GPU_SPECS.items(), key=lambda item: item[1][1])
    return spec[1] * MIB, name


def _first_path(sweep: Sweep, config: RunConfig, blame: str) -> str:
    """The job field path (``widths[2]``, ``datasets[0].n_train[1]``, ...) that holds ``config``'s ``blame``
    value (``width``, ``n_train``, ``n_test``, ``depth``, ``seeds``)."""
    if blame == "width":
        return f"widths[{sweep.widths.index(config.width)}]"
    if blame == "seeds":
        return "seeds"
    if blame == "depth":
        for a, arch in enumerate(sweep.architectures):
            if config.depth in arch.depth:
                return f"architectures[{a}].depth[{arch.depth.index(config.depth)}]"
    for d, ds in enumerate(sweep.datasets):
        if ds.name == config.dataset and config.n_train in ds.n_train and ds.n_test == config.n_test:
            if blame == "n_test":
                return f"datasets[{d}].n_test"
            return f"datasets[{d}].n_train[{ds.n_train.index(config.n_train)}]"
    return "datasets"


def check_sizes(sweep: Sweep, runs: list[RunConfig], source: str) -> None:
    """Refuse, in one line naming the field, a sweep with a task that no device can hold: by the memory
    model (:func:`estimate_pack`, :func:`estimate_analytic`), its host memory above the most any node the
    planner knows gives a task (:func:`largest_host_memory`: 70 % of a 2 TiB p5.48xlarge), or its GPU
    memory (with :data:`GPU_MEMORY_MARGIN` to spare) above its share of the largest GPU (an H200's 140 GiB).

    ``runs``: ``sweep.expand()``. Estimates are made once per task shape. A real cluster may be smaller:
    the runner checks each task against the nodes it actually has (:func:`pipeline.ray_session.check_task_fits`).
    """
    host_limit, host_node = largest_host_memory()
    gpu_bytes, gpu_name = largest_gpu_memory()
    res = sweep.resources
    on_gpu = res.num_gpus > 0 and sweep.device != "cpu"
    device = "gpu" if on_gpu else "cpu"
    gpu_limit = gpu_bytes * min(1.0, res.num_gpus) / GPU_MEMORY_MARGIN
    store = sweep.kernels.store

    def fits(pack: list[RunConfig]) -> tuple[bool, str]:
        in_dim, out_dim = io_dims(pack[0])
        est = estimate_pack(pack, in_dim, out_dim, store=store, device=device, num_cpus=res.num_cpus,
                            num_gpus=res.num_gpus)
        if est.host_peak_bytes > host_limit:
            return False, f"{_gib(est.host_peak_bytes)} of host memory, more than any node ntk-sweep knows " \
                          f"gives a task ({_gib(host_limit)} on a {host_node})"
        if on_gpu and est.device_peak_bytes > gpu_limit:
            return False, f"{_gib(est.device_peak_bytes)} of GPU memory, more than {_gib(gpu_limit)} " \
                          f"({min(1.0, res.num_gpus):g} of an {gpu_name}, {GPU_MEMORY_MARGIN - 1:.0%} to spare)"
        return True, ""

    seen: set[tuple] = set()
    for pack in make_packs(runs, res.pack_seeds, res.pack_max_width):
        c = pack[0]
        in_dim, out_dim = io_dims(c)
        shape = (c.dataset, c.n_train, c.n_test, out_dim, c.depth, c.width, c.dtype, c.optimizer,
                 c.steps >= c.n_train, len(pack))
        if shape in seen:
            continue
        seen.add(shape)
        what = (f"{c.dataset} n_train {c.n_train:,}, n_test {c.n_test:,}, depth {c.depth}, width {c.width:,}, "
                f"{len(pack)} seed{'s' if len(pack) > 1 else ''}")
        # The analytic kernels first: closed form, and it bounds N before the panel loops of the training model.
        analytic = estimate_analytic(c, in_dim, out_dim)
        if analytic > host_limit:
            blame = "n_test" if c.n_test > c.n_train else "n_train"
            raise UserError(f"{source}: {_first_path(sweep, c, blame)}: the analytic kernels of {what} need an "
                            f"estimated {_gib(analytic)} of host memory, more than any node ntk-sweep knows gives "
                            f"a task ({_gib(host_limit)} on a {host_node}); see `ntk-sweep plan`")
        ok, why = fits(pack)
        if ok:
            continue
        if len(pack) > 1 and fits(pack[:1])[0]:
            blame = "seeds"  # the seeds packed together: pack_max_width below this width trains them apart
        elif c.width > 1 and fits([c.model_copy(update={"width": 1})])[0]:
            blame = "width"
        elif c.depth > 1 and fits([c.model_copy(update={"depth": 1})])[0]:
            blame = "depth"
        else:
            blame = "n_test" if c.n_test > c.n_train else "n_train"
        hint = f" (or set resources.pack_max_width below {c.width})" if blame == "seeds" else ""
        raise UserError(f"{source}: {_first_path(sweep, c, blame)}: a task of {what} needs an estimated {why}"
                        f"{hint}; see `ntk-sweep plan`")


# --------------------------------------------------------------------------------------------- clusters

# Known EC2 instance types: (vCPUs, RAM GiB, GPUs, GPU class). Used when a node type's `resources` leave
# something out; a type not listed here leaves its memory unknown (say it with `resources: memory`).
INSTANCE_TYPES: dict[str, tuple[int, int, int, str | None]] = {
    **{f"{fam}.{size}": (cpu, ram * mult, 0, None)
       for fam, mult in (("m5", 4), ("m6i", 4), ("m6a", 4), ("m7i", 4), ("c6i", 2), ("c7i", 2), ("r6i", 8))
       for size, cpu, ram in (("large", 2, 2), ("xlarge", 4, 4), ("2xlarge", 8, 8), ("4xlarge", 16, 16),
                              ("8xlarge", 32, 32), ("12xlarge", 48, 48), ("16xlarge", 64, 64))},
    "g5.xlarge": (4, 16, 1, "A10G"), "g5.2xlarge": (8, 32, 1, "A10G"), "g5.4xlarge": (16, 64, 1, "A10G"),
    "g5.8xlarge": (32, 128, 1, "A10G"), "g5.12xlarge": (48, 192, 4, "A10G"), "g5.16xlarge": (64, 256, 1, "A10G"),
    "g5.24xlarge": (96, 384, 4, "A10G"), "g5.48xlarge": (192, 768, 8, "A10G"),
    "g4dn.xlarge": (4, 16, 1, "T4"), "g4dn.2xlarge": (8, 32, 1, "T4"), "g4dn.4xlarge": (16, 64, 1, "T4"),
    "g4dn.12xlarge": (48, 192, 4, "T4"),
    "g6.xlarge": (4, 16, 1, "L4"), "g6.2xlarge": (8, 32, 1, "L4"), "g6.4xlarge": (16, 64, 1, "L4"),
    "g6.12xlarge": (48, 192, 4, "L4"),
    "g6e.xlarge": (4, 32, 1, "L40S"), "g6e.2xlarge": (8, 64, 1, "L40S"), "g6e.4xlarge": (16, 128, 1, "L40S"),
    "p3.2xlarge": (8, 61, 1, "V100"), "p3.8xlarge": (32, 244, 4, "V100"),
    "p4d.24xlarge": (96, 1152, 8, "A100"), "p4de.24xlarge": (96, 1152, 8, "A100-80GB"),
    "p5.48xlarge": (192, 2048, 8, "H100"),
}
# Without `resources: memory`, Ray gives tasks the node's memory less the object store's default 30 %
# (ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION).
RAY_TASK_MEMORY_FRACTION = 0.7


@dataclass(frozen=True)
class NodeType:
    """One entry of ``available_node_types``: what Ray will schedule on it.

    ``memory_bytes``: memory Ray lets tasks use (its ``memory`` resource), None when unknown;
    ``memory_source`` says where it came from. ``gpu``: the class of its GPUs, None without GPUs."""

    name: str
    instance_type: str | None
    cpus: float
    gpus: float
    gpu: DeviceClass | None
    memory_bytes: int | None
    memory_source: str
    max_workers: int
    head: bool


@dataclass(frozen=True)
class Cluster:
    path: str
    max_workers: int
    node_types: tuple[NodeType, ...]


def _cluster_error(path: str, where: str, message: str) -> UserError:
    return UserError(f"{path}: {where}: {message}")


def _number(path: str, where: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise _cluster_error(path, where, f"must be a {'positive' if positive else 'non-negative'} number, "
                                          f"got {value!r}")
    return float(value)


def load_cluster(path: str | Path) -> Cluster:
    """Read the node types of a Ray cluster-launcher YAML. Raises :class:`UserError` naming the file and
    the field (``cluster.yaml: available_node_types.gpu_worker.resources.GPU: ...``)."""
    path = str(path)
    data = read_yaml_file(path, "cluster")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a cluster config must be a YAML mapping, got {type(data).__name__}")
    types = data.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise _cluster_error(path, "available_node_types", "must be a non-empty mapping of node types")
    head_name = data.get("head_node_type")
    if head_name not in types:
        raise _cluster_error(path, "head_node_type", f"must name one of available_node_types, got {head_name!r}")
    cluster_max = int(_number(path, "max_workers", data.get("max_workers", 2)))
    nodes = []
    for name, spec in types.items():
        where = f"available_node_types.{name}"
        if not isinstance(spec, dict):
            raise _cluster_error(path, where, "must be a mapping")
        resources = spec.get("resources")
        if not isinstance(resources, dict):
            raise _cluster_error(path, f"{where}.resources", "must be a mapping such as {CPU: 8, GPU: 1}")
        node_config = spec.get("node_config") or {}
        instance = node_config.get("InstanceType") if isinstance(node_config, dict) else None
        if instance is not None and not isinstance(instance, str):
            raise _cluster_error(path, f"{where}.node_config.InstanceType", f"must be a string, got {instance!r}")
        known = INSTANCE_TYPES.get(instance or "")
        if "CPU" in resources:
            cpus = _number(path, f"{where}.resources.CPU", resources["CPU"])
        elif known:
            cpus = float(known[0])
        else:
            raise _cluster_error(path, f"{where}.resources.CPU", f"missing, and instance type {instance!r} is "
                                                                  "not in the planner's table")
        gpus = _number(path, f"{where}.resources.GPU", resources["GPU"]) if "GPU" in resources else \
            float(known[2]) if known else 0.0
        if "memory" in resources:
            memory = int(_number(path, f"{where}.resources.memory", resources["memory"], positive=True))
            if memory < 64 * MIB:
                raise _cluster_error(path, f"{where}.resources.memory",
                                     f"is in bytes (Ray's convention); {memory} is less than 64 MiB")
            source = "resources.memory"
        elif known:
            memory = int(known[1] * GIB * RAY_TASK_MEMORY_FRACTION)
            source = f"{RAY_TASK_MEMORY_FRACTION:.0%} of {instance}'s {known[1]} GiB (Ray's default)"
        else:
            memory, source = None, f"unknown (instance type {instance!r} not in the planner's table; " \
                                   "give resources: memory in bytes)"
        gpu = None
        if gpus > 0:
            gpu = gpu_class(known[3]) if known and known[3] else gpu_class("A10G")
        head = name == head_name
        max_workers = 0 if head else int(_number(path, f"{where}.max_workers", spec.get("max_workers", cluster_max)))
        nodes.append(NodeType(name, instance, cpus, gpus, gpu, memory, source, max_workers, head))
    return Cluster(path, cluster_max, tuple(nodes))


@dataclass(frozen=True)
class Fit:
    """Whether ``count`` tasks of one shape fit a node type: ``at_once`` of them run side by side (CPUs and
    GPU share allow), each needing ``host_bytes`` of host and ``device_bytes`` of GPU memory."""

    node_type: str
    fits: bool
    at_once: int
    reason: str


def fit_task(node: NodeType, num_cpus: float, num_gpus: float, host_bytes: int, device_bytes: int) -> Fit:
    """Does a task with these resources and peaks fit ``node``, ``at_once`` of them at a time?"""
    if num_gpus > 0 and node.gpus == 0:
        return Fit(node.name, False, 0, "no GPU")
    if num_cpus > node.cpus:
        return Fit(node.name, False, 0, f"needs {num_cpus:g} CPUs, node has {node.cpus:g}")
    if num_gpus > node.gpus:
        return Fit(node.name, False, 0, f"needs {num_gpus:g} GPUs, node has {node.gpus:g}")
    at_once = int(node.cpus // num_cpus)
    if num_gpus > 0:
        per_gpu = int(1 // num_gpus) if num_gpus < 1 else 1
        gpu_slots = int(node.gpus) * per_gpu if num_gpus < 1 else int(node.gpus // num_gpus)
        at_once = min(at_once, gpu_slots)
        share = min(num_gpus, 1.0) * node.gpu.memory_bytes
        if device_bytes * GPU_MEMORY_MARGIN > share:
            return Fit(node.name, False, at_once, f"GPU memory {_gib(device_bytes)} (+{GPU_MEMORY_MARGIN - 1:.0%}) > "
                                                  f"its share {_gib(share)} ({num_gpus:g} of {node.gpu.name})")
    if node.memory_bytes is None:
        return Fit(node.name, False, at_once, "node memory unknown")
    if at_once * host_bytes > node.memory_bytes:
        fit_n = int(node.memory_bytes // host_bytes)
        return Fit(node.name, False, at_once, f"memory {at_once} x {_gib(host_bytes)} > {_gib(node.memory_bytes)}"
                                              f" ({fit_n} fit)")
    return Fit(node.name, True, at_once, f"{at_once} at once, {_gib(at_once * host_bytes)} of "
                                         f"{_gib(node.memory_bytes)}")


# --------------------------------------------------------------------------------------------- the plan


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n < 100 * GIB else f"{n / GIB:,.0f} GiB"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@dataclass
class TaskPlan:
    """One training task: its runs (a seed pack or a single run), its estimate, and the analytic task
    of its (subset, architecture)."""

    configs: list[RunConfig]
    in_dim: int
    out_dim: int
    estimate: RunEstimate
    analytic_peak_bytes: int
    fits: list[Fit] = field(default_factory=list)

    @property
    def shape(self) -> tuple:
        c = self.configs[0]
        return (c.dataset, c.n_train, c.n_test, c.depth, c.width, len(self.configs))


@dataclass
class AnalyticPlan:
    config: RunConfig
    peak_bytes: int
    flops: float
    seconds: float
    fits: list[Fit] = field(default_factory=list)


@dataclass
class Plan:
    """A sweep's estimated cost (see the module docstring). ``tasks``: the training tasks in the order the
    runner forms them; ``analytic``: one task per (subset, architecture); ``cluster``: the node types
    given with ``--cluster``."""

    sweep: Sweep
    device: DeviceClass
    tasks: list[TaskPlan]
    analytic: list[AnalyticPlan]
    cluster: Cluster | None = None
    gp: list[GpPlan] = field(default_factory=list)

    # -- per run
    def runs(self) -> list[dict[str, Any]]:
        """One JSON-ready object per run (bytes, FLOPs, seconds; a run's share of its pack's FLOPs, time
        and Grams; the pack's peak memory, which every run of it shares)."""
        res = self.sweep.resources
        rows = []
        for i, task in enumerate(self.tasks):
            est, s = task.estimate, len(task.configs)
            for c in task.configs:
                row = {
                    "run_id": c.run_id, "task": i, "task_seeds": s, "dataset": c.dataset, "n_train": c.n_train,
                    "n_test": c.n_test, "depth": c.depth, "width": c.width, "seed": c.seed, "in_dim": task.in_dim,
                    "out_dim": task.out_dim, "params": est.params, "device": est.device,
                    "num_cpus": res.num_cpus, "num_gpus": res.num_gpus,
                    "peak_memory_bytes": est.host_peak_bytes, "device_peak_memory_bytes": est.device_peak_bytes,
                    "analytic_peak_memory_bytes": task.analytic_peak_bytes,
                    "flops": est.flops / s, "task_flops": est.flops, "seconds": est.seconds / s,
                    "task_seconds": est.seconds, "gram_bytes": est.gram_bytes // s,
                }
                if self.cluster is not None:
                    row["fits"] = {f.node_type: f.fits for f in task.fits}
                rows.append(row)
        return rows

    # -- per sweep
    def totals(self) -> dict[str, Any]:
        res = self.sweep.resources
        train_s = sum(t.estimate.seconds for t in self.tasks)
        analytic_s = sum(a.seconds for a in self.analytic)
        out = {
            "runs": sum(len(t.configs) for t in self.tasks), "tasks": len(self.tasks),
            "analytic_tasks": len(self.analytic), "device": self.device.name,
            "flops": sum(t.estimate.flops for t in self.tasks) + sum(a.flops for a in self.analytic),
            "task_hours": train_s / 3600, "gpu_hours": train_s * res.num_gpus / 3600,
            "cpu_hours": (train_s + analytic_s) * res.num_cpus / 3600,
            "gram_bytes": sum(t.estimate.gram_bytes for t in self.tasks)
            + sum(nngp_test_bytes(a.config) for a in self.analytic),
            "max_peak_memory_bytes": max((t.estimate.host_peak_bytes for t in self.tasks), default=0),
            "max_device_peak_memory_bytes": max((t.estimate.device_peak_bytes for t in self.tasks), default=0),
            "max_analytic_peak_memory_bytes": max((a.peak_bytes for a in self.analytic), default=0),
            "longest_task_seconds": max((t.estimate.seconds for t in self.tasks), default=0.0),
            "gp_tasks": len(self.gp), "gp_cpu_hours": sum(g.seconds for g in self.gp) * res.num_cpus / 3600,
            "max_gp_peak_memory_bytes": max((g.peak_bytes for g in self.gp), default=0),
        }
        out["flops"] += sum(g.flops for g in self.gp)
        out["cpu_hours"] += out["gp_cpu_hours"]
        if self.cluster is not None:
            out["cluster"] = self.cluster_summary()
        return out

    def cluster_summary(self) -> dict[str, Any]:
        """Per node type: do all training (and analytic) task shapes fit, how many at once, and how many
        such nodes the sweep can keep busy (``ceil(tasks / at_once)``), against its ``max_workers``."""
        assert self.cluster is not None
        summary: dict[str, Any] = {"all_fit": True, "node_types": {}}
        train_hosts = []
        for node in self.cluster.node_types:
            fits = [f for t in self.tasks for f in t.fits if f.node_type == node.name]
            an = [f for a in self.analytic for f in a.fits if f.node_type == node.name]
            ok = bool(fits) and all(f.fits for f in fits)
            at_once = min((f.at_once for f in fits), default=0)
            entry = {"instance_type": node.instance_type, "cpus": node.cpus, "gpus": node.gpus,
                     "gpu": node.gpu.name if node.gpu else None, "memory_bytes": node.memory_bytes,
                     "memory_source": node.memory_source, "max_workers": node.max_workers, "head": node.head,
                     "training_tasks_fit": ok, "training_at_once": at_once if ok else 0,
                     "training_misfits": sorted({f.reason for f in fits if not f.fits}),
                     "analytic_tasks_fit": bool(an) and all(f.fits for f in an)}
            if ok:
                entry["nodes_usable"] = math.ceil(len(self.tasks) / at_once) if at_once else 0
                train_hosts.append((node, entry))
            summary["node_types"][node.name] = entry
        workers = [(n, e) for n, e in train_hosts if not n.head]
        summary["all_fit"] = bool(train_hosts) and all(
            any(f.fits for f in t.fits) for t in self.tasks) and all(any(f.fits for f in a.fits) for a in self.analytic)
        if workers:
            node, entry = workers[0]
            at_once = entry["training_at_once"]
            usable = entry["nodes_usable"]
            train_s = sum(t.estimate.seconds for t in self.tasks)
            longest = max((t.estimate.seconds for t in self.tasks), default=0.0)
            # Beyond this many nodes the wall time is the longest task's: more nodes only idle.
            useful = min(usable, math.ceil(train_s / (at_once * longest))) if longest else usable
            max_workers = min(node.max_workers, self.cluster.max_workers)
            nodes = min(usable, max_workers)
            summary.update(training_node_type=node.name, nodes_usable=usable, nodes_useful=useful,
                           nodes_max=nodes, max_workers=max_workers, node_hours=train_s / at_once / 3600,
                           wall_seconds_at_max=max(train_s / max(nodes * at_once, 1), longest),
                           can_grow_to_sweep=max_workers >= useful)
        return summary


def plan_sweep(sweep: Sweep, cluster_path: str | Path | None = None, *, data_dir: str | None = None,
               gpu: str | None = None) -> Plan:
    """Estimate every task of ``sweep`` (see the module docstring).

    Training tasks run on a GPU when the job gives them one (``resources.num_gpus > 0`` and ``device`` not
    ``cpu``): the class is ``gpu``, else that of the cluster's first GPU node type, else A10G; otherwise on
    this machine's CPU. ``cluster_path``: a Ray cluster-launcher YAML to check every task against.
    """
    cluster = load_cluster(cluster_path) if cluster_path is not None else None
    res = sweep.resources
    on_gpu = res.num_gpus > 0 and sweep.device != "cpu"
    if on_gpu:
        name = gpu or next((n.gpu.name for n in (cluster.node_types if cluster else ()) if n.gpu), DEFAULT_GPU)
        dev = device_class(name)
    else:
        dev = CPU
    runs = sweep.expand(data_dir)
    store = sweep.kernels.store
    tasks = []
    analytic: dict[tuple, AnalyticPlan] = {}
    for pack in make_packs(runs, res.pack_seeds, res.pack_max_width):
        in_dim, out_dim = io_dims(pack[0])
        key = analytic_args(pack[0])
        if key not in analytic:
            fl = analytic_flops(pack[0], in_dim)
            analytic[key] = AnalyticPlan(pack[0], estimate_analytic(pack[0], in_dim, out_dim), fl,
                                         fl / (CPU.host_flops_per_cpu * max(1, int(res.num_cpus))) + 2.0)
        est = estimate_pack(pack, in_dim, out_dim, store=store, device=dev, num_cpus=res.num_cpus)
        tasks.append(TaskPlan(pack, in_dim, out_dim, est, analytic[key].peak_bytes))
    gp = []
    for c in gp_configs(sweep, runs):
        in_dim, out_dim = io_dims(c)
        gp.append(estimate_gp(c, c.n_test, out_dim, in_dim, sweep.gp_seeds, res.num_cpus))
    if cluster is not None:
        for task in tasks:
            task.fits = [fit_task(node, res.num_cpus, res.num_gpus if on_gpu else 0.0, task.estimate.host_peak_bytes,
                                  task.estimate.device_peak_bytes) for node in cluster.node_types]
        for a in analytic.values():
            a.fits = [fit_task(node, res.num_cpus, 0.0, a.peak_bytes, 0) for node in cluster.node_types]
    return Plan(sweep, dev, tasks, list(analytic.values()), cluster, gp)


# --------------------------------------------------------------------------------------------- formatting


def format_json(plan: Plan) -> str:
    """The per-run list (:meth:`Plan.runs`) as JSON."""
    return json.dumps(plan.runs(), indent=1)


def assumptions(plan: Plan) -> list[str]:
    """The stated assumptions behind the numbers, one line each."""
    lines = [
        f"time on {plan.device.note}" if plan.device.kind == "gpu" else f"time on {CPU.note}",
        "host memory: peak resident set of the Ray task (0.84-1.10 of the measured peak on this machine's CPU)"
        + ("; on a GPU node plus the CUDA runtime's host pages (~1.5 GiB, not measured)" if plan.device.kind == "gpu"
           else ""),
        f"Grams: float32 (N, N) per stored Gram, {GRAM_CODEC} at {GRAM_COMPRESSION[GRAM_CODEC]}x (measured)",
    ]
    if plan.device.kind == "gpu":
        lines.append(f"GPU memory: first-principles (not measured on a GPU), CUDA context {CUDA_CONTEXT_BYTES // MIB} "
                     f"MiB per task included; a task fits a GPU share with {GPU_MEMORY_MARGIN - 1:.0%} to spare; "
                     "GPU-hours = task seconds x num_gpus (a shared GPU is assumed to give each task its full rate)")
    return lines


def format_table(plan: Plan) -> str:
    """A readable plan: one row per task shape (runs equal but for seed trained as one pack are one task),
    the totals, and, with a cluster, the verdict per node type."""
    res = plan.sweep.resources
    groups: dict[tuple, list[TaskPlan]] = {}
    for t in plan.tasks:
        groups.setdefault(t.shape, []).append(t)
    gpu = plan.device.kind == "gpu"
    head = ["dataset", "n_train", "n_test", "depth", "width", "tasks x seeds", "params", "host peak"]
    head += ["GPU peak"] if gpu else []
    head += ["GFLOP/run", "time/task", "Grams/run"]
    if plan.cluster is not None:
        head.append("fits")
    rows = []
    for (ds, n, m, depth, width, s), tasks in groups.items():
        est = tasks[0].estimate
        row = [ds, f"{n:,}", f"{m:,}", str(depth), f"{width:,}", f"{len(tasks)} x {s}", f"{est.params:,}",
               _gib(est.host_peak_bytes)]
        row += [_gib(est.device_peak_bytes)] if gpu else []
        row += [f"{est.flops / s / 1e9:,.0f}", _duration(est.seconds), _bytes(est.gram_bytes / s)]
        if plan.cluster is not None:
            row.append(", ".join(f.node_type for f in tasks[0].fits if f.fits) or "NONE")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    out = [f"{plan.sweep.name}: {sum(len(t.configs) for t in plan.tasks)} runs in {len(plan.tasks)} training "
           f"tasks ({res.num_cpus:g} CPU{', ' + format(res.num_gpus, 'g') + ' GPU' if gpu else ''} each) + "
           f"{len(plan.analytic)} analytic-kernel tasks, on {plan.device.name}"]
    out.append("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        out.append("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    tot = plan.totals()
    out.append("")
    out.append(f"totals: {tot['flops']:.3g} FLOP; training {tot['task_hours']:,.1f} task-hours"
               + (f" = {tot['gpu_hours']:,.1f} GPU-hours ({plan.device.name}, {res.num_gpus:g} GPU per task)"
                  if gpu else "")
               + f"; {tot['cpu_hours']:,.1f} CPU-hours; Grams on disk {_bytes(tot['gram_bytes'])} "
               f"(kernels.store: {plan.sweep.kernels.store})")
    out.append(f"largest task: host {_gib(tot['max_peak_memory_bytes'])}"
               + (f", GPU {_gib(tot['max_device_peak_memory_bytes'])}" if gpu else "")
               + f", {_duration(tot['longest_task_seconds'])}; largest analytic task: host "
               f"{_gib(tot['max_analytic_peak_memory_bytes'])}")
    if plan.gp:
        widths = sorted({g.config.width for g in plan.gp})
        out.append(f"gp_seeds: {len(plan.gp)} init-only tasks of {plan.sweep.gp_seeds} networks (widths "
                   f"{widths[0]:,}-{widths[-1]:,}), {sum(g.flops for g in plan.gp):.3g} FLOP, "
                   f"{tot['gp_cpu_hours']:,.2f} CPU-hours (included above), longest "
                   f"{_duration(max(g.seconds for g in plan.gp))}, host {_gib(tot['max_gp_peak_memory_bytes'])}")
    if plan.cluster is not None:
        out.append("")
        out.extend(_format_cluster(plan))
    out.append("")
    out.extend(f"assumes: {line}" for line in assumptions(plan))
    return "\n".join(out)


def _format_cluster(plan: Plan) -> list[str]:
    summary = plan.cluster_summary()
    out = [f"cluster {plan.cluster.path}:"]
    for name, e in summary["node_types"].items():
        node = next(n for n in plan.cluster.node_types if n.name == name)
        desc = (f"  {name} ({e['instance_type'] or '?'}{', head' if e['head'] else ''}: {e['cpus']:g} CPU, "
                f"{e['gpus']:g} GPU{' ' + e['gpu'] if e['gpu'] else ''}, task memory "
                f"{_gib(e['memory_bytes']) if e['memory_bytes'] else '?'} from {e['memory_source']})")
        out.append(desc)
        if e["training_tasks_fit"]:
            fits = [f for t in plan.tasks for f in t.fits if f.node_type == name]
            worst = max(plan.tasks, key=lambda t: t.estimate.host_peak_bytes)
            wf = next(f for f in worst.fits if f.node_type == name)
            out.append(f"    training: every task fits, {e['training_at_once']} at once; largest: {wf.reason}"
                       + (f"; GPU {_gib(max(t.estimate.device_peak_bytes for t in plan.tasks))} of "
                          f"{_gib(min(plan.sweep.resources.num_gpus, 1) * node.gpu.memory_bytes)} share"
                          if node.gpu else ""))
            del fits
        elif e["training_misfits"] == ["no GPU"]:
            out.append("    training: no (the tasks need a GPU)")
        else:
            misfits = e["training_misfits"]
            bad = sum(1 for t in plan.tasks for f in t.fits if f.node_type == name and not f.fits)
            out.append(f"    training: {bad} of {len(plan.tasks)} tasks do not fit: " + "; ".join(misfits[:3])
                       + (f" (+{len(misfits) - 3} more)" if len(misfits) > 3 else ""))
        out.append(f"    analytic kernels: {'every task fits' if e['analytic_tasks_fit'] else 'not every task fits'}")
    if "training_node_type" in summary:
        kind = summary["training_node_type"]
        out.append(f"  nodes: {len(plan.tasks)} tasks keep at most {summary['nodes_usable']} {kind} nodes busy; "
                   f"beyond {summary['nodes_useful']} the wall time is the longest task's; the cluster grows to "
                   f"{summary['max_workers']} (max_workers): "
                   + ("enough" if summary["can_grow_to_sweep"] else "FEWER than the sweep can use"))
        out.append(f"  cost: {summary['node_hours']:,.1f} {kind} node-hours; wall time at {summary['nodes_max']} "
                   f"nodes >= {_duration(summary['wall_seconds_at_max'])}")
    out.append("  verdict: " + ("every task fits a node type" if summary["all_fit"]
                                else "NOT every task fits: see above"))
    return out
