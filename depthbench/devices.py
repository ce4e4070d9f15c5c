"""Where and in what precision a run trains: device names resolved on this machine, autocast dtypes."""

from __future__ import annotations

import torch

from depthbench.config import DEVICE_NAME
from depthbench.errors import DepthbenchError


def resolve_device(name: str, option: str = "device") -> torch.device:
    """The device ``name`` means here; ``option`` is how the user gave it, for the error message."""
    if not DEVICE_NAME.fullmatch(name):
        raise DepthbenchError(f"{option} '{name}' is unknown; auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DepthbenchError(f"train.device is '{name}' but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DepthbenchError(f"train.device is '{name}' but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. ``auto`` means bf16 on CUDA, fp32 on CPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """How a step's precision is recorded (result.json, checkpoints): float32 or bfloat16."""
    return str(amp_dtype or torch.float32).removeprefix("torch.")
