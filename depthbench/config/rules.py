"""Rules across fields: settings that validate one by one but cannot work together, or that nothing the
run builds would read. Each rule answers one line naming the key and the fix, or None."""

from __future__ import annotations

from typing import Protocol

from depthbench.architecture import PLACEMENTS, SHORTCUT_GATE_SETTINGS
from depthbench.config.schema import DatasetConfig, ModelConfig, SuccessConfig, TrainConfig, WarmupConfig, same_value
from depthbench.errors import DepthbenchError
from depthbench.families import FAMILIES, family_of_unit
from depthbench.transformer import UNITS as VIT_UNITS
from depthbench.transformer import check_heads, check_patch


class Run(Protocol):
    """What the rules read of a run (a :class:`depthbench.config.RunConfig`, which calls them while it is
    validated, so this module cannot import it)."""

    @property
    def dataset(self) -> DatasetConfig: ...
    @property
    def model(self) -> ModelConfig: ...
    @property
    def train(self) -> TrainConfig: ...
    @property
    def success(self) -> SuccessConfig: ...
    @property
    def unit(self) -> str: ...


# Which units hold learnable scalars (what train.scalar_lr scales), as each family's tables say.
_HAS_SCALARS = {**{name: p.has_scalars for name, p in PLACEMENTS.items()},
                **{name: u.gate for name, u in VIT_UNITS.items()}}


def conflict(model: ModelConfig, train: TrainConfig) -> str | None:
    """Settings that validate one by one but cannot work together, as a one-line reason; or None."""
    if model.checkpointing and train.compile is True:  # auto leaves a checkpointed net uncompiled
        # Compiling each residual unit apart from the checkpoint works on a net of distinct units, but
        # where units repeat the recomputation can pick another compiled graph than the forward did, and
        # checkpoint refuses the mismatch (pytorch issue 166926).
        return ("model.checkpointing and train.compile cannot be used together: torch.compile cannot trace the "
                "checkpoint's guard that updates BatchNorm statistics once per step; turn one off")
    return None


def family_problem(run: Run) -> str | None:
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
            if key not in family.own_settings and not same_value(getattr(model, key), unused):
                return (f"model.{key} is a {name} setting, and this run is a {family.name} (model.family); "
                        f"remove it, or set it in a sub-grid of {name} runs")
    defaults = TrainConfig.model_fields
    if train.optimizer == "sgd":
        for key in ("betas", "eps"):
            if getattr(train, key) is not None:
                return f"train.{key} is an adamw setting, and train.optimizer is sgd; remove it"
    else:
        for key in ("momentum", "nesterov"):
            if not same_value(getattr(train, key), defaults[key].default):
                return (f"train.{key} is an sgd setting, and train.optimizer is {train.optimizer}; remove it "
                        "(adamw's are betas and eps)")
    if train.schedule == "cosine":
        for key in ("milestones", "gamma"):
            if not same_value(getattr(train, key), defaults[key].default):
                return f"train.{key} belongs to the multistep schedule, and train.schedule is cosine; remove it"
    if train.warmup_steps and train.warmup.shape == "constant" and train.warmup.lr > train.lr:
        # Checked per run, where the shape is resolved: a ViT that picks the constant shape would inherit
        # the ResNet recipe's 0.01, ten times its own rate.
        return (f"train.warmup.lr ({train.warmup.lr:g}) is above train.lr ({train.lr:g}): a warmup runs below "
                "the rate it hands over to; lower train.warmup.lr, or set train.warmup.shape: linear")
    if train.warmup.shape == "linear" and not same_value(train.warmup.lr, WarmupConfig.model_fields["lr"].default):
        return ("train.warmup.lr is the constant warmup's rate; a linear warmup ramps from 0 to train.lr: "
                "remove it, or set train.warmup.shape: constant")
    if model.family == "vit":
        return _vit_shape_problem(run)
    return None


def unread_setting(run: Run) -> str | None:
    """A setting given a value other than its default where nothing the run builds reads it: it would
    change the run id and nothing else. One line naming the key and what would read it."""
    model, train, dataset = run.model, run.train, run.dataset
    if model.family == "resnet":  # another family's settings are family_problem's
        reads = SHORTCUT_GATE_SETTINGS[model.shortcut_gate]
        for key in dict.fromkeys(key for keys in SHORTCUT_GATE_SETTINGS.values() for key in keys):
            if key not in reads and not same_value(getattr(model, key), ModelConfig.model_fields[key].default):
                readers = [gate for gate, keys in SHORTCUT_GATE_SETTINGS.items() if key in keys]
                return (f"model.{key} is a setting of the {' and '.join(readers)} shortcut "
                        f"gate{'s' * (len(readers) > 1)}, and model.shortcut_gate is {model.shortcut_gate}; remove it")
    if train.nesterov and train.momentum == 0:
        return ("train.nesterov changes how momentum is applied, and train.momentum is 0; remove it, "
                "or set train.momentum")
    if not _HAS_SCALARS[run.unit] and not same_value(train.scalar_lr, TrainConfig.model_fields["scalar_lr"].default):
        with_scalars = [unit for unit in FAMILIES[model.family].units if _HAS_SCALARS[unit]]
        return (f"train.scalar_lr scales the rate of the units' scalar parameters, and the run's unit "
                f"({run.unit}) has none; remove it, or use a unit that has them: {', '.join(with_scalars)}")
    if not dataset.augment and dataset.flip != DatasetConfig.model_fields["flip"].default:
        return "dataset.flip is part of the augmentation, and dataset.augment is false; remove it"
    return None


def unmeasured_metric(run: Run) -> str | None:
    """A success metric of the validation split on a run that holds none out, so that it could never succeed."""
    metric = run.success.metric
    if metric.startswith(("val_", "best_val_")) and run.dataset.val_split is None:
        return (f"success.metric {metric} is measured on the validation split, and dataset.val_split is not set; "
                "set it (a count of images, or a fraction such as 0.1), or use a test metric")
    return None


def _vit_shape_problem(run: Run) -> str | None:
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
