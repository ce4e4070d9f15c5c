"""Typed sweep and run configs, validated once when the YAML is loaded.

A sweep YAML holds the shared settings (``dataset``, ``model``, ``train``, ``success``) and a
``grid`` of lists; every combination of the grid is one run. Each run is resolved into a frozen
:class:`RunConfig` up front, so a bad value anywhere in the grid is reported before anything trains.
The defaults are the CIFAR recipe of He et al. (REFERENCE.md section 2).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from depthbench.errors import ConfigError, DepthbenchError, did_you_mean

Version = Literal["v1", "v2"]
Unit = Literal["original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact"]
ShortcutGate = Literal[
    "identity", "constant_scaling", "exclusive_gating", "shortcut_only_gating", "conv1x1", "dropout"
]
METRICS = ("test_acc", "best_test_acc", "test_loss", "train_acc", "train_loss")

# What train.device and every --device accept.
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Section):
    name: Literal["cifar10", "cifar100", "imagefolder", "digits", "synthetic"] = "cifar10"
    root: str | None = Field(None, description="data folder; None means the cache folder")
    train_subset: int | None = Field(None, gt=0, description="class-balanced training subset size")
    test_subset: int | None = Field(None, gt=0, description="class-balanced test subset size")
    augment: bool = True
    image_size: int | None = Field(None, ge=8, le=512, description="resize to this square size")
    num_classes: int = Field(10, ge=2, le=1000, description="classes of the synthetic set")


class ModelConfig(_Section):
    block: Literal["auto", "basic", "bottleneck"] = "auto"
    shortcut: Literal["auto", "A", "B"] = "auto"
    width: int = Field(16, gt=0, description="base width: 16 in the papers")
    unit: Unit | None = Field(None, description="overrides the unit that the version implies")
    shortcut_gate: ShortcutGate = "identity"
    shortcut_scale: float = Field(1.0, description="lambda on the shortcut (constant_scaling)")
    residual_scale: float = Field(1.0, description="lambda on the residual (constant_scaling)")
    gate_bias: float = Field(0.0, description="initial bias b_g of the 1x1 gate conv")
    shortcut_dropout: float = Field(0.5, ge=0.0, lt=1.0, description="drop rate on the shortcut")
    checkpointing: int = Field(0, ge=0, description="activation-checkpoint segments per stage; 0 off")

    @field_validator("checkpointing", mode="before")
    @classmethod
    def _bool_segments(cls, value: Any) -> Any:
        # `checkpointing: true` means one checkpoint per residual unit (most memory saved).
        if value is True:
            return 1_000_000
        if value is False:
            return 0
        return value


class WarmupConfig(_Section):
    steps: int = Field(0, ge=0, description="steps at the warmup learning rate")
    lr: float = Field(0.01, gt=0.0)


class TrainConfig(_Section):
    steps: int = Field(64_000, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    nesterov: bool = False
    milestones: tuple[float, ...] = Field((0.5, 0.75), description="fractions (<1) or step numbers")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup: WarmupConfig = WarmupConfig()
    eval_every: int = Field(2000, gt=0)
    log_every: int = Field(100, gt=0)
    eval_batch_size: int = Field(256, gt=0, description="256: larger CPU batches page-fault (BENCHMARKS.md)")
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    checkpoint_every: int = Field(1000, gt=0)
    keep_checkpoint: Literal["weights", "full", "none"] = "weights"
    diagnose_steps: tuple[int, ...] = Field((), description="steps at which to record gradient/signal flow")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_NAME.fullmatch(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(m <= 0 for m in value):
            raise ValueError("must be positive: fractions of steps (<1) or step numbers")
        return value

    @model_validator(mode="after")
    def _milestones_within_steps(self) -> TrainConfig:
        for m in self.milestones:
            if m >= 1 and m > self.steps:
                raise ValueError(f"milestones: step {m:g} is beyond steps ({self.steps})")
        resolved = self.milestone_steps
        if list(resolved) != sorted(set(resolved)):
            raise ValueError(f"milestones: must be strictly increasing once resolved to steps (got {list(resolved)})")
        if self.warmup.steps >= self.steps:
            raise ValueError(f"warmup.steps ({self.warmup.steps}) must be below steps ({self.steps})")
        return self

    @property
    def milestone_steps(self) -> tuple[int, ...]:
        """Milestones as step numbers: fractions scale with ``steps`` (0.5, 0.75 = 32k, 48k of 64k)."""
        return tuple(round(m * self.steps) if m < 1 else int(m) for m in self.milestones)


class SuccessConfig(_Section):
    metric: str = "test_acc"
    min: float | None = None
    max: float | None = None

    @field_validator("metric")
    @classmethod
    def _recorded(cls, value: str) -> str:
        if value not in METRICS:
            raise ValueError(f"'{value}' is not recorded{did_you_mean(value, METRICS)}; one of {', '.join(METRICS)}")
        return value

    def __call__(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric)
        if value is None or value != value:  # missing or NaN
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        parts = [f">= {self.min:g}" if self.min is not None else "", f"<= {self.max:g}" if self.max is not None else ""]
        rule = " and ".join(p for p in parts if p)
        return f"{self.metric} {rule}" if rule else "completed"


class ResourcesConfig(_Section):
    """What one run asks of a cluster scheduler (the ray and slurm executors); none of it changes a run id."""

    gpus_per_run: float = Field(1.0, ge=0.0, description="fractions share a GPU (ray); train.device cpu runs ask none")
    cpus_per_run: float = Field(1.0, gt=0.0)
    max_restarts: int = Field(3, ge=0, description="restarts of a run whose Ray worker dies or SLURM job times out")
    partition: str | None = Field(None, description="SLURM partition; None: the cluster's default")
    time_min: int = Field(60, gt=0, description="SLURM time limit per job; a longer run checkpoints and is requeued")
    array_parallelism: int | None = Field(None, gt=0, description="most SLURM array tasks at once; None: submitit's")
    slurm_extra: dict[str, str | int] = Field({}, description="more sbatch options, e.g. {account: proj, qos: high}")


class RunConfig(_Section):
    """Everything one training run needs, fully resolved; written to the run's ``config.yaml``."""

    name: str
    version: Version
    depth: int = Field(gt=0)
    seed: int = Field(ge=0)
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    success: SuccessConfig = SuccessConfig()

    @model_validator(mode="after")
    def _depth_fits(self) -> RunConfig:
        from depthbench.models import resolve_block  # models imports nothing from here at module level

        try:
            resolve_block(self.depth, self.model.block)
        except DepthbenchError as err:
            raise ValueError(str(err)) from None
        return self

    @property
    def run_id(self) -> str:
        return f"{self.version}-d{self.depth}-s{self.seed}-{self.content_hash}"

    @property
    def content_hash(self) -> str:
        """Short hash of every setting that changes what is trained (not where or how it is logged)."""
        ident = self.model_dump(mode="json", exclude={"name", "version", "depth", "seed", "success"})
        for key in EXECUTION_KEYS:
            ident["train"].pop(key)
        blob = json.dumps(ident, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]


