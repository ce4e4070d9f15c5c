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
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator,
)
from pydantic_core import PydanticCustomError

from depthbench.architecture import EVERY_UNIT, resolve_block
from depthbench.errors import ConfigError, DepthbenchError, did_you_mean
from depthbench.families import FAMILIES, family_of_unit, with_defaults
from depthbench.transformer import check_heads, check_patch

Version = Literal["v1", "v2"]
Family = Literal["resnet", "vit"]
Unit = Literal[
    "original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact", "fixup", "skipinit",
    "post_ln", "pre_ln", "deepnorm", "rezero",
]
ShortcutGate = Literal[
    "identity", "constant_scaling", "exclusive_gating", "shortcut_only_gating", "conv1x1", "dropout"
]
METRICS = ("test_acc", "best_test_acc", "test_loss", "train_acc", "train_loss")

# What train.device and every --device accept.
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML 1.1 reads yes/no/on/off/true/false as booleans, and pydantic would take True as 1 for a
        # number. A subclass's own before-validator runs first, so one that gives booleans a meaning
        # (model.checkpointing: true) has already replaced them by then.
        found = _boolean_for_number(cls.model_fields[str(info.field_name)].annotation, value)
        if found is not None:
            at, expected = found
            raise PydanticCustomError("boolean_number", "expected {expected}, got a boolean",
                                      {"at": at, "expected": expected})
        return value


def _boolean_for_number(annotation: Any, value: Any) -> tuple[str, str] | None:
    """Where in ``value`` a boolean stands where ``annotation`` asks for a number, as a key suffix
    ('' for the value itself, '[1]' in a tuple, '.key' in a mapping) and what was expected; or None."""
    arms = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    if isinstance(value, bool):
        if bool in arms or not any(arm in (int, float) for arm in arms):
            return None
        return "", "text or a number" if str in arms else "a number"
    for arm in arms:
        origin, args = get_origin(arm), get_args(arm)
        items = (enumerate(value) if origin is tuple and isinstance(value, list | tuple)
                 else value.items() if origin is dict and isinstance(value, dict) else ())
        for key, item in items:
            found = _boolean_for_number(args[0] if origin is tuple else args[1], item)
            if found is not None:
                return (f"[{key}]" if origin is tuple else f".{key}") + found[0], found[1]
    return None


class DatasetConfig(_Section):
    name: Literal["cifar10", "cifar100", "imagefolder", "digits", "synthetic"] = "cifar10"
    root: str | None = Field(None, description="data folder; None means the cache folder")
    train_subset: int | None = Field(None, gt=0, description="class-balanced training subset size")
    test_subset: int | None = Field(None, gt=0, description="class-balanced test subset size")
    augment: bool = True
    image_size: int | None = Field(None, ge=8, le=512, description="resize to this square size")
    num_classes: int = Field(10, ge=2, le=1000, description="classes of the synthetic set; other sets have their own")

    @model_validator(mode="after")
    def _classes_of_synthetic_only(self) -> DatasetConfig:
        # Every run id hashes this field, so it cannot go; a value other than the default on a real
        # dataset would claim a class count the data does not have.
        default = DatasetConfig.model_fields["num_classes"].default
        if self.name != "synthetic" and self.num_classes != default:
            raise ValueError(f"num_classes: only synthetic data takes a class count ({self.name} has its own); "
                             "remove it")
        return self


