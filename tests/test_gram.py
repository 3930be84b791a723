"""Blocked Grams in Zarr: blocked == dense, symmetric tiling, resume after a kill, bad stores, the model
NTK as a block function, Ray's Dask scheduler, and the ``ntk-sweep gram`` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from kernels.analytic import mlp_kernels
from kernels.gram import (
    ATTR_KEY,
    AnalyticKernel,
    GramError,
    ModelNTK,
    gram_status,
    gram_to_zarr,
    open_gram,
    relu_ntk_tile,
)
from pipeline import cli

REPO = Path(__file__).resolve().parents[1]


def _inputs(n: int, d: int = 13, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------------------ blocked == dense


@pytest.mark.parametrize(
    ("impl", "kind", "w_std", "b_std"),
    [
        ("fused", "ntk", 2**0.5, 0.0),
        ("fused", "ntk", 1.3, 0.4),
        ("fused", "nngp", 1.3, 0.4),
        ("series", "ntk", 2**0.5, 0.0),
        ("series", "nngp", 1.3, 0.0),
        ("generic", "ntk", 2**0.5, 0.0),
    ],
)
def test_symmetric_blocked_equals_dense(tmp_path, impl, kind, w_std, b_std):
    """N = 203 with block 64 (four tiles per side, the last one 11 wide), against float64 mlp_kernels."""
    x = _inputs(203)
    x[7] = 0.0  # a zero-norm input
    kernel = AnalyticKernel(kind=kind, depth=3, w_std=w_std, b_std=b_std, impl=impl)
    result = gram_to_zarr(kernel, x, store=tmp_path / "g.zarr", path="k", block=64, progress=False,
                          attrs={"dataset": "synthetic"})
    assert (result.tiles_total, result.tiles_computed, result.tiles_skipped) == (10, 10, 0)
    assert result.entries_written == 203 * 203
    dense = mlp_kernels(x.astype(np.float64), depth=3, w_std=w_std, b_std=b_std, get=(kind,))[kind]
    gram = open_gram(tmp_path / "g.zarr", "k")
    assert gram.chunks == ((64, 64, 64, 11), (64, 64, 64, 11))
    g = gram.compute()
    assert g.dtype == np.float32
    # float32 compute: the fused path is ~1e-7 of the largest entry; the generic float32 recursion loses
    # ~1e-4 where atan2 meets cos(angle) ~ 1 (the diagonal)
    assert _rel_err(g, dense) < (1e-3 if impl == "generic" else 2e-6)
    assert np.array_equal(g, g.T)

    arr = zarr.open_array(str(tmp_path / "g.zarr"), path="k", mode="r")
    meta = arr.attrs[ATTR_KEY]
    assert meta["gram"] == {  # the format: exactly these keys and values
        "format": 1, "shape": [203, 203], "block": 64, "tiles": [4, 4], "dtype": "float32", "symmetric": True,
        "compressor": "blosc-lz4", "complete": True, "tiles_path": "k_tiles",
    }
    assert meta["gram"]["complete"] is True and meta["gram"]["symmetric"] is True
    assert meta["gram"]["shape"] == [203, 203] and meta["gram"]["dtype"] == "float32"
    assert meta["kernel"]["depth"] == 3 and meta["kernel"]["kind"] == kind and meta["kernel"]["impl"] == impl
    assert meta["data"] == {"dataset": "synthetic"}
    assert meta["inputs"]["x1"]["shape"] == [203, 13]
    assert arr.chunks == (64, 64)
    assert any(c.to_dict()["name"] in ("blosc", "zstd") for c in arr.metadata.codecs)


def test_rectangular_blocked_equals_dense_any_activation(tmp_path):
    """x2 given: every tile computed, the generic path (erf), float64 storage."""
    x1, x2 = _inputs(150, seed=1), _inputs(70, seed=2)
    kernel = AnalyticKernel(kind="ntk", depth=2, activation="erf", b_std=0.2, dtype="float64")
    assert kernel.resolved(10**9).impl == "generic"  # float64: the reference recursion
    assert AnalyticKernel(activation="erf").resolved(10**9).impl == "compiled"  # float32: the fused one
    result = gram_to_zarr(kernel, x1, x2, store=tmp_path / "g.zarr", path="grams/erf", block=32,
                          dtype="float64", compressor="zstd", progress=False)
    assert result.tiles_computed == 5 * 3
    dense = mlp_kernels(x1.astype(np.float64), x2.astype(np.float64), depth=2, activation="erf", b_std=0.2)
    g = open_gram(tmp_path / "g.zarr", "grams/erf").compute()
    assert g.shape == (150, 70) and g.dtype == np.float64
    np.testing.assert_allclose(g, dense["ntk"], rtol=1e-12, atol=1e-12)


def test_default_block_fits_the_workers_and_a_resume_keeps_it(tmp_path):
    """block=None: N = 1,000 on 2 workers is tiled finer than one 1,000-row tile (kernels.tiles.choose_block);
    a resume with another worker count keeps the stored block instead of refusing a 'different' Gram."""
    from kernels.tiles import choose_block, tile_grid

    def linear(a, b):
        return a @ b.T

    x = _inputs(1000, d=5)
    block = choose_block(1000, workers=2)
    assert block < 1000 and block % 64 == 0
    first = gram_to_zarr(linear, x, store=tmp_path / "g.zarr", path="lin", workers=2, progress=False,
                         max_tiles=1)
    assert first.block == block and first.tiles_total == sum(range(tile_grid(1000, 1000, block)[0] + 1))
    again = gram_to_zarr(linear, x, store=tmp_path / "g.zarr", path="lin", workers=1, progress=False)
    assert again.block == block and again.tiles_skipped == 1
    np.testing.assert_allclose(open_gram(tmp_path / "g.zarr", "lin").compute(), x @ x.T, rtol=1e-5, atol=1e-5)
    assert choose_block(70000, workers=2) == 2048 and choose_block(4000, workers=1) == 2048


def test_auto_impl_resume_keeps_the_stored_path(tmp_path):
    """A Gram started with impl='auto' resolved to one path is resumed on that path even when auto would
    now pick another (here: forced by starting with 'generic' stored as the resolved choice)."""
    x = _inputs(40)
    gram_to_zarr(AnalyticKernel(depth=2, activation="erf", impl="generic"), x, store=tmp_path / "g.zarr",
                 path="k", block=16, progress=False, max_tiles=2)
    result = gram_to_zarr(AnalyticKernel(depth=2, activation="erf"), x, store=tmp_path / "g.zarr", path="k",
                          block=16, progress=False)
    assert result.tiles_skipped == 2
    assert gram_status(tmp_path / "g.zarr", "k")["kernel"]["impl"] == "generic"


def test_symmetric_tiling_computes_upper_tiles_and_mirrors(tmp_path):
    """A counting block function: only tiles i <= j are computed; diagonal tiles get x2 is x1; the lower
    triangle is the transpose; a zarr array works as the input (rows read per tile)."""
    calls = []

    def linear(a, b):
        calls.append((a.shape[0], b.shape[0], b is a))
        return a @ b.T + 0.001 * np.arange(b.shape[0])[None, :] * (b is not a)

    x = _inputs(100, d=5)
    xz = zarr.create_array(str(tmp_path / "x.zarr"), shape=x.shape, chunks=(16, 5), dtype="float32")
    xz[:] = x
    gram_to_zarr(linear, xz, store=tmp_path / "g.zarr", path="lin", block=30, progress=False, workers=1)
    assert len(calls) == 4 * 5 // 2  # 4 tiles per side -> 10 upper tiles
    assert sum(diag for _, _, diag in calls) == 4
    g = open_gram(tmp_path / "g.zarr", "lin").compute()
    assert np.array_equal(g, g.T)
    # tile (0, 1) was computed with the column offsets added, so its mirror (1, 0) carries them transposed
    expected = x[0:30] @ x[30:60].T + 0.001 * np.arange(30)[None, :]
    np.testing.assert_allclose(g[0:30, 30:60], expected, rtol=1e-5)
    np.testing.assert_allclose(g[30:60, 0:30], g[0:30, 30:60].T)
    status = gram_status(tmp_path / "g.zarr", "lin")
    assert (status["tiles_done"], status["tiles_total"]) == (10, 10)
    assert status["kernel"]["type"] == "callable" and status["kernel"]["name"].endswith("linear")


# --------------------------------------------------------------------------------------------- resume


_SLOW_RUN = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from kernels.gram import AnalyticKernel, gram_to_zarr

    class Slow:
        # the same spec as the analytic kernel, but each tile takes >= 0.1 s
        def __init__(self, kernel):
            self.kernel = kernel
        def spec(self):
            return self.kernel.spec()
        def tile(self, a, b, stats=None):
            time.sleep(0.1)
            return self.kernel.tile(a, b, stats)
        def __call__(self, a, b):
            return self.tile(a, b)

    x = np.load(sys.argv[1])
    kernel = Slow(AnalyticKernel(depth=3, impl="fused"))
    gram_to_zarr(kernel, x, store=sys.argv[2], path="ntk", block=16, progress=False, workers=2)
    """
)


