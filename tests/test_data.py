"""Loaders, subsets and their cache: synthetic files for bad input, the real MNIST/CIFAR-10 files else."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline import data
from pipeline.data import load_dataset, make_subset, resolve_data_root
from pipeline.errors import UserError

# ----------------------------------------------------------------------------------- synthetic files


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, gz: bool = False) -> Path:
    """Write ``array`` (uint8) as an IDX file; ``magic`` defaults to the right one for its rank."""
    magic = 0x800 | array.ndim if magic is None else magic
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def fake_mnist(folder: Path, *, n_train: int = 30, n_test: int = 20, gz: bool = True, seed: int = 0):
    """Four small IDX files with 28x28 random images, labels cycling 0..9; returns the train/test arrays."""
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y, gz=gz)
        arrays[split] = (x, y)
    return arrays


def write_cifar_py(path: Path, x_hwc: np.ndarray, labels, protocol: int = 2) -> None:
    """A CIFAR-10 python batch like the official ones (CHW rows of 3072 bytes)."""
    flat = x_hwc.transpose(0, 3, 1, 2).reshape(len(x_hwc), -1)
    batch = {b"batch_label": b"synthetic", b"labels": [int(v) for v in labels], b"data": flat}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def write_cifar_bin(path: Path, x_hwc: np.ndarray, labels) -> None:
    flat = x_hwc.transpose(0, 3, 1, 2).reshape(len(x_hwc), -1)
    rows = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], flat], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(rows.tobytes())


def fake_cifar(base: Path, rows: int = 7, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both CIFAR-10 layouts under ``base`` with ``rows`` images per batch; returns the split arrays."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"train": [], "test": []}
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(rows, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=rows)
        write_cifar_py(base / "cifar-10-batches-py" / batch, x, y)
        write_cifar_bin(base / "cifar-10-batches-bin" / f"{batch}.bin", x, y)
        out["test" if batch == "test_batch" else "train"].append((x, y))
    return {s: (np.concatenate([x for x, _ in v]), np.concatenate([y for _, y in v])) for s, v in out.items()}


def one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# ----------------------------------------------------------------------------------- data root


def test_resolve_data_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("NTK_SWEEP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("NTK_SWEEP_DATA")
    assert resolve_data_root(None) == tmp_path / "xdg" / "ntk-sweep" / "data"


# ----------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("layout", ["", "mnist", "mnist/raw", "MNIST/raw"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_layouts_and_compression(tmp_path, layout, gz):
    arrays = fake_mnist(tmp_path / layout, gz=gz)
    for split in ("train", "test"):
        x, y = load_dataset("mnist", tmp_path, split)
        assert x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x, arrays[split][0])
        np.testing.assert_array_equal(y, arrays[split][1])


def test_fashion_mnist_uses_its_own_folder(tmp_path):
    fake_mnist(tmp_path / "mnist", seed=1)
    arrays = fake_mnist(tmp_path / "fashion_mnist", seed=2)
    x, _ = load_dataset("fashion_mnist", tmp_path, "train")
    np.testing.assert_array_equal(x, arrays["train"][0])


def test_flat_mnist_files_are_not_taken_for_fashion_mnist(tmp_path, real_data):
    """Both datasets use the same file names; real MNIST archives laid out flat must not load as Fashion."""
    for f in (real_data / "mnist").glob("t10k-*.gz"):
        (tmp_path / f.name).symlink_to(f)
    x, _ = load_dataset("mnist", tmp_path, "test")
    assert x.shape == (10000, 28, 28)
    with pytest.raises(UserError) as excinfo:
        load_dataset("fashion_mnist", tmp_path, "test")
    one_line_error(excinfo, "t10k-images-idx3-ubyte.gz", "the mnist file, not fashion_mnist")


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_dataset("mnist", tmp_path, "train")
    one_line_error(excinfo, str(tmp_path / "mnist" / "raw"), "ntk-sweep data fetch mnist")


def test_idx_wrong_magic(tmp_path):
    fake_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros((30, 28, 28), np.uint8), gz=True)  # an image file under the labels name
    with pytest.raises(UserError) as excinfo:
        load_dataset("mnist", tmp_path, "train")
    one_line_error(excinfo, str(labels), "magic number 2051")


def test_idx_truncated(tmp_path):
    fake_mnist(tmp_path, gz=False)
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(UserError) as excinfo:
        load_dataset("mnist", tmp_path, "test")
    one_line_error(excinfo, str(images), "truncated")


def test_idx_truncated_gzip(tmp_path):
    fake_mnist(tmp_path, gz=True)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-50])
    with pytest.raises(UserError) as excinfo:
        load_dataset("mnist", tmp_path, "test")
    one_line_error(excinfo, str(images), "gzip")


def test_idx_label_count_mismatch(tmp_path):
    fake_mnist(tmp_path)
    labels = write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8), gz=True)
    with pytest.raises(UserError) as excinfo:
        load_dataset("mnist", tmp_path, "train")
    one_line_error(excinfo, str(labels), "29 labels", "30 images")


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_dataset("imagenet", tmp_path, "train")
    one_line_error(excinfo, "imagenet")
    with pytest.raises(UserError):
        load_dataset("digits", tmp_path, "validation")


# ----------------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("under", ["", "cifar10"])
def test_cifar_layouts_agree_and_take_rows_from_file(tmp_path, under):
    arrays = fake_cifar(tmp_path / under, rows=7)
    for split, n in (("train", 35), ("test", 7)):
        x_py, y_py = data.load_cifar10(tmp_path, split, "py")
        x_bin, y_bin = data.load_cifar10(tmp_path, split, "bin")
        assert x_py.shape == (n, 32, 32, 3) and x_py.dtype == np.uint8
        np.testing.assert_array_equal(x_py, arrays[split][0])
        np.testing.assert_array_equal(x_py, x_bin)
        np.testing.assert_array_equal(y_py, y_bin)
        np.testing.assert_array_equal(load_dataset("cifar10", tmp_path, split)[0], x_py)


def test_cifar_protocol4_pickle_loads(tmp_path):
    x = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    write_cifar_py(tmp_path / "batch", x, [1, 2], protocol=4)
    got, labels = data.read_cifar_python_batch(tmp_path / "batch")
    np.testing.assert_array_equal(got, x)
    assert labels.tolist() == [1, 2]


def test_cifar_wrong_shapes(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, protocol=2))
    with pytest.raises(UserError) as excinfo:
        data.read_cifar_python_batch(bad)
    one_line_error(excinfo, str(bad), "(4, 3000)")
    bad.write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, protocol=2))
    with pytest.raises(UserError) as excinfo:
        data.read_cifar_python_batch(bad)
    one_line_error(excinfo, str(bad), "4 images")
    binary = tmp_path / "bad.bin"
    binary.write_bytes(bytes(3073 * 2 + 5))
    with pytest.raises(UserError) as excinfo:
        data.read_cifar_binary_batch(binary)
    one_line_error(excinfo, str(binary), "3073-byte")


class _Payload:
    """Unpickling this would run ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.parent.mkdir()
    batch.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": []}, protocol=2))
    with pytest.raises(UserError) as excinfo:
        load_dataset("cifar10", tmp_path, "test")
    one_line_error(excinfo, str(batch), "refused pickle global")
    assert not marker.exists()