class ModelConfig(_Section):
    """The net: its family, then settings every family reads (width, unit), then each family's own.

    A family's own settings on a net of another family are refused (:class:`RunConfig`); the ViT's are
    None on a ResNet and filled from the family's defaults (:mod:`depthbench.families`) on a ViT.
    """

    family: Family = Field("resnet", description="resnet, or vit (a Vision Transformer; v1 Post-LN, v2 Pre-LN)")
    # ResNet only
    block: Literal["auto", "basic", "bottleneck"] = "auto"
    shortcut: Literal["auto", "A", "B"] = "auto"
    width: int = Field(16, gt=0, description="base width (16 in the ResNet papers); a ViT's embedding size")
    unit: Unit | None = Field(None, description="overrides the unit that the version implies")
    shortcut_gate: ShortcutGate = "identity"
    shortcut_scale: float = Field(1.0, description="lambda on the shortcut (constant_scaling)")
    residual_scale: float = Field(1.0, description="lambda on the residual (constant_scaling)")
    gate_bias: float = Field(0.0, description="initial bias b_g of the 1x1 gate conv")
    shortcut_dropout: float = Field(0.5, ge=0.0, lt=1.0, description="drop rate on the shortcut")
    checkpointing: int = Field(0, ge=0, description="activation-checkpoint segments per stage; 0 off")
    # ViT only
    patch: int | None = Field(None, ge=1, description="side of the square, non-overlapping patches")
    heads: int | None = Field(None, ge=1, description="attention heads; must divide width")
    mlp_ratio: float | None = Field(None, gt=0.0, description="hidden width of the MLP over width")
    pool: Literal["cls", "mean"] | None = Field(None, description="class token, or the mean of the patch tokens")

    @field_validator("checkpointing", mode="before")
    @classmethod
    def _bool_segments(cls, value: Any) -> Any:
        # `checkpointing: true` means one checkpoint per residual unit (most memory saved).
        if value is True:
            return EVERY_UNIT
        if value is False:
            return 0
        return value


class WarmupConfig(_Section):
    """The first steps of a run: a constant low rate that hands over to the schedule ([V1] ResNet-110's
    0.01), or a linear ramp from 0 up to ``train.lr`` (the Transformer recipe, [Xiong])."""

    steps: int | float = Field(0, ge=0, description="warmup steps, or a fraction (<1) of train.steps")
    lr: float = Field(0.01, gt=0.0, description="the constant shape's rate")
    shape: Literal["constant", "linear"] = "constant"

    @field_validator("steps")
    @classmethod
    def _whole_or_fraction(cls, value: int | float) -> int | float:
        # A whole float is a step count (0.0 and 5.0 as 0 and 5, so run ids are those of the int).
        if isinstance(value, float) and (value >= 1 or value.is_integer()):
            if not value.is_integer():
                raise ValueError(f"must be a whole number of steps or a fraction below 1 (got {value:g})")
            return int(value)
        return value