def _done_markers(store: Path) -> int:
    tiles = store / "ntk_tiles" / "c"
    if not tiles.is_dir():
        return 0
    return sum(1 for p in tiles.rglob("*") if p.is_file() and ".partial" not in p.name)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    x = _inputs(160, d=21, seed=3)  # 10 x 10 tiles of 16 -> 55 upper tiles, >= 2.75 s with two workers
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "run.py"
    script.write_text(_SLOW_RUN)
    store = tmp_path / "killed.zarr"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(script), str(tmp_path / "x.npy"), str(store)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _done_markers(store) < 6:
            assert proc.poll() is None, f"the run ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no tiles finished within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    status = gram_status(store, "ntk")
    assert status["gram"]["complete"] is False
    assert 6 <= status["tiles_done"] < status["tiles_total"] == 55

    kernel = AnalyticKernel(depth=3, impl="fused")
    resumed = gram_to_zarr(kernel, x, store=store, path="ntk", block=16, progress=False)
    assert resumed.tiles_skipped == status["tiles_done"]
    assert resumed.tiles_computed == 55 - status["tiles_done"]
    fresh = gram_to_zarr(kernel, x, store=tmp_path / "fresh.zarr", path="ntk", block=16, progress=False)
    assert fresh.tiles_computed == 55
    a = open_gram(store, "ntk").compute()
    b = open_gram(tmp_path / "fresh.zarr", "ntk").compute()
    assert np.array_equal(a, b)  # bit for bit
    assert not np.isnan(a).any()