def test_pickle_with_other_numpy_global_is_refused(tmp_path):
    batch = tmp_path / "batch"
    batch.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=5))
    with pytest.raises(UserError) as excinfo:  # protocol 5 arrays ask for numpy._core.numeric._frombuffer
        data.read_cifar_python_batch(batch)
    one_line_error(excinfo, str(batch), "_frombuffer")


# ----------------------------------------------------------------------------------- real files


def test_real_mnist_and_cifar_shapes(real_data):
    x, y = load_dataset("mnist", real_data, "test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x, y = load_dataset("cifar10", real_data, "test")
    assert x.shape == (1017, 32, 32, 3) and y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


@pytest.mark.parametrize("split", ["train", "test"])
def test_real_cifar_py_and_bin_identical(real_data, split):
    x_py, y_py = data.load_cifar10(real_data, split, "py")
    x_bin, y_bin = data.load_cifar10(real_data, split, "bin")
    assert x_py.shape == ((5085 if split == "train" else 1017), 32, 32, 3)
    np.testing.assert_array_equal(x_py, x_bin)
    np.testing.assert_array_equal(y_py, y_bin)


def test_digits_split():
    x_train, y_train = load_dataset("digits", None, "train")
    x_test, y_test = load_dataset("digits", None, "test")
    assert x_train.shape == (1352, 8, 8) and x_test.shape == (445, 8, 8)
    assert x_train.dtype == np.uint8 and x_train.max() == 16
    assert np.bincount(y_test).min() >= 43


def _check_balanced(subset, n_train: int, n_test: int, k: int, d: int) -> None:
    assert subset.x_train.shape == (n_train, d) and subset.x_train.dtype == np.float32
    assert subset.x_test.shape == (n_test, d) and subset.x_test.dtype == np.float32
    assert subset.y_train.shape == (n_train, k) and subset.y_train.dtype == np.float32
    assert subset.labels_train.dtype == np.int64 and subset.labels_test.dtype == np.int64
    assert np.bincount(subset.labels_train, minlength=k).tolist() == [n_train // k] * k
    assert np.bincount(subset.labels_test, minlength=k).tolist() == [n_test // k] * k
    np.testing.assert_allclose(subset.y_train, np.eye(k)[subset.labels_train] - 1 / k, atol=1e-7)


@pytest.mark.parametrize(("name", "d"), [("mnist", 784), ("cifar10", 3072)])
def test_real_subset_balanced_and_reproducible(real_data, tmp_path, name, d):
    first = make_subset(name, real_data, n_train=1000, n_test=500, seed=0, cache_dir=tmp_path / "a")
    _check_balanced(first, 1000, 500, 10, d)
    again = make_subset(name, real_data, n_train=1000, n_test=500, seed=0, cache_dir=tmp_path / "b")
    cached = make_subset(name, real_data, n_train=1000, n_test=500, seed=0, cache_dir=tmp_path / "a")
    for other in (again, cached):
        assert other.key == first.key
        for field in ("x_train", "y_train", "labels_train", "index_train", "x_test", "labels_test"):
            np.testing.assert_array_equal(getattr(other, field), getattr(first, field))
    assert len(set(first.index_train.tolist())) == 1000
    other_seed = make_subset(name, real_data, n_train=1000, n_test=500, seed=1, cache_dir=tmp_path / "a")
    assert other_seed.key != first.key
    assert not np.array_equal(other_seed.index_train, first.index_train)
    # Rows come from the official splits, each image centred and scaled to unit variance (per_image).
    raw = {s: load_dataset(name, real_data, s)[0].reshape(-1, d) / 255.0 for s in ("train", "test")}

    def per_image(rows):
        centred = rows - rows.mean(axis=1, keepdims=True)
        return centred / centred.std(axis=1, keepdims=True)

    np.testing.assert_allclose(first.x_train, per_image(raw["train"][first.index_train]), atol=1e-4)
    np.testing.assert_allclose(first.x_test, per_image(raw["test"][first.index_test]), atol=1e-4)


# ----------------------------------------------------------------------------------- subsets (digits)


def test_binary_task(tmp_path):
    s = make_subset("digits", None, n_train=40, n_test=20, seed=3, classes=[3, 5], cache_dir=tmp_path)
    assert s.classes == (3, 5) and s.y_train.shape == (40, 1)
    assert set(s.labels_train.tolist()) == {0, 1}
    np.testing.assert_array_equal(s.y_train[:, 0], np.where(s.labels_train == 1, 1.0, -1.0))
    _, y = load_dataset("digits", None, "train")
    np.testing.assert_array_equal(np.array(s.classes)[s.labels_train], y[s.index_train])


def test_remainder_spread_over_first_classes(tmp_path):
    s = make_subset("digits", None, n_train=13, n_test=12, seed=0, cache_dir=tmp_path)
    assert np.bincount(s.labels_train, minlength=10).tolist() == [2, 2, 2] + [1] * 7
    assert np.bincount(s.labels_test, minlength=10).tolist() == [2, 2] + [1] * 8


def test_digits_train_and_test_disjoint(tmp_path):
    s = make_subset("digits", None, n_train=500, n_test=200, seed=0, cache_dir=tmp_path)
    from sklearn.datasets import load_digits

    test_mask = data._digits_test_mask(load_digits().target)
    original_train = np.flatnonzero(~test_mask)[s.index_train]
    original_test = np.flatnonzero(test_mask)[s.index_test]
    assert not set(original_train.tolist()) & set(original_test.tolist())


def test_label_noise_only_on_train(tmp_path):
    clean = make_subset("digits", None, n_train=200, n_test=100, seed=5, cache_dir=tmp_path)
    noisy = make_subset("digits", None, n_train=200, n_test=100, seed=5, label_noise=0.25, cache_dir=tmp_path)
    np.testing.assert_array_equal(clean.index_train, noisy.index_train)
    assert (clean.labels_train != noisy.labels_train).sum() == 50
    np.testing.assert_array_equal(clean.labels_test, noisy.labels_test)
    np.testing.assert_allclose(noisy.y_train, np.eye(10)[noisy.labels_train] - 0.1, atol=1e-7)


@pytest.mark.parametrize("method", ["per_image", "standardize", "unit_norm", "raw01"])
def test_preprocessing(tmp_path, method):
    s = make_subset("digits", None, n_train=100, n_test=50, seed=0, preprocess=method, cache_dir=tmp_path)
    if method == "unit_norm":
        np.testing.assert_allclose((s.x_test.astype(np.float64) ** 2).sum(axis=1), 64, rtol=1e-5)
    elif method == "raw01":
        assert s.x_train.min() >= 0 and s.x_train.max() == 1.0
    elif method == "per_image":
        for x in (s.x_train.astype(np.float64), s.x_test.astype(np.float64)):
            np.testing.assert_allclose(x.mean(axis=1), 0, atol=1e-6)
            np.testing.assert_allclose(x.std(axis=1), 1, rtol=1e-5)
    else:
        constant = s.x_train.std(axis=0) == 0  # digits have always-blank corner pixels
        assert constant.any() and np.all(s.x_train[:, constant] == 0)
        np.testing.assert_allclose(s.x_train[:, ~constant].std(axis=0), 1, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_train": 2000}, "n_train=2000"),
        ({"n_test": 100, "classes": [0, 1]}, "n_test=100"),
        ({"n_train": 5}, "n_train=5"),
        ({"classes": [3, 3]}, "classes="),
        ({"classes": [0, 12]}, "classes="),
        ({"preprocess": "whiten"}, "preprocess="),
        ({"label_noise": 1.5}, "label_noise="),
        ({"seed": -1}, "seed="),
    ],
)
def test_bad_subset_arguments_write_nothing(tmp_path, kwargs, needle):
    args = {"n_train": 100, "n_test": 50, "seed": 0, "cache_dir": tmp_path / "cache", **kwargs}
    with pytest.raises(UserError) as excinfo:
        make_subset("digits", None, **args)
    one_line_error(excinfo, needle)
    assert not (tmp_path / "cache").exists()


def test_unknown_dataset_subset(tmp_path):
    with pytest.raises(UserError) as excinfo:
        make_subset("svhn", tmp_path, n_train=10, n_test=10, seed=0, cache_dir=tmp_path / "cache")
    one_line_error(excinfo, "svhn")
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------- cache


def test_cache_file_written_once_and_corrupt_cache_recomputed(tmp_path):
    fake_mnist(tmp_path / "data", n_train=60, n_test=30)
    kwargs = {"n_train": 40, "n_test": 20, "seed": 0, "cache_dir": tmp_path / "cache"}
    first = make_subset("mnist", tmp_path / "data", **kwargs)
    files = list((tmp_path / "cache").glob("*.npz"))
    assert [f.name for f in files] == [f"mnist-{first.key}.npz"]
    files[0].write_bytes(b"not a zip file")
    again = make_subset("mnist", tmp_path / "data", **kwargs)
    np.testing.assert_array_equal(again.x_train, first.x_train)
    assert sorted(f.name for f in (tmp_path / "cache").iterdir()) == [f"mnist-{first.key}.npz", data.HASH_INDEX]
    with np.load(files[0]) as z:
        assert str(z["key"]) == first.key


def test_cache_key_tracks_source_files(tmp_path):
    fake_mnist(tmp_path / "a", n_train=60, n_test=30)
    fake_mnist(tmp_path / "b", n_train=70, n_test=30)
    kwargs = {"n_train": 40, "n_test": 20, "seed": 0, "cache_dir": tmp_path / "cache"}
    assert (
        make_subset("mnist", tmp_path / "a", **kwargs).key
        != make_subset("mnist", tmp_path / "b", **kwargs).key
    )


def test_default_cache_dir_is_the_user_cache_never_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "data"
    fake_mnist(root, n_train=40, n_test=20)  # a writable data dir: still not written
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    s = make_subset("mnist", root, n_train=20, n_test=10, seed=0)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert (tmp_path / "xdg" / "ntk-sweep" / "subsets" / f"mnist-{s.key}.npz").is_file()