class TrainConfig(_Section):
    steps: int = Field(64_000, gt=0)
    batch_size: int = Field(128, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd")
    nesterov: bool = Field(False, description="sgd")
    betas: tuple[float, float] | None = Field(None, description="adamw; (0.9, 0.999) when left out")
    eps: float | None = Field(None, gt=0.0, description="adamw; 1e-8 when left out")
    weight_decay: float = Field(1e-4, ge=0.0, description="L2 for sgd, decoupled for adamw")
    decay_all: bool = Field(True, description="decay every parameter (the ResNet recipe); false skips norms, "
                                              "biases, scalar gains and a ViT's position embedding and class token")
    clip_grad_norm: float | None = Field(None, gt=0.0, description="clip the gradients' global L2 norm to this")
    scalar_lr: float = Field(1.0, gt=0.0, description="learning-rate factor of the units' scalar parameters (Fixup's "
                                                      "biases and multipliers, SkipInit's and ReZero's gates)")
    schedule: Literal["multistep", "cosine"] = Field(
        "multistep", description="multistep: times gamma at each milestone; cosine: from lr down to 0 at the last step")
    milestones: tuple[float, ...] = Field(
        (0.5, 0.75),
        description="fractions (<1) or step numbers; on a very short run the default fractions may resolve "
                    "to one step (0.5 and 0.75 of 3 steps are both step 2): both drops then happen there",
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup: WarmupConfig = WarmupConfig()
    eval_every: int = Field(2000, gt=0)
    log_every: int = Field(100, gt=0)
    eval_batch_size: int = Field(256, gt=0, description="256: larger CPU batches page-fault (BENCHMARKS.md)")
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    cuda_graph: bool = Field(
        True, description="on CUDA, capture the whole training step once as a CUDA graph and replay it "
                          "(checked against an eager step first; falls back to eager on a mismatch)")
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
        # Only milestones someone chose must each get a step of their own. The default is compared by
        # value, not by model_fields_set: a run's config.yaml spells every field out and must load again.
        chosen = self.milestones != TrainConfig.model_fields["milestones"].default
        if list(resolved) != sorted(resolved) or (chosen and len(set(resolved)) < len(resolved)):
            raise ValueError(f"milestones: must be strictly increasing once resolved to steps (got {list(resolved)}); "
                             "give each drop a step of its own")
        if self.warmup_steps >= self.steps:
            written = self.warmup.steps
            shown = f"{written:g}, i.e. {self.warmup_steps} steps" if isinstance(written, float) else f"{written}"
            raise ValueError(f"warmup.steps ({shown}) must be below steps ({self.steps})")
        if self.betas is not None and not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: each must be in [0, 1) (got {list(self.betas)})")
        return self

    @property
    def warmup_steps(self) -> int:
        """Warmup as a step count: a fraction scales with ``steps``."""
        w = self.warmup.steps
        return round(w * self.steps) if isinstance(w, float) else w

    @property
    def milestone_steps(self) -> tuple[int, ...]:
        """Milestones as step numbers: fractions scale with ``steps`` (0.5, 0.75 = 32k, 48k of 64k)."""
        return tuple(round(m * self.steps) if m < 1 else int(m) for m in self.milestones)


class SuccessConfig(_Section):
    """Which finished runs count as a success: ``metric`` at least ``min`` and/or at most ``max``.

    A sweep without a ``success`` section keeps no threshold (both None): every completed run counts
    as a success. A ``success`` section written in a sweep must give min or max (SweepConfig checks it,
    so runs' config.yaml files, which spell out ``min: null, max: null``, still load).
    """

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
        """The rule in words, as report.md states it: 'test_acc >= 0.8', or 'completed' without a threshold."""
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


def _conflict(model: ModelConfig, train: TrainConfig) -> str | None:
    """Settings that validate one by one but cannot work together, as a one-line reason; or None."""
    if model.checkpointing and train.compile:
        # Compiling each residual unit apart from the checkpoint works on a net of distinct units, but
        # where units repeat the recomputation can pick another compiled graph than the forward did, and
        # checkpoint refuses the mismatch (pytorch issue 166926).
        return ("model.checkpointing and train.compile cannot be used together: torch.compile cannot trace the "
                "checkpoint's guard that updates BatchNorm statistics once per step; turn one off")
    return None


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

    @model_validator(mode="before")
    @classmethod
    def _resolve_defaults(cls, data: Any) -> Any:
        # The unit's, the family's and the optimizer's defaults go under what the run wrote; the resolved
        # values are what its config.yaml keeps. Sections given as objects count what was set on them as written.
        if not isinstance(data, dict):
            return data
        data = {k: v.model_dump(exclude_unset=True) if isinstance(v, BaseModel) else v for k, v in data.items()}
        return with_defaults(data)

    @model_validator(mode="after")
    def _fits_its_family(self) -> RunConfig:
        if problem := _family_problem(self):
            raise ValueError(problem)
        if self.model.family == "resnet":
            try:
                resolve_block(self.depth, self.model.block)
            except DepthbenchError as err:
                raise ValueError(str(err)) from None
        return self

    @property
    def blocks(self) -> tuple[str, int]:
        """What the run's units are and how many a stage has: (basic | bottleneck, n) for a ResNet,
        (transformer, depth) for a ViT, whose one stage is its ``depth`` blocks."""
        if self.model.family == "vit":
            return "transformer", self.depth
        return resolve_block(self.depth, self.model.block)

    @property
    def unit(self) -> str:
        """The unit this run builds: ``model.unit``, else the one its family's version implies."""
        return FAMILIES[self.model.family].unit_of(self.version, self.model.unit)

    @property
    def run_id(self) -> str:
        # A family other than the first says so in the folder name: runs/ lists what each folder trained.
        family = "" if self.model.family == "resnet" else f"{self.model.family}-"
        return f"{family}{self.version}-d{self.depth}-s{self.seed}-{self.content_hash}"

    @property
    def content_hash(self) -> str:
        """Short hash of every setting that changes what is trained (not where or how it is logged).

        A setting added after run ids existed is hashed only when it differs from the value that means
        what every earlier run did (:data:`ADDED_SETTINGS`), so runs/ folders made before it keep their ids.
        """
        ident = self.model_dump(mode="json", exclude={"name", "version", "depth", "seed", "success"})
        for key in EXECUTION_KEYS:
            ident["train"].pop(key)
        for key, before in ADDED_SETTINGS.items():
            *parents, last = key.split(".")
            section = ident
            for part in parents:
                section = section[part]
            if section[last] == before:
                del section[last]
        blob = json.dumps(ident, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]


# Settings that change where or how a run executes and logs, never what it learns;
# changing them must not orphan finished results, so they stay out of the run id.
EXECUTION_KEYS = (
    "device", "eval_every", "log_every", "eval_batch_size", "checkpoint_every", "keep_checkpoint", "compile",
    "diagnose_steps", "cuda_graph",
)


# Settings added after run ids were first written, with the value (as JSON) that does what runs before
# them did: at that value a setting stays out of the id. A new setting that changes what is trained
# must be added here, or every existing runs/ folder would look unfinished.
ADDED_SETTINGS: dict[str, Any] = {
    "model.family": "resnet", "model.patch": None, "model.heads": None, "model.mlp_ratio": None,
    "model.pool": None, "train.optimizer": "sgd", "train.betas": None, "train.eps": None,
    "train.decay_all": True, "train.clip_grad_norm": None, "train.scalar_lr": 1.0, "train.schedule": "multistep",
    "train.warmup.shape": "constant",
}


def _family_problem(run: RunConfig) -> str | None:
    """A setting that the run's family, optimizer or schedule does not read, set to something that would
    mean a change; or a unit of another family. One line, naming the key and the fix."""
    model, train, family = run.model, run.train, FAMILIES[run.model.family]
    if model.unit is not None and model.unit not in family.units:
        other = family_of_unit(model.unit)
        return (f"model.unit: '{model.unit}' is a {other} unit, not a {family.name} one; "
                f"{family.name} units: {', '.join(family.units)}")
    for name, other in FAMILIES.items():
        if name == family.name:
            continue
        for key, unused in other.own_settings.items():
            if key not in family.own_settings and not _same(getattr(model, key), unused):
                return (f"model.{key} is a {name} setting, and this run is a {family.name} (model.family); "
                        f"remove it, or set it in a sub-grid of {name} runs")
    defaults = TrainConfig.model_fields
    if train.optimizer == "sgd":
        for key in ("betas", "eps"):
            if getattr(train, key) is not None:
                return f"train.{key} is an adamw setting, and train.optimizer is sgd; remove it"
    else:
        for key in ("momentum", "nesterov"):
            if not _same(getattr(train, key), defaults[key].default):
                return (f"train.{key} is an sgd setting, and train.optimizer is {train.optimizer}; remove it "
                        "(adamw's are betas and eps)")
    if train.schedule == "cosine":
        for key in ("milestones", "gamma"):
            if not _same(getattr(train, key), defaults[key].default):
                return f"train.{key} belongs to the multistep schedule, and train.schedule is cosine; remove it"
    if train.warmup_steps and train.warmup.shape == "constant" and train.warmup.lr > train.lr:
        # Checked per run, where the shape is resolved: a ViT that picks the constant shape would inherit
        # the ResNet recipe's 0.01, ten times its own rate.
        return (f"train.warmup.lr ({train.warmup.lr:g}) is above train.lr ({train.lr:g}): a warmup runs below "
                "the rate it hands over to; lower train.warmup.lr, or set train.warmup.shape: linear")
    if train.warmup.shape == "linear" and not _same(train.warmup.lr, WarmupConfig.model_fields["lr"].default):
        return ("train.warmup.lr is the constant warmup's rate; a linear warmup ramps from 0 to train.lr: "
                "remove it, or set train.warmup.shape: constant")
    if model.family == "vit":
        return _vit_shape_problem(run)
    return None


def _vit_shape_problem(run: RunConfig) -> str | None:
    """Patch and heads that cannot fit the image and the width, where the config alone tells the image
    side (every dataset but imagefolder, which the model checks when it is built)."""
    model = run.model
    side = run.dataset.image_size or (None if run.dataset.name == "imagefolder" else 32)
    try:
        check_heads(model.width, model.heads)
    except DepthbenchError as err:
        return f"model.heads: {err}"
    try:
        if side is not None:
            check_patch(side, model.patch)
    except DepthbenchError as err:
        return f"model.patch: {err}"
    return None


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
        values = run.model_dump(mode="json")
        for key, want in self.match.items():
            have: Any = values
            for part in key.split("."):
                have = have.get(part) if isinstance(have, dict) else None
            if key == "model.unit" and have is None:
                have = run.unit
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

    @model_validator(mode="after")
    def _checks_across_sections(self) -> SweepConfig:
        rule = self.success
        # Both written as null is how a saved sweep.yaml spells "no threshold"; leaving both out is a slip.
        if rule.min is None and rule.max is None and not {"min", "max"} <= rule.model_fields_set \
                and "success" in self.model_fields_set:
            example = "max: 0.5" if rule.metric.endswith("_loss") else "min: 0.8"
            raise ValueError(f"success: give min or max, e.g. success: {{metric: {rule.metric}, {example}}}; "
                             "without a success section every completed run counts as a success")
        if rule.min is not None and rule.max is not None and rule.min > rule.max:
            raise ValueError(f"success: min ({rule.min:g}) is above max ({rule.max:g}), so no run can succeed; "
                             "swap them or drop one")
        if rule.metric.endswith("_acc") and rule.min is not None and rule.min > 1:
            raise ValueError(f"success.min: {rule.metric} is a fraction from 0 to 1, so {rule.min:g} can never "
                             f"be met; write {rule.min / 100:g} for {rule.min:g}%")
        if conflict := _conflict(self.model, self.train):
            raise ValueError(conflict)
        return self

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
        """Every axis of the grid with the values any sub-grid gives it, in first-seen order (``--dry-run``)."""
        axes: Grid = {}
        for grid in self.grids():
            for key, values in grid.items():
                known = axes.setdefault(key, [])
                known += [v for v in values if v not in known]
        return axes

    def runs(self) -> list[RunConfig]:
        """Every grid combination as a validated RunConfig, in grid order (sub-grid by sub-grid)."""
        # Only what the sweep wrote: what it left out is each run's to resolve (a ViT's defaults differ).
        base = self.model_dump(exclude={"grid", "resources", "reference"}, exclude_unset=True)
        grids = self.grids()
        runs: dict[str, RunConfig] = {}
        for i, axes in enumerate(grids):
            where = f"sub-grid {i + 1}, " if len(grids) > 1 else ""
            for combo in itertools.product(*axes.values()):
                data = json.loads(json.dumps(base))
                for key, value in zip(axes, combo, strict=True):
                    _set_dotted(data, key, value)
                setting = ", ".join(f"{k}={v}" for k, v in zip(axes, combo, strict=True))
                try:
                    run = RunConfig.model_validate(data)
                except ValidationError as err:
                    raise ConfigError(f"{_first_error(err, RunConfig)} (in grid run {where}{setting})") from None
                if conflict := _conflict(run.model, run.train):  # the grid may set one of the pair
                    raise ConfigError(f"{conflict} (in grid run {where}{setting})")
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


def _first_error(err: ValidationError, model: type[BaseModel], booleans: Mapping[str, str] | None = None) -> str:
    """The first error as one line naming the dotted key; ``booleans`` quotes YAML booleans as written."""
    booleans = booleans or {}
    error = err.errors(include_url=False)[0]
    loc = tuple(error["loc"])
    key = _dotted(loc) or "config"
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}'{did_you_mean(str(loc[-1]), _fields_at(model, loc[:-1]))}"
    if kind == "missing":
        return f"missing required key '{key}'"
    if kind == "boolean_number":
        return _boolean_error(key, error, booleans)
    shown = error.get("input")
    written = booleans.get(key) if isinstance(shown, bool) else None  # quote `no` as written, not as False
    if kind == "literal_error":
        what = f"'{written}' (YAML reads it as a boolean)" if written else f"'{shown}'"
        return f"{key}: {what} is not allowed; {message[0].lower()}{message[1:]}"
    message = message.removeprefix("Value error, ")
    if not loc:
        return message
    got = ""
    if kind.endswith(("_type", "_parsing")) and not isinstance(shown, dict):
        got = f" (got '{written}', which YAML reads as a boolean)" if written else f" (got {shown!r})"
    return f"{key}: {message[0].lower()}{message[1:]}{got}"


def parse_sweep(data: Any, source: str = "config", booleans: Mapping[str, str] | None = None) -> SweepConfig:
    """Validate an already-parsed YAML mapping and resolve every run (so grid errors surface now).

    ``booleans`` is the source text of the YAML's booleans by dotted key (from :func:`read_yaml`), so an
    error can quote ``yes`` as it was written.
    """
    booleans = booleans or {}
    if data is None:
        raise ConfigError(f"{source} is empty: it needs at least 'name' and a 'grid' with version and depth lists")
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of settings, not a {type(data).__name__}")
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_first_error(err, SweepConfig, booleans)}") from None
    try:
        _check_grid_booleans(sweep, booleans)
        _check_reference(sweep, sweep.runs())
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return sweep


