"""The resolved configuration of one training run, and its stable ``run_id``.

A :class:`RunConfig` is everything a run depends on; a run is a pure function of it. ``run_id`` is a
hash of its canonical JSON (fields that do not change the result, such as the data directory and
the device, are left out), so the same run in two sweeps or two invocations has the same id.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kernels.activation_spec import canonical_activation

# Fields that say where or how fast a run executes, not what it computes.
EXECUTION_FIELDS = ("data_dir", "device", "sweep")
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds take it; one of 4 billion is plenty


class RunConfig(BaseModel):
    """One (dataset subset, architecture, width, seed, optimiser) combination."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    sweep: str = "adhoc"
    # data
    dataset: str = "digits"
    data_dir: str | None = None
    n_train: int = Field(256, gt=0)
    n_test: int = Field(256, gt=0)
    classes: tuple[int, ...] | None = None
    preprocess: Literal["per_image", "standardize", "unit_norm", "raw01"] = "per_image"
    label_noise: float = Field(0.0, ge=0.0, lt=1.0)
    data_seed: int = Field(0, ge=0, le=MAX_SEED)
    # architecture (the arguments of kernels.mlp.MLP and kernels.analytic.mlp_kernels)
    depth: int = Field(2, ge=0)
    width: int = Field(256, gt=0)
    activation: str = "relu"
    w_std: float = Field(2**0.5, gt=0)
    b_std: float = Field(0.0, ge=0)
    parameterization: Literal["ntk", "standard", "mup"] = "ntk"  # mup: kernels.mlp (Yang & Hu 2021, Table 3)
    # training
    seed: int = Field(0, ge=0, le=MAX_SEED)
    optimizer: Literal["gd", "sgd"] = "gd"
    batch_size: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    lr_scale: float | None = Field(None, gt=0)
    steps: int = Field(1000, ge=0)
    loss: Literal["mse"] = "mse"
    log_points: int = Field(24, ge=2)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, value: str) -> str:
        canonical_activation(value)  # raises ValueError naming the known activations
        return value

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and (len(value) < 2 or len(set(value)) != len(value) or min(value) < 0):
            raise ValueError("must list at least two distinct class indices >= 0")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.lr is not None and self.lr_scale is not None:
            raise ValueError("give lr or lr_scale, not both")
        if self.optimizer == "sgd" and self.batch_size is None:
            raise ValueError("optimizer 'sgd' needs batch_size")
        if self.optimizer == "gd" and self.batch_size is not None:
            raise ValueError("batch_size is only for optimizer 'sgd' (gd is full-batch)")
        if self.batch_size is not None and self.batch_size > self.n_train:
            raise ValueError(f"batch_size {self.batch_size} exceeds n_train {self.n_train}")
        return self

    @property
    def effective_lr_scale(self) -> float | None:
        """lr_scale, defaulting to 0.5 of the critical rate when neither lr nor lr_scale is given."""
        if self.lr is not None:
            return None
        return 0.5 if self.lr_scale is None else self.lr_scale

    @classmethod
    def from_row(cls, row: dict) -> RunConfig:
        """The config of a results row (or of any mapping of config fields; missing ones take their
        defaults). A row records the learning rate actually used in ``lr``, which is the configured one only
        for a run configured by an absolute ``lr``: of the two candidates, the one whose ``run_id`` is the
        row's is taken (without a ``run_id``, the one configured by ``lr_scale``)."""
        fields = {k: row[k] for k in cls.model_fields if k in row and row[k] is not None}
        for key, value in list(fields.items()):  # Parquet/pandas may give NaN for a missing value
            if isinstance(value, float) and math.isnan(value):
                del fields[key]
        if fields.get("classes") is not None:
            fields["classes"] = tuple(fields["classes"])
        used_lr = fields.pop("lr", None)
        candidates = [cls(**fields)]
        if fields.get("lr_scale") is None and used_lr is not None:
            candidates.append(cls(**fields, lr=used_lr))
        return next((c for c in candidates if c.run_id == row.get("run_id")), candidates[0])

    def kernel_args(self) -> dict:
        """The keyword arguments of :func:`kernels.analytic.mlp_kernels` for this run's architecture. μP maps
        to NTK: its empirical NTK at init equals the NTK-parameterisation one for the same draws
        (:mod:`kernels.mlp`), so its limit at init is the same ``Theta``."""
        param = "ntk" if self.parameterization == "mup" else self.parameterization
        return dict(depth=self.depth, activation=self.activation, w_std=self.w_std, b_std=self.b_std,
                    parameterization=param, width=self.width if self.parameterization == "standard" else None)

    def canonical(self) -> dict:
        """The fields that determine the result, JSON-ready, in a fixed order."""
        data = self.model_dump(exclude=set(EXECUTION_FIELDS))
        data["classes"] = list(self.classes) if self.classes is not None else None
        data["activation"] = canonical_activation(self.activation)
        return data

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), default=_json_float)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def shape_key(self) -> tuple:
        """Runs with equal shape keys differ only in ``seed`` and can be trained as one vmapped pack."""
        data = self.canonical()
        data.pop("seed")
        return tuple(sorted((k, json.dumps(v, default=_json_float)) for k, v in data.items()))


def _json_float(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {value!r}")


# Grouping runs into Ray tasks (the runner forms them; the planner costs the same tasks).


def subset_args(config: RunConfig) -> tuple:
    """What identifies the dataset subset of a run."""
    return (config.dataset, config.data_dir, config.n_train, config.n_test, config.classes, config.preprocess,
            config.label_noise, config.data_seed)


def analytic_args(config: RunConfig) -> tuple:
    """What identifies the analytic kernels of a run: its subset and architecture (and, in standard
    parameterisation, its width, on which that NTK depends). μP shares the NTK-parameterisation kernels: its
    empirical NTK at init is the NTK one (kernels.mlp)."""
    k = config.kernel_args()
    return (subset_args(config), k["depth"], k["activation"], k["w_std"], k["b_std"], k["parameterization"], k["width"])


def make_packs(runs: list[RunConfig], pack_seeds: bool, pack_max_width: int = 512) -> list[list[RunConfig]]:
    """Group runs that differ only in seed (width <= ``pack_max_width``) into packs; others alone."""
    packs: dict[tuple, list[RunConfig]] = {}
    for r in runs:
        key = r.shape_key() if pack_seeds and r.width <= pack_max_width else (r.run_id,)
        packs.setdefault(key, []).append(r)
    return list(packs.values())
