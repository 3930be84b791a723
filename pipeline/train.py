"""One training run (or a vmapped pack of seeds) -> :class:`RunResult`: the network beside its
linearisation, their closed forms, and every measurement of the pair.

Loss and dynamics. The objective is ``L(theta) = 1/(2n) sum_i |f(x_i) - y_i|^2`` over the n training
points (K outputs), minimised by plain gradient descent (``gd``: full batch; ``sgd``: seeded
mini-batches of ``batch_size``, the mean over the batch). The linearised model
``f_lin(x) = f(x; theta0) + J(x; theta0)(theta_lin - theta0)`` is trained with the same optimiser,
batches and steps, through ``torch.func.jvp`` (never a materialised Jacobian). For full-batch GD its
training residual evolves exactly as ``r_t = (I - eta Theta_hat0/n)^t r_0``, which gives closed forms:

* ``f_lin`` on test points from the network's own empirical NTK ``Theta_hat0`` (a consistency check:
  equal to the trained linear model up to float rounding);
* the mean predictor of the analytic NTK ``Theta`` (``f_0 = 0``) at the same ``t``;
* kernel regression at ``t = infinity`` with the analytic NTK and NNGP.

Learning rates. ``lr_scale`` (default 0.5) is relative to the critical rate
``2 n / max(lambda_max(Theta), lambda_max(Theta_hat0))``: above it the linearised dynamics diverge,
for the kernel limit (``Theta``, analytic, on the training set) or for this network's own
linearisation (``Theta_hat0``, the full ``nK x nK`` empirical NTK at init, whose top eigenvalue exceeds
the limit's at small width). So ``lr_scale < 1`` is safe at every width, and at large width the rate
is the analytic one. An absolute ``lr`` overrides it. ``lr`` and ``lr_critical`` are recorded per run.

μP (``parameterization: mup``, :mod:`kernels.mlp`: Yang & Hu 2021, Table 3, one global rate for every
layer). Its empirical NTK at init, with respect to its own parameters, equals the NTK-parameterisation one
exactly, so ``lr_critical`` and ``lr_scale`` keep their meaning (the stability edge of the linearised
dynamics at init) and give a width-independent base rate: the same rate as an NTK run of the same seed.
Unlike NTK training, μP training moves that kernel by O(1) at every width, so the network can leave the
linearised regime (and, well above ``lr_scale`` 1, diverge where its linearisation would not). The
measurements are the same, except the ones that compare the network with the kernel-regime limit, which
μP does not follow: :data:`KERNEL_REGIME_ONLY` are NaN under μP (README, column list).

Everything is a pure function of the :class:`~pipeline.run_config.RunConfig` (deterministic on CPU).
"""

from __future__ import annotations

import copy
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

from kernels.analytic import mlp_kernels, mlp_kernels_blocked
from kernels.empirical import empirical_ntk
from kernels.mlp import MLP
from pipeline.data import Subset, make_subset, resolve_data_root
from pipeline.run_config import RunConfig

Tensor = torch.Tensor
DIVERGENCE_FACTOR = 1e6  # a loss this many times its initial value (or non-finite) means diverged
MAX_FULL_NTK = 4096  # n_train * K up to which the (nK x nK) empirical-NTK closed form is computed

SCALAR_METRICS = (
    "train_loss", "test_loss", "train_acc", "test_acc",
    "lin_train_loss", "lin_test_loss", "lin_train_acc", "lin_test_acc",
    "ntk_test_acc", "nngp_test_acc", "ntk_test_loss", "nngp_test_loss", "ntk_own_test_acc", "ntk_own_test_loss",
    "kernel_rel_dev_init", "kernel_rel_change", "kernel_rel_dev_init_train", "kernel_rel_change_train",
    "weight_rel_change", "weight_distance",
    "rmse_nn_lin_test", "agree_nn_lin_test", "rmse_nn_ntk_test", "rmse_nn_ntk_mean_test", "lin_closed_form_rel_err",
    "relu_flip_frac", "lr", "lr_critical", "diverged_step",
    "ntk_eig_min_init", "ntk_eig_max_init", "ntk_cond_init",
    "ntk_eig_min_final", "ntk_eig_max_final", "ntk_cond_final",
    "ntk_eig_min_analytic", "ntk_eig_max_analytic", "ntk_cond_analytic",
    "train_loss_pred_ratio", "train_loss_obs_ratio",
)
# Eigen-bands of the analytic NTK on the training set (indices in decreasing eigenvalue order) over
# which the spectral-bias table sums residual energy; the last band runs to n.
SPECTRAL_BANDS = ((0, 1), (1, 4), (4, 16), (16, 64), (64, None))
MAX_EIGH = 4096  # n_train up to which train-set spectra and the spectral-bias table are computed
# Measures of how the network compares with the kernel-regime (analytic NTK/NNGP) limit of infinitely wide
# networks. μP networks do not have that limit (their kernel moves by O(1) in training), so under μP these
# are NaN rather than a number that reads as a convergence measure.
KERNEL_REGIME_ONLY = (
    "ntk_test_acc", "nngp_test_acc", "ntk_test_loss", "nngp_test_loss", "ntk_own_test_acc", "ntk_own_test_loss",
    "rmse_nn_ntk_test", "rmse_nn_ntk_mean_test", "train_loss_pred_ratio",
)
CURVE_COLUMNS = (
    "step", "train_loss", "test_loss", "train_acc", "test_acc",
    "lin_train_loss", "lin_test_loss", "lin_train_acc", "lin_test_acc",
)


