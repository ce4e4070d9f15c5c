"""The nets a run trains, one family per module: :mod:`depthbench.models.resnet` holds the CIFAR ResNets
(V1 and V2, basic and bottleneck units, every placement and shortcut of the papers), built from the
torch-free tables of :mod:`depthbench.architecture`; :mod:`depthbench.models.vit` the Vision Transformers
(v1 Post-LN, v2 Pre-LN, DeepNorm and ReZero units), built from those of :mod:`depthbench.transformer`.
:func:`model_from_config` picks the family a config names."""

from typing import Any

from torch import nn

from depthbench.architecture import BLOCKS, EVERY_UNIT, PLACEMENTS, VERSION_UNIT, choice, resolve_block, valid_depths
from depthbench.families import FAMILIES
from depthbench.models import resnet
from depthbench.models.resnet import (
    SHORTCUT_GATES,
    GatedSum,
    ResidualUnit,
    ResNet,
    ShortcutGate,
    ZeroPadShortcut,
    build_model,
    count_params,
    forward_flops,
)
from depthbench.models.vit import Attention, PatchEmbedding, TransformerBlock, ViT, build_vit
from depthbench.transformer import (
    UNITS,
    VIT_VERSION_UNIT,
    TransformerUnit,
    vit_forward_flops,
    vit_param_count,
    vit_settings,
)


def model_from_config(version: str, depth: int, model_cfg: Any, num_classes: int, in_channels: int = 3,
                      image_size: int = 32) -> nn.Module:
    """The net of a :class:`depthbench.config.ModelConfig`: a ResNet or a ViT as ``model_cfg.family`` says
    (a config without the field is a ResNet's). ``image_size`` sizes a ViT's position embedding; a ResNet
    takes any size."""
    family = choice("family", getattr(model_cfg, "family", "resnet"), FAMILIES)
    if family == "resnet":
        return resnet.model_from_config(version, depth, model_cfg, num_classes, in_channels)
    return build_vit(version, depth, num_classes, image_size=image_size, in_channels=in_channels,
                     **vit_settings(model_cfg))


__all__ = [
    "BLOCKS",
    "EVERY_UNIT",
    "PLACEMENTS",
    "SHORTCUT_GATES",
    "UNITS",
    "VERSION_UNIT",
    "VIT_VERSION_UNIT",
    "Attention",
    "GatedSum",
    "PatchEmbedding",
    "ResNet",
    "ResidualUnit",
    "ShortcutGate",
    "TransformerBlock",
    "TransformerUnit",
    "ViT",
    "ZeroPadShortcut",
    "build_model",
    "build_vit",
    "count_params",
    "forward_flops",
    "model_from_config",
    "resolve_block",
    "valid_depths",
    "vit_forward_flops",
    "vit_param_count",
]
