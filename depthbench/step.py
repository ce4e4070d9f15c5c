"""The training step, run eagerly or captured once as a CUDA graph and replayed.

An eager step launches every kernel from Python, thousands of them for a deep ResNet, and on a GPU
the launches take longer than the arithmetic of small CIFAR maps. A CUDA graph records the
whole step once (batch gather, augmentation and normalisation, forward, backward, the SGD update
with the learning rate read from a device tensor, the metric sums) and replays it with one launch.
Only the step's inputs change between replays: the batch's indices, its augmentation draws and the
learning rate are copied into fixed buffers the graph reads.

A graph replays whatever it captured, so it is checked before it is trusted (:func:`choose_step`):
from one saved state, an eager step and a graphed step are run and their loss and updates compared.
On a mismatch, or when capture fails, the run goes on eagerly with a one-line note. Either way the
state is put back as it was, so the check changes nothing the run computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from depthbench.config import RunConfig

# How far the graphed step may stray from the eager one: relative to the eager loss, and to the size
# of the eager update of the weights and BN statistics. A replay runs the same kernels, so it agrees
# to rounding; a graph that lost the update or the batch misses by 100%.
LOSS_RTOL = 1e-3
UPDATE_RTOL = 1e-2
CAPTURE_WARMUP = 3  # eager steps on a side stream before capture, as CUDA graph capture needs


def update_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
    autocast: Callable[[], Any], clip_grad_norm: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward, backward and optimizer step on a prepared batch; the loss and logits, detached.

    The eager step's arithmetic, shared with ``depthbench bench`` so that what is timed is what trains.
    """
    with autocast():
        logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip(model, clip_grad_norm)
    optimizer.step()
    return loss.detach(), logits.detach()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate on every parameter group, times the group's ``lr_factor`` where it has one
    (``train.scalar_lr`` on the units' scalars)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)


def clip(model: nn.Module, max_norm: float | None) -> None:
    """Scale the gradients down so their global L2 norm is at most ``max_norm`` (``train.clip_grad_norm``).
    No host sync: the scale is computed and applied on the device, so it can sit inside a CUDA graph."""
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)


