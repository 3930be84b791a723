"""One run beside its linearisation: closed forms, width trends, learning-rate safety, packing."""

import math

import numpy as np
import pytest
import torch

from pipeline.data import load_subset
from pipeline.limits import analytic_kernels
from pipeline.measures import log_steps
from pipeline.measures.dynamics import gd_closed_form
from pipeline.run import train_run, train_runs
from pipeline.run_config import RunConfig

# The measurement columns of a runs row, as documented in the README: users query them by these names, so
# a rename or a lost column is a change of interface, caught here.
DOCUMENTED_METRICS = {
    "train_loss", "test_loss", "train_acc", "test_acc", "lin_train_loss", "lin_test_loss", "lin_train_acc",
    "lin_test_acc", "ntk_test_acc", "nngp_test_acc", "ntk_test_loss", "nngp_test_loss", "ntk_own_test_acc",
    "ntk_own_test_loss", "kernel_rel_dev_init", "kernel_rel_change", "kernel_rel_dev_init_train",
    "kernel_rel_change_train", "weight_rel_change", "weight_distance", "rmse_nn_lin_test", "agree_nn_lin_test",
    "rmse_nn_ntk_test", "rmse_nn_ntk_mean_test", "lin_closed_form_rel_err", "relu_flip_frac", "lr",
    "lr_critical", "diverged_step", "ntk_eig_min_init", "ntk_eig_max_init", "ntk_cond_init", "ntk_eig_min_final",
    "ntk_eig_max_final", "ntk_cond_final", "ntk_eig_min_analytic", "ntk_eig_max_analytic", "ntk_cond_analytic",
    "train_loss_pred_ratio", "train_loss_obs_ratio", "weight_rel_change_by_layer",
}
RUN_COLUMNS = {"run_id", "status", "error", "wall_s", "device", "peak_rss_bytes", "peak_gpu_bytes",
               "analytic_peak_rss_bytes", "node"}

torch.set_num_threads(2)


