"""The depthbench side of the comparison: the trainer's own setup and step, timed and measured."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from depthbench.bench.probes import PeakMemory, StepTiming, activation_mb, sync, timed
from depthbench.config import RunConfig
from depthbench.data import TensorData
from depthbench.train import TrainingSetup, evaluate, sgd_step


@dataclass(frozen=True)
class TrainerFigures:
    timing: StepTiming
    setup_s: float  # data to the device, model built and moved, optimizer
    first_step_s: float  # the first step, compilation included when compiling
    peak_mem_mb: float | None  # training memory above the resident data and model
    peak_total_mb: float | None  # everything: CUDA allocations, or the process's resident set on CPU
    activation_mb: float  # what the forward pass keeps for the backward pass (see activation_mb)
    eval_img_per_s: float | None = None


def measure_trainer(cfg: RunConfig, data: TensorData, *, steps: int, warmup: int, evaluate_too: bool = False,
                    ) -> TrainerFigures:
    """Time the trainer's step for ``cfg``: the setup and the step of :func:`depthbench.train.train_run`."""
    tc = cfg.train
    t_setup = time.perf_counter()
    setup = TrainingSetup.create(cfg, data)  # exactly train_run's setup
    device, model, autocast = setup.device, setup.model, setup.autocast
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    sync(device)
    setup_s = time.perf_counter() - t_setup

    def train_step(step: int) -> None:
        # The body of train_run's loop, less its logging.
        xb, yb = setup.batch(step)
        loss, logits = sgd_step(setup.step_model, setup.optimizer, xb, yb, autocast)
        loss_sum.add_(loss.double() * len(yb))
        correct.add_((logits.argmax(1) == yb).sum())

    model.train()
    peak = PeakMemory(device)
    peak.start()  # before the first step, which allocates the gradients and momentum buffers
    first_step_s = timed(device, lambda: train_step(0))
    for step in range(1, warmup):
        train_step(step)
    seconds = timed(device, lambda: [train_step(s) for s in range(warmup, warmup + steps)])
    peak_mb, total_mb = peak.stop()
    xb, _ = setup.batch(0)
    activations = activation_mb(model, xb, autocast)  # eager: what the compiled graph saves may differ
    eval_rate = None
    if evaluate_too:
        test_x, test_y = data.test_x.to(device), data.test_y.to(device)
        eval_s = timed(device, lambda: evaluate(model, test_x, test_y, setup.mean, setup.std, tc.eval_batch_size,
                                                autocast, tc.channels_last))
        eval_rate = len(test_x) / eval_s
    return TrainerFigures(StepTiming(steps, tc.batch_size, seconds), setup_s, first_step_s, peak_mb, total_mb,
                          activations, eval_rate)
