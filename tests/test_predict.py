"""``kernels.solve`` and ``ntk-sweep predict``: precision of the out-of-core path, resume, provenance, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from kernels.analytic import mlp_kernels
from kernels.solve import SolveError, choose_method, solve
from pipeline.cli import main as cli_main


def _digits_kernels(n_train: int = 500, n_test: int = 200, kind: str = "nngp", depth: int = 2):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data[: n_train + n_test].astype(np.float64)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    xt = torch.tensor(x)
    k = mlp_kernels(xt, xt, depth=depth, activation="relu", b_std=0.3)[kind].numpy()
    y = np.eye(10)[d.target[: n_train + n_test]] - 0.1
    return k[:n_train, :n_train], k[n_train:, :n_train], y[:n_train]


@pytest.mark.parametrize("diag_reg", [1e-4, 1e-8])
def test_out_of_core_path_matches_float64(diag_reg):
    """The float32-factor PCG (forced at small n) agrees with the in-memory float64 Cholesky to <= 1e-6."""
    k, ks, y = _digits_kernels()
    k32, ks32 = k.astype(np.float32), ks.astype(np.float32)  # the stored (float32) Gram is the matrix
    ref = solve(k32, y, ks32, diag_reg=diag_reg, method="float64")
    out = solve(k32, y, ks32, diag_reg=diag_reg, method="float32-pcg")
    assert ref.method == "float64" and out.method == "float32-pcg"
    assert np.linalg.norm(out.pred - ref.pred) / np.linalg.norm(ref.pred) <= 1e-6
    assert np.linalg.norm(out.alpha - ref.alpha) / np.linalg.norm(ref.alpha) <= 1e-6
    # and against numpy's own float64 solve
    a = k32.astype(np.float64)
    a.flat[:: len(a) + 1] += ref.lam
    alpha = np.linalg.solve(a, y)
    assert np.linalg.norm(out.alpha - alpha) / np.linalg.norm(alpha) <= 1e-6


def test_out_of_core_from_zarr_reader(tmp_path):
    """The same through Zarr arrays read panel by panel (panels smaller than the matrix)."""
    import zarr

    import kernels.solve as ks_mod

    k, ks, y = _digits_kernels(700, 150)
    za = zarr.create_array(str(tmp_path / "g.zarr"), name="k", shape=k.shape, chunks=(128, 128), dtype="float32")
    za[:] = k.astype(np.float32)
    zt = zarr.create_array(str(tmp_path / "g.zarr"), name="t", shape=ks.shape, chunks=(128, 128), dtype="float32")
    zt[:] = ks.astype(np.float32)
    ref = solve(k.astype(np.float32), y, ks.astype(np.float32), method="float64")  # scipy's LAPACK
    old = ks_mod._PANEL, ks_mod._SUB, ks_mod._SCIPY_MAX_N
    ks_mod._PANEL, ks_mod._SUB, ks_mod._SCIPY_MAX_N = 256, 100, 0
    try:
        out = solve(za, y, zt, method="float32-pcg")
        blocked = solve(za, y, zt, method="float64")  # the blocked in-place float64 Cholesky
    finally:
        ks_mod._PANEL, ks_mod._SUB, ks_mod._SCIPY_MAX_N = old
    assert np.linalg.norm(out.pred - ref.pred) / np.linalg.norm(ref.pred) <= 1e-6
    assert np.linalg.norm(blocked.pred - ref.pred) / np.linalg.norm(ref.pred) <= 1e-12


def test_solve_vector_rhs_absolute_reg_and_time():
    k, ks, y = _digits_kernels(300, 50, kind="ntk")
    r = solve(k, y[:, 0], ks, diag_reg=1e-3, absolute=True)
    assert r.alpha.shape == (300,) and r.pred.shape == (50,) and r.lam == 1e-3
    inf = solve(k, y, ks, diag_reg=1e-6)
    zero = solve(k, y, ks, diag_reg=1e-6, time=0.0)
    late = solve(k, y, ks, diag_reg=1e-6, time=1e12)
    assert np.abs(zero.pred).max() == 0.0
    assert np.linalg.norm(late.pred - inf.pred) / np.linalg.norm(inf.pred) < 1e-6
    mid = solve(k, y, ks, diag_reg=1e-6, time=10.0)
    assert 0 < np.linalg.norm(mid.pred) < np.linalg.norm(inf.pred) * 1.5


def test_choose_method_and_refusals():
    assert choose_method(10_000) == "float64"
    assert choose_method(50_000) == "float32-pcg"
    with pytest.raises(SolveError, match="budget"):
        choose_method(70_000, memory_budget=12 * 2**30)
    with pytest.raises(SolveError, match="finite time"):
        choose_method(50_000, time=10.0)
    with pytest.raises(SolveError):
        solve(np.eye(3), np.ones(4))


# ------------------------------------------------------------------------------------------------ CLI


def _predict(capsys, store, *extra) -> tuple[int, str, str]:
    argv = ["predict", "--dataset", "digits", "--n-train", "400", "--n-test", "all", "--kernel", "nngp",
            "--depth", "2", "--b-std", "0.3", "--block", "128", "--gram", str(store), "--no-progress",
            "--format", "json", *extra]
    rc = cli_main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_json_resume_and_provenance(tmp_path, capsys):
    import pyarrow.parquet as pq
    import zarr

    store = tmp_path / "g.zarr"
    rc, out, err = _predict(capsys, store)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    for key in ("test_acc", "test_loss", "n_train", "n_test", "kernel", "wall_s"):
        assert key in res
    assert res["n_train"] == 400 and res["kernel"] == "nngp" and res["test_acc"] > 0.9
    assert res["tiles"]["nngp_train"]["skipped"] == 0
    table = pq.read_table(res["predictions"])
    assert table.num_rows == res["n_test"]
    assert float((table["label"].to_numpy() == table["pred_class"].to_numpy()).mean()) == res["test_acc"]

    # interrupt: forget two tiles of the train Gram (their record and their data)
    tiles = zarr.open_array(str(store), path="nngp_train_tiles", mode="r+")
    gram = zarr.open_array(str(store), path="nngp_train", mode="r+")
    tiles[0, 1] = 0
    tiles[1, 2] = 0
    gram[0:128, 128:256] = np.nan
    gram[128:256, 256:384] = np.nan
    rc, out, err = _predict(capsys, store)
    assert rc == 0, err
    again = json.loads(out.strip().splitlines()[-1])
    assert again["tiles"]["nngp_train"] == {"computed": 2, "skipped": res["tiles"]["nngp_train"]["skipped"] - 2
                                            + res["tiles"]["nngp_train"]["computed"]}
    assert again["tiles"]["nngp_test_train"]["computed"] == 0
    assert again["test_acc"] == res["test_acc"] and again["test_loss"] == pytest.approx(res["test_loss"], rel=1e-12)

    # provenance: another depth, another subset -> one line, exit 2, nothing overwritten
    for extra in (("--depth", "3"), ("--seed", "1"), ("--preprocess", "unit_norm")):
        argv_extra = list(extra)
        rc, out, err = _predict(capsys, store, *argv_extra)
        assert rc == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("error: --gram") and "computed for other inputs" in err
    # --overwrite replaces it
    rc, out, err = _predict(capsys, store, "--depth", "3", "--overwrite")
    assert rc == 0, err


@pytest.mark.parametrize("extra, match", [
    (("--n-test", "0"), "--n-test 0"),
    (("--n-train", "abc"), "--n-train 'abc'"),
    (("--diag-reg", "-1"), "--diag-reg"),
    (("--diag-reg", "nan"), "--diag-reg"),
    (("--time", "5"), "--time"),  # nngp
    (("--kernel", "ntk", "--time", "5", "--memory-budget", "0.0001"), "finite time"),
    (("--block", "0"), "--block"),
    (("--depth", "-1"), "--depth"),
    (("--memory-budget", "0"), "--memory-budget"),
])
def test_cli_bad_flags(tmp_path, capsys, extra, match):
    rc, out, err = _predict(capsys, tmp_path / "g.zarr", *extra)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err
    assert not (tmp_path / "g.zarr" / "nngp_train").exists()


def test_cli_ntk_finite_time(tmp_path, capsys):
    store = tmp_path / "g.zarr"
    rc, out, err = _predict(capsys, store, "--kernel", "ntk", "--time", "1e9")
    assert rc == 0, err
    late = json.loads(out.strip().splitlines()[-1])
    rc, out, err = _predict(capsys, store, "--kernel", "ntk")
    inf = json.loads(out.strip().splitlines()[-1])
    assert late["test_acc"] == inf["test_acc"] and late["solver"] == "float64-eigh"


@pytest.mark.skipif(not os.environ.get("NTK_SWEEP_DATA"), reason="needs $NTK_SWEEP_DATA (real MNIST)")
def test_cli_real_mnist_subset(tmp_path, capsys):
    argv = ["predict", "--dataset", "mnist", "--n-train", "1000", "--n-test", "1000", "--kernel", "nngp",
            "--depth", "1", "--w-std", "0.3162", "--b-std", "0.6928", "--gram", str(tmp_path / "m.zarr"),
            "--no-progress", "--format", "json", "--solver", "float32-pcg"]
    assert cli_main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_test"] == 1000 and res["solver"] == "float32-pcg" and res["test_acc"] > 0.85
    assert res["residual"] <= 1e-8  # tol 1e-9 on the recursive residual; this is the true one