# Settings that change where or how a run executes and logs, never what it learns;
# changing them must not orphan finished results, so they stay out of the run id.
EXECUTION_KEYS = (
    "device", "eval_every", "log_every", "eval_batch_size", "checkpoint_every", "keep_checkpoint", "compile",
    "diagnose_steps",
)


Grid = dict[str, list[Any]]


def _flatten_nested(grid: dict[Any, Any]) -> dict[str, Any]:
    """`grid: {model: {width: [4, 8]}}` is the same axis as `grid: {model.width: [4, 8]}`."""
    flat: dict[str, Any] = {}
    for key, value in grid.items():
        if isinstance(value, dict):
            for sub, inner in _flatten_nested(value).items():
                flat[f"{key}.{sub}"] = inner
        else:
            flat[str(key)] = value
    return flat


def _check_grid(grid: Grid) -> None:
    for key in grid:  # unknown keys first: a misspelt 'version' is named as such, not as missing
        if key not in GRID_RUN_KEYS:
            _check_dotted(key)
    for key in ("version", "depth"):
        if key not in grid:
            raise ValueError(f"needs a '{key}' list")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise ValueError(f"'{key}' must be a list of values, e.g. [{json.dumps(values)}]")
        if not values:
            raise ValueError(f"'{key}' is an empty list: give at least one value")
        seen = [json.dumps(v, sort_keys=True) for v in values]
        dupes = sorted({v for v in seen if seen.count(v) > 1})
        if dupes:
            raise ValueError(f"'{key}' lists {', '.join(dupes)} more than once")


