"""Behaviour is unchanged by refactoring: a float64 pack of runs gives the numbers the code gave at commit
7485b48 (before the structure change of issue 17), column for column.

``tests/data/golden_float64.json`` was written by running these configs through that commit's trainer
(``pipeline.train.train_runs``) with its own code on the path. Run-to-run differences of the same code are
~1e-16 (BLAS threading), so 1e-9 relative is a change of behaviour, not noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.run import train_runs
from pipeline.run_config import RunConfig, make_packs

GOLDEN = Path(__file__).parent / "data" / "golden_float64.json"
NOT_COMPARED = {"wall_s", "peak_rss_bytes", "peak_gpu_bytes", "analytic_peak_rss_bytes", "node", "device"}


def golden_configs() -> list[RunConfig]:
    base = dict(dataset="digits", n_train=48, n_test=24, dtype="float64", device="cpu", steps=30, log_points=5,
                depth=2)
    out = [RunConfig(width=w, seed=s, **base) for w in (32, 96) for s in (0, 1)]
    out.append(RunConfig(width=64, seed=3, activation="erf", b_std=0.1, **base))
    out.append(RunConfig(width=64, seed=2, parameterization="mup", **base))
    out.append(RunConfig(width=64, seed=4, parameterization="standard", **base))
    out.append(RunConfig(width=64, seed=5, optimizer="sgd", batch_size=16, lr_scale=0.3, **base))
    out.append(RunConfig(width=64, seed=6, steps=0, **{k: v for k, v in base.items() if k != "steps"}))
    return out


def _close(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        if a and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a + b):
            np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-9, atol=1e-12,
                                       err_msg=where)
        else:
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            assert a is None and b is None, f"{where}: {a!r} != {b!r}"
        elif math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), f"{where}: {a!r} != {b!r}"
        else:
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_float64_runs_match_the_numbers_before_the_refactor():
    golden = json.loads(GOLDEN.read_text())
    got = {}
    for pack in make_packs(golden_configs(), pack_seeds=True):
        for r in train_runs(pack):
            row = {k: v for k, v in r.row().items() if k not in NOT_COMPARED}
            got[r.run_id] = {"row": row, "curves": r.curves, "spectral": r.spectral,
                             "f0_test": r.f0_test.tolist() if r.f0_test is not None else None}
    assert set(got) == set(golden), "run ids changed"
    for run_id, expected in golden.items():
        expected["row"] = {k: v for k, v in expected["row"].items() if k not in NOT_COMPARED}
        got_j = json.loads(json.dumps(got[run_id], default=float))  # the same JSON round trip as the file
        _close(got_j, expected, run_id)
