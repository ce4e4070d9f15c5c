"""Batched augmentation and normalisation on whatever device the batch lives on.

The CIFAR recipe of He et al. ([V1] arXiv:1512.03385, Sec. 4.2; [V2] arXiv:1603.05027, Sec. 5): pad 4
pixels with zeros, take a random crop of the original size, flip horizontally with probability 1/2;
test images are not augmented. Done for a whole batch with a few tensor ops rather than per image in
DataLoader workers, as airbench does (Jordan 2024, arXiv:2404.00498), so a dataset kept on the GPU as
uint8 never comes back to the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from depthbench.errors import DepthbenchError


def draw_augmentation(
    n: int, generator: torch.Generator, pad: int = 4, flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The random part of :func:`augment_batch` for ``n`` images, drawn on ``generator``'s device.

    ``shift`` is 2 x n x 1 (dy, dx), uniform in [-pad, pad]; ``flipped`` is n x 1 bool, or None
    without ``flip``. The trainer draws these on the CPU from a generator seeded by (seed, step) and
    sends them to the device with the batch: the same augmentation on every device, and no generator
    made on a GPU per step.
    """
    if pad < 0:
        raise DepthbenchError(f"augment_batch: pad must be >= 0, got {pad}")
    shift = torch.randint(-pad, pad + 1, (2, n, 1), generator=generator, device=generator.device)
    flipped = torch.rand(n, 1, generator=generator, device=generator.device) < 0.5 if flip else None
    return shift, flipped


def apply_augmentation(
    x: torch.Tensor, shift: torch.Tensor, flipped: torch.Tensor | None, pad: int = 4
) -> torch.Tensor:
    """Translate and flip each image of ``x`` as ``shift`` and ``flipped`` (on ``x``'s device) say.

    Device work only, a fixed sequence of kernels whatever the draws: a CUDA graph can capture it.
    """
    n, _, h, w = x.shape
    device = x.device
    # Output pixel (i, j) of image k reads padded pixel (i + pad + dy_k, j + pad + dx_k); a flip reverses
    # the columns it reads. One gather with these per-image index grids does every crop and flip at once.
    rows = torch.arange(h, device=device) + pad + shift[0]  # N x H
    cols = torch.arange(w, device=device) + pad + shift[1]  # N x W
    if flipped is not None:
        cols = torch.where(flipped, cols.flip(1), cols)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=device)[None, :, None, None]
    out = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
    if _is_channels_last(x):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Randomly translate (zero-pad ``pad`` px, crop back to H x W) and horizontally flip each image of ``x``.

    ``x`` is N x C x H x W, uint8 or float, in any memory format (channels_last is kept). Each image
    gets its own shift, uniform in [-pad, pad] independently along x and y, and is flipped with
    probability 1/2 when ``flip``. All randomness comes from ``generator`` (on any device; the draws
    travel to ``x``'s), so a run's augmentation is reproducible. The padding is zeros in ``x``'s units:
    black for uint8 pixels, which is why this runs before normalisation.
    """
    if x.dim() != 4:
        raise DepthbenchError(f"augment_batch needs an N x C x H x W batch, got shape {tuple(x.shape)}")
    shift, flipped = draw_augmentation(len(x), generator, pad, flip)
    shift = shift.to(x.device, non_blocking=True)
    flipped = flipped.to(x.device, non_blocking=True) if flipped is not None else None
    return apply_augmentation(x, shift, flipped, pad)


def normalize(
    x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(x / 255 - mean) / std`` as ``dtype``, with ``mean`` and ``std`` shaped (1, C, 1, 1) on the batch's device.

    Computed in float32 whatever ``dtype`` is (a bf16 ``x - mean`` loses the low pixel bits), then cast.
    Elementwise ops keep the input's memory format, so a channels_last batch stays channels_last.
    """
    scaled_mean = mean.to(torch.float32) * 255
    scaled_std = std.to(torch.float32) * 255
    out = (x_uint8.to(torch.float32) - scaled_mean) / scaled_std
    return out.to(dtype)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