def _check_grid_booleans(sweep: SweepConfig, booleans: Mapping[str, str]) -> None:
    """A YAML boolean among a grid's numbers, named by its place in the grid (``grid.train.lr[1]``).

    Each value goes through the field's own validators, so one that gives booleans a meaning
    (``model.checkpointing: [true]``) still can.
    """
    grids = sweep.grid if isinstance(sweep.grid, list) else [sweep.grid]
    for i, grid in enumerate(grids):
        where = f"grid[{i}]" if isinstance(sweep.grid, list) else "grid"
        for key, values in grid.items():
            for j, value in enumerate(values):
                data: dict[str, Any] = {}
                _set_dotted(data, key, value)
                try:
                    RunConfig.model_validate(data)
                except ValidationError as err:
                    for error in err.errors(include_url=False):
                        if error["type"] == "boolean_number":
                            raise ConfigError(_boolean_error(f"{where}.{key}[{j}]", error, booleans)) from None


def _boolean_error(key: str, error: Any, booleans: Mapping[str, str]) -> str:
    key += error["ctx"]["at"]
    written = booleans.get(key, "")
    shown = f"'{written}' (YAML reads it as a boolean)" if written else "a boolean"
    hint = "; quote it to mean the text" if "text" in error["ctx"]["expected"] else ""
    return f"{key}: expected {error['ctx']['expected']}, got {shown}{hint}"