def cfg(**kw) -> RunConfig:
    base = dict(dataset="digits", n_train=64, n_test=48, depth=2, width=128, steps=40, device="cpu")
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("steps", [5, 37])
def test_closed_form_matches_explicit_iteration(steps):
    """Both paths of the closed form (function-space iteration for t < m, eigenbasis for t >= m = 20)
    equal literally iterating r <- (I - rate Theta) r and accumulating the test-point change."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 12))
    theta = a @ a.T  # rank 12: singular on purpose
    tr, te = theta[:20, :20], theta[20:, :20]
    r = rng.normal(size=(20, 3))
    rate = 1.5 / np.linalg.eigvalsh(tr)[-1]
    r_t, change = r.copy(), np.zeros((10, 3))
    for _ in range(steps):
        change -= rate * te @ r_t
        r_t -= rate * tr @ r_t
    np.testing.assert_allclose(gd_closed_form(tr, te, r, rate, steps), change, rtol=1e-9, atol=1e-12)


def test_linearised_gd_equals_its_empirical_ntk_closed_form_float64():
    """The trained linear model and the (I - eta Theta_hat0/n)^t formula agree to ~1e-6 (float64)."""
    res = train_run(cfg(dtype="float64", steps=60, b_std=0.1))
    assert res.status == "ok", res.error
    assert res.metrics["lin_closed_form_rel_err"] < 1e-6


def test_result_has_every_measurement_and_curves():
    res = train_run(cfg(), keep_grams=True)
    assert res.status == "ok", res.error
    row = res.row()
    assert set(row) == DOCUMENTED_METRICS | RUN_COLUMNS | set(RunConfig.model_fields)
    assert all(isinstance(row[k], float) for k in DOCUMENTED_METRICS - {"weight_rel_change_by_layer"})
    for key in ("train_loss", "test_loss", "train_acc", "test_acc", "lin_train_loss", "lin_test_loss",
                "lin_test_acc", "ntk_test_acc", "nngp_test_acc", "kernel_rel_dev_init", "kernel_rel_change",
                "weight_rel_change", "rmse_nn_lin_test", "agree_nn_lin_test", "rmse_nn_ntk_test"):
        assert math.isfinite(row[key]), key
    assert len(row["weight_rel_change_by_layer"]) == 3
    assert res.curves["step"] == log_steps(40, 24)
    assert res.curves["train_loss"][-1] < res.curves["train_loss"][0]
    n = 64 + 48
    assert res.ntk_init.shape == (n, n) and res.ntk_final.shape == (n, n)
    assert row["run_id"] == res.config.run_id and len(row["run_id"]) == 16


def test_own_f0_kernel_regression_is_recomputed_independently():
    """ntk_own_test_*: f0(x_te) + Theta_te,tr Theta_tr^-1 (y - f0(x_tr)) from the run's own network at init,
    here rebuilt from the config with MLP + mlp_kernels and a direct solve (Lee et al. 2019, eq. 16)."""
    from kernels.analytic import mlp_kernels
    from kernels.mlp import MLP

    c = cfg(dtype="float64", steps=5, seed=3, b_std=0.2)
    res = train_run(c)
    assert res.status == "ok", res.error
    sub = load_subset(c)
    x_tr, x_te = (torch.as_tensor(a, dtype=torch.float64) for a in (sub.x_train, sub.x_test))
    net = MLP(x_tr.shape[1], c.width, c.depth, sub.y_train.shape[1], c.activation, c.w_std, c.b_std,
              c.parameterization, seed=c.seed, dtype=torch.float64)
    with torch.no_grad():
        f0_tr, f0_te = net(x_tr).numpy(), net(x_te).numpy()
    theta = mlp_kernels(np.concatenate([sub.x_train, sub.x_test]).astype(np.float64), depth=c.depth,
                        activation=c.activation, w_std=c.w_std, b_std=c.b_std, get=("ntk",))["ntk"]
    n = len(x_tr)
    pred = f0_te + theta[n:, :n] @ np.linalg.solve(theta[:n, :n], sub.y_train - f0_tr)
    loss = 0.5 * ((pred - sub.y_test) ** 2).sum(-1).mean()
    assert res.metrics["ntk_own_test_loss"] == pytest.approx(loss, rel=1e-5)
    assert res.metrics["ntk_own_test_acc"] == pytest.approx(float((pred.argmax(1) == sub.labels_test).mean()))
    # The random f0 adds variance: this limit is not the mean predictor's.
    assert abs(res.metrics["ntk_own_test_loss"] - res.metrics["ntk_test_loss"]) > 1e-3


def test_deterministic_for_a_seed_and_seeds_differ():
    a, b, c = (train_run(cfg(seed=s), keep_grams=True) for s in (3, 3, 4))
    assert a.metrics["test_loss"] == b.metrics["test_loss"]
    np.testing.assert_array_equal(a.ntk_final, b.ntk_final)
    assert a.metrics["test_loss"] != c.metrics["test_loss"]


@pytest.mark.parametrize("optimizer", ["gd", "sgd"])
def test_packed_seeds_equal_separate_runs(optimizer):
    extra = dict(batch_size=16) if optimizer == "sgd" else {}
    configs = [cfg(seed=s, optimizer=optimizer, dtype="float64", **extra) for s in range(3)]
    packed = train_runs(configs)
    for config, res in zip(configs, packed, strict=True):
        alone = train_run(config)
        assert res.status == alone.status == "ok"
        for key in ("train_loss", "test_loss", "lin_test_loss", "kernel_rel_change", "weight_rel_change",
                    "rmse_nn_lin_test"):
            assert res.metrics[key] == pytest.approx(alone.metrics[key], rel=1e-9, abs=1e-12), key
        np.testing.assert_allclose(res.curves["lin_train_loss"], alone.curves["lin_train_loss"], rtol=1e-9)


def test_packing_refuses_mixed_shapes():
    with pytest.raises(ValueError, match="differ only in seed"):
        train_runs([cfg(width=64), cfg(width=128)])


def test_wide_network_agrees_with_its_linearisation_better_than_narrow():
    """Lee et al. 2019: the wider the network, the closer to its linearisation (ordering, not numbers)."""
    results = {w: train_run(cfg(width=w, n_train=128, n_test=128, steps=100, lr_scale=0.3)) for w in (64, 2048)}
    assert all(r.status == "ok" for r in results.values())
    assert results[2048].metrics["rmse_nn_lin_test"] < 0.5 * results[64].metrics["rmse_nn_lin_test"]
    assert results[2048].metrics["agree_nn_lin_test"] >= 0.95
    assert results[2048].metrics["kernel_rel_change"] < results[64].metrics["kernel_rel_change"]
    assert results[2048].metrics["relu_flip_frac"] < results[64].metrics["relu_flip_frac"]
    # ... and to the analytic-NTK dynamics started from its own f0.
    assert results[2048].metrics["rmse_nn_ntk_test"] < results[64].metrics["rmse_nn_ntk_test"]


def test_kernel_deviation_at_init_scales_like_inverse_sqrt_width():
    """log-log slope of ||Theta_hat0 - Theta|| / ||Theta|| over widths 128..4096, 4 seeds: ~ -1/2."""
    widths = [128, 512, 2048, 4096]
    means = []
    for w in widths:
        runs = train_runs([cfg(width=w, steps=0, seed=s, n_train=48, n_test=16) for s in range(4)])
        means.append(np.mean([r.metrics["kernel_rel_dev_init"] for r in runs]))
    slope = np.polyfit(np.log(widths), np.log(means), 1)[0]
    assert -0.7 <= slope <= -0.3, (slope, means)


def test_learning_rate_scale_below_one_never_diverges_above_diverges():
    for width in (64, 256, 1024):
        res = train_run(cfg(width=width, lr_scale=0.9, steps=60))
        assert res.status == "ok", (width, res.error)
    res = train_run(cfg(width=256, lr_scale=1.6, steps=150))
    assert res.status == "diverged"
    assert "exploded" in res.error and math.isfinite(res.metrics["kernel_rel_dev_init"])
    assert math.isnan(res.metrics["test_loss"])


@pytest.mark.parametrize("seeds", [1, 3])
def test_divergence_between_sparse_log_points_is_diverged_not_failed(seeds):
    """lr far above critical with few logged steps: the weights are inf/NaN long before the next log point.
    The run must still end "diverged" with what the initial state determines (the init kernel, its
    spectrum, kernel regression), not "failed" on a NaN kernel."""
    configs = [cfg(width=16, lr_scale=4.0, steps=1000, log_points=5, seed=s) for s in range(seeds)]
    for res in train_runs(configs, keep_grams=True):
        assert res.status == "diverged", res.error
        assert "exploded" in res.error
        assert math.isfinite(res.metrics["kernel_rel_dev_init"]) and math.isfinite(res.metrics["ntk_cond_init"])
        assert math.isfinite(res.metrics["ntk_test_acc"]) and math.isfinite(res.metrics["ntk_own_test_loss"])
        assert res.ntk_init is not None and res.ntk_final is None and len(res.curves["step"]) >= 1


def test_critical_rate_is_two_n_over_the_larger_top_eigenvalue():
    """lr_critical = 2 n / max(lambda_max(Theta), lambda_max(Theta_hat0)): at most the analytic edge, and
    equal to this network's own edge (the full (nK, nK) empirical NTK at init) when that one is larger."""
    from kernels.empirical import empirical_ntk
    from kernels.mlp import MLP

    config = cfg(dtype="float64", width=32, steps=1)
    subset = load_subset(config)
    theta = analytic_kernels(config, subset)["ntk"][:64, :64]
    analytic_edge = 2 * 64 / np.linalg.eigvalsh(theta).max()
    net = MLP(subset.x_train.shape[1], 32, config.depth, subset.y_train.shape[1], seed=config.seed,
              dtype=torch.float64)
    blocks = empirical_ntk(net, torch.as_tensor(subset.x_train), trace=False).numpy()
    own_edge = 2 * 64 / np.linalg.eigvalsh(blocks.transpose(0, 2, 1, 3).reshape(640, 640)).max()
    res = train_run(config)
    assert res.metrics["lr_critical"] == pytest.approx(min(analytic_edge, own_edge), rel=1e-9)
    assert res.metrics["lr"] == pytest.approx(0.5 * res.metrics["lr_critical"], rel=1e-12)


