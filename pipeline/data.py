"""Datasets: loaders (MNIST-style IDX, CIFAR-10, scikit-learn digits), training subsets and their disk cache.

Datasets (all ten classes, labels 0..9):

* ``mnist`` and ``fashion_mnist``: the four IDX files (gzipped or not), found in ``root/<name>/raw/``,
  ``root/MNIST/raw/`` or ``root/FashionMNIST/raw/`` (torchvision layouts), ``root/<name>/`` or ``root/``,
  first match wins. Images ``(N, 28, 28) uint8``.
* ``cifar10``: the python batches (``cifar-10-batches-py/``) or the binary version
  (``cifar-10-batches-bin/``), under ``root/`` or ``root/cifar10/``. Images ``(N, 32, 32, 3) uint8`` (HWC,
  RGB) for both layouts; the row count comes from each file.
* ``digits``: the 1,797 real 8x8 handwritten digits shipped inside scikit-learn, needing no download.
  Pixels are kept as they are, integers 0..16, stored as uint8 (``raw01`` divides by 16). Split without
  randomness: within each class, in scikit-learn's order, every fourth example (ranks 3, 7, 11, ...) is a test
  example; that gives 1,352 train and 445 test images ``(N, 8, 8) uint8``.

:func:`make_subset` draws class-balanced, seeded subsets and caches them as one ``.npz`` per argument set, in
the user cache directory (``$XDG_CACHE_HOME/ntk-sweep/subsets``); the data directory is only ever read.

Bad files are one-line errors (:class:`~pipeline.errors.UserError`) naming the file: unreadable (permissions), wrong
magic number, header dimensions that do not fit the format (:data:`MAX_IDX_BYTES`), truncated, or larger than
their header says. A gzipped IDX file is decompressed in a stream and never past the size its header implies,
so a gzip bomb costs no more memory than an honest file; CIFAR-10 batches are refused above the size of
:data:`MAX_CIFAR_ROWS` records before they are read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import os
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.atomic import atomic_file
from pipeline.errors import UserError
from pipeline.preprocess import PREPROCESSING, preprocess_images

if TYPE_CHECKING:
    from pipeline.run_config import RunConfig

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion_mnist", "cifar10", "digits")
SPLITS = ("train", "test")
NUM_CLASSES = 10
PIXEL_MAX = {"mnist": 255, "fashion_mnist": 255, "cifar10": 255, "digits": 16}
DATA_ENV_VAR = "NTK_SWEEP_DATA"
CACHE_FORMAT_VERSION = 2  # 2: keyed on the source files' sha256 (1: their names and sizes)
HASH_INDEX = "source-hashes.json"

_IDX_IMAGES_MAGIC = 0x803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x801  # unsigned bytes, 1 dimension
_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}

CIFAR_LAYOUTS = ("py", "bin")
_CIFAR_DIRS = {"py": "cifar-10-batches-py", "bin": "cifar-10-batches-bin"}
_CIFAR_SUFFIX = {"py": "", "bin": ".bin"}
_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_PIXELS = 3 * 32 * 32
MAX_CIFAR_ROWS = 10_000  # records per batch file, as in the official batches
_CIFAR_PICKLE_OVERHEAD = 1 << 20  # labels list, file names and keys of a python batch: ~0.3 MB officially
# An IDX file above this size (after decompression) is refused from its header; MNIST's largest is 47 MB.
MAX_IDX_BYTES = 1 << 30


# --------------------------------------------------------------------------------------------- locations


def user_cache_dir() -> Path:
    """Per-user cache folder: ``$XDG_CACHE_HOME/ntk-sweep``, else ``~/.cache/ntk-sweep``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ntk-sweep"


def resolve_data_root(data_dir: str | Path | None) -> Path:
    """The data root: ``data_dir`` (``--data-dir``), else ``$NTK_SWEEP_DATA``, else ``<user cache>/data``.

    Only decides the path; nothing is created or checked.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return user_cache_dir() / "data"


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r} (expected one of: {', '.join(DATASETS)})")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (expected 'train' or 'test')")


def _how_to_get(name: str, root: Path) -> str:
    return (
        f"download them with `ntk-sweep data fetch {name} --root {root}`, or point --data-dir / "
        f"${DATA_ENV_VAR} at a folder that has them"
    )


# --------------------------------------------------------------------------------------------- IDX files


def _open_input(path: Path):
    """``open(path, "rb")``; an unreadable file (permissions, a folder, gone) is a one-line :class:`UserError`."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot read dataset file ({exc.strerror or exc})") from None


