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


SMALL_JOB = """
name: small
datasets:
  - name: digits
    n_train: [48]
    n_test: 32
architectures:
  - depth: [2]
widths: [16, 64]
seeds: 2
optimizer:
  name: gd
  steps: 10
kernels:
  store: init
resources:
  num_cpus: 1
"""


def write_results_without_ray(out: Path, job: str | dict) -> Path:
    """A results directory with every run of ``job`` (YAML text or its parsed dict), laid out exactly as a
    sweep writes it (runs, curves, spectral and outputs parts, the Grams, the limits' NNGP test block), each
    pack trained in this process as a runner task would train it, without starting Ray."""
    import torch
    import yaml

    from pipeline.data import load_subset
    from pipeline.limits import analytic_blocks
    from pipeline.run import train_runs
    from pipeline.run_config import make_packs
    from pipeline.spec import parse_sweep
    from pipeline.store import GramWriter, ResultsStore

    sweep = parse_sweep(yaml.safe_load(job) if isinstance(job, str) else job)
    store = ResultsStore(out)
    store.write_sweep(sweep.name, sweep.model_dump(mode="json"))
    writer = GramWriter(store.root.resolve(), sweep.kernels.store, store.probe_token())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a runner task with num_cpus 1
    try:
        for pack in make_packs(sweep.expand(), sweep.resources.pack_seeds, sweep.resources.pack_max_width):
            subset = load_subset(pack[0])
            analytic = analytic_blocks(pack[0], subset)
            writer.write_nngp_test(pack[0], subset.x_test)
            results = train_runs(pack, subset=subset, analytic=analytic, gram_writer=writer)
            assert all(r.status == "ok" for r in results), [r.error for r in results]
            store.write_pack(results)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def small_results(tmp_path_factory) -> Path:
    """A small real results directory (digits, widths 16 and 64, 2 seeds, Grams at init), built without Ray.
    Tests must not modify it."""
    return write_results_without_ray(tmp_path_factory.mktemp("small") / "results", SMALL_JOB)