@dataclass
class RunResult:
    """What one run produced.

    ``metrics``: the scalar measurements (``SCALAR_METRICS``, NaN where not measured) plus
    ``weight_rel_change_by_layer`` (list, one per Dense layer, input first). ``curves``: column ->
    list over the logged steps (``CURVE_COLUMNS``). ``ntk_init`` / ``ntk_final``: the traced
    empirical NTK ``(N, N)`` float32 over ``train ++ test`` points, kept only when asked
    (``keep_grams``; a sweep writes them to Zarr in the worker instead). ``peak_rss_bytes``: the peak
    resident memory of the process (task) that trained the pack, as the kernel reports it (VmHWM,
    reset when the pack starts); ``peak_gpu_bytes``: torch's peak CUDA allocation (None on CPU);
    ``analytic_peak_rss_bytes``: the same for the task that computed the run's analytic kernels;
    ``node``: the Ray node id that trained it (empty outside Ray).
    """

    config: RunConfig
    status: str = "ok"
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict)
    ntk_init: np.ndarray | None = None
    ntk_final: np.ndarray | None = None
    spectral: dict[str, list] = field(default_factory=dict)
    f0_test: np.ndarray | None = None
    wall_s: float = float("nan")
    device: str = "cpu"
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    analytic_peak_rss_bytes: int | None = None
    node: str = ""

    @property
    def run_id(self) -> str:
        return self.config.run_id

    def row(self) -> dict[str, Any]:
        """One flat row: config columns, measurements, status."""
        cfg = self.config.model_dump()
        cfg["classes"] = list(cfg["classes"]) if cfg["classes"] is not None else None
        row = {"run_id": self.run_id, **cfg}
        row.update({k: float(self.metrics.get(k, math.nan)) for k in SCALAR_METRICS})
        row["weight_rel_change_by_layer"] = list(self.metrics.get("weight_rel_change_by_layer", []))
        row.update(status=self.status, error=self.error, wall_s=self.wall_s, device=self.device,
                   peak_rss_bytes=self.peak_rss_bytes, peak_gpu_bytes=self.peak_gpu_bytes,
                   analytic_peak_rss_bytes=self.analytic_peak_rss_bytes, node=self.node)
        return row


# ----------------------------------------------------------------------------------------------
# Public entry points


def train_run(config: RunConfig, *, subset: Subset | None = None, analytic: AnalyticBlocks | None = None,
              keep_grams: bool = False) -> RunResult:
    """Train one network and its linearisation. Never raises: failures give ``status="failed"``."""
    return train_runs([config], subset=subset, analytic=analytic, keep_grams=keep_grams)[0]


def train_runs(
    configs: list[RunConfig], *, subset: Subset | None = None, analytic: AnalyticBlocks | None = None,
    keep_grams: bool = False, gram_writer: Callable[[RunResult, MLP, MLP | None, np.ndarray], None] | None = None,
) -> list[RunResult]:
    """Train several seeds of one shape at once (``torch.func.stack_module_state`` + ``vmap``).

    All configs must be equal but for ``seed``. Returns the same results as separate
    :func:`train_run` calls, to float tolerance. ``subset`` and ``analytic`` (the output of
    :func:`analytic_blocks`) may be passed in when the caller already has them. ``keep_grams``: keep the
    ``(N, N)`` empirical NTKs on the results (for tests and small interactive use). ``gram_writer(result,
    model0, model_t, x_all)``: called once per seed after its measurements, in this process, to store its
    Grams (``model_t`` is None when the run diverged); a failure there fails the run.
    """
    if not configs:
        return []
    if len({c.shape_key() for c in configs}) != 1:
        raise ValueError("train_runs packs runs that differ only in seed")
    reset_peak_memory()
    start = time.perf_counter()
    device = torch.device("cpu")
    try:
        device = resolve_device(configs[0].device)  # inside: "cuda" on a node without one is a failed run
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results = _train_pack(configs, device, subset, analytic, keep_grams, gram_writer)
    except Exception as exc:  # noqa: BLE001 - a run records its failure, the sweep goes on
        message = f"{type(exc).__name__}: {exc}"
        results = [RunResult(c, status="failed", error=message[:2000]) for c in configs]
        results[0].metrics["traceback"] = traceback.format_exc()
    wall = (time.perf_counter() - start) / len(configs)
    peak_rss = peak_memory()
    peak_gpu = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    for r in results:
        r.wall_s, r.device = wall, str(device)
        r.peak_rss_bytes, r.peak_gpu_bytes = peak_rss, peak_gpu
    return results


def reset_peak_memory() -> None:
    """Reset this process's peak resident set (VmHWM) so that :func:`peak_memory` measures from now
    (Linux >= 4.0: writing 5 to /proc/self/clear_refs). A pooled Ray worker runs many tasks: without the
    reset, a task would report the largest of its predecessors."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # not Linux, or not permitted: the peak is then the process's lifetime peak
        pass


def peak_memory() -> int | None:
    """Peak resident set of this process in bytes since :func:`reset_peak_memory` (VmHWM), as the kernel
    counts it: private pages plus the shared (object-store) pages this process touched."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def load_subset(config: RunConfig) -> Subset:
    """The (cached) dataset subset a config trains on."""
    return make_subset(
        config.dataset, resolve_data_root(config.data_dir), n_train=config.n_train, n_test=config.n_test,
        seed=config.data_seed, classes=list(config.classes) if config.classes else None,
        preprocess=config.preprocess, label_noise=config.label_noise,
    )


def _arch(config: RunConfig) -> dict[str, Any]:
    """The analytic-kernel arguments of a config. μP maps to NTK: its empirical NTK at init equals the
    NTK-parameterisation one for the same draws (kernels.mlp), so its limit at init is the same ``Theta``."""
    param = "ntk" if config.parameterization == "mup" else config.parameterization
    return dict(depth=config.depth, activation=config.activation, w_std=config.w_std, b_std=config.b_std,
                parameterization=param,
                width=config.width if config.parameterization == "standard" else None)


