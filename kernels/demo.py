"""A small real run of the kernel core: the analytic NTK of a ReLU MLP on scikit-learn's digits,
and the empirical NTK of finite networks of growing width converging to it.

    python -m kernels.demo
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from kernels.analytic import mlp_kernels
from kernels.empirical import empirical_ntk
from kernels.mlp import MLP


def main() -> None:
    digits = load_digits()
    x = digits.data[:200].astype(np.float64)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    theta = mlp_kernels(x, depth=2)["ntk"]
    print(f"analytic NTK of a depth-2 ReLU MLP on {len(x)} digits: eig range "
          f"[{np.linalg.eigvalsh(theta).min():.3g}, {np.linalg.eigvalsh(theta).max():.3g}]")
    xt = torch.tensor(x)
    print(f"{'width':>6}  {'|emp - analytic| / |analytic|':>30}")
    for width in (64, 256, 1024, 4096):
        model = MLP(x.shape[1], width, 2, 1, seed=0, dtype=torch.float64)
        emp = empirical_ntk(model, xt).numpy()
        print(f"{width:>6}  {np.linalg.norm(emp - theta) / np.linalg.norm(theta):>30.4f}")


if __name__ == "__main__":
    main()
