"""The depthbench side of the comparison: the trainer's own setup and step, timed and measured, at full
size and on tiny batches (the host's cost of a step, and the kernels it dispatches)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from depthbench.bench.probes import KernelCount, PeakMemory, StepTiming, activation_mb, sync, timed
from depthbench.bench.spec import HOST_STEPS, HOST_WARMUP, host_config
from depthbench.config import RunConfig
from depthbench.data import TensorData, load_dataset
from depthbench.step import choose_step, update_step
from depthbench.train import TrainingSetup, evaluate, lr_at


@dataclass(frozen=True)
class TrainerFigures:
    timing: StepTiming
    setup_s: float  # data to the device, model built and moved, optimizer
    first_step_s: float  # the first step, compilation included when compiling
    peak_mem_mb: float | None  # training memory above the resident data and model
    peak_total_mb: float | None  # everything: CUDA allocations, or the process's resident set on CPU
    activation_mb: float  # what the forward pass keeps for the backward pass (see activation_mb)
    eval_img_per_s: float | None = None
    graphed: bool = False  # the step was a replayed CUDA graph
    notes: tuple[str, ...] = ()  # why it was not, when a graph was wanted


@dataclass(frozen=True)
class HostFigures:
    """What one trainer step costs the host, whatever the arithmetic (see :func:`measure_host`)."""

    ms_per_step: float  # median wall time of one step on tiny batches
    kernels_by_phase: dict[str, int]  # aten calls that reach a kernel on the device, by phase of the step
    aten_calls: int  # every aten call of the step, views and allocations included

    @property
    def kernels(self) -> int:
        return sum(self.kernels_by_phase.values())


def trainer_step(setup: TrainingSetup, model: nn.Module | None = None, notes: list[str] | None = None,
                 ) -> Callable[[int], None]:
    """One step of train_run's loop, less its logging: the batch, forward, backward, SGD update at the
    schedule's rate, and the running loss and accuracy sums kept on the device.

    Without ``model``, the step train_run would choose (:func:`depthbench.step.choose_step`: a checked CUDA
    graph on CUDA, else eager; why not is appended to ``notes``); the returned function's ``graphed`` says
    which. With ``model``, an eager step of that module (the uncompiled model, say).
    """
    tc = setup.cfg.train
    if model is None:
        chosen = choose_step(setup, 0, lr_at(0, tc), notes if notes is not None else [])

        def step(index: int) -> None:
            chosen(index, lr_at(index, tc))

        step.graphed = chosen.graphed  # type: ignore[attr-defined]
        return step

    def eager(index: int) -> None:
        xb, yb = setup.batch(index)
        loss, logits = update_step(model, setup.optimizer, xb, yb, setup.autocast, tc.clip_grad_norm)
        setup.add_to_sums(loss, logits, yb)

    eager.graphed = False  # type: ignore[attr-defined]
    return eager


def measure_trainer(cfg: RunConfig, data: TensorData, *, steps: int, warmup: int, evaluate_too: bool = False,
                    ) -> TrainerFigures:
    """Time the trainer's step for ``cfg``: the setup and the step of :func:`depthbench.train.train_run`."""
    tc = cfg.train
    t_setup = time.perf_counter()
    setup = TrainingSetup.create(cfg, data)  # exactly train_run's setup
    device, model, autocast = setup.device, setup.model, setup.autocast
    notes: list[str] = []
    train_step = trainer_step(setup, notes=notes)
    sync(device)
    setup_s = time.perf_counter() - t_setup

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
                          activations, eval_rate, train_step.graphed, tuple(notes))  # type: ignore[attr-defined]


def measure_host(cfg: RunConfig, num_classes: int) -> HostFigures:
    """The host's cost of ``cfg``'s trainer step: the step of the same net, precision, memory format and
    optimizer on tiny batches (:func:`depthbench.bench.spec.host_config`), where the arithmetic is negligible
    and a step takes what dispatching its kernels takes; and those kernels, counted by phase."""
    tiny = host_config(cfg, num_classes)
    setup = TrainingSetup.create(tiny, load_dataset(tiny.dataset))
    step = trainer_step(setup)
    setup.model.train()
    for index in range(HOST_WARMUP):
        step(index)
    seconds = [timed(setup.device, lambda i=index: step(i)) for index in range(HOST_WARMUP, HOST_WARMUP + HOST_STEPS)]
    count = count_kernels(setup, HOST_WARMUP + HOST_STEPS)
    return HostFigures(1000 * statistics.median(seconds), count.by_phase, count.calls)


def count_kernels(setup: TrainingSetup, index: int) -> KernelCount:
    """The kernels that step ``index`` of ``setup`` dispatches, counted by :class:`KernelCount` on the eager
    model: what a compiled step fuses or a CUDA graph replays with one launch starts from these. Counting a
    step after the first, whose optimizer creates its momentum buffers, gives the steady step's count."""
    step = trainer_step(setup, setup.model)
    with KernelCount(setup.model, setup.optimizer, setup.device) as count:
        step(index)
    sync(setup.device)
    return count