def read_yaml(path: Path) -> tuple[Any, dict[str, str]]:
    """A YAML file as plain data, and the source text of each boolean in it by dotted key.

    Every problem is one ConfigError line: unreadable file, YAML that does not parse, and a key written
    twice in one mapping (PyYAML keeps the last silently, so a second ``train:`` block would drop the
    first). Merge keys (``<<: *anchor``) are YAML's way of repeating keys on purpose and stay allowed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file '{path}': {err}") from None
    loader = yaml.SafeLoader(text)
    booleans: dict[str, str] = {}
    try:
        node = loader.get_single_node()
        if node is None:
            return None, booleans
        _walk_yaml(node, "", booleans, set(), str(path))
        return loader.construct_document(node), booleans
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML does not parse{where}: {problem}") from None
    finally:
        loader.dispose()


def _walk_yaml(node: yaml.Node, key: str, booleans: dict[str, str], seen: set[int], source: str) -> None:
    """Check ``node``'s mappings for repeated keys and note its booleans' text, each node once (an
    alias repeats a node; walking it again could take exponential time)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                _walk_yaml(value_node, key, booleans, seen, source)
                continue
            name = f"{key}.{key_node.value}" if key else key_node.value
            if key_node.value in first:
                fix = ("a later block silently replaces an earlier one; merge them"
                       if isinstance(value_node, yaml.MappingNode)
                       else "a later value silently replaces an earlier one; keep one")
                here, there = key_node.start_mark, first[key_node.value].start_mark
                col = here.line == there.line  # `{steps: 5, steps: 6}`: the line alone does not tell them apart
                raise ConfigError(
                    f"{source}: duplicate key '{name}' at line {here.line + 1}{f', column {here.column + 1}' * col} "
                    f"(first at line {there.line + 1}{f', column {there.column + 1}' * col}): {fix}")
            first[key_node.value] = key_node
            _walk_yaml(value_node, name, booleans, seen, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk_yaml(item, f"{key}[{i}]", booleans, seen, source)
    elif node.tag == "tag:yaml.org,2002:bool":
        booleans[key] = node.value


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML; every problem is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a folder)" if path.is_dir() else ""
        raise ConfigError(f"config file '{path}' does not exist{hint}; see configs/ for examples")
    data, booleans = read_yaml(path)
    return parse_sweep(data, source=str(path), booleans=booleans)


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run's resolved ``config.yaml`` back; every problem is one ConfigError line."""
    data, booleans = read_yaml(Path(path))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {_first_error(err, RunConfig, booleans)}") from None


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
    "read_yaml",
]