def _read_up_to(stream, n: int, path: Path) -> bytes:
    """Up to ``n`` bytes (fewer only at the end of the stream); gzip and I/O errors become a :class:`UserError`."""
    parts, got = [], 0
    try:
        while got < n:
            chunk = stream.read(min(n - got, 1 << 24))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: truncated or corrupt gzip file ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read dataset file ({exc.strerror or exc})") from None
    return b"".join(parts)


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped or not) and check it.

    ``magic`` is the expected magic number: ``0x803`` (2051) for ``(N, rows, cols)`` images, ``0x801``
    (2049) for ``(N,)`` labels. Returns a writable uint8 array with the dimensions from the header.
    Raises :class:`UserError` naming the file on a wrong magic number, header dimensions above
    :data:`MAX_IDX_BYTES`, or a size that does not match them. A gzipped file is decompressed as a stream,
    never past one byte beyond what its header implies (a gzip bomb costs no more memory than its header says).
    """
    path = Path(path)
    with _open_input(path) as raw_file:
        gzipped = _read_up_to(raw_file, 2, path) == b"\x1f\x8b"
        raw_file.seek(0)
        stream = gzip.GzipFile(fileobj=raw_file, mode="rb") if gzipped else raw_file
        head = _read_up_to(stream, 4, path)
        if len(head) < 4:
            raise UserError(f"{path}: truncated IDX file ({len(head)} bytes, no header)")
        found = int.from_bytes(head, "big")
        if found != magic:
            raise UserError(f"{path}: not the expected IDX file (magic number {found}, expected {magic})")
        ndim = head[3]
        header = 4 + 4 * ndim
        dim_bytes = _read_up_to(stream, 4 * ndim, path)
        if len(dim_bytes) < 4 * ndim:
            raise UserError(f"{path}: truncated IDX header ({4 + len(dim_bytes)} bytes, {header} needed)")
        dims = tuple(int.from_bytes(dim_bytes[4 * i : 4 * i + 4], "big") for i in range(ndim))
        expected = header + math.prod(dims)  # Python ints: no overflow
        if expected - header > MAX_IDX_BYTES:
            raise UserError(f"{path}: IDX header dimensions {dims} imply {expected - header:,} bytes, more than the "
                            f"{MAX_IDX_BYTES:,} an IDX file may have here; the file is corrupt")
        if not gzipped:
            size = os.fstat(raw_file.fileno()).st_size
            if size != expected:
                raise UserError(f"{path}: IDX size {size} bytes does not match its dimensions {dims} ({expected} "
                                "bytes expected); the file is truncated or corrupt")
        body = _read_up_to(stream, expected - header + 1, path)  # one byte more tells a longer stream
    if len(body) != expected - header:
        got = f"{header + len(body)} bytes" if len(body) <= expected - header else "more bytes"
        raise UserError(
            f"{path}: IDX size ({got}) does not match its dimensions {dims} ({expected} bytes expected); the file "
            "is truncated or corrupt" + (" (decompression stopped there)" if gzipped and got == "more bytes" else "")
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def _idx_dirs(root: Path, name: str) -> list[Path]:
    return [root / name / "raw", root / _TORCHVISION_DIRS[name] / "raw", root / name, root]


def _find_plain_or_gz(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate_idx(root: Path, name: str, split: str) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of one split; both from the same folder."""
    image_stem, label_stem = _IDX_STEMS[split]
    dirs = _idx_dirs(root, name)
    for directory in dirs:
        images = _find_plain_or_gz(directory, image_stem)
        labels = _find_plain_or_gz(directory, label_stem)
        if images is not None and labels is not None:
            return images, labels
    looked = ", ".join(str(d) for d in dirs)
    raise UserError(
        f"{name} {split} files {image_stem}[.gz] and {label_stem}[.gz] not found in {looked}; "
        + _how_to_get(name, root)
    )


def _check_labels(labels: np.ndarray, path: Path) -> None:
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise UserError(f"{path}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")


