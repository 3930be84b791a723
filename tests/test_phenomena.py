"""The NTK phenomena measured per run, each checked where the answer is known."""

import math

import numpy as np
import pytest
import torch

from kernels.analytic import mlp_kernels
from kernels.mlp import MLP
from pipeline.gp_init import covariance_error, normality
from pipeline.run import train_run
from pipeline.run_config import RunConfig

torch.set_num_threads(2)


def cfg(**kw) -> RunConfig:
    base = dict(dataset="digits", n_train=64, n_test=48, depth=2, width=128, steps=60, device="cpu")
    base.update(kw)
    return RunConfig(**base)


def test_linear_model_residual_decays_as_the_closed_form_per_eigen_direction():
    """depth 0: the network is linear in its parameters and its NTK is the analytic one exactly, so
    the residual energy per eigen-band equals (1 - lr lam/n)^(2t) |v^T r0|^2 at every logged step."""
    res = train_run(cfg(depth=0, dtype="float64", steps=80, b_std=0.5))
    assert res.status == "ok", res.error
    sp = res.spectral
    nn, lin, theory = (np.array(sp[k]) for k in ("energy_nn", "energy_lin", "energy_theory"))
    scale = nn.max()
    np.testing.assert_allclose(nn, theory, rtol=1e-7, atol=1e-10 * scale)
    np.testing.assert_allclose(lin, theory, rtol=1e-7, atol=1e-10 * scale)
    assert res.metrics["train_loss_pred_ratio"] == pytest.approx(res.metrics["train_loss_obs_ratio"], rel=1e-7)
    assert res.metrics["kernel_rel_dev_init"] < 1e-12


def test_spectral_bias_top_band_is_learned_first():
    res = train_run(cfg(width=512, steps=100))
    sp = res.spectral
    bands = sorted(set(sp["band"]))
    final = max(sp["step"])

    def remaining(band: int) -> float:
        e = {s: v for s, b, v in zip(sp["step"], sp["band"], sp["energy_nn"], strict=True) if b == band}
        return e[final] / e[0]

    fractions = [remaining(b) for b in bands]
    assert fractions[0] < 1e-4 and fractions[-1] > 100 * fractions[0], fractions
    assert fractions == sorted(fractions), fractions  # higher eigen-bands keep more of their energy


def test_spectrum_columns_and_conditioning():
    res = train_run(cfg(width=256))
    m = res.metrics
    for when in ("init", "final", "analytic"):
        lo, hi, cond = m[f"ntk_eig_min_{when}"], m[f"ntk_eig_max_{when}"], m[f"ntk_cond_{when}"]
        assert 0 < lo < hi and cond == pytest.approx(hi / lo)
    assert m["ntk_eig_max_init"] == pytest.approx(m["ntk_eig_max_analytic"], rel=0.25)
    assert 0 < m["train_loss_obs_ratio"] < 1 and 0 < m["train_loss_pred_ratio"] < 1


def test_relu_flips_vanish_with_width_on_a_fixed_subset():
    widths = (32, 128, 512)
    flips = [train_run(cfg(width=w, steps=80, lr_scale=0.5)).metrics["relu_flip_frac"] for w in widths]
    assert flips[0] > flips[1] > flips[2] > 0, flips
    slope = np.polyfit(np.log(widths), np.log(flips), 1)[0]
    assert slope < -0.2, slope


def _outputs_at_init(width: int, seeds: int, x: torch.Tensor, k: int = 4) -> np.ndarray:
    return np.stack([MLP(x.shape[1], width, 2, k, seed=s, dtype=torch.float64)(x).detach().numpy()
                     for s in range(seeds)])


def test_output_covariance_over_seeds_approaches_the_nngp():
    x = torch.randn(12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    nngp = mlp_kernels(x.numpy(), depth=2)["nngp"]
    f0 = _outputs_at_init(1024, 400, x)
    err, floor = covariance_error(f0, nngp)
    # At width 1024 the finite-width bias is far below the sampling error of 1,600 GP samples.
    assert err < 2.5 * floor, (err, floor)
    assert floor == pytest.approx(math.sqrt(1 / 1600 + np.trace(nngp) ** 2 / np.linalg.norm(nngp) ** 2 / 1600))
    ks, _ = normality(f0, np.diag(nngp))
    assert ks < 0.05
    narrow_err, narrow_floor = covariance_error(_outputs_at_init(2, 400, x), nngp)
    assert narrow_err > 2.5 * narrow_floor  # width 2: visibly not the limit


def test_gp_sampling_floor_is_calibrated_on_a_true_gaussian_process():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 10))
    cov = a @ a.T / 10 + np.eye(10)
    chol = np.linalg.cholesky(cov)
    errors, floor = [], None
    for _ in range(200):
        f0 = np.einsum("ij,sjk->sik", chol, rng.normal(size=(50, 10, 2)))
        err, floor = covariance_error(f0, cov)
        errors.append(err)
    assert np.sqrt(np.mean(np.square(errors))) == pytest.approx(floor, rel=0.1)
