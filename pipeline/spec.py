"""Job YAML -> validated :class:`Sweep` -> expanded list of :class:`RunConfig` (stable ``run_id``\\s).

Every error names the field path the way a user would write it, e.g.
``jobs/x.yaml: datasets[0].n_train[1]: Input should be greater than 0``, and is raised as a
:class:`~pipeline.errors.UserError` before anything is written.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kernels.activations import get_activation
from pipeline.errors import UserError
from pipeline.run_config import RunConfig

NonEmptyPositive = list[int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    data_seed: int = Field(0, ge=0)

    _listify = field_validator("n_train", mode="before")(_positive_list)
    _positive = field_validator("n_train")(_each_at_least(1))


class ArchitectureSpec(_Strict):
    depth: list[int] = Field(min_length=1)
    activation: str = "relu"
    w_std: float = Field(2**0.5, gt=0)
    b_std: float = Field(0.0, ge=0)
    parameterization: Literal["ntk", "standard"] = "ntk"

    _listify = field_validator("depth", mode="before")(_positive_list)

    _non_negative = field_validator("depth")(_each_at_least(0))

    @field_validator("activation")
    @classmethod
    def _known(cls, value: str) -> str:
        get_activation(value)
        return value


class OptimizerSpec(_Strict):
    name: Literal["gd", "sgd"] = "gd"
    lr: float | None = Field(None, gt=0)
    lr_scale: float | None = Field(None, gt=0)
    steps: int = Field(1000, ge=0)
    batch_size: int | None = Field(None, gt=0)
    log_points: int = Field(24, ge=2)
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
    max_retries: int = Field(2, ge=0)


class Sweep(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    datasets: list[DatasetSpec] = Field(min_length=1)
    architectures: list[ArchitectureSpec] = Field(min_length=1)
    widths: list[int] = Field(min_length=1)
    seeds: int | list[int] = 3
    optimizer: OptimizerSpec = OptimizerSpec()
    kernels: KernelSpec = KernelSpec()
    resources: ResourceSpec = ResourceSpec()
    device: Literal["auto", "cpu", "cuda"] = "auto"

    _listify = field_validator("widths", mode="before")(_positive_list)
    _positive_widths = field_validator("widths")(_each_at_least(1))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int):
            if value <= 0:
                raise ValueError("a seed count must be > 0")
        elif not value or len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("must be a non-empty list of distinct seeds >= 0")
        return value

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


def _field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
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
    return f"{source}: {path}: {msg}{more}"


def parse_sweep(data: Any, source: str = "<sweep>") -> Sweep:
    if not isinstance(data, dict):
        raise UserError(f"{source}: a sweep must be a YAML mapping of fields, got {type(data).__name__}")
    try:
        sweep = Sweep.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None
    try:  # cross-field rules (batch_size vs n_train, lr vs lr_scale) live on RunConfig
        sweep.expand()
    except ValidationError as err:
        raise UserError(format_validation_error(err, source).replace(": : ", ": optimizer: ")) from None
    return sweep


def read_yaml_file(path: str | Path, kind: str) -> Any:
    """The parsed YAML of ``path``; an unreadable file or bad YAML is a one-line :class:`UserError`
    (``PATH: cannot read KIND file (...)``, ``PATH: line L invalid YAML: ...``)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read {kind} file ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a job file. Raises :class:`UserError` naming the file and field."""
    return parse_sweep(read_yaml_file(path, "job"), str(path))