def analytic_kernels(config: RunConfig, subset: Subset) -> dict[str, np.ndarray]:
    """Analytic NNGP and NTK (float64) over ``train ++ test`` points: ``{"nngp", "ntk"}: (N, N)``.
    Depends on the subset and architecture only, so a sweep computes it once for all widths' seeds
    in NTK parameterisation (the standard-parameterisation NTK depends on the width)."""
    x = np.concatenate([subset.x_train, subset.x_test]).astype(np.float64)
    return mlp_kernels(x, **_arch(config))


ANALYTIC_BLOCK = 1024  # tile edge of the float64 analytic kernels (temporaries ~ a dozen of these squared)


@dataclass
class AnalyticBlocks:
    """What the runs of one (subset, architecture) need of its analytic (infinite-width) kernels, float64.

    n training points, m test points, K outputs. The NTK ``Theta`` in three blocks: ``ntk_tr (n, n)``,
    ``ntk_te_tr (m, n)`` (the train-test block is its transpose) and ``ntk_te_te (m, m)``.
    ``ntk_solver (m, n)``: ``Theta_te,tr (Theta_tr + eps I)^-1``, t = infinity kernel regression for any
    training targets. ``ntk_pred``, ``nngp_pred (m, K)``: the mean predictors at t = infinity of the
    NTK and the NNGP (``K_te,tr K_tr^-1 y``). ``lam_max``: top eigenvalue of ``ntk_tr``; ``spectrum``:
    ``(lambda_min, lambda_max, cond)`` of ``ntk_tr`` when ``n <= MAX_EIGH``. ``peak_rss_bytes``: the peak
    memory of the task that computed them. No ``(N, N)`` NNGP is ever formed: the runs need only its solve.
    """

    ntk_tr: np.ndarray
    ntk_te_tr: np.ndarray
    ntk_te_te: np.ndarray
    ntk_solver: np.ndarray
    ntk_pred: np.ndarray
    nngp_pred: np.ndarray
    lam_max: float
    spectrum: tuple[float, float, float] | None
    peak_rss_bytes: int | None = None

    @property
    def n(self) -> int:
        return len(self.ntk_tr)

    def ntk_block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """``Theta[r0:r1, c0:c1]`` over ``train ++ test`` for a block that lies within one of the
        train/test quadrants (``r0 < r1 <= n`` or ``n <= r0``, and the same for columns)."""
        n = self.n
        if r1 <= n and c1 <= n:
            return self.ntk_tr[r0:r1, c0:c1]
        if r0 >= n and c1 <= n:
            return self.ntk_te_tr[r0 - n:r1 - n, c0:c1]
        if r1 <= n and c0 >= n:
            return self.ntk_te_tr[c0 - n:c1 - n, r0:r1].T
        if r0 >= n and c0 >= n:
            return self.ntk_te_te[r0 - n:r1 - n, c0 - n:c1 - n]
        raise ValueError(f"block [{r0}:{r1}, {c0}:{c1}] straddles the train/test boundary {n}")


SWEEP_DIAG_REG = 1e-10  # of the mean diagonal: numerical safety only, the runs measure the unregularised limit


def _kernel_solve(make: Callable[[], np.ndarray], rhs: np.ndarray, keep: bool) -> np.ndarray:
    """``(K + eps I)^-1 rhs`` by :func:`kernels.solve.solve` (the project's one solver; float64 Cholesky, LU
    when ``K`` is numerically indefinite), ``K = make()`` symmetric PSD, ``eps`` = :data:`SWEEP_DIAG_REG` of
    its mean diagonal. ``keep=False`` factorises ``make()``'s array in place (no copy; rebuilt for the LU
    fallback)."""
    from kernels.solve import IndefiniteInPlace, solve

    args = dict(diag_reg=SWEEP_DIAG_REG, method="float64")
    if keep:
        return solve(make(), rhs, **args).alpha
    try:
        return solve(make(), rhs, overwrite=True, **args).alpha
    except IndefiniteInPlace:
        return solve(make(), rhs, **args).alpha


def analytic_blocks(config: RunConfig, subset: Subset) -> AnalyticBlocks:
    """The :class:`AnalyticBlocks` of a config's subset and architecture. Depends on the subset and the
    architecture only (and the width in standard parameterisation), so a sweep computes it once for all
    the widths' seeds. Peak memory: ``ntk_tr`` and one factor of it, ``2 n^2`` float64, plus the test blocks."""
    reset_peak_memory()
    x_tr, x_te = (np.asarray(a, dtype=np.float64) for a in (subset.x_train, subset.x_test))
    y_tr = subset.y_train.astype(np.float64)
    arch = _arch(config)
    ntk_tr = mlp_kernels_blocked(x_tr, get=("ntk",), block=ANALYTIC_BLOCK, **arch)["ntk"]
    ntk_te_tr = mlp_kernels_blocked(x_te, x_tr, get=("ntk",), block=ANALYTIC_BLOCK, **arch)["ntk"]
    ntk_te_te = mlp_kernels_blocked(x_te, get=("ntk",), block=ANALYTIC_BLOCK, **arch)["ntk"]
    lam_max = top_eigenvalue(ntk_tr)
    spectrum = spectrum_stats(ntk_tr) if len(ntk_tr) <= MAX_EIGH else None
    ntk_solver = np.ascontiguousarray(_kernel_solve(lambda: ntk_tr, ntk_te_tr.T, keep=True).T)  # Theta_tr symmetric
    ntk_pred = ntk_solver @ y_tr
    alpha = _kernel_solve(
        lambda: mlp_kernels_blocked(x_tr, get=("nngp",), block=ANALYTIC_BLOCK, **arch)["nngp"], y_tr, keep=False)
    nngp_te_tr = mlp_kernels_blocked(x_te, x_tr, get=("nngp",), block=ANALYTIC_BLOCK, **arch)["nngp"]
    nngp_pred = nngp_te_tr @ alpha
    return AnalyticBlocks(ntk_tr, ntk_te_tr, ntk_te_te, ntk_solver, ntk_pred, nngp_pred, lam_max, spectrum,
                          peak_memory())


