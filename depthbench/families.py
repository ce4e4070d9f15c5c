"""The model families a sweep can train, and what each one means by a version, a unit and a default.

Every family has the same two versions, so that one question is asked of each: does a clean identity path
let depth grow? ``v1`` is the original design, whose identity path passes through a gate that every block
applies (V1's ReLU after the addition, Post-LN's LayerNorm after it); ``v2`` keeps the path clean (V2's
full pre-activation, Pre-LN with one final LayerNorm). A family's other units (``model.unit``) are
variants on the same axis and are compared within it.

A family may declare defaults for settings a sweep does not write (:data:`FAMILIES`): a ResNet keeps the
config schema's, the CIFAR recipe of [V1] and [V2] (SGD with step drops); a ViT has ViT-Tiny's width, heads
and MLP ratio, patches for small images, and the AdamW recipe of DeiT (Touvron et al. 2020,
arXiv:2012.12877) with a cosine schedule after a linear warmup, as Transformers are trained. The values
a run resolved to are in its ``config.yaml``.

Torch-free: :mod:`depthbench.config` validates a sweep with these tables before anything is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from depthbench.architecture import PLACEMENTS, VERSION_UNIT
from depthbench.transformer import UNITS as VIT_UNITS
from depthbench.transformer import VIT_VERSION_UNIT


@dataclass(frozen=True)
class Family:
    """One model family: its units, what each version means, how reports name the versions, which
    ``model`` settings only it reads, and its defaults for settings a sweep leaves out."""

    name: str
    version_unit: dict[str, str]
    units: tuple[str, ...]
    version_labels: dict[str, str]
    own_settings: dict[str, Any]  # model settings only this family reads, with the value meaning "not used"
    default_depth: int  # what `depthbench diagnose` measures when no depth is given
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def unit_of(self, version: str, unit: str | None) -> str:
        """The unit a run builds: its own ``model.unit``, else the one its version implies."""
        return unit or self.version_unit[version]


# ResNet-only settings, with their defaults: a ViT that sets one to anything else is refused.
_RESNET_SETTINGS = {
    "block": "auto", "shortcut": "auto", "shortcut_gate": "identity", "shortcut_scale": 1.0,
    "residual_scale": 1.0, "gate_bias": 0.0, "shortcut_dropout": 0.5, "checkpointing": 0,
}
# ViT-only settings: None on a ResNet, filled in from the family's defaults on a ViT.
_VIT_SETTINGS = {"patch": None, "heads": None, "mlp_ratio": None, "pool": None}

FAMILIES: dict[str, Family] = {
    "resnet": Family(
        name="resnet",
        version_unit=VERSION_UNIT,
        units=tuple(PLACEMENTS),
        version_labels={"v1": "V1", "v2": "V2"},
        own_settings=_RESNET_SETTINGS,
        default_depth=110,  # ResNet-110, the net both [V1] and [V2] report on CIFAR-10
    ),
    "vit": Family(
        name="vit",
        version_unit=VIT_VERSION_UNIT,
        units=tuple(VIT_UNITS),
        version_labels={"v1": "Post-LN", "v2": "Pre-LN"},
        own_settings=_VIT_SETTINGS,
        default_depth=24,  # as ViT-Large has
        defaults={
            "model": {"width": 192, "heads": 3, "mlp_ratio": 4.0, "patch": 4, "pool": "cls"},
            "train": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "decay_all": False,
                      "schedule": "cosine", "warmup": {"shape": "linear", "steps": 0.05}},
        },
    ),
}

# Defaults a unit brings, under its family's. Fixup's scalar biases and multipliers train at a tenth of
# the weights' rate, as the Fixup code trains them (hongyi-zhang/Fixup, cifar_train.py): the ResNet
# recipe's rate, tuned for nets with BatchNorm, is too high for scalars that scale a whole branch.
UNIT_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {"fixup": {"train": {"scalar_lr": 0.1}}}

# What an optimizer needs that the other does not read, filled in when a run chooses it and leaves
# them out (PyTorch's AdamW defaults).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {"sgd": {}, "adamw": {"betas": (0.9, 0.999), "eps": 1e-8}}


def family_of_unit(unit: str) -> str | None:
    """The family a unit belongs to, or None for a name no family has."""
    return next((f.name for f in FAMILIES.values() if unit in f.units), None)


def version_label(family: str, version: str) -> str:
    """How a report names a version: 'V1' for a ResNet, 'Post-LN' for a ViT."""
    return FAMILIES[family].version_labels.get(version, version) if family in FAMILIES else version


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A run's raw settings (``model``, ``train``, ... sections) with its unit's, its family's and its
    optimizer's defaults under what it wrote: a written value always wins, a section's missing keys are filled."""
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    # Only names are looked up: anything else (a list where a name belongs) is the validators' to refuse.
    family = FAMILIES.get(_name(model.get("family")) or "resnet")
    merged = _merge(UNIT_DEFAULTS.get(_name(model.get("unit")), {}), data)
    merged = _merge(family.defaults, merged) if family else merged
    if isinstance(merged.get("train"), dict):
        train = merged["train"] = dict(merged["train"])  # the caller's mapping stays as it was
        for key, value in OPTIMIZER_DEFAULTS.get(_name(train.get("optimizer")) or "sgd", {}).items():
            if train.get(key) is None:
                train[key] = value
    return merged


def _name(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _merge(defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    merged = dict(data)
    for key, value in defaults.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(value, merged[key])
        elif merged.get(key) is None:  # null is how a saved config spells "not set"
            merged[key] = _merge(value, {}) if isinstance(value, dict) else value
    return merged