class ReferenceRow(_Section):
    """One row of a published table: the settings that pick its runs, and the test error printed for them.

    ``match`` holds ``version``, ``depth`` and dotted settings (``model.gate_bias: -6``); a run matches
    when each equals the run's resolved value, ``model.unit`` counting the unit the version implies.
    """

    match: dict[str, Any] = Field(description="version, depth and dotted settings that pick the runs")
    error: float | Literal["fail"] = Field(description="published test error in %, or 'fail' (above 20%)")
    label: str = Field("", description="the row's name in the published table")

    @field_validator("match", mode="before")
    @classmethod
    def _keys(cls, match: Any) -> Any:
        if not isinstance(match, dict) or not match:
            raise ValueError("must be a non-empty mapping of setting: value, e.g. {version: v1, depth: 110}")
        match = _flatten_nested(match)
        for key, value in match.items():
            if key not in GRID_RUN_KEYS:
                _check_dotted(key)
            if isinstance(value, dict | list):
                raise ValueError(f"'{key}' must be a single value, not {type(value).__name__}")
        return match

    @field_validator("error", mode="before")
    @classmethod
    def _percent(cls, value: Any) -> Any:
        if value == "fail" or (isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100):
            return value
        raise ValueError(f"must be a test error in percent (0 to 100) or 'fail' (got {value!r})")

    def matches(self, run: RunConfig) -> bool:
        from depthbench.models import VERSION_UNIT  # models imports nothing from here at module level

        values = run.model_dump(mode="json")
        for key, want in self.match.items():
            have: Any = values
            for part in key.split("."):
                have = have.get(part) if isinstance(have, dict) else None
            if key == "model.unit" and have is None:
                have = VERSION_UNIT[run.version]
            if not _same(have, want):
                return False
        return True

    def describe(self) -> str:
        return self.label or ", ".join(f"{k}={v}" for k, v in self.match.items())


def _same(a: Any, b: Any) -> bool:
    """Equal values, where YAML's -6 and a float field's -6.0 are equal."""
    number = (int, float)
    if isinstance(a, number) and isinstance(b, number) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _check_reference(sweep: SweepConfig, runs: list[RunConfig]) -> None:
    """Every reference row picks some run, and no run is picked by two rows."""
    picked: dict[str, int] = {}
    for i, row in enumerate(sweep.reference):
        hits = [run for run in runs if row.matches(run)]
        if not hits:
            raise ConfigError(f"reference[{i}] ({row.describe()}) matches no run of the grid")
        for run in hits:
            if run.run_id in picked:
                other = sweep.reference[picked[run.run_id]].describe()
                raise ConfigError(f"reference[{i}] ({row.describe()}) and reference[{picked[run.run_id]}] ({other}) "
                                  f"both match run {run.run_id}; give them distinct settings")
            picked[run.run_id] = i


class SweepConfig(_Section):
    name: str
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    success: SuccessConfig = SuccessConfig()
    resources: ResourcesConfig = ResourcesConfig()
    # One grid mapping, or a list of them (sub-grids) whose runs are concatenated: a paper table whose
    # rows are not one cartesian product is a list of products. Runs shared by sub-grids train once.
    grid: Grid | list[Grid]
    reference: tuple[ReferenceRow, ...] = Field((), description="published results to report beside ours")

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("must be a folder name: letters, digits, '.', '_' and '-'")
        return value

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, grid: Any) -> Any:
        if isinstance(grid, dict):
            grid = _flatten_nested(grid)
            _check_grid(grid)
            return grid
        if not isinstance(grid, list) or not grid:
            raise ValueError("must be a mapping of setting: [values], or a non-empty list of such mappings")
        flat = []
        for i, sub in enumerate(grid):
            where = f"sub-grid {i + 1} of {len(grid)}"
            if not isinstance(sub, dict):
                raise ValueError(f"{where} must be a mapping of setting: [values]")
            try:
                _check_grid(sub := _flatten_nested(sub))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            flat.append(sub)
        return flat

    def grids(self) -> list[Grid]:
        """Each (sub-)grid with a default seed axis, in a stable order: version, depth, seed, then the rest."""
        ordered = []
        for grid in self.grid if isinstance(self.grid, list) else [self.grid]:
            grid = {"seed": [0], **grid}
            order = [k for k in GRID_RUN_KEYS if k in grid] + [k for k in grid if k not in GRID_RUN_KEYS]
            ordered.append({k: grid[k] for k in order})
        return ordered

    def axes(self) -> Grid:
        """Every axis of the grid with the values any sub-grid gives it, in first-seen order."""
        axes: Grid = {}
        for grid in self.grids():
            for key, values in grid.items():
                known = axes.setdefault(key, [])
                known += [v for v in values if v not in known]
        return axes

    def runs(self) -> list[RunConfig]:
        """Every grid combination as a validated RunConfig, in grid order (sub-grid by sub-grid)."""
        base = self.model_dump(exclude={"grid", "resources", "reference"})
        grids = self.grids()
        runs: dict[str, RunConfig] = {}
        for i, axes in enumerate(grids):
            where = f"sub-grid {i + 1}, " if len(grids) > 1 else ""
            for combo in itertools.product(*axes.values()):
                data = json.loads(json.dumps(base))
                for key, value in zip(axes, combo, strict=True):
                    _set_dotted(data, key, value)
                try:
                    run = RunConfig.model_validate(data)
                except ValidationError as err:
                    setting = ", ".join(f"{k}={v}" for k, v in zip(axes, combo, strict=True))
                    raise ConfigError(
                        f"{_first_error(err, RunConfig, prefix_grid=True)} (in grid run {where}{setting})"
                    ) from None
                runs.setdefault(run.run_id, run)
        return list(runs.values())