def top_eigenvalue(matrix: np.ndarray) -> float:
    """Largest eigenvalue of a symmetric PSD matrix by Lanczos (a dense eigvalsh costs m^3)."""
    from scipy.sparse.linalg import eigsh

    if len(matrix) <= 64:
        return float(np.linalg.eigvalsh(matrix)[-1])
    return float(eigsh(matrix, k=1, which="LA", tol=1e-10, return_eigenvectors=False)[0])


def critical_lr(theta_train: np.ndarray) -> float:
    """``2 n / lambda_max``: the rate above which GD on the linearised model diverges."""
    return 2.0 * len(theta_train) / top_eigenvalue(theta_train)


def top_ntk_eigenvalue(model: MLP, x: Tensor, iterations: int = 60, seed: int = 0) -> float:
    """Largest eigenvalue of the full ``(nK, nK)`` empirical NTK ``J J^T`` on ``x``, by power iteration
    on NTK-vector products ``J (J^T v)`` (``torch.func`` vjp then jvp; no Jacobian is formed).
    Power iteration approaches from below; 60 iterations leave well under 1% on NTK spectra,
    whose top eigenvalue is well separated."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict) -> Tensor:
        return functional_call(model, p, (x,))

    out, pullback = torch.func.vjp(f, params)
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    lam = 0.0
    for _ in range(iterations):
        v = v / torch.linalg.norm(v)
        (cotangent,) = pullback(v)
        w = jvp(f, (params,), (cotangent,))[1]
        lam = float((v * w).sum())
        v = w
    return lam


def log_steps(steps: int, points: int) -> list[int]:
    """``0``, then about ``points`` log-spaced steps up to and including ``steps``."""
    if steps == 0:
        return [0]
    grid = np.unique(np.round(np.logspace(0, math.log10(steps), points - 1)).astype(int))
    return [0] + [int(s) for s in grid if 0 < s <= steps]


# ----------------------------------------------------------------------------------------------
# The pack trainer


class SpectralTracker:
    """Residual energy per eigen-band of the analytic training-set NTK, at each logged step.

    ``theta_tr: (n, n)``; ``r0: (S, n, K)`` initial residuals ``f0 - y`` of the S seeds; ``lrs``:
    their learning rates. ``record`` takes the current train predictions ``(S, n, K)`` of the
    network and of the linearised model.
    """

    def __init__(self, theta_tr: np.ndarray, y_tr: np.ndarray, r0: np.ndarray, lrs: list[float]) -> None:
        lam, vec = np.linalg.eigh(theta_tr)
        self.lam, self.vec = lam[::-1].clip(min=0.0), vec[:, ::-1]  # decreasing eigenvalues
        n = len(lam)
        self.bands = [(lo, n if hi is None else min(hi, n)) for lo, hi in SPECTRAL_BANDS if lo < n]
        self.y = y_tr
        self.c0_sq = (np.einsum("ni,snk->sik", self.vec, r0) ** 2).sum(-1)  # (S, n)
        self.rates = np.asarray(lrs)[:, None] / n
        self.rows: list[dict[str, list]] = [{k: [] for k in SPECTRAL_COLUMNS} for _ in lrs]

    def energies(self, pred: np.ndarray) -> np.ndarray:
        """``(S, n)`` energy of the residual ``pred - y`` along each eigenvector."""
        return (np.einsum("ni,snk->sik", self.vec, pred - self.y) ** 2).sum(-1)

    def record(self, step: int, nn_tr: np.ndarray, lin_tr: np.ndarray) -> None:
        e_nn, e_lin = self.energies(nn_tr), self.energies(lin_tr)
        with np.errstate(over="ignore", invalid="ignore"):
            e_th = (1 - self.rates * self.lam[None, :]) ** (2 * step) * self.c0_sq
        for s, table in enumerate(self.rows):
            for b, (lo, hi) in enumerate(self.bands):
                row = dict(step=step, band=b, band_lo=lo, band_hi=hi, energy_nn=float(e_nn[s, lo:hi].sum()),
                           energy_lin=float(e_lin[s, lo:hi].sum()), energy_theory=float(e_th[s, lo:hi].sum()))
                for k, v in row.items():
                    table[k].append(v)

    def predicted_loss_ratio(self, s: int, steps: int) -> float:
        """``L_T / L_0`` of GD under the analytic kernel from seed ``s``'s initial residual."""
        decay = (1 - self.rates[s] * self.lam) ** (2 * steps)
        return float((decay * self.c0_sq[s]).sum() / self.c0_sq[s].sum())


SPECTRUM_KEYS = ("ntk_eig_min", "ntk_eig_max", "ntk_cond")
SPECTRAL_COLUMNS = ("step", "band", "band_lo", "band_hi", "energy_nn", "energy_lin", "energy_theory")


def spectrum_stats(kernel: np.ndarray) -> tuple[float, float, float]:
    """(lambda_min, lambda_max, condition number) of a symmetric PSD matrix."""
    lam = np.linalg.eigvalsh(kernel)
    lo, hi = float(lam[0]), float(lam[-1])
    return lo, hi, hi / lo if lo > 0 else math.inf


