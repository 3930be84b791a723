"""The kernels' float64 numbers and the MLP's initial parameters match those stored from before the layer refactor.

``tests/data/kernels_reference.npz`` was written by :func:`compute` run against commit 7485b48 (the code
before :mod:`kernels.layers`): analytic NNGP/NTK, structured and generic empirical NTKs, and MLP parameters
for fixed seeds. Regenerate only on purpose: ``python tests/test_kernels_reference.py OUT.npz``.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from kernels.analytic import mlp_kernels, mlp_kernels_blocked
from kernels.empirical import empirical_ntk
from kernels.mlp import MLP

DATA = Path(__file__).resolve().parent / "data" / "kernels_reference.npz"  # see save()

ANALYTIC = {  # name -> architecture keywords of mlp_kernels
    "relu0": dict(depth=0),
    "relu3": dict(depth=3),
    "leaky2": dict(depth=2, activation="leaky_relu:0.2", w_std=1.2, b_std=0.3),
    "erf2std": dict(depth=2, activation="erf", b_std=0.1, parameterization="standard", width=16),
    "gelu1": dict(depth=1, activation="gelu", w_std=1.0, b_std=0.5),
    "tanh2": dict(depth=2, activation="tanh", w_std=1.5),
    "abs2std": dict(depth=2, activation="abs", parameterization="standard", width=7),
}
EMPIRICAL = {  # name -> MLP(in_dim=5, width=8, ...) arguments after in_dim and width
    "relu_d0_k1": dict(depth=0, out_dim=1),
    "relu_d1_k2": dict(depth=1, out_dim=2),
    "erf_d3_k3_std": dict(depth=3, out_dim=3, activation="erf", b_std=0.2, parameterization="standard"),
    "tanh_d2_k2_mup": dict(depth=2, out_dim=2, activation="tanh", b_std=0.1, parameterization="mup"),
    "leaky_d2_k1": dict(depth=2, out_dim=1, activation="leaky_relu:0.1", w_std=1.1, b_std=0.1),
}


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(17)
    x1 = rng.standard_normal((5, 5))
    x1[4] = x1[0] + 1e-6 * rng.standard_normal(5)  # a near-duplicate: the angle recursion amplifies rounding
    return x1, rng.standard_normal((3, 5))


def compute() -> dict[str, np.ndarray]:
    """Every reference value, keyed ``kind/case/variant``."""
    x1, x2 = _inputs()
    out: dict[str, np.ndarray] = {}
    for name, arch in ANALYTIC.items():
        for k, v in mlp_kernels(x1, **arch).items():
            out[f"analytic/{name}/sym/{k}"] = v
        for k, v in mlp_kernels(x1, x2, **arch).items():
            out[f"analytic/{name}/cross/{k}"] = v
    for k, v in mlp_kernels_blocked(x1, block=4, **ANALYTIC["relu3"]).items():
        out[f"analytic/relu3/blocked/{k}"] = v
    t1, t2 = torch.tensor(x1), torch.tensor(x2)
    for seed, (name, arch) in enumerate(EMPIRICAL.items()):
        model = MLP(5, 8, seed=seed, dtype=torch.float64, **arch)
        out[f"empirical/{name}/sym"] = empirical_ntk(model, t1).numpy()
        out[f"empirical/{name}/cross"] = empirical_ntk(model, t1, t2).numpy()
        out[f"empirical/{name}/full"] = empirical_ntk(model, t1, t2, trace=False).numpy()
        out[f"empirical/{name}/sym_chunked"] = empirical_ntk(model, t1, chunk_size=2).numpy()
        out[f"empirical/{name}/jacobian"] = empirical_ntk(model, t1, t2, method="jacobian").numpy()
        out[f"empirical/{name}/forward"] = model(t1).detach().numpy()
        if name == "erf_d3_k3_std":
            out[f"empirical/{name}/full_sym_chunked"] = empirical_ntk(model, t1, trace=False, chunk_size=2).numpy()
            _, inputs, preacts = model.forward_with_preactivations(t1)
            for i, h in enumerate(inputs + preacts):
                out[f"empirical/{name}/recorded{i}"] = h.detach().numpy()
    for dtype, param in ((torch.float32, "ntk"), (torch.float64, "mup"), (torch.float32, "standard")):
        model = MLP(5, 6, 2, 2, "gelu", 1.3, 0.2, param, seed=11, dtype=dtype)
        for name, p in model.named_parameters():
            out[f"params/{param}/{name}"] = p.detach().numpy()
    return out


def save(path: str | Path, values: dict[str, np.ndarray]) -> None:
    """One float64 vector and a ``key|dtype|shape`` index (a few KB; float32 values convert exactly)."""
    keys = sorted(values)
    index = [f"{k}|{values[k].dtype}|{','.join(map(str, values[k].shape))}" for k in keys]
    flat = np.concatenate([values[k].astype(np.float64).ravel() for k in keys])
    np.savez_compressed(path, index=np.array(index), values=flat)


def load(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        index, flat = list(data["index"]), data["values"]
    out, at = {}, 0
    for entry in index:
        key, dtype, shape = entry.split("|")
        dims = tuple(int(s) for s in shape.split(",")) if shape else ()
        size = int(np.prod(dims))
        out[key] = flat[at : at + size].reshape(dims).astype(dtype)
        at += size
    return out


def test_numbers_match_the_code_before_the_layer_refactor():
    ref = load(DATA)
    now = compute()
    assert sorted(now) == sorted(ref)
    for key, want in ref.items():
        if key.startswith("params/"):  # same draws, same names, same order
            assert now[key].dtype == want.dtype, key
            np.testing.assert_array_equal(now[key], want, err_msg=key)
        else:
            np.testing.assert_allclose(now[key], want, rtol=1e-12, atol=0, err_msg=key)
    param_names = [k.split("/", 2)[2] for k in now if k.startswith("params/ntk/")]
    assert param_names == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
                           "layers.2.weight", "layers.2.bias"]


if __name__ == "__main__":
    save(sys.argv[1], compute())