def test_half_written_chunks_are_never_taken_for_done(tmp_path):
    """A chunk whose marker is missing, or whose marker object is empty (a torn write), is recomputed;
    an incomplete run (max_tiles) reports itself incomplete to readers."""
    x = _inputs(90, seed=4)
    kernel = AnalyticKernel(depth=2, impl="fused")
    store = tmp_path / "g.zarr"
    partial = gram_to_zarr(kernel, x, store=store, path="ntk", block=32, progress=False, max_tiles=2)
    assert partial.tiles_computed == 2
    with pytest.raises(GramError, match="incomplete Gram"):
        open_gram(store, "ntk")
    assert np.isnan(open_gram(store, "ntk", allow_incomplete=True).compute()).any()
    gram_to_zarr(kernel, x, store=store, path="ntk", block=32, progress=False)
    reference = open_gram(store, "ntk").compute()

    chunk = store / "ntk" / "c" / "0" / "1"
    chunk.write_bytes(chunk.read_bytes()[:100])  # a torn chunk ...
    (store / "ntk_tiles" / "c" / "0" / "1").unlink()  # ... whose marker was never written
    chunk2 = store / "ntk" / "c" / "1" / "2"
    chunk2.write_bytes(b"")
    (store / "ntk_tiles" / "c" / "1" / "2").write_bytes(b"")  # a torn marker counts as not done
    again = gram_to_zarr(kernel, x, store=store, path="ntk", block=32, progress=False)
    assert again.tiles_computed == 2
    assert np.array_equal(open_gram(store, "ntk").compute(), reference)


# --------------------------------------------------------------------------------------------- bad stores


def test_missing_corrupt_and_mismatching_stores_raise_clear_errors(tmp_path):
    x = _inputs(40)
    kernel = AnalyticKernel(depth=1, impl="fused")
    with pytest.raises(GramError, match="no such Zarr store"):
        open_gram(tmp_path / "absent.zarr", "ntk")
    store = tmp_path / "g.zarr"
    gram_to_zarr(kernel, x, store=store, path="ntk", block=16, progress=False)
    with pytest.raises(GramError, match="no Gram there"):
        open_gram(store, "nngp")
    with pytest.raises(GramError, match="holds a different Gram, kernel.depth"):
        gram_to_zarr(AnalyticKernel(depth=2, impl="fused"), x, store=store, path="ntk", block=16,
                     progress=False)
    with pytest.raises(GramError, match="inputs.x1"):
        gram_to_zarr(kernel, x + 1, store=store, path="ntk", block=16, progress=False)
    redone = gram_to_zarr(AnalyticKernel(depth=2, impl="fused"), x, store=store, path="ntk", block=16,
                          progress=False, overwrite=True)
    assert redone.tiles_computed == 6
    assert open_gram(store, "ntk").compute().shape == (40, 40)

    (store / "ntk" / "zarr.json").write_text("{ not json")
    with pytest.raises(GramError, match="unreadable Zarr array"):
        open_gram(store, "ntk")
    with pytest.raises(GramError, match="unreadable Zarr array"):
        gram_to_zarr(kernel, x, store=store, path="ntk", block=16, progress=False)

    plain = zarr.create_array(str(tmp_path / "other.zarr"), name="ntk", shape=(3, 3), dtype="float32")
    assert plain.shape == (3, 3)
    with pytest.raises(GramError, match="not an ntk-sweep Gram"):
        open_gram(tmp_path / "other.zarr", "ntk")
    (tmp_path / "file.zarr").write_text("")
    with pytest.raises(GramError, match="not a folder"):
        gram_to_zarr(kernel, x, store=tmp_path / "file.zarr", path="ntk", progress=False)
    with pytest.raises(GramError, match="block"):
        gram_to_zarr(kernel, x, store=store, path="ntk", block=0)
    with pytest.raises(GramError, match="path"):
        gram_to_zarr(kernel, x, store=store, path="../up")