def test_failures_are_recorded_not_raised():
    res = train_run(cfg(dataset="mnist", data_dir="/nonexistent/ntk-data"))
    assert res.status == "failed"
    assert "mnist" in res.error
    if not torch.cuda.is_available():  # a GPU run landing on a CPU-only node is a recorded failure too
        res = train_run(cfg(device="cuda"))
        assert res.status == "failed" and "no CUDA device" in res.error


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="width"):
        RunConfig(width=0)
    with pytest.raises(ValueError, match="batch_size"):
        RunConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="lr or lr_scale"):
        RunConfig(lr=0.1, lr_scale=0.5)
    with pytest.raises(ValueError, match="unknown activation"):
        RunConfig(activation="swish2")


def test_run_id_is_stable_and_ignores_execution_fields():
    a = RunConfig(width=64, seed=1)
    assert a.run_id == RunConfig(width=64, seed=1, device="cpu", data_dir="/x", sweep="other").run_id
    assert a.run_id != RunConfig(width=64, seed=2).run_id
    assert a.run_id == RunConfig(width=64, seed=1, activation="ReLU").run_id


def test_power_iteration_finds_the_top_eigenvalue_of_the_full_empirical_ntk():
    from kernels.empirical import empirical_ntk
    from kernels.mlp import MLP
    from pipeline.measures.spectra import top_ntk_eigenvalue

    x = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = MLP(8, 64, 2, 3, seed=1, dtype=torch.float64)
    blocks = empirical_ntk(model, x, trace=False).numpy()
    exact = np.linalg.eigvalsh(blocks.transpose(0, 2, 1, 3).reshape(120, 120))[-1]
    assert top_ntk_eigenvalue(model, x) == pytest.approx(exact, rel=1e-3)