GRID_RUN_KEYS = ("version", "depth", "seed")


def _check_dotted(key: str) -> None:
    """A grid key names a setting of the shared sections, e.g. ``model.width`` or ``train.lr``."""
    section, _, field = key.partition(".")
    sections = {"dataset": DatasetConfig, "model": ModelConfig, "train": TrainConfig}
    if section not in sections or not field:
        choices = [*GRID_RUN_KEYS, *(f"{s}.{f}" for s, m in sections.items() for f in m.model_fields)]
        raise ValueError(f"unknown key '{key}'{did_you_mean(key, choices)}; use version, depth, seed or section.setting")
    model: type[BaseModel] = sections[section]
    known = section
    for part in field.split("."):
        if part not in model.model_fields:
            choices = [f"{known}.{name}" for name in model.model_fields]  # suggest what to write in the grid
            raise ValueError(f"unknown key '{key}'{did_you_mean(f'{known}.{part}', choices)}")
        known = f"{known}.{part}"
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else BaseModel


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section that ``loc`` points into, for 'did you mean' hints."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _first_error(err: ValidationError, model: type[BaseModel], prefix_grid: bool = False) -> str:
    error = err.errors(include_url=False)[0]
    loc = tuple(error["loc"])
    key = _dotted(loc) or "config"
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}'{did_you_mean(str(loc[-1]), _fields_at(model, loc[:-1]))}"
    if kind == "missing":
        return f"missing required key '{key}'"
    if kind == "literal_error":
        return f"{key}: '{error.get('input')}' is not allowed; {message[0].lower()}{message[1:]}"
    message = message.removeprefix("Value error, ")
    if not loc:
        return message
    shown = error.get("input")
    got = f" (got {shown!r})" if kind.endswith(("_type", "_parsing")) and not isinstance(shown, dict) else ""
    return f"{key}: {message[0].lower()}{message[1:]}{got}"


def parse_sweep(data: Any, source: str = "config") -> SweepConfig:
    """Validate an already-parsed YAML mapping and resolve every run (so grid errors surface now)."""
    if data is None:
        raise ConfigError(f"{source} is empty: it needs at least 'name' and a 'grid' with version and depth lists")
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of settings, not a {type(data).__name__}")
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_first_error(err, SweepConfig)}") from None
    try:
        _check_reference(sweep, sweep.runs())
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return sweep


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML; every problem is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a folder)" if path.is_dir() else ""
        raise ConfigError(f"config file '{path}' does not exist{hint}; see configs/ for examples")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file '{path}': {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML does not parse{where}: {problem}") from None
    return parse_sweep(data, source=str(path))


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run's resolved ``config.yaml`` back."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {_first_error(err, RunConfig)}") from None


def dump_run_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


__all__ = [
    "METRICS",
    "ConfigError",
    "DatasetConfig",
    "ModelConfig",
    "ReferenceRow",
    "ResourcesConfig",
    "RunConfig",
    "SuccessConfig",
    "SweepConfig",
    "TrainConfig",
    "WarmupConfig",
    "dump_run_config",
    "load_run_config",
    "load_sweep",
    "parse_sweep",
]