def _train_pack(configs: list[RunConfig], device: torch.device, subset: Subset | None,
                analytic: AnalyticBlocks | None, keep_grams: bool, gram_writer: Callable | None) -> list[RunResult]:
    cfg = configs[0]
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    subset = subset if subset is not None else load_subset(cfg)
    analytic = analytic if analytic is not None else analytic_blocks(cfg, subset)
    n, k_out = subset.y_train.shape

    def tensor(a: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)

    x_tr, y_tr, x_te, y_te = map(tensor, (subset.x_train, subset.y_train, subset.x_test, subset.y_test))
    x_all = torch.cat([x_tr, x_te])
    models = [MLP(x_tr.shape[1], cfg.width, cfg.depth, k_out, cfg.activation, cfg.w_std, cfg.b_std,
                  cfg.parameterization, seed=c.seed, dtype=dtype).to(device) for c in configs]

    def step_size(g: Tensor) -> Tensor:
        return lr_t.view(-1, *([1] * (g.ndim - 1))) * g

    base = copy.deepcopy(models[0]).to("meta")
    params0, _ = stack_module_state(models)
    params0 = {name: p.detach() for name, p in params0.items()}

    def f(p: dict, x: Tensor) -> Tensor:
        return functional_call(base, p, (x,))

    def f_lin(delta: dict, p0: dict, f0: Tensor, x: Tensor) -> Tensor:
        return f0 + jvp(lambda q: f(q, x), (p0,), (delta,))[1]

    def loss_nn(p: dict, x: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((f(p, x) - y) ** 2).sum(-1).mean()

    def loss_lin(delta: dict, p0: dict, f0: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((f_lin(delta, p0, f0, x) - y) ** 2).sum(-1).mean()

    seeds_batched = cfg.optimizer == "sgd"
    in_x = 0 if seeds_batched else None
    grad_nn = vmap(grad(loss_nn), in_dims=(0, in_x, in_x))
    grad_lin = vmap(grad(loss_lin), in_dims=(0, 0, 0, in_x, in_x))
    forward = vmap(f, in_dims=(0, None))
    forward_lin = vmap(f_lin, in_dims=(0, 0, 0, None))

    with torch.no_grad():
        f0_tr, f0_te = forward(params0, x_tr), forward(params0, x_te)
    # Per seed, one at a time (their (N, n, K, K) blocks are large): the top eigenvalue of the full
    # training-set NTK, hence the rate, and the closed form of the linearised model at the last step.
    lr_crit, lrs, lin_closed = [], [], []
    for s, model in enumerate(models):
        crit, lr, closed = _rate_and_closed_form(model, x_all, f0_tr[s], f0_te[s], subset, analytic.lam_max, cfg)
        lr_crit.append(crit)
        lrs.append(lr)
        lin_closed.append(closed)
    lr_t = torch.tensor(lrs, dtype=dtype, device=device)
    y_tr_np = subset.y_train.astype(np.float64)
    tracker = None
    if n <= MAX_EIGH:
        tracker = SpectralTracker(analytic.ntk_tr, y_tr_np, f0_tr.double().cpu().numpy() - y_tr_np, lrs)
    params = {k: v.clone() for k, v in params0.items()}
    delta = {k: torch.zeros_like(v) for k, v in params0.items()}
    batch_rngs = [torch.Generator().manual_seed(10_007 * c.seed + 1) for c in configs]

    def evaluate() -> dict[str, Tensor]:
        with torch.no_grad():
            out = {"nn_tr": forward(params, x_tr), "nn_te": forward(params, x_te)}
            out["lin_tr"] = forward_lin(delta, params0, f0_tr, x_tr)
            out["lin_te"] = forward_lin(delta, params0, f0_te, x_te)
        return out

    curves_by_seed = [{c: [] for c in CURVE_COLUMNS} for _ in configs]
    record_at = set(log_steps(cfg.steps, cfg.log_points))
    diverged_at = [None] * len(configs)
    init_losses = None
    for step in range(cfg.steps + 1):
        if step in record_at:
            preds = evaluate()
            losses = _curve_point(preds, y_tr, y_te, subset, step, curves_by_seed)
            if tracker is not None:
                tracker.record(step, preds["nn_tr"].double().cpu().numpy(), preds["lin_tr"].double().cpu().numpy())
            if init_losses is None:
                init_losses = losses
            for s, (nn_l, lin_l) in enumerate(losses):
                blown = not (math.isfinite(nn_l) and math.isfinite(lin_l)) or max(
                    nn_l / max(init_losses[s][0], 1e-12), lin_l / max(init_losses[s][1], 1e-12)
                ) > DIVERGENCE_FACTOR
                if blown and diverged_at[s] is None:
                    diverged_at[s] = step
            if all(d is not None for d in diverged_at):
                break
        if step == cfg.steps:
            break
        if seeds_batched:
            idx = torch.stack([torch.randperm(n, generator=g)[: cfg.batch_size] for g in batch_rngs])
            idx = idx.to(device)
            xb, yb = x_tr[idx], y_tr[idx]
            f0b = torch.gather(f0_tr, 1, idx[..., None].expand(-1, -1, k_out))
        else:
            xb, yb, f0b = x_tr, y_tr, f0_tr
        g_nn = grad_nn(params, xb, yb)
        g_lin = grad_lin(delta, params0, f0b, xb, yb)
        params = {k: v - step_size(g_nn[k]) for k, v in params.items()}
        delta = {k: v - step_size(g_lin[k]) for k, v in delta.items()}
    final_step = step  # preds holds the evaluation at this step

    # Analytic-NTK predictions at the same training time, from each seed's own f0 (linear in r0 = f0 - y):
    # one closed form per distinct rate, its right-hand sides stacked (-y for the mean predictor, then
    # f0 of each seed), so Theta_tr is swept once per rate, not once per seed.
    f_ntk = {}
    if cfg.optimizer == "gd":
        f0_tr_np = f0_tr.double().cpu().numpy()
        for lr in sorted(set(lrs)):
            seeds = [s for s, x in enumerate(lrs) if x == lr]
            rhs = np.concatenate([-y_tr_np] + [f0_tr_np[s] for s in seeds], axis=1)
            parts = np.split(gd_closed_form(analytic.ntk_tr, analytic.ntk_te_tr, rhs, lr / n, final_step),
                             len(seeds) + 1, axis=1)
            for s, part in zip(seeds, parts[1:], strict=True):
                f_ntk[s] = (parts[0], part)
    results = []
    for s, c in enumerate(configs):
        model0, model_t = _unstack(models[s], params0, s), _unstack(models[s], params, s)
        res = RunResult(c, curves=curves_by_seed[s])
        res.metrics["lr_critical"] = lr_crit[s]
        res.f0_test = f0_te[s].float().cpu().numpy()
        if tracker is not None:
            res.spectral = tracker.rows[s]
            res.metrics["train_loss_pred_ratio"] = tracker.predicted_loss_ratio(s, final_step)
            for key, value in zip(SPECTRUM_KEYS, analytic.spectrum, strict=True):
                res.metrics[f"{key}_analytic"] = value
        diverged = _measure(res, s, subset, analytic, model0, model_t, preds, f0_tr, f0_te, lrs[s], final_step,
                            diverged_at[s], x_tr, x_all, f_ntk.get(s), lin_closed[s], keep_grams)
        if gram_writer is not None:
            gram_writer(res, model0, None if diverged else model_t, x_all)
        results.append(res)
    return results


def _unstack(template: MLP, stacked: dict[str, Tensor], s: int) -> MLP:
    model = copy.deepcopy(template)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(stacked[name][s])
    return model


def _accuracy(pred: Tensor, labels: np.ndarray) -> float:
    lab = torch.as_tensor(labels, device=pred.device)
    cls = (pred[:, 0] > 0).long() if pred.shape[1] == 1 else pred.argmax(dim=1)
    return float((cls == lab).double().mean())


def _mse(pred: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    return float(0.5 * ((pred - y) ** 2).sum(-1).mean())


def _curve_point(preds: dict, y_tr: Tensor, y_te: Tensor, subset: Subset, step: int,
                 curves_by_seed: list[dict]) -> list[tuple[float, float]]:
    losses = []
    for s, curve in enumerate(curves_by_seed):
        nn_tr, lin_tr = preds["nn_tr"][s], preds["lin_tr"][s]
        point = {
            "step": step,
            "train_loss": _mse(nn_tr, y_tr), "test_loss": _mse(preds["nn_te"][s], y_te),
            "train_acc": _accuracy(nn_tr, subset.labels_train), "test_acc": _accuracy(preds["nn_te"][s],
                                                                                       subset.labels_test),
            "lin_train_loss": _mse(lin_tr, y_tr), "lin_test_loss": _mse(preds["lin_te"][s], y_te),
            "lin_train_acc": _accuracy(lin_tr, subset.labels_train),
            "lin_test_acc": _accuracy(preds["lin_te"][s], subset.labels_test),
        }
        for key, value in point.items():
            curve[key].append(value)
        losses.append((point["train_loss"], point["lin_train_loss"]))
    return losses


def gd_closed_form(theta_tr: np.ndarray, theta_te_tr: np.ndarray, r0: np.ndarray, rate: float,
                   steps: int) -> np.ndarray:
    """Change of the test predictions after ``steps`` of GD on a linear model with kernel ``theta``.

    ``-Theta_te,tr Theta^-1 (I - (I - rate Theta)^t) r0``, with ``rate = lr / n``.
    ``theta_tr: (m, m)``, ``theta_te_tr: (m', m)``, ``r0: (m,)`` or ``(m, K)``: the initial training
    residual ``f0 - y``. For ``t < m`` it iterates the exact map ``r <- r - rate Theta r`` in function
    space (``t m^2`` flops); otherwise it uses the eigenbasis (``m^3``), with
    ``(1 - (1 - rate lam)^t) / lam`` taken stably for small ``lam`` (limit ``rate t``).
    """
    if steps < len(theta_tr):
        r, total = np.array(r0, dtype=np.float64), np.zeros_like(r0, dtype=np.float64)
        for _ in range(steps):
            total += r
            r -= rate * (theta_tr @ r)
        return -rate * (theta_te_tr @ total)
    lam, vec = np.linalg.eigh(theta_tr)
    lam = np.clip(lam, 0.0, None)
    a = rate * lam
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        small = a < 0.5  # there 1 - (1 - a)^t loses digits to cancellation: use expm1/log1p
        decayed = np.where(small, -np.expm1(steps * np.log1p(-np.where(small, a, 0.0))), 1 - (1 - a) ** steps)
        gain = np.where(lam > 0, decayed / np.where(lam > 0, lam, 1.0), rate * steps)
    return -theta_te_tr @ (vec @ (gain.reshape(-1, *([1] * (r0.ndim - 1))) * (vec.T @ r0)))


def _rate_and_closed_form(model: MLP, x_all: Tensor, f0_tr: Tensor, f0_te: Tensor, subset: Subset,
                          lam_analytic: float, cfg: RunConfig) -> tuple[float, float, np.ndarray | None]:
    """``(lr_critical, lr, lin_closed)`` of one seed at init.

    The top eigenvalue of the full ``(nK, nK)`` training-set empirical NTK: exact from the ``(N, n, K, K)``
    blocks against the training points when ``n K <= MAX_FULL_NTK``, else by power iteration. With the
    blocks (and full-batch GD) also ``lin_closed (m, K)``: the linearised model's test predictions after
    ``cfg.steps`` from the network's own NTK, a consistency check on the trained linear model (None
    otherwise). The blocks are dropped before the next seed: they grow as ``N n K^2``.
    """
    n, k_out = subset.y_train.shape
    nk = n * k_out
    full = nk <= MAX_FULL_NTK
    if full:
        blocks = empirical_ntk(model, x_all, x_all[:n], trace=False).double().cpu().numpy()
        big = blocks.transpose(0, 2, 1, 3).reshape(len(x_all) * k_out, nk)  # a copy: blocks can go
        del blocks
        lam_max = top_eigenvalue(big[:nk])
    else:
        lam_max = top_ntk_eigenvalue(model, x_all[:n])
    lr_crit = 2.0 * n / max(lam_analytic, lam_max)
    lr = cfg.lr if cfg.lr is not None else cfg.effective_lr_scale * lr_crit
    closed = None
    if full and cfg.optimizer == "gd":
        r0 = (f0_tr.double().cpu().numpy() - subset.y_train.astype(np.float64)).reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):  # a rate far above critical: the run diverges
            change = gd_closed_form(big[:nk], big[nk:], r0, lr / n, cfg.steps)
        closed = f0_te.double().cpu().numpy() + change.reshape(-1, k_out)
    return lr_crit, lr, closed


NORM_PANEL = 1024  # rows of an (N, N) kernel turned into float64 at a time for its norms


def _panels(n: int, total: int, rows: int = NORM_PANEL) -> list[tuple[int, int]]:
    """Row ranges of ``train ++ test`` of at most ``rows`` rows, none straddling the boundary ``n``."""
    return [(lo, min(hi_end, lo + rows)) for start, hi_end in ((0, n), (n, total))
            for lo in range(start, hi_end, rows)]


def _norm_panel_rows(width: int, total: int) -> int:
    """Rows per panel: each panel recomputes the column features (``O(N K width^2)``) beside its Gram
    (``O(rows N K width)``), so wide networks get taller panels; memory is ``rows x N`` per kernel."""
    return min(total, max(NORM_PANEL, 2 * width))


def _kernel_norms(model0: MLP, model_t: MLP | None, x_all: Tensor, an: AnalyticBlocks,
                  keep: bool = False) -> dict[str, Any]:
    """Frobenius norms over all ``N x N`` entries of the empirical NTKs of ``model0`` (and ``model_t``),
    formed one row panel ``(rows, N)`` at a time in the models' dtype and reduced in float64: ``dev`` =
    ``||ntk0 - Theta||``, ``theta`` = ``||Theta||``, ``init`` = ``||ntk0||`` and ``change`` =
    ``||ntk_t - ntk0||``; the same four over the ``n x n`` training block alone with a ``_train`` suffix
    (what gradient descent sees). No ``(N, N)`` array is formed unless ``keep`` (then ``ntk0``, ``ntk_t``:
    float32 numpy). ``x_all``: ``(N, d)`` train ++ test inputs."""
    total, n = len(x_all), an.n
    sq = {f"{k}{part}": 0.0 for k in ("dev", "theta", "init", "change") for part in ("", "_train")}
    kept: dict[str, Any] = {}
    if keep:
        kept = {"ntk0": np.empty((total, total), np.float32)}
        if model_t is not None:
            kept["ntk_t"] = np.empty((total, total), np.float32)
    for r0, r1 in _panels(n, total, _norm_panel_rows(model0.config["width"], total)):
        e0 = empirical_ntk(model0, x_all[r0:r1], x_all).double().cpu().numpy()
        theta = np.concatenate([an.ntk_block(r0, r1, c0, c1) for c0, c1 in ((0, n), (n, total))], axis=1)
        train_rows = r1 <= n
        for part, cols in (("", slice(None)), ("_train", slice(0, n))):
            if part and not train_rows:
                continue
            sq["dev" + part] += float(np.square(e0[:, cols] - theta[:, cols]).sum())
            sq["theta" + part] += float(np.square(theta[:, cols]).sum())
            sq["init" + part] += float(np.square(e0[:, cols]).sum())
        del theta
        if keep:
            kept["ntk0"][r0:r1] = e0
        if model_t is not None:
            et = empirical_ntk(model_t, x_all[r0:r1], x_all).double().cpu().numpy()
            sq["change"] += float(np.square(et - e0).sum())
            if train_rows:
                sq["change_train"] += float(np.square(et[:, :n] - e0[:, :n]).sum())
            if keep:
                kept["ntk_t"][r0:r1] = et
    out: dict[str, Any] = {k: math.sqrt(v) for k, v in sq.items()}
    if keep:  # the panels are computed row by row: symmetrise as the whole-matrix kernel is
        out.update({k: 0.5 * (v + v.T) for k, v in kept.items()})
    return out


def _train_spectrum(model: MLP, x_tr: Tensor) -> tuple[float, float, float] | None:
    """Spectrum of the traced empirical NTK on the training points (``n <= MAX_EIGH``)."""
    if len(x_tr) > MAX_EIGH:
        return None
    return spectrum_stats(empirical_ntk(model, x_tr).double().cpu().numpy())


def _measure(res: RunResult, s: int, subset: Subset, analytic: AnalyticBlocks, model0: MLP, model_t: MLP,
             preds: dict, f0_tr: Tensor, f0_te: Tensor, lr: float, steps: int, diverged_at: int | None,
             x_tr: Tensor, x_all: Tensor, f_ntk: tuple[np.ndarray, np.ndarray] | None,
             lin_closed: np.ndarray | None, keep_grams: bool) -> bool:
    """Fill ``res`` with every measurement of seed ``s`` of the pack. Returns whether it diverged.

    The empirical NTKs at init and at the end are formed here, one seed at a time and one row panel at
    a time (:func:`_kernel_norms`): nothing ``(N, N)`` is formed unless ``keep_grams``."""
    m = {key: res.metrics.get(key, math.nan) for key in SCALAR_METRICS}
    m["lr"] = lr

    # Analytic kernel regression at t = infinity: the mean predictor (f0 = 0) of the NTK and the NNGP, and
    # the NTK limit from this network's own random f0 (Lee et al. 2019, eq. 16), which is what one
    # infinitely wide network trained to convergence predicts. The mean predictor drops the variance that
    # f0 carries into every prediction, so only ntk_own is a network's limit.
    y_tr, y_te = subset.y_train.astype(np.float64), subset.y_test.astype(np.float64)
    f0_tr_own, f0_te_own = f0_tr[s].double().cpu().numpy(), f0_te[s].double().cpu().numpy()
    preds_inf = {"ntk": analytic.ntk_pred, "nngp": analytic.nngp_pred,
                 "ntk_own": f0_te_own + analytic.ntk_solver @ (y_tr - f0_tr_own)}
    for name, pred in preds_inf.items():
        m[f"{name}_test_acc"] = _accuracy(torch.from_numpy(pred), subset.labels_test)
        m[f"{name}_test_loss"] = _mse(pred, y_te)

    if diverged_at is None and not all(bool(torch.isfinite(p).all()) for p in model_t.parameters()):
        diverged_at = steps  # blew up after the last logged step
    diverged = diverged_at is not None
    for key, value in zip(SPECTRUM_KEYS, _train_spectrum(model0, x_tr) or (), strict=False):
        m[f"{key}_init"] = value
    norms = _kernel_norms(model0, None if diverged else model_t, x_all, analytic, keep=keep_grams)
    m["kernel_rel_dev_init"] = norms["dev"] / norms["theta"]
    m["kernel_rel_dev_init_train"] = norms["dev_train"] / norms["theta_train"]
    if keep_grams:
        res.ntk_init, res.ntk_final = norms["ntk0"], norms.get("ntk_t")
    if diverged:
        # Only what the initial state and the kernels determine; the final weights are not finite.
        res.status = "diverged"
        m["diverged_step"] = float(diverged_at)
        res.error = f"loss exploded or became non-finite by step {diverged_at} (lr={lr:.4g})"
        res.metrics.update(_kernel_regime_nan(m, res.config))
        return True
    m["kernel_rel_change"] = norms["change"] / norms["init"]
    m["kernel_rel_change_train"] = norms["change_train"] / norms["init_train"]
    for key, value in zip(SPECTRUM_KEYS, _train_spectrum(model_t, x_tr) or (), strict=False):
        m[f"{key}_final"] = value

    kinked = model0.activation.piecewise_linear and model0.activation.name != "identity"
    m["relu_flip_frac"] = _flip_fraction(model0, model_t, x_tr) if kinked else math.nan

    weights0 = [layer.weight.detach() for layer in model0.layers]
    weights_t = [layer.weight.detach() for layer in model_t.layers]
    res.metrics["weight_rel_change_by_layer"] = [
        float(torch.linalg.norm(wt - w0) / torch.linalg.norm(w0))
        for w0, wt in zip(weights0, weights_t, strict=True)
    ]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model0.parameters()])
    flat_t = torch.cat([p.detach().reshape(-1) for p in model_t.parameters()])
    m["weight_distance"] = float(torch.linalg.norm(flat_t - flat0))
    m["weight_rel_change"] = m["weight_distance"] / float(torch.linalg.norm(flat0))

    curve = res.curves
    for key in ("train_loss", "test_loss", "train_acc", "test_acc", "lin_train_loss", "lin_test_loss",
                "lin_train_acc", "lin_test_acc"):
        m[key] = curve[key][-1]
    m["train_loss_obs_ratio"] = curve["train_loss"][-1] / curve["train_loss"][0]
    nn_te = preds["nn_te"][s].double().cpu().numpy()
    lin_te = preds["lin_te"][s].double().cpu().numpy()
    m["rmse_nn_lin_test"] = float(np.sqrt(np.mean((nn_te - lin_te) ** 2)))
    m["agree_nn_lin_test"] = _agreement(nn_te, lin_te)

    if f_ntk is not None:
        # Analytic NTK at the same training time: the mean predictor (f0 = 0), and the prediction
        # started from this network's own f0. Only the latter converges to the network as the width
        # grows; the former keeps the O(1) random initial function.
        f_mean, f_own_change = f_ntk
        m["rmse_nn_ntk_mean_test"] = float(np.sqrt(np.mean((nn_te - f_mean) ** 2)))
        m["rmse_nn_ntk_test"] = float(np.sqrt(np.mean((nn_te - (f0_te_own + f_mean + f_own_change)) ** 2)))
    if lin_closed is not None and steps == res.config.steps:
        # The network's own empirical NTK predicts the trained linear model exactly.
        m["lin_closed_form_rel_err"] = float(np.linalg.norm(lin_closed - lin_te) / np.linalg.norm(lin_te))
    res.metrics.update(_kernel_regime_nan(m, res.config))
    return False


def _kernel_regime_nan(m: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """``m`` with :data:`KERNEL_REGIME_ONLY` set to NaN under μP."""
    if config.parameterization == "mup":
        m.update(dict.fromkeys(KERNEL_REGIME_ONLY, math.nan))
    return m


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape[1] == 1:
        return float(np.mean((a[:, 0] > 0) == (b[:, 0] > 0)))
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def _flip_fraction(model0: MLP, model_t: MLP, x: Tensor) -> float:
    """Fraction of (hidden unit, training point) pairs whose activation sign flipped in training."""
    with torch.no_grad():
        _, _, z0 = model0.forward_with_preactivations(x)
        _, _, zt = model_t.forward_with_preactivations(x)
    if not z0:
        return math.nan
    flips = sum(int(((a > 0) != (b > 0)).sum()) for a, b in zip(z0, zt, strict=True))
    return flips / sum(a.numel() for a in z0)
