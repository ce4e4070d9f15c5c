"""The sections of a config (``dataset``, ``model``, ``train``, ``success``, ``resources``): typed,
frozen, each field checked on its own; rules across fields are in :mod:`depthbench.config.rules`."""

from __future__ import annotations

import math
import re
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from depthbench.architecture import EVERY_UNIT
from depthbench.errors import did_you_mean

Version = Literal["v1", "v2"]
Family = Literal["resnet", "vit"]
Unit = Literal[
    "original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact", "fixup", "skipinit",
    "post_ln", "pre_ln", "deepnorm", "rezero",
]
ShortcutGate = Literal[
    "identity", "constant_scaling", "exclusive_gating", "shortcut_only_gating", "conv1x1", "dropout"
]
METRICS = ("test_acc", "best_test_acc", "test_loss", "train_acc", "train_loss", "val_acc", "best_val_acc", "val_loss")

# What train.device and every --device accept.
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


class Section(BaseModel):
    """A config section: unknown keys refused, frozen, and only plain finite numbers where numbers go."""

    # allow_inf_nan: pydantic would otherwise read the text 'inf' or 'nan' as a number.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML 1.1 reads yes/no/on/off/true/false as booleans, and pydantic would take True as 1 for a
        # number. A subclass's own before-validator runs first, so one that gives booleans a meaning
        # (model.checkpointing: true) has already replaced them by then.
        found = _boolean_for_number(cls.model_fields[str(info.field_name)].annotation, value)
        if found is not None:
            at, expected = found
            raise PydanticCustomError("boolean_number", "expected {expected}, got a boolean",
                                      {"at": at, "expected": expected})
        # YAML's .inf, -.inf and .nan are floats, and no setting has a use for them (a bound that is
        # never reached is written by leaving the setting out).
        if (where := _non_finite(value)) is not None:
            at, written = where
            raise PydanticCustomError("non_finite", "expected a finite number, got {written}",
                                      {"at": at, "written": written})
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


def _non_finite(value: Any) -> tuple[str, str] | None:
    """Where in ``value`` an infinite or NaN float stands, as a key suffix (as :func:`_boolean_for_number`'s),
    and how YAML spells it; or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "", ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    items = (enumerate(value) if isinstance(value, list | tuple)
             else value.items() if isinstance(value, dict) else ())
    for key, item in items:
        found = _non_finite(item)
        if found is not None:
            return (f"[{key}]" if isinstance(value, list | tuple) else f".{key}") + found[0], found[1]
    return None


def check_key(model: type[BaseModel], key: str, prefix: str = "") -> None:
    """Refuse a dotted ``key`` that names no setting of ``model`` (``prefix`` is where ``model`` sits),
    suggesting the nearest one; a mapping-valued setting takes any key below it."""
    known, parts = prefix, key.split(".")
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            rest = "".join(f".{p}" for p in parts[i + 1 :])  # the suggestion mends the misspelt part only
            choices = [f"{known}.{name}{rest}" if known else f"{name}{rest}" for name in model.model_fields]
            full = f"{prefix}.{key}" if prefix else key
            raise ValueError(f"unknown key '{full}'{did_you_mean(full, choices)}")
        known = f"{known}.{part}" if known else part
        annotation = model.model_fields[part].annotation
        if get_origin(annotation) in (Union, types.UnionType):  # an optional section (tune, tune.halving): its keys
            annotation = next((arg for arg in get_args(annotation) if isinstance(arg, type)
                               and issubclass(arg, BaseModel)), annotation)
        if get_origin(annotation) is dict:
            return
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else BaseModel


def same_value(a: Any, b: Any) -> bool:
    """Equal values, where YAML's -6 and a float field's -6.0 are equal."""
    number = (int, float)
    if isinstance(a, number) and isinstance(b, number) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


class DatasetConfig(Section):
    name: Literal["cifar10", "cifar100", "imagefolder", "digits", "synthetic"] = "cifar10"
    root: str | None = Field(None, description="data folder; None means the cache folder")
    train_subset: int | None = Field(None, gt=0, description="class-balanced training subset size")
    test_subset: int | None = Field(None, gt=0, description="class-balanced test subset size")
    val_split: int | float | None = Field(
        None, description="a class-balanced validation split held out of the training split (after train_subset): "
                          "a count of images, or a fraction (<1) of them")
    augment: bool = Field(True, description="random crops of the image padded by 4 pixels, and the flips of flip")
    flip: bool = Field(True, description="with augment, mirror each image left to right with probability 1/2")
    image_size: int | None = Field(None, ge=8, le=512, description="resize to this square size")
    num_classes: int = Field(10, ge=2, le=1000, description="classes of the synthetic set; other sets have their own")

    @field_validator("val_split")
    @classmethod
    def _count_or_fraction(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return None
        # A whole float is a count (500.0 as 500, so run ids are those of the int).
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value < 1):
            return value
        raise ValueError(f"must be a count of images (1 or more) or a fraction of the training split between "
                         f"0 and 1 (got {value})")

    def val_size(self, train_size: int) -> int:
        """How many images ``val_split`` holds out of a training split of ``train_size``: the count, or the
        fraction of it, rounded; 0 without a split."""
        if self.val_split is None:
            return 0
        return round(self.val_split * train_size) if isinstance(self.val_split, float) else self.val_split

    @model_validator(mode="after")
    def _classes_of_synthetic_only(self) -> DatasetConfig:
        # Every run id hashes this field, so it cannot go; a value other than the default on a real
        # dataset would claim a class count the data does not have.
        default = DatasetConfig.model_fields["num_classes"].default
        if self.name != "synthetic" and self.num_classes != default:
            raise ValueError(f"num_classes: only synthetic data takes a class count ({self.name} has its own); "
                             "remove it")
        return self


class ModelConfig(Section):
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


class WarmupConfig(Section):
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


class TrainConfig(Section):
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
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the model; auto: on CPUs with AMX in bf16, for runs long enough to "
                            "repay the compilation (devices.resolve_compile)")
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


class SuccessConfig(Section):
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


class ResourcesConfig(Section):
    """What one run asks of a cluster scheduler (the ray and slurm executors); none of it changes a run id."""

    gpus_per_run: float = Field(1.0, ge=0.0, description="fractions share a GPU (ray); train.device cpu runs ask none")
    cpus_per_run: float = Field(1.0, gt=0.0)
    max_restarts: int = Field(3, ge=0, description="restarts of a run whose Ray worker dies or SLURM job times out")
    partition: str | None = Field(None, description="SLURM partition; None: the cluster's default")
    time_min: int = Field(60, gt=0, description="SLURM time limit per job; a longer run checkpoints and is requeued")
    array_parallelism: int | None = Field(None, gt=0, description="most SLURM array tasks at once; None: submitit's")
    slurm_extra: dict[str, str | int] = Field({}, description="more sbatch options, e.g. {account: proj, qos: high}")
