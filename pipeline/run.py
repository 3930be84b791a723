"""One training run (or a vmapped pack of seeds) -> :class:`~pipeline.results.RunResult`: the network
trained beside its linearisation, then measured (:mod:`pipeline.measures`).

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
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

from kernels.mlp import MLP
from pipeline.data import Subset, load_subset
from pipeline.limits import AnalyticBlocks, analytic_blocks
from pipeline.measures import MAX_EIGH, log_steps
from pipeline.measures.dynamics import gd_closed_form, rate_and_closed_form
from pipeline.measures.kernel_distance import kernel_norms
from pipeline.measures.outputs import accuracy, agreement, flip_fraction, mse
from pipeline.measures.spectra import SpectralTracker, train_spectrum
from pipeline.memory import peak_memory, reset_peak_memory
from pipeline.results import CURVE_COLUMNS, KERNEL_REGIME_ONLY, SCALAR_METRICS, SPECTRUM_KEYS, RunResult
from pipeline.run_config import RunConfig

Tensor = torch.Tensor
DIVERGENCE_FACTOR = 1e6  # a loss this many times its initial value (or non-finite) means diverged


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
        traceback.print_exc()  # to the task's stderr, which Ray forwards to the driver; the row keeps the message
    wall = (time.perf_counter() - start) / len(configs)
    peak_rss = peak_memory()
    peak_gpu = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    for r in results:
        r.wall_s, r.device = wall, str(device)
        r.peak_rss_bytes, r.peak_gpu_bytes = peak_rss, peak_gpu
    return results


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


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
        crit, lr, closed = rate_and_closed_form(model, x_all, f0_tr[s], f0_te[s], subset, analytic.lam_max, cfg)
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


def _curve_point(preds: dict, y_tr: Tensor, y_te: Tensor, subset: Subset, step: int,
                 curves_by_seed: list[dict]) -> list[tuple[float, float]]:
    losses = []
    for s, curve in enumerate(curves_by_seed):
        nn_tr, lin_tr = preds["nn_tr"][s], preds["lin_tr"][s]
        point = {
            "step": step,
            "train_loss": mse(nn_tr, y_tr), "test_loss": mse(preds["nn_te"][s], y_te),
            "train_acc": accuracy(nn_tr, subset.labels_train), "test_acc": accuracy(preds["nn_te"][s],
                                                                                       subset.labels_test),
            "lin_train_loss": mse(lin_tr, y_tr), "lin_test_loss": mse(preds["lin_te"][s], y_te),
            "lin_train_acc": accuracy(lin_tr, subset.labels_train),
            "lin_test_acc": accuracy(preds["lin_te"][s], subset.labels_test),
        }
        for key, value in point.items():
            curve[key].append(value)
        losses.append((point["train_loss"], point["lin_train_loss"]))
    return losses


def _measure(res: RunResult, s: int, subset: Subset, analytic: AnalyticBlocks, model0: MLP, model_t: MLP,
             preds: dict, f0_tr: Tensor, f0_te: Tensor, lr: float, steps: int, diverged_at: int | None,
             x_tr: Tensor, x_all: Tensor, f_ntk: tuple[np.ndarray, np.ndarray] | None,
             lin_closed: np.ndarray | None, keep_grams: bool) -> bool:
    """Fill ``res`` with every measurement of seed ``s`` of the pack. Returns whether it diverged.

    The empirical NTKs at init and at the end are formed here, one seed at a time and one row panel at a
    time (:func:`~pipeline.measures.kernel_distance.kernel_norms`): nothing ``(N, N)`` is formed unless
    ``keep_grams``."""
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
        m[f"{name}_test_acc"] = accuracy(torch.from_numpy(pred), subset.labels_test)
        m[f"{name}_test_loss"] = mse(pred, y_te)

    if diverged_at is None and not all(bool(torch.isfinite(p).all()) for p in model_t.parameters()):
        diverged_at = steps  # blew up after the last logged step
    diverged = diverged_at is not None
    for key, value in zip(SPECTRUM_KEYS, train_spectrum(model0, x_tr) or (), strict=False):
        m[f"{key}_init"] = value
    norms = kernel_norms(model0, None if diverged else model_t, x_all, analytic, keep=keep_grams)
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
    for key, value in zip(SPECTRUM_KEYS, train_spectrum(model_t, x_tr) or (), strict=False):
        m[f"{key}_final"] = value

    kinked = model0.activation.piecewise_linear and model0.activation.name != "identity"
    m["relu_flip_frac"] = flip_fraction(model0, model_t, x_tr) if kinked else math.nan

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
    m["agree_nn_lin_test"] = agreement(nn_te, lin_te)

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