def _refuse_other_idx_dataset(root: Path, name: str, paths: Sequence[Path]) -> None:
    """MNIST and Fashion-MNIST share file names, so files found directly in ``root/`` could be either.
    Gzipped files are told apart by their published MD5s; a file that is the *other* dataset's is refused."""
    from pipeline.fetch import CHECKSUMS, md5sum  # fetch imports nothing from here

    for path in paths:
        if path.parent != root or path.suffix != ".gz":
            continue
        try:
            digest = md5sum(path)
        except OSError as exc:
            raise UserError(f"{path}: cannot read dataset file ({exc.strerror or exc})") from None
        for other, table in CHECKSUMS.items():
            if other != name and table.get(path.name) == digest:
                raise UserError(
                    f"{path}: this is the {other} file, not {name} (they share file names); put each dataset "
                    f"in its own folder, e.g. {root / name}/"
                )


def load_idx_dataset(root: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of an MNIST-style dataset: images ``(N, 28, 28) uint8``, labels ``(N,) int64`` in 0..9."""
    image_path, label_path = locate_idx(root, name, split)
    _refuse_other_idx_dataset(root, name, (image_path, label_path))
    images = read_idx(image_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(label_path, _IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise UserError(f"{image_path}: images are {images.shape[1:]}, expected 28x28")
    if len(labels) != len(images):
        raise UserError(f"{label_path}: {len(labels)} labels but {image_path.name} has {len(images)} images")
    _check_labels(labels, label_path)
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------------------------- CIFAR-10


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles written by Python 3 use for bytes."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list; nothing from it was run."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers, bytes, str and numbers, plus the numpy globals of array pickles."""

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedPickle(f"refused pickle global {module}.{name}") from None

    def persistent_load(self, pid):
        raise RefusedPickle("refused pickle persistent id")


def _batch_field(batch: dict, key: str):
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    return None


def _to_hwc(flat: np.ndarray) -> np.ndarray:
    """``(N, 3072)`` rows of 1024 R, 1024 G, 1024 B (row-major 32x32) -> ``(N, 32, 32, 3)`` contiguous."""
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def read_cifar_python_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images ``(N, 32, 32, 3) uint8``, labels ``(N,) int64``.

    The pickle is read with a restricted unpickler: a pickle that asks for any global other than the numpy
    array ones is refused (:class:`UserError`) before anything from it runs.
    """
    path = Path(path)
    limit = MAX_CIFAR_ROWS * (1 + _CIFAR_PIXELS) + _CIFAR_PICKLE_OVERHEAD
    with _open_input(path) as fh:
        raw = _read_up_to(fh, limit + 1, path)
    if len(raw) > limit:
        raise UserError(f"{path}: larger than a CIFAR-10 python batch of {MAX_CIFAR_ROWS:,} images can be "
                        f"({limit:,} bytes); refused before unpickling")
    try:
        batch = _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except RefusedPickle as exc:
        raise UserError(f"{path}: unsafe pickle, {exc}; it was not loaded") from None
    except Exception as exc:  # a corrupt pickle can fail in many ways
        raise UserError(
            f"{path}: not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc})"
        ) from None
    data = _batch_field(batch, "data") if isinstance(batch, dict) else None
    labels = _batch_field(batch, "labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise UserError(f"{path}: CIFAR-10 batch needs a 'data' uint8 array of shape (N, 3072)")
    if data.shape[1] != _CIFAR_PIXELS:
        raise UserError(f"{path}: CIFAR-10 'data' has shape {data.shape}, expected (N, {_CIFAR_PIXELS})")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: CIFAR-10 'labels' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise UserError(
            f"{path}: CIFAR-10 batch has {len(data)} images but 'labels' has shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise UserError(f"{path}: CIFAR-10 labels out of range 0..{NUM_CLASSES - 1}")
    return _to_hwc(data), labels


def read_cifar_binary_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch (records of 1 label byte + 3072 pixel bytes).

    Returns images ``(N, 32, 32, 3) uint8`` and labels ``(N,) int64``; N is the file size / 3073.
    """
    path = Path(path)
    record = 1 + _CIFAR_PIXELS
    with _open_input(path) as fh:
        raw = _read_up_to(fh, MAX_CIFAR_ROWS * record + 1, path)
    if len(raw) > MAX_CIFAR_ROWS * record:
        raise UserError(f"{path}: larger than a CIFAR-10 binary batch of {MAX_CIFAR_ROWS:,} records can be "
                        f"({MAX_CIFAR_ROWS * record:,} bytes)")
    if not raw or len(raw) % record:
        raise UserError(
            f"{path}: size {len(raw)} bytes is not a whole number of {record}-byte CIFAR-10 records"
        )
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, 0].astype(np.int64)
    _check_labels(labels, path)
    return _to_hwc(rows[:, 1:]), labels


