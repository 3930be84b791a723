"""Job YAML -> validated :class:`Sweep` -> expanded list of :class:`RunConfig` (stable ``run_id``\\s).

Every error names the field path the way a user would write it, e.g.
``jobs/x.yaml: datasets[0].n_train[1]: Input should be greater than 0``, and is raised as a
:class:`~pipeline.errors.UserError` before anything is written.

What a job may ask for is bounded, so that a bad or hostile file fails here, in one line, and not later
after something was written or after minutes of work:

* the file itself (:func:`read_yaml_file`): at most 1 MiB, UTF-8, nested at most 32 deep, at most 100,000
  values with aliases expanded;
* every number anywhere in it finite (no ``.inf``/``.nan``) and every integer within 64 bits;
* at most :data:`MAX_RUNS` runs, ``depth`` at most :data:`MAX_DEPTH`, ``steps`` at most :data:`MAX_STEPS`,
  ``log_points`` at most :data:`MAX_LOG_POINTS`, seeds below 2^32, ``max_retries`` at most
  :data:`MAX_RETRIES`, a sweep ``name`` of at most 100 characters (it names a file);
* every task's memory, by the planner's model (:func:`pipeline.plan.check_sizes`), within the largest node
  and GPU the planner knows.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from kernels.activation_spec import canonical_activation
from pipeline import plan
from pipeline.errors import UserError
from pipeline.run_config import MAX_SEED, RunConfig
from pipeline.yaml_file import one_line, read_yaml_file

__all__ = ["Sweep", "load_sweep", "parse_sweep", "read_yaml_file"]

MAX_RUNS = 100_000  # the real studies have 540; 100,000 runs are weeks of GPU time
MAX_GP_SEEDS = 4096  # untrained networks per width for the GP check: 4096^2 float64 residual Gram = 128 MiB
MAX_DEPTH = 1_000
MAX_STEPS = 1_000_000_000
MAX_LOG_POINTS = 10_000
MAX_RETRIES = 100
MAX_INT = 2**63 - 1  # what a Parquet int64 column holds



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _positive_list(values: Any) -> list[int]:
    """A bare number where a list is expected means a one-element list."""
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    return values


def _each_at_least(minimum: int):
    """A validator that names the offending index: ``[1] must be > 0, got -4``."""
    op = ">" if minimum == 1 else ">="
    bound = 0 if minimum == 1 else minimum

    def check(cls, values: list[int]) -> list[int]:
        for i, v in enumerate(values):
            if v < minimum:
                raise ValueError(f"[{i}] must be {op} {bound}, got {v}")
        return values

    return classmethod(check)


class DatasetSpec(_Strict):
    name: Literal["digits", "mnist", "fashion_mnist", "cifar10"]
    n_train: list[int] = Field(min_length=1)
    n_test: int = Field(gt=0)
    classes: list[int] | None = None
    preprocess: Literal["per_image", "standardize", "unit_norm", "raw01"] = "per_image"
    label_noise: float = Field(0.0, ge=0.0, lt=1.0)
    data_seed: int = Field(0, ge=0, le=MAX_SEED)

    _listify = field_validator("n_train", mode="before")(_positive_list)
    _positive = field_validator("n_train")(_each_at_least(1))

    @field_validator("classes")
    @classmethod
    def _class_ids(cls, value: list[int] | None) -> list[int] | None:
        for i, c in enumerate(value or []):
            if not 0 <= c <= 9:
                raise ValueError(f"[{i}] must be a class id 0..9, got {c}")
        return value


class ArchitectureSpec(_Strict):
    depth: list[int] = Field(min_length=1)
    activation: str = "relu"
    w_std: float = Field(2**0.5, gt=0)
    b_std: float = Field(0.0, ge=0)
    parameterization: Literal["ntk", "standard", "mup"] = "ntk"

    _listify = field_validator("depth", mode="before")(_positive_list)

    _non_negative = field_validator("depth")(_each_at_least(0))

    @field_validator("depth")
    @classmethod
    def _not_too_deep(cls, values: list[int]) -> list[int]:
        for i, v in enumerate(values):
            if v > MAX_DEPTH:
                raise ValueError(f"[{i}] must be <= {MAX_DEPTH}, got {v}")
        return values

    @field_validator("activation")
    @classmethod
    def _known(cls, value: str) -> str:
        canonical_activation(value)
        return value


class OptimizerSpec(_Strict):
    name: Literal["gd", "sgd"] = "gd"
    lr: float | None = Field(None, gt=0)
    lr_scale: float | None = Field(None, gt=0)
    steps: int = Field(1000, ge=0, le=MAX_STEPS)
    """Training steps, 0..10^9. ``steps: 0`` is allowed and means init-only measurements: every run is
    built, measured at initialisation (its empirical NTK against the analytic one, ``kernel_rel_dev_init``;
    the losses and accuracies of f(x; theta0); the analytic kernels' predictions, ``ntk_test_acc``) and
    recorded with status ``ok``, one curve point at step 0; the training measures are exactly 0
    (``kernel_rel_change``, ``weight_rel_change``, ``rmse_nn_lin_test``) and the learning rate is the one
    that would have been used."""
    batch_size: int | None = Field(None, gt=0)
    log_points: int = Field(24, ge=2, le=MAX_LOG_POINTS)
    dtype: Literal["float32", "float64"] = "float32"


class KernelSpec(_Strict):
    """Which empirical NTK Grams to store (over the run's train ++ test points) in grams.zarr."""

    store: Literal["none", "init", "init+final"] = "none"


class ResourceSpec(_Strict):
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    pack_seeds: bool = True
    # Packing pays for small networks (per-step overhead); wide ones fill a core alone, and one big
    # pack would serialise its seeds on one worker.
    pack_max_width: int = Field(512, gt=0)
    max_retries: int = Field(2, ge=0, le=MAX_RETRIES)


class Sweep(_Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    datasets: list[DatasetSpec] = Field(min_length=1)
    architectures: list[ArchitectureSpec] = Field(min_length=1)
    widths: list[int] = Field(min_length=1)
    seeds: int | list[int] = 3
    optimizer: OptimizerSpec = OptimizerSpec()
    kernels: KernelSpec = KernelSpec()
    resources: ResourceSpec = ResourceSpec()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Init-only GP check (pipeline.gp_sample): this many untrained networks per width, 0 = off.
    gp_seeds: int = Field(0, ge=0, le=MAX_GP_SEEDS)
    # ... at the widths up to this one (None: every width). Its cost grows as gp_seeds x width^2.
    gp_max_width: int | None = Field(None, gt=0)

    _listify = field_validator("widths", mode="before")(_positive_list)
    _positive_widths = field_validator("widths")(_each_at_least(1))

    @field_validator("gp_seeds")
    @classmethod
    def _gp_seeds(cls, value: int) -> int:
        if 0 < value < 3:
            raise ValueError("0 (off) or at least 3 (the bias's jackknife needs 3 networks), got " + str(value))
        return value

    @field_validator("gp_seeds")
    @classmethod
    def _gp_not_mup(cls, value: int, info: ValidationInfo) -> int:
        if value and any(a.parameterization == "mup" for a in info.data.get("architectures", [])):
            raise ValueError("the GP check compares outputs at init with the NNGP, which mup outputs (O(n^-1/2) "
                             "at init) do not follow; use gp_seeds: 0 with parameterization mup")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int):
            if value <= 0:
                raise ValueError("a seed count must be > 0")
            if value > MAX_RUNS:
                raise ValueError(f"a seed count must be <= {MAX_RUNS:,}, got {value}")
        elif not value or len(set(value)) != len(value) or min(value) < 0 or max(value) > MAX_SEED:
            raise ValueError(f"must be a non-empty list of distinct seeds 0..{MAX_SEED}")
        return value

    def num_runs(self) -> int:
        """How many runs :meth:`expand` makes at most (before duplicates collapse), without making them."""
        per_arch = sum(len(a.depth) for a in self.architectures)
        per_data = sum(len(d.n_train) for d in self.datasets)
        return per_data * per_arch * len(self.widths) * len(self.seed_list)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def expand(self, data_dir: str | None = None) -> list[RunConfig]:
        """Every run of the sweep, in a stable order (dataset, n_train, architecture, depth, width, seed),
        each once: a value listed twice (``widths: [16, 16]``) or overlapping entries give one run."""
        opt = self.optimizer
        runs = []
        for ds, arch in itertools.product(self.datasets, self.architectures):
            for n_train, depth, width, seed in itertools.product(ds.n_train, arch.depth, self.widths, self.seed_list):
                runs.append(RunConfig(
                    sweep=self.name, dataset=ds.name, data_dir=data_dir, n_train=n_train, n_test=ds.n_test,
                    classes=tuple(ds.classes) if ds.classes else None, preprocess=ds.preprocess,
                    label_noise=ds.label_noise, data_seed=ds.data_seed, depth=depth, width=width,
                    activation=arch.activation, w_std=arch.w_std, b_std=arch.b_std,
                    parameterization=arch.parameterization, seed=seed, optimizer=opt.name,
                    batch_size=opt.batch_size, lr=opt.lr, lr_scale=opt.lr_scale, steps=opt.steps,
                    log_points=opt.log_points, dtype=opt.dtype, device=self.device,
                ))
        unique: dict[str, RunConfig] = {}
        for run in runs:
            unique.setdefault(run.run_id, run)
        return list(unique.values())


def _key(part: Any) -> str:
    """A mapping key as a path component: as written when printable, else quoted (``'a\\nb'``)."""
    return part if isinstance(part, str) and part.isprintable() and part else repr(part)


def _field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not isinstance(part, str) or not part.isprintable():
            path += f".{_key(part)}" if path else _key(part)
        elif part.startswith("["):  # a list index our validators put in the message
            path += part
        else:
            path += f".{part}" if path else part
    return path


def format_validation_error(err: ValidationError, source: str) -> str:
    """The first error, one line: ``source: field.path[i]: message``."""
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    path = _field_path(tuple(first["loc"]))
    if msg.startswith("["):  # "[1] must be > 0": the index belongs to the path
        index, _, msg = msg.partition(" ")
        path += index
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return one_line(f"{source}: {path}: {msg}{more}")


def _check_numbers(data: Any, source: str) -> None:
    """Every number anywhere in the parsed file finite, every integer within 64 bits; else a one-line
    :class:`UserError` naming the first offending field (``job.yaml: optimizer.lr: must be a finite number,
    got nan``). Shared objects (YAML aliases) are visited once."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{source}: {path or '<top>'}: must be a finite number, got {value}")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise UserError(f"{source}: {path or '<top>'}: integer out of range (at most 2^63 - 1)")
        if isinstance(value, (dict, list)) and id(value) not in seen:
            seen.add(id(value))
            if isinstance(value, dict):
                items = [(f"{path}.{_key(k)}" if path else _key(k), v) for k, v in value.items()]
                items += [(f"{path}.<key {k!r}>" if path else f"<key {k!r}>", k) for k in value]
            else:
                items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
            stack.extend(reversed(items))


def parse_sweep(data: Any, source: str = "<sweep>") -> Sweep:
    """Validate the parsed job ``data`` (``source`` names it in errors): fields, bounds (see the module
    docstring) and each task's memory. Raises a one-line :class:`UserError` naming the field."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a sweep must be a YAML mapping of fields, got {type(data).__name__}")
    _check_numbers(data, source)
    try:
        sweep = Sweep.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None
    if sweep.num_runs() > MAX_RUNS:
        raise UserError(f"{source}: seeds: the sweep has {sweep.num_runs():,} runs (datasets x n_train x "
                        f"architectures x depth x widths x seeds), more than {MAX_RUNS:,}; split it into sweeps")
    try:  # cross-field rules (batch_size vs n_train, lr vs lr_scale) live on RunConfig
        runs = sweep.expand()
    except ValidationError as err:
        raise UserError(format_validation_error(err, source).replace(": : ", ": optimizer: ")) from None
    plan.check_sizes(sweep, runs, source)
    return sweep


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a job file. Raises :class:`UserError` naming the file and field, in one line
    whatever the file holds (line breaks in names and values are folded)."""
    try:
        return parse_sweep(read_yaml_file(path, "job"), str(path))
    except UserError as exc:
        raise UserError(one_line(str(exc))) from None
