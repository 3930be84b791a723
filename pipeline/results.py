"""The result of one run (:class:`RunResult`) and the names of the columns it becomes: the results schema.

Torch-free: reading results (``ntk-sweep query``, ``status``, ``report``) imports this, never the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.run_config import RunConfig

SCALAR_METRICS = (
    "train_loss", "test_loss", "train_acc", "test_acc",
    "lin_train_loss", "lin_test_loss", "lin_train_acc", "lin_test_acc",
    "ntk_test_acc", "nngp_test_acc", "ntk_test_loss", "nngp_test_loss", "ntk_own_test_acc", "ntk_own_test_loss",
    "kernel_rel_dev_init", "kernel_rel_change", "kernel_rel_dev_init_train", "kernel_rel_change_train",
    "weight_rel_change", "weight_distance",
    "rmse_nn_lin_test", "agree_nn_lin_test", "rmse_nn_ntk_test", "rmse_nn_ntk_mean_test", "lin_closed_form_rel_err",
    "relu_flip_frac", "lr", "lr_critical", "diverged_step",
    "ntk_eig_min_init", "ntk_eig_max_init", "ntk_cond_init",
    "ntk_eig_min_final", "ntk_eig_max_final", "ntk_cond_final",
    "ntk_eig_min_analytic", "ntk_eig_max_analytic", "ntk_cond_analytic",
    "train_loss_pred_ratio", "train_loss_obs_ratio",
)
# Measures of how the network compares with the kernel-regime (analytic NTK/NNGP) limit of infinitely wide
# networks. μP networks do not have that limit (their kernel moves by O(1) in training), so under μP these
# are NaN rather than a number that reads as a convergence measure.
KERNEL_REGIME_ONLY = (
    "ntk_test_acc", "nngp_test_acc", "ntk_test_loss", "nngp_test_loss", "ntk_own_test_acc", "ntk_own_test_loss",
    "rmse_nn_ntk_test", "rmse_nn_ntk_mean_test", "train_loss_pred_ratio",
)
CURVE_COLUMNS = (
    "step", "train_loss", "test_loss", "train_acc", "test_acc",
    "lin_train_loss", "lin_test_loss", "lin_train_acc", "lin_test_acc",
)
SPECTRUM_KEYS = ("ntk_eig_min", "ntk_eig_max", "ntk_cond")
SPECTRAL_COLUMNS = ("step", "band", "band_lo", "band_hi", "energy_nn", "energy_lin", "energy_theory")


@dataclass
class RunResult:
    """What one run produced.

    ``metrics``: the scalar measurements (``SCALAR_METRICS``, NaN where not measured) plus
    ``weight_rel_change_by_layer`` (list, one per Dense layer, input first). ``curves``: column ->
    list over the logged steps (``CURVE_COLUMNS``). ``ntk_init`` / ``ntk_final``: the traced
    empirical NTK ``(N, N)`` float32 over ``train ++ test`` points, kept only when asked
    (``keep_grams``; a sweep writes them to Zarr in the worker instead). ``peak_rss_bytes``: the peak
    resident memory of the process (task) that trained the pack, as the kernel reports it (VmHWM,
    reset when the pack starts); ``peak_gpu_bytes``: torch's peak CUDA allocation (None on CPU);
    ``analytic_peak_rss_bytes``: the same for the task that computed the run's analytic kernels;
    ``node``: the Ray node id that trained it (empty outside Ray).
    """

    config: RunConfig
    status: str = "ok"
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict)
    ntk_init: np.ndarray | None = None
    ntk_final: np.ndarray | None = None
    spectral: dict[str, list] = field(default_factory=dict)
    f0_test: np.ndarray | None = None
    wall_s: float = float("nan")
    device: str = "cpu"
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    analytic_peak_rss_bytes: int | None = None
    node: str = ""

    @property
    def run_id(self) -> str:
        return self.config.run_id

    def row(self) -> dict[str, Any]:
        """One flat row: config columns, measurements, status."""
        cfg = self.config.model_dump()
        cfg["classes"] = list(cfg["classes"]) if cfg["classes"] is not None else None
        row = {"run_id": self.run_id, **cfg}
        row.update({k: float(self.metrics.get(k, math.nan)) for k in SCALAR_METRICS})
        row["weight_rel_change_by_layer"] = list(self.metrics.get("weight_rel_change_by_layer", []))
        row.update(status=self.status, error=self.error, wall_s=self.wall_s, device=self.device,
                   peak_rss_bytes=self.peak_rss_bytes, peak_gpu_bytes=self.peak_gpu_bytes,
                   analytic_peak_rss_bytes=self.analytic_peak_rss_bytes, node=self.node)
        return row
