"""The nets a run trains, one family per module: :mod:`depthbench.models.resnet` holds the CIFAR ResNets
(V1 and V2, basic and bottleneck units, every placement and shortcut of the papers), built from the
torch-free tables of :mod:`depthbench.architecture`."""

from depthbench.architecture import BLOCKS, PLACEMENTS, VERSION_UNIT, EVERY_UNIT, resolve_block, valid_depths
from depthbench.models.resnet import (
    SHORTCUT_GATES, GatedSum, ResidualUnit, ResNet, ShortcutGate, ZeroPadShortcut, build_model, count_params,
    forward_flops, model_from_config,
)

__all__ = [
    "BLOCKS",
    "EVERY_UNIT",
    "PLACEMENTS",
    "SHORTCUT_GATES",
    "VERSION_UNIT",
    "GatedSum",
    "ResNet",
    "ResidualUnit",
    "ShortcutGate",
    "ZeroPadShortcut",
    "build_model",
    "count_params",
    "forward_flops",
    "model_from_config",
    "resolve_block",
    "valid_depths",
]