# --------------------------------------------------------------------------------------------- kernels


def test_model_ntk_block_function(tmp_path):
    """The empirical NTK of a torch model, tiled: equals the dense empirical NTK; the spec records the
    model and a hash of its weights (so a resume with other weights is refused)."""
    pytest.importorskip("kernels.empirical")
    from kernels.empirical import empirical_ntk
    from kernels.mlp import MLP

    model = MLP(in_dim=13, width=64, depth=2, out_dim=3, seed=0, dtype=torch.float64)
    x = _inputs(45).astype(np.float64)
    block_fn = ModelNTK(model)
    result = gram_to_zarr(block_fn, x, store=tmp_path / "e.zarr", path="entk", block=16, dtype="float64",
                          progress=False)
    assert result.tiles_computed == 6
    g = open_gram(tmp_path / "e.zarr", "entk").compute()
    dense = empirical_ntk(model, x)
    np.testing.assert_allclose(g, dense, rtol=1e-10, atol=1e-12 * np.abs(dense).max())
    spec = gram_status(tmp_path / "e.zarr", "entk")["kernel"]
    assert spec["model_class"] == "kernels.mlp.MLP" and spec["model_config"]["width"] == 64
    other = ModelNTK(MLP(in_dim=13, width=64, depth=2, out_dim=3, seed=1, dtype=torch.float64))
    with pytest.raises(GramError, match="state_sha256"):
        gram_to_zarr(other, x, store=tmp_path / "e.zarr", path="entk", block=16, dtype="float64",
                     progress=False)


def test_compiled_fused_relu_tile_matches_float64():
    """The torch.compile'd single-pass ReLU kernel (a few seconds to compile) agrees with float64
    mlp_kernels to float32 rounding, on and off the diagonal, with and without bias."""
    x = torch.from_numpy(_inputs(37, d=11, seed=5))
    y = torch.from_numpy(_inputs(23, d=11, seed=6))
    for b_std in (0.0, 0.3):
        ref = mlp_kernels(x.double(), y.double(), depth=3, b_std=b_std)["ntk"].numpy()
        out = relu_ntk_tile(x, y, depth=3, b_std=b_std, compiled=True)
        assert _rel_err(out.numpy(), ref) < 2e-6
    ref = mlp_kernels(x.double(), depth=3)["ntk"].numpy()
    out = relu_ntk_tile(x, None, depth=3, compiled=True).numpy()
    assert _rel_err(out, ref) < 2e-6
    np.testing.assert_allclose(np.diag(out), np.diag(ref), rtol=1e-6)  # pinned c = 1 on the diagonal


