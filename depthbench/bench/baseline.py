"""The usual pipeline that bench compares against: the script most CIFAR code starts from, timed on
the same model and images as the trainer (per-image PIL transforms in DataLoader workers, NCHW fp32, eager)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import VisionDataset

from depthbench.bench.probes import StepTiming, timed
from depthbench.config import RunConfig
from depthbench.data import TensorData
from depthbench.models import model_from_config
from depthbench.seeds import Stream, seed_for
from depthbench.devices import resolve_device


class PILImageSet(VisionDataset):
    """A torchvision-style dataset, as ``torchvision.datasets.CIFAR10`` is: the images as one
    H x W x C uint8 array, and a PIL image made of each sample before its transforms run."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        super().__init__(root=None, transform=transform)
        self.images = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
        self.targets = y.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        return self.transform(pil), self.targets[index]


def usual_transform(data: TensorData, augment: bool = True, flip: bool = True) -> transforms.Compose:
    """The per-image transforms of the usual CIFAR script: with ``augment``, a pad-4 random crop and, with
    ``flip``, a horizontal flip."""
    steps: list[Any] = [transforms.RandomCrop(data.image_size, padding=4),
                        *([transforms.RandomHorizontalFlip()] if flip else [])]
    return transforms.Compose([*(steps if augment else []), transforms.ToTensor(),
                               transforms.Normalize(data.mean, data.std)])


def default_workers() -> int:
    """DataLoader workers as CIFAR scripts usually set them: up to 4, no more than the cores."""
    return min(4, os.cpu_count() or 1)


def _forever(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def measure_usual(cfg: RunConfig, data: TensorData, *, steps: int, warmup: int, workers: int) -> StepTiming:
    """Time the usual CIFAR training script on the same model and images: per-image PIL transforms in
    DataLoader workers, NCHW fp32, eager, the run's optimizer (SGD, or AdamW for a ViT), a ``loss.item()``
    per step for its running average."""
    tc = cfg.train
    device = resolve_device(tc.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # the usual script leaves it at its default
    dataset = PILImageSet(data.train_x, data.train_y, usual_transform(data, cfg.dataset.augment, cfg.dataset.flip))
    # Persistent workers: a real epoch is 391 steps, so restarting them at each end of our small
    # subset would charge the usual script far more worker start-up than it really pays.
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(seed_for(cfg.seed, Stream.INIT))  # the trainer's init
    model = model_from_config(cfg.version, cfg.depth, cfg.model, data.num_classes, data.in_channels,
                              data.image_size).to(device)
    optimizer: torch.optim.Optimizer
    if tc.optimizer == "adamw":  # the usual ViT script: AdamW on every parameter, PyTorch's default kernel
        optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas or (0.9, 0.999),
                                      eps=tc.eps or 1e-8, weight_decay=tc.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay,
                                    nesterov=tc.nesterov and tc.momentum > 0)
    model.train()
    batches = _forever(loader)
    running = 0.0

    def step() -> None:
        nonlocal running
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running += loss.item()

    try:
        for _ in range(warmup):
            step()
        seconds = timed(device, lambda: [step() for _ in range(steps)])
    finally:
        del batches  # shuts the workers down
    return StepTiming(steps, tc.batch_size, seconds)
