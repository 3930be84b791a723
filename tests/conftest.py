"""Shared test set-up: point the loaders at the real data beside the repo, when it is there."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

if "NTK_SWEEP_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["NTK_SWEEP_DATA"] = str(SHARED_DATA)


def real_data_root() -> Path | None:
    """The real-data root (MNIST IDX files, CIFAR-10 batches), or None where it is absent."""
    root = os.environ.get("NTK_SWEEP_DATA")
    return Path(root) if root and Path(root).is_dir() else None


@pytest.fixture
def real_data() -> Path:
    """Skip the test, with the reason, when the real MNIST/CIFAR-10 files are not on this machine."""
    root = real_data_root()
    if root is None:
        pytest.skip("real data not found: set NTK_SWEEP_DATA to a folder with mnist/ and cifar10/")
    return root