def test_panelled_kernel_norms_equal_the_full_matrix_ones(monkeypatch):
    """kernel_rel_dev_init and kernel_rel_change are reduced in row panels (none straddling train/test)
    against the analytic blocks; here with 16-row panels against the whole (N, N) matrices."""
    import pipeline.measures as measures
    from kernels.analytic import mlp_kernels

    monkeypatch.setattr(measures, "NORM_PANEL", 16)
    c = cfg(dtype="float64", steps=20, n_train=70, n_test=50, b_std=0.1)
    res = train_run(c, keep_grams=True)
    assert res.status == "ok", res.error
    sub = load_subset(c)
    theta = mlp_kernels(np.concatenate([sub.x_train, sub.x_test]).astype(np.float64), depth=c.depth,
                        activation=c.activation, w_std=c.w_std, b_std=c.b_std, get=("ntk",))["ntk"]
    e0, et = res.ntk_init.astype(np.float64), res.ntk_final.astype(np.float64)
    assert res.metrics["kernel_rel_dev_init"] == pytest.approx(np.linalg.norm(e0 - theta) / np.linalg.norm(theta),
                                                               rel=1e-5)
    assert res.metrics["kernel_rel_change"] == pytest.approx(np.linalg.norm(et - e0) / np.linalg.norm(e0), rel=1e-4)
    n = c.n_train  # the training block alone: what gradient descent sees
    tr = np.s_[:n, :n]
    assert res.metrics["kernel_rel_dev_init_train"] == pytest.approx(
        np.linalg.norm(e0[tr] - theta[tr]) / np.linalg.norm(theta[tr]), rel=1e-5)
    assert res.metrics["kernel_rel_change_train"] == pytest.approx(
        np.linalg.norm(et[tr] - e0[tr]) / np.linalg.norm(e0[tr]), rel=1e-4)
    assert res.row()["peak_rss_bytes"] > 50e6  # VmHWM of this process: at least the interpreter and torch


def test_grams_are_not_kept_unless_asked():
    res = train_run(cfg(steps=5))
    assert res.status == "ok" and res.ntk_init is None and res.ntk_final is None


def test_sweep_solve_rebuilds_an_indefinite_gram_factored_in_place():
    """The sweep's kernel regression goes through kernels.solve; an indefinite matrix factored in place is
    rebuilt for the LU fallback, so the answer is the exact solve, not one of a spoilt array."""
    from pipeline.limits import kernel_solve

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    k = (q * np.r_[np.ones(39), -0.5]) @ q.T  # one negative eigenvalue: Cholesky fails
    rhs = rng.standard_normal((40, 3))
    built = []

    def make():
        built.append(1)
        return k.copy()

    x = kernel_solve(make, rhs, keep=False)
    eps = 1e-10 * np.trace(k) / len(k)
    np.testing.assert_allclose(x, np.linalg.solve(k + eps * np.eye(40), rhs), rtol=1e-9, atol=1e-9)
    assert len(built) == 2  # once for the failed in-place Cholesky, once for the LU