def locate_cifar10(root: Path, split: str, layout: str | None = None) -> tuple[str, list[Path]]:
    """``(layout, batch paths)`` of one split; python batches are preferred when both layouts exist."""
    layouts = CIFAR_LAYOUTS if layout is None else (layout,)
    looked = []
    for base in (root, root / "cifar10"):
        for lay in layouts:
            directory = base / _CIFAR_DIRS[lay]
            paths = [directory / f"{b}{_CIFAR_SUFFIX[lay]}" for b in _CIFAR_BATCHES[split]]
            if all(p.is_file() for p in paths):
                return lay, paths
            missing = [p.name for p in paths if not p.is_file()]
            note = f" (missing {', '.join(missing)})" if directory.is_dir() else ""
            looked.append(f"{directory}{note}")
    raise UserError(
        f"cifar10 {split} batches not found in {'; '.join(looked)}; " + _how_to_get("cifar10", root)
    )


def load_cifar10(root: Path, split: str, layout: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 split: images ``(N, 32, 32, 3) uint8`` HWC, labels ``(N,) int64``.

    ``layout`` is ``"py"``, ``"bin"`` or None (python batches if present, else binary).
    """
    layout, paths = locate_cifar10(root, split, layout)
    reader = read_cifar_python_batch if layout == "py" else read_cifar_binary_batch
    parts = [reader(p) for p in paths]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


# --------------------------------------------------------------------------------------------- digits


def _digits_test_mask(labels: np.ndarray) -> np.ndarray:
    """True for every fourth example of each class (ranks 3, 7, ...), in the original order."""
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        mask[np.flatnonzero(labels == c)[3::4]] = True
    return mask


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images ``(N, 8, 8) uint8`` with values 0..16, labels ``(N,) int64``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    test = _digits_test_mask(labels)
    keep = test if split == "test" else ~test
    return images[keep], labels[keep]


# --------------------------------------------------------------------------------------------- loading


def load_dataset(name: str, root: str | Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one official split of a dataset.

    Returns ``(x, y)``: ``x`` uint8 images, ``(N, 28, 28)`` for MNIST-style, ``(N, 32, 32, 3)`` for CIFAR-10,
    ``(N, 8, 8)`` (values 0..16) for digits; ``y`` ``(N,) int64`` labels 0..9. ``root`` None means
    :func:`resolve_data_root` (``$NTK_SWEEP_DATA`` or the user cache); digits ignores it.
    """
    _check_name(name)
    _check_split(split)
    if name == "digits":
        return load_digits_split(split)
    root = resolve_data_root(root)
    if name == "cifar10":
        return load_cifar10(root, split)
    return load_idx_dataset(root, name, split)


def source_files(name: str, root: Path) -> list[Path]:
    """The files a dataset is read from (both splits); for digits, scikit-learn's data file."""
    if name == "digits":
        import sklearn.datasets

        return [Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"]
    if name == "cifar10":
        return [p for s in SPLITS for p in locate_cifar10(root, s)[1]]
    return [p for s in SPLITS for p in locate_idx(root, name, s)]


def _stat_key(path: Path) -> list[int]:
    """What says that a file is unchanged: size, mtime and ctime in ns, inode. A write in place changes
    mtime and ctime; ctime cannot be set back (``touch -d`` sets mtime only, and moves ctime)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise UserError(f"{path}: cannot read dataset file ({exc.strerror or exc})") from None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with _open_input(path) as fh:
        while chunk := _read_up_to(fh, 1 << 20, path):
            digest.update(chunk)
    return digest.hexdigest()


def _load_hash_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / HASH_INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _save_hash_index(folder: Path, index: dict) -> None:
    """Write the index atomically; a cache that cannot be written only costs re-hashing next time."""
    try:
        with atomic_file(folder / HASH_INDEX, "w") as fh:
            json.dump(index, fh)
    except OSError as exc:
        log.warning("could not write %s (%s)", folder / HASH_INDEX, exc)


def source_digests(paths: Sequence[Path], index: dict) -> tuple[list[list], list[list[int]], bool]:
    """``([[file name, sha256], ...], [stat key, ...], index changed)`` of ``paths``.

    ``index`` (the cache dir's ``source-hashes.json``, :func:`_load_hash_index`) remembers each file's sha256
    under its absolute path with its size, mtime, ctime and inode (:func:`_stat_key`); an entry is reused only
    while all of them are unchanged, so an unchanged file is not read again and a file changed in place is
    hashed again. New entries are added to ``index`` (the caller saves it); an entry is added only when the
    file did not change while it was hashed. The stat keys returned are those taken before hashing.
    """
    digests, stats, changed = [], [], False
    for path in paths:
        where = str(path.resolve())
        before = _stat_key(path)
        entry = index.get(where)
        if isinstance(entry, dict) and entry.get("stat") == before and isinstance(entry.get("sha256"), str):
            digest = entry["sha256"]
        else:
            digest = _sha256(path)
            if _stat_key(path) == before:
                index[where] = {"stat": before, "sha256": digest}
                changed = True
        digests.append([path.name, digest])
        stats.append(before)
    return digests, stats, changed


# --------------------------------------------------------------------------------------------- subsets


@dataclass(frozen=True, eq=False)
class Subset:
    """A class-balanced training/test subset, ready for training.

    ``x_*``: ``(n, d) float32`` preprocessed, flattened images. ``y_*``: ``(n, k) float32`` regression
    targets, one-hot minus ``1/k`` (``k`` classes), or for a binary task ``(n, 1)`` with ``-1`` for
    ``classes[0]`` and ``+1`` for ``classes[1]``. ``labels_*``: ``(n,) int64`` class index into ``classes``
    (training labels include any label noise). ``index_*``: ``(n,) int64`` rows of the official split the
    examples were taken from. ``key``: the cache hash of the arguments; ``classes``: original class ids.
    """

    name: str
    classes: tuple[int, ...]
    key: str
    x_train: np.ndarray
    y_train: np.ndarray
    labels_train: np.ndarray
    index_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels_test: np.ndarray
    index_test: np.ndarray

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def dim(self) -> int:
        """Input dimension ``d``."""
        return int(self.x_train.shape[1])


_ARRAY_FIELDS = (
    "x_train",
    "y_train",
    "labels_train",
    "index_train",
    "x_test",
    "y_test",
    "labels_test",
    "index_test",
)


def _check_classes(classes: Sequence[int] | None) -> tuple[int, ...]:
    if classes is None:
        return tuple(range(NUM_CLASSES))
    try:
        out = tuple(int(c) for c in classes)
    except (TypeError, ValueError):
        raise UserError(f"classes={classes!r}: expected a list of class ids 0..{NUM_CLASSES - 1}") from None
    if any(isinstance(c, bool) or int(c) != c for c in classes):
        raise UserError(f"classes={list(classes)!r}: class ids must be integers")
    if len(out) < 2 or len(set(out)) != len(out) or min(out) < 0 or max(out) >= NUM_CLASSES:
        raise UserError(f"classes={list(out)}: need at least two distinct class ids in 0..{NUM_CLASSES - 1}")
    return out


def _check_count(field: str, n: object, k: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < k:
        raise UserError(f"{field}={n!r}: must be an integer >= the number of classes ({k})")
    return int(n)


def _check_subset_args(
    name: str, n_train: int, n_test: int, seed: int, classes, preprocess: str, label_noise: float
) -> tuple[tuple[int, ...], int, int, int, float]:
    _check_name(name)
    classes = _check_classes(classes)
    n_train = _check_count("n_train", n_train, len(classes))
    n_test = _check_count("n_test", n_test, len(classes))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed={seed!r}: must be a non-negative integer")
    if preprocess not in PREPROCESSING:
        raise UserError(f"preprocess={preprocess!r}: expected one of {', '.join(PREPROCESSING)}")
    try:
        label_noise = float(label_noise)
    except (TypeError, ValueError):
        label_noise = float("nan")
    if not 0.0 <= label_noise <= 1.0:
        raise UserError(f"label_noise={label_noise!r}: must be a fraction in [0, 1]")
    return classes, n_train, n_test, int(seed), label_noise


def subset_key(name: str, source: list, **args) -> str:
    """Hex hash (24 chars) of the subset arguments, the source files (names and sha256), and the format."""
    payload = {"name": name, "source": source, "format": CACHE_FORMAT_VERSION, **args}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _per_class_counts(n: int, k: int) -> list[int]:
    """``n`` over ``k`` classes: ``n // k`` each, the first ``n % k`` classes (as listed) one more."""
    return [n // k + (i < n % k) for i in range(k)]


def _balanced_indices(
    labels: np.ndarray, classes: tuple[int, ...], n: int, rng: np.random.Generator, field: str, split: str
) -> np.ndarray:
    """Indices of a class-balanced sample without replacement, in a seeded random order.

    ``field`` (``n_train``/``n_test``) and ``split`` (e.g. ``mnist train``) only name things in errors.
    """
    if n > len(labels):
        raise UserError(f"{field}={n}: larger than the {len(labels)} examples of the {split} split")
    picks = []
    for c, count in zip(classes, _per_class_counts(n, len(classes)), strict=True):
        pool = np.flatnonzero(labels == c)
        if count > len(pool):
            raise UserError(
                f"{field}={n}: needs {count} examples of class {c} but the {split} split has only {len(pool)}"
            )
        picks.append(rng.choice(pool, size=count, replace=False))
    return rng.permutation(np.concatenate(picks))


def _noisy(labels: np.ndarray, k: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Replace ``round(fraction * n)`` labels, chosen at random, by a uniformly random different class."""
    count = int(round(fraction * len(labels)))
    out = labels.copy()
    if count:
        flip = rng.choice(len(labels), size=count, replace=False)
        out[flip] = (out[flip] + rng.integers(1, k, size=count)) % k
    return out


def _targets(labels: np.ndarray, k: int) -> np.ndarray:
    """``(n, k)`` one-hot minus ``1/k``, or ``(n, 1)`` of -1/+1 when ``k == 2``; float32."""
    if k == 2:
        return np.where(labels == 1, 1.0, -1.0).astype(np.float32)[:, None]
    return (np.eye(k)[labels] - 1.0 / k).astype(np.float32)


def _build_subset(
    name: str,
    root: Path,
    key: str,
    classes: tuple[int, ...],
    n_train: int,
    n_test: int,
    seed: int,
    preprocess: str,
    label_noise: float,
) -> Subset:
    train_rng, test_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    x_tr, y_tr = load_dataset(name, root, "train")
    idx_tr = _balanced_indices(y_tr, classes, n_train, train_rng, "n_train", f"{name} train")
    x_te, y_te = load_dataset(name, root, "test")
    idx_te = _balanced_indices(y_te, classes, n_test, test_rng, "n_test", f"{name} test")
    lookup = np.full(NUM_CLASSES, -1, dtype=np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    labels_tr = _noisy(lookup[y_tr[idx_tr]], len(classes), label_noise, noise_rng)
    labels_te = lookup[y_te[idx_te]]
    xa, xb = preprocess_images(x_tr[idx_tr], x_te[idx_te], preprocess, PIXEL_MAX[name])
    k = len(classes)
    return Subset(
        name=name,
        classes=classes,
        key=key,
        x_train=xa,
        y_train=_targets(labels_tr, k),
        labels_train=labels_tr,
        index_train=idx_tr.astype(np.int64),
        x_test=xb,
        y_test=_targets(labels_te, k),
        labels_test=labels_te,
        index_test=idx_te.astype(np.int64),
    )


# --------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``<user cache>/subsets`` (:func:`user_cache_dir`): never inside the data directory, which is only read."""
    return user_cache_dir() / "subsets"


def _read_cache(path: Path, key: str, n_train: int, n_test: int) -> Subset | None:
    """The cached subset, or None when the file is absent, corrupt or for other arguments."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key or int(z["format_version"]) != CACHE_FORMAT_VERSION:
                return None
            arrays = {f: z[f] for f in _ARRAY_FIELDS}
            name, classes = str(z["name"]), tuple(int(c) for c in z["classes"])
    except Exception as exc:  # zip, npy-format and I/O errors all mean "recompute"
        log.warning("ignoring unreadable subset cache %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    rows = {f: (n_train if f.endswith("train") else n_test) for f in _ARRAY_FIELDS}
    if any(arrays[f].shape[:1] != (rows[f],) for f in _ARRAY_FIELDS):
        log.warning("ignoring subset cache %s with unexpected shapes", path)
        return None
    return Subset(name=name, classes=classes, key=key, **arrays)


def _write_cache(path: Path, subset: Subset) -> None:
    """Write the subset as one ``.npz``, atomically (:func:`pipeline.atomic.atomic_file`)."""
    with atomic_file(path) as fh:
        np.savez(
            fh,
            **{f: getattr(subset, f) for f in _ARRAY_FIELDS},
            key=np.array(subset.key),
            name=np.array(subset.name),
            classes=np.array(subset.classes, dtype=np.int64),
            format_version=np.array(CACHE_FORMAT_VERSION),
        )


def make_subset(
    name: str,
    root: str | Path | None,
    *,
    n_train: int,
    n_test: int,
    seed: int,
    classes: Sequence[int] | None = None,
    preprocess: str = "per_image",
    label_noise: float = 0.0,
    cache_dir: str | Path | None = None,
) -> Subset:
    """A class-balanced, seeded subset of ``name``, drawn from the official train and test splits.

    Per class ``n // k`` examples, the first ``n % k`` classes of ``classes`` one more. ``classes`` None means
    all ten; two classes make a binary task (labels 0/1, one target column, ``classes[1]`` -> +1).
    ``label_noise`` replaces that fraction of the training labels (rounded to a count) by a uniformly random
    other class; test labels are never noised. ``preprocess``: see :func:`pipeline.preprocess.preprocess_images`.

    The result is cached in ``cache_dir`` (default :func:`default_cache_dir`, in the user cache; the data
    directory is never written) as ``<name>-<key>.npz``. The key covers the arguments and the sha256 of every
    source file (:func:`source_digests`), so a file changed in place is never served from the cache; a subset
    is cached only when its files did not change while it was built. A corrupt or unwritable cache is
    recomputed / skipped with a warning. Raises :class:`UserError` for bad arguments or missing/corrupt/
    unreadable dataset files, before writing anything but the hash index.
    """
    classes, n_train, n_test, seed, label_noise = _check_subset_args(
        name, n_train, n_test, seed, classes, preprocess, label_noise
    )
    root = resolve_data_root(root)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    sources = source_files(name, root)
    index = _load_hash_index(folder)
    digests, stats, index_changed = source_digests(sources, index)
    key = subset_key(
        name,
        digests,
        n_train=n_train,
        n_test=n_test,
        seed=seed,
        classes=list(classes),
        preprocess=preprocess,
        label_noise=label_noise,
    )
    path = folder / f"{name}-{key}.npz"
    cached = _read_cache(path, key, n_train, n_test)
    if cached is not None:
        if index_changed:
            _save_hash_index(folder, index)
        return cached
    subset = _build_subset(name, root, key, classes, n_train, n_test, seed, preprocess, label_noise)
    if [_stat_key(p) for p in sources] != stats:  # changed while we read it: do not file it under the old hash
        log.warning("dataset files of %s changed while the subset was built; not cached", name)
        return subset
    if index_changed:  # only now, with the subset built: a bad request writes nothing
        _save_hash_index(folder, index)
    try:
        _write_cache(path, subset)
    except OSError as exc:
        log.warning("could not write subset cache %s (%s); continuing without it", path, exc)
    return subset


def load_subset(config: RunConfig) -> Subset:
    """The (cached) dataset subset a run's config trains on (:func:`make_subset` of its data fields)."""
    return make_subset(
        config.dataset, resolve_data_root(config.data_dir), n_train=config.n_train, n_test=config.n_test,
        seed=config.data_seed, classes=list(config.classes) if config.classes else None,
        preprocess=config.preprocess, label_noise=config.label_noise,
    )


def load_recorded_subset(config: RunConfig, data_dir: str | None = None) -> Subset:
    """The subset of a recorded run: from ``data_dir`` if given, else the run's own data directory,
    falling back to the default root (a results directory may come from another machine)."""
    if data_dir is not None:
        return load_subset(config.model_copy(update={"data_dir": data_dir}))
    try:
        return load_subset(config)
    except Exception:  # noqa: BLE001 - a data_dir recorded on another machine: try the default root
        if config.data_dir is None:
            raise
        return load_subset(config.model_copy(update={"data_dir": None}))