class TrainingSetup(Protocol):
    """What a step needs of a run made ready to train: :class:`depthbench.train.TrainingSetup` is the one
    (named here by its shape, so that this module sits below the trainer that imports it)."""

    cfg: RunConfig
    device: torch.device
    model: nn.Module
    step_model: nn.Module  # the model, compiled when `compiled`
    compiled: bool
    optimizer: torch.optim.Optimizer
    random_layers: bool
    loss_sum: torch.Tensor
    correct: torch.Tensor

    def autocast(self, cache_enabled: bool = True) -> Any: ...
    def draws(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]: ...
    def assemble(self, idx: torch.Tensor, shift: torch.Tensor | None, flipped: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def seed_layers(self, step: int) -> None: ...
    def add_to_sums(self, loss: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor) -> None: ...


class Step(Protocol):
    """One training step at ``step`` with learning rate ``lr``; adds its loss and correct predictions
    to the setup's metric sums and returns the step's mean loss (a device tensor)."""

    graphed: bool

    def __call__(self, step: int, lr: float) -> torch.Tensor: ...


class EagerStep:
    """The step as PyTorch runs it by default: each op dispatched from Python."""

    graphed = False

    def __init__(self, setup: TrainingSetup) -> None:
        self.setup = setup

    def __call__(self, step: int, lr: float) -> torch.Tensor:
        setup = self.setup
        set_lr(setup.optimizer, lr)
        setup.seed_layers(step)
        xb, yb = setup.batch(step)
        loss, logits = update_step(setup.step_model, setup.optimizer, xb, yb, setup.autocast,
                                   setup.cfg.train.clip_grad_norm)
        setup.add_to_sums(loss, logits, yb)
        return loss


class GraphedStep:
    """The step captured as one CUDA graph; ``__call__`` fills its input buffers and replays it."""

    graphed = True

    def __init__(self, setup: TrainingSetup) -> None:
        if setup.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, not {setup.device}")
        self.setup = setup
        n, device = setup.cfg.train.batch_size, setup.device
        self.idx = torch.zeros(n, dtype=torch.int64, device=device)
        self.shift = torch.zeros(2, n, 1, dtype=torch.int64, device=device)
        flip = setup.cfg.dataset.augment and setup.cfg.dataset.flip
        self.flipped = torch.zeros(n, 1, dtype=torch.bool, device=device) if flip else None
        # The fused CUDA SGD reads the learning rate through a float32 pointer: a new value is one copy per
        # parameter group (groups differ by their lr_factor).
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in setup.optimizer.param_groups]
        self._lr_value: float | None = None
        for group, rate in zip(setup.optimizer.param_groups, self.lrs, strict=True):
            group["lr"] = rate
        self.graph = torch.cuda.CUDAGraph()
        self.loss = self._capture()

    def _body(self) -> torch.Tensor:
        setup = self.setup
        if setup.cfg.dataset.augment:
            xb, yb = setup.assemble(self.idx, self.shift, self.flipped)
        else:
            xb, yb = setup.assemble(self.idx, None, None)
        with setup.autocast(cache_enabled=False):  # a cached cast would be a tensor made outside the graph
            logits = setup.step_model(xb)
            loss = F.cross_entropy(logits.float(), yb)
        loss.backward()
        clip(setup.model, setup.cfg.train.clip_grad_norm)
        setup.optimizer.step()
        setup.add_to_sums(loss.detach(), logits.detach(), yb)
        return loss.detach()

    def _capture(self) -> torch.Tensor:
        # Captured on the draws of a step the run never takes (its last step is steps - 1), so that the
        # check against eager, at a real step, fails if a replay kept the capture's batch. The warmup
        # steps' training is undone by choose_step.
        self._set_inputs(self.setup.cfg.train.steps, 0.0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: cuDNN's algorithm choice, momentum buffers, allocator
            for _ in range(CAPTURE_WARMUP):
                self.setup.optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        # Gradients start as None, so the captured backward writes them (into the graph's own memory)
        # instead of adding to them: each replay computes them afresh without a zero_grad.
        self.setup.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            loss = self._body()
        return loss

    def _set_inputs(self, step: int, lr: float) -> None:
        idx, shift, flipped = self.setup.draws(step)
        self.idx.copy_(idx, non_blocking=True)
        if shift is not None:
            self.shift.copy_(shift, non_blocking=True)
        if self.flipped is not None:
            self.flipped.copy_(flipped, non_blocking=True)
        if lr != self._lr_value:
            # The groups keep the tensors: a float put back here before capture would be baked into the
            # graph as the rate of every replay. (A checkpoint's saved rates are never read back: the
            # trainer sets the rate at every step.)
            for group, rate in zip(self.setup.optimizer.param_groups, self.lrs, strict=True):
                rate.fill_(lr * group.get("lr_factor", 1.0))
            self._lr_value = lr

    def __call__(self, step: int, lr: float) -> torch.Tensor:
        self._set_inputs(step, lr)
        self.graph.replay()
        return self.loss


Capture = Callable[[TrainingSetup], Step]


@dataclass
class _Snapshot:
    """Weights, buffers, momentum and metric sums, copied so they can be written back in place
    (in place: a captured graph holds their addresses)."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]]
    momentum: list[tuple[torch.Tensor, torch.Tensor | None]]  # (param, its buffer or None before step 1)

    @classmethod
    def take(cls, setup: TrainingSetup) -> _Snapshot:
        live = [*setup.model.parameters(), *setup.model.buffers(), setup.loss_sum, setup.correct]
        momentum = []
        for p in setup.model.parameters():
            buf = setup.optimizer.state.get(p, {}).get("momentum_buffer")
            momentum.append((p, buf.clone() if buf is not None else None))
        return cls([(t, t.detach().clone()) for t in live], momentum)

    def restore(self, setup: TrainingSetup) -> None:
        with torch.no_grad():
            for live, saved in self.tensors:
                live.copy_(saved)
            for p, saved in self.momentum:
                state = setup.optimizer.state[p]
                buf = state.get("momentum_buffer")
                if saved is not None and buf is not None:
                    buf.copy_(saved)
                elif buf is not None:
                    # No momentum yet: SGD's first step sets buf = grad; a zero buffer gives 0 * m + grad,
                    # the same numbers (with dampening 0, the trainer's), and keeps the address a captured
                    # graph reads.
                    buf.zero_()
                elif saved is not None:
                    state["momentum_buffer"] = saved.clone()


def _outcome(setup: TrainingSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights and the floating buffers (BN statistics), each flattened into one float64 vector.
    Apart, because the statistics move by far more than the weights in a step and would hide them."""
    model = setup.model
    weights = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    buffers = [b.detach().double().flatten() for b in model.buffers() if b.is_floating_point()]
    return weights, torch.cat(buffers) if buffers else torch.zeros(0, dtype=torch.float64, device=weights.device)


def compare(setup: TrainingSetup, candidate: Step, step: int, lr: float) -> str | None:
    """Run an eager step and ``candidate`` from the same state; None when they agree, else what differs.
    Leaves the state as it found it."""
    snapshot = _Snapshot.take(setup)
    before = _outcome(setup)
    eager_loss = EagerStep(setup)(step, lr).item()
    eager = [after - was for after, was in zip(_outcome(setup), before)]
    snapshot.restore(setup)
    try:
        loss = candidate(step, lr).item()
        got = [after - was for after, was in zip(_outcome(setup), before)]
    finally:
        snapshot.restore(setup)
    if not abs(loss - eager_loss) <= LOSS_RTOL * max(1.0, abs(eager_loss)):
        return f"loss {loss:.6g} vs eager {eager_loss:.6g}"
    for what, mine, reference in zip(("weight", "BN statistics"), got, eager):
        miss = (mine - reference).norm().item() / max(reference.norm().item(), 1e-12)
        if not miss <= UPDATE_RTOL:
            return f"{what} update off by {100 * miss:.3g}% of the eager one"
    return None


def wants_graph(setup: TrainingSetup) -> bool:
    """On by default on CUDA (``train.cuda_graph``); a compiled model is left to torch.compile."""
    tc = setup.cfg.train
    return setup.device.type == "cuda" and tc.cuda_graph and not setup.compiled


def choose_step(setup: TrainingSetup, step: int, lr: float, notes: list[str], capture: Capture | None = None,
                ) -> Step:
    """The step the run trains with: the graphed one when the setup wants it and it passes
    :func:`compare` against eager at ``step``, else the eager one (with a note saying why)."""
    eager = EagerStep(setup)
    if not wants_graph(setup):
        return eager
    if setup.random_layers:
        # Dropout's masks come from (seed, step) through the global RNG, which a replay would not reseed.
        notes.append(f"{setup.cfg.run_id}: a layer draws random numbers each step (dropout); CUDA graph off, "
                     "training eager")
        return eager
    if setup.cfg.train.optimizer != "sgd":
        # The graph and its check (_Snapshot) hold SGD's state only; AdamW takes fused eager steps.
        notes.append(f"{setup.cfg.run_id}: CUDA graphs are used with SGD only; {setup.cfg.train.optimizer} "
                     "trains eager (fused)")
        return eager
    capture = capture or GraphedStep
    snapshot = _Snapshot.take(setup)
    try:
        graphed = capture(setup)
        snapshot.restore(setup)  # the capture's warmup steps trained; undo them
        problem = compare(setup, graphed, step, lr)
    except Exception as err:  # noqa: BLE001  capture is the GPU driver's business; any failure means: go eager
        if setup.device.type == "cuda":  # a capture that failed to end can leave its stream current
            torch.cuda.synchronize()
            torch.cuda.set_stream(torch.cuda.default_stream())
        snapshot.restore(setup)  # compare leaves the state as it found it; a failed capture may not
        first_line = str(err).splitlines()[0] if str(err) else ""
        notes.append(f"{setup.cfg.run_id}: CUDA graph capture failed ({type(err).__name__}: {first_line}); "
                     "training eager")
        return eager
    if problem is None:
        # The eager step's gradients: a replay never writes p.grad (its own live in the graph's memory).
        setup.optimizer.zero_grad(set_to_none=True)
        return graphed
    notes.append(f"{setup.cfg.run_id}: the CUDA-graph step disagreed with the eager step ({problem}); "
                 "training eager")
    return eager
