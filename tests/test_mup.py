"""μP (``parameterization: mup``, Yang & Hu 2021, Table 3) beside NTK: coordinate checks at init and after
one step, the exact identity of the two empirical NTKs at init, and the regime split of a width sweep:
the μP kernel keeps moving at every width while the NTK one freezes."""

import math

import pytest
import torch

from kernels.empirical import empirical_ntk
from kernels.mlp import MLP
from pipeline.data import load_subset
from pipeline.errors import UserError
from pipeline.limits import analytic_blocks
from pipeline.results import KERNEL_REGIME_ONLY
from pipeline.run import train_runs
from pipeline.run_config import RunConfig
from pipeline.spec import parse_sweep

torch.set_num_threads(2)
F64 = torch.float64


def _x(n: int = 24, d: int = 16, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x / x.pow(2).mean(1, keepdim=True).sqrt()  # |x|^2 / d = 1, as per_image preprocessing


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().pow(2).mean().sqrt())


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mup_empirical_ntk_at_init_equals_ntk_parameterisation(depth):
    """Same draws: the μP hidden layers compute the NTK network's features, its readout is n^-1/2 of
    it, and its NTK with respect to its own parameters (what global-rate GD sees) is the NTK one."""
    x = _x()
    ntk = MLP(16, 96, depth, 3, "relu", 1.4, 0.2, "ntk", seed=3, dtype=F64)
    mup = MLP(16, 96, depth, 3, "relu", 1.4, 0.2, "mup", seed=3, dtype=F64)
    k_ntk, k_mup = empirical_ntk(ntk, x), empirical_ntk(mup, x)
    torch.testing.assert_close(k_mup, k_ntk, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(empirical_ntk(mup, x, method="jacobian"), k_mup, rtol=1e-10, atol=1e-10)
    _, _, z_ntk = ntk.forward_with_preactivations(x)
    _, _, z_mup = mup.forward_with_preactivations(x)
    for a, b in zip(z_ntk, z_mup, strict=True):
        torch.testing.assert_close(a, b)


def test_mup_coordinates_at_init():
    """Hidden pre-activations are O(1) at every width; the μP output shrinks as n^-1/2 (a + b = 1 at the
    readout), the NTK output does not."""
    x = _x(64)
    hidden, out_mup, out_ntk = {}, {}, {}
    for n in (64, 4096):
        models = [MLP(16, n, 2, 4, "relu", 2**0.5, 0.0, "mup", seed=s, dtype=F64) for s in range(4)]
        with torch.no_grad():
            hidden[n] = [_rms(z) for m in models for z in m.forward_with_preactivations(x)[2]]
            out_mup[n] = sum(_rms(m(x)) for m in models) / 4
            out_ntk[n] = sum(_rms(MLP(16, n, 2, 4, "relu", 2**0.5, 0.0, "ntk", seed=s, dtype=F64)(x))
                             for s in range(4)) / 4
    for a, b in zip(hidden[64], hidden[4096], strict=True):
        assert 0.7 < a / b < 1.4
    assert 5.0 < out_mup[64] / out_mup[4096] < 13.0  # sqrt(4096 / 64) = 8
    assert 0.5 < out_ntk[64] / out_ntk[4096] < 2.0


def _one_step(parameterization: str, width: int, lr: float = 0.5, seeds: int = 3) -> tuple[list[float], float]:
    """rms change of each hidden layer's activations and of the output after one full-batch GD step on
    ``1/(2n) sum |f - y|^2`` with one global rate, averaged over seeds."""
    x = _x(32)
    y = torch.randn(32, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    dh, df = None, 0.0
    for s in range(seeds):
        model = MLP(16, width, 2, 2, "relu", 2**0.5, 0.0, parameterization, seed=s, dtype=F64)
        with torch.no_grad():
            out0, h0, _ = model.forward_with_preactivations(x)
        loss = 0.5 * (model(x) - y).pow(2).sum(-1).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= lr * g
            out1, h1, _ = model.forward_with_preactivations(x)
        layer = [_rms(b - a) / seeds for a, b in zip(h0[1:], h1[1:], strict=True)]
        dh = layer if dh is None else [u + v for u, v in zip(dh, layer, strict=True)]
        df += _rms(out1 - out0) / seeds
    return dh, df


def test_mup_feature_updates_are_order_one_ntk_vanish():
    """The coordinate check of the mup library: per-coordinate change of the hidden features after one
    step, at widths 128 and 2048. μP: width-independent (Θ(1)); NTK: shrinks as n^-1/2 (4x here).
    The output moves by Θ(1) in both."""
    mup = {n: _one_step("mup", n) for n in (128, 2048)}
    ntk = {n: _one_step("ntk", n) for n in (128, 2048)}
    for a, b in zip(mup[128][0], mup[2048][0], strict=True):
        assert 0.5 < a / b < 2.0, (a, b)
    for a, b in zip(ntk[128][0], ntk[2048][0], strict=True):
        assert a / b > 2.5, (a, b)
    for steps in (mup, ntk):
        assert 0.5 < steps[128][1] / steps[2048][1] < 2.0


def _cfg(**kw) -> RunConfig:
    base = dict(dataset="digits", n_train=32, n_test=10, depth=2, width=64, steps=80, device="cpu")
    base.update(kw)
    return RunConfig(**base)


def test_kernel_change_stays_under_mup_and_falls_under_ntk():
    """kernel_rel_change at widths 64 and 1024 (3 seeds and 1; lr: the same fraction of the critical rate):
    μP within a factor of 2, NTK down by at least 3x. Columns of the kernel regime are NaN under μP."""
    subset = load_subset(_cfg())
    analytic = analytic_blocks(_cfg(), subset)  # shared: μP's kernel limit at init is the NTK one
    change = {}
    for p in ("ntk", "mup"):
        for width in (64, 1024):
            seeds = range(3 if width == 64 else 1)  # the wide kernel's change varies little between seeds
            runs = train_runs([_cfg(parameterization=p, width=width, seed=s) for s in seeds],
                              subset=subset, analytic=analytic)
            assert all(r.status == "ok" for r in runs), [r.error for r in runs]
            change[p, width] = sum(r.metrics["kernel_rel_change"] for r in runs) / len(runs)
            for r in runs:
                regime = [r.metrics[k] for k in KERNEL_REGIME_ONLY]
                assert all(math.isnan(v) for v in regime) if p == "mup" else all(math.isfinite(v) for v in regime)
                assert math.isfinite(r.metrics["kernel_rel_dev_init"])
    assert 0.5 < change["mup", 64] / change["mup", 1024] < 2.0, change
    assert change["ntk", 64] / change["ntk", 1024] >= 3.0, change


def _sweep(**arch) -> dict:
    return dict(name="t", datasets=[dict(name="digits", n_train=[32], n_test=16)],
                architectures=[dict(depth=[2], **arch)], widths=[64], seeds=1)


def test_spec_accepts_mup_and_refuses_gp_check():
    runs = parse_sweep(_sweep(parameterization="mup")).expand()
    assert runs[0].parameterization == "mup"
    with pytest.raises(UserError, match="gp_seeds"):
        parse_sweep({**_sweep(parameterization="mup"), "gp_seeds": 8})
    with pytest.raises(UserError, match="parameterization"):
        parse_sweep(_sweep(parameterization="mean_field"))


def test_report_draws_the_regimes_side_by_side(tmp_path):
    """Synthetic runs, NTK with a kernel change ~ n^-0.7 and μP with ~ n^0: the report draws regimes.png
    and a table with one column per parameterisation and its expected exponents."""
    import numpy as np

    from pipeline.report import build_report
    from pipeline.results import SCALAR_METRICS, RunResult
    from pipeline.store import ResultsStore

    rng = np.random.default_rng(0)
    store = ResultsStore(tmp_path)
    for p, slope in (("ntk", -0.7), ("mup", 0.0)):
        for w in (64, 128, 256):
            pack = []
            for s in range(3):
                m = dict.fromkeys(SCALAR_METRICS, math.nan)
                m.update(kernel_rel_dev_init=w**-0.5 * math.exp(0.1 * rng.normal()),
                         kernel_rel_change=w**slope * math.exp(0.1 * rng.normal()), test_acc=0.8, lin_test_acc=0.8)
                cfg = RunConfig(dataset="digits", n_train=20, n_test=20, width=w, seed=s, steps=10, device="cpu",
                                parameterization=p)
                pack.append(RunResult(cfg, metrics=m))
            store.write_pack(pack)
    md = build_report(tmp_path).read_text()
    image = tmp_path / "report" / "regimes.png"
    assert image.stat().st_size > 10_000
    assert "](regimes.png)" in md and "| measure | NTK | μP |" in md
    row = next(line for line in md.splitlines() if line.startswith("| `kernel_rel_change` | -0."))
    assert "(between -1/2 and -1)" in row and "(0)" in row