def test_ray_scheduler_runs_the_same_graph(tmp_path):
    """ray.util.dask's scheduler (a local Ray instance here) gives the same bits as the threaded one."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.util.dask")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        x = _inputs(70, seed=7)
        kernel = AnalyticKernel(depth=3, impl="fused")
        on_ray = gram_to_zarr(kernel, x, store=tmp_path / "r.zarr", path="ntk", block=32, scheduler="ray",
                              progress=False)
        assert on_ray.tiles_computed == 6 and on_ray.stats["scheduler"] == "ray"
    finally:
        if started:
            ray.shutdown()
    gram_to_zarr(kernel, x, store=tmp_path / "t.zarr", path="ntk", block=32, progress=False)
    assert np.array_equal(open_gram(tmp_path / "r.zarr", "ntk").compute(),
                          open_gram(tmp_path / "t.zarr", "ntk").compute())


# --------------------------------------------------------------------------------------------- CLI


def test_cli_gram_on_real_mnist_subset(tmp_path, real_data, capsys):
    from pipeline.data import make_subset

    out = tmp_path / "grams.zarr"
    argv = ["gram", "--dataset", "mnist", "--split", "train+test", "--n-train", "150", "--n-test", "40",
            "--depth", "3", "--activation", "relu", "--kernel", "ntk", "--out", str(out), "--block", "64",
            "--data-dir", str(real_data), "--no-progress"]
    assert cli.main(argv) == 0
    assert "ntk Gram 190 x 190" in capsys.readouterr().out
    subset = make_subset("mnist", real_data, n_train=150, n_test=40, seed=0)
    x = np.concatenate([subset.x_train, subset.x_test]).astype(np.float64)
    dense = mlp_kernels(x, depth=3)["ntk"]
    g = open_gram(out, "ntk").compute()
    assert _rel_err(g, dense) < 2e-6
    meta = gram_status(out, "ntk")
    assert meta["data"]["subset_key"] == subset.key and meta["data"]["dataset"] == "mnist"
    assert meta["data"]["rows"] == [{"split": "train", "start": 0, "stop": 150},
                                    {"split": "test", "start": 150, "stop": 190}]
    assert cli.main(argv) == 0  # a re-run resumes: nothing left to do
    assert "0 tiles computed, 6 already done" in capsys.readouterr().out


@pytest.mark.parametrize("method", [None, "standardize"])
def test_cli_gram_whole_split_no_balancing(tmp_path, method):
    """--n all on scikit-learn's digits (no download): every row of both splits, preprocessed block by block
    exactly as pipeline.preprocess.preprocess_images does (default per_image; standardize with the train
    split's statistics)."""
    from pipeline.data import load_dataset
    from pipeline.preprocess import preprocess_images

    out = tmp_path / "d.zarr"
    argv = ["gram", "--dataset", "digits", "--split", "train+test", "--n", "all", "--depth", "2", "--kernel",
            "nngp", "--out", str(out), "--block", "512", "--no-progress"]
    assert cli.main(argv + (["--preprocess", method] if method else [])) == 0
    x_tr, _ = load_dataset("digits", None, "train")
    x_te, _ = load_dataset("digits", None, "test")
    a, b = preprocess_images(x_tr, x_te, method or "per_image", 16)
    assert gram_status(out, "nngp")["data"]["preprocess"] == (method or "per_image")
    dense = mlp_kernels(np.concatenate([a, b]).astype(np.float64), depth=2, get=("nngp",))["nngp"]
    g = open_gram(out, "nngp").compute()
    assert g.shape == (1797, 1797)
    assert _rel_err(g, dense) < 2e-6
    assert gram_status(out, "nngp")["data"]["rows"][1] == {"split": "test", "start": 1352, "stop": 1797}


def test_cli_gram_bad_arguments_exit_2(tmp_path, capsys):
    base = ["gram", "--dataset", "digits", "--out", str(tmp_path / "g.zarr"), "--no-progress"]
    assert cli.main([*base, "--block", "0"]) == 2
    assert "--block 0" in capsys.readouterr().err
    assert cli.main([*base, "--activation", "nope"]) == 2
    assert "unknown activation 'nope'" in capsys.readouterr().err
    assert cli.main([*base, "--split", "train+test", "--n", "50"]) == 2
    assert cli.main(["gram", "--dataset", "nosuch", "--out", str(tmp_path / "g.zarr")]) == 2
    assert "unknown dataset 'nosuch'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["gram", "--dataset", "digits", "--out", str(tmp_path / "file")]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main([*base, "--kernel", "bogus"])
    assert exc.value.code == 2
    assert not (tmp_path / "g.zarr").exists()  # nothing written for bad input


def test_gram_attributes_are_plain_json(tmp_path):
    x = _inputs(20)
    gram_to_zarr(AnalyticKernel(depth=1), x, store=tmp_path / "g.zarr", path="ntk", block=8, progress=False,
                 attrs={"dataset": "synthetic", "rows": (0, 20)})
    meta = json.loads((tmp_path / "g.zarr" / "ntk" / "zarr.json").read_text())["attributes"][ATTR_KEY]
    assert meta["data"] == {"dataset": "synthetic", "rows": [0, 20]}
    assert meta["kernel"]["impl"] == "fused"  # "auto" resolved and recorded
