"""The instruments bench measures with: wall time of device work, peak memory over a window, the bytes
one forward pass saves for backward, the kernels one step dispatches, the device's dense matmul peak,
and facts about the host."""

from __future__ import annotations

import gc
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from depthbench.devices import release_freed_memory

# Square fp32 (or the autocast dtype) matmuls whose best rate is taken as the device's dense peak.
MATMUL_SIZES = {"cpu": (2048, 4096), "cuda": (4096, 8192)}
MB = 2**20


# ---------------------------------------------------------------------------------------------
# Time


@dataclass(frozen=True)
class StepTiming:
    """Wall time of ``steps`` steady-state training steps of ``batch_size`` images."""

    steps: int
    batch_size: int
    seconds: float

    @property
    def step_s(self) -> float:
        return self.seconds / self.steps

    @property
    def img_per_s(self) -> float:
        return self.steps * self.batch_size / self.seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], None]) -> float:
    """Seconds that ``fn`` takes, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """The best dense ``torch.mm`` rate of the device in FLOP/s, and the matrix size that gave it."""
    best, best_n = 0.0, 0
    for n in MATMUL_SIZES["cuda" if device.type == "cuda" else "cpu"]:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out = torch.empty_like(a)
        timed(device, lambda: torch.mm(a, b, out=out))  # warmup: library handles, kernel choice
        once = timed(device, lambda: torch.mm(a, b, out=out))
        reps = max(1, math.ceil(0.25 / max(once, 1e-6)))
        for _ in range(3):
            seconds = timed(device, lambda: [torch.mm(a, b, out=out) for _ in range(reps)])
            rate = 2 * n**3 * reps / seconds
            if rate > best:
                best, best_n = rate, n
        del a, b, out
    return best, best_n


# ---------------------------------------------------------------------------------------------
# Memory


class PeakMemory:
    """Peak memory between :meth:`start` and :meth:`stop`, above what was in use at ``start``.

    CUDA: the caching allocator's peak. CPU: the peak resident set size of this process (Linux only;
    None elsewhere). Freed heap is handed back to the OS first (``malloc_trim``), so memory freed by
    an earlier measurement in this process is neither counted nor silently reused.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base: int | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        gc.collect()  # an earlier measurement's model may sit in a reference cycle
        release_freed_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current VmRSS
            self.base = _proc_status_kb("VmRSS") * 1024
        except (OSError, ValueError):
            self.base = None

    def stop(self) -> tuple[float | None, float | None]:
        """(peak above the start, peak in total), in MiB."""
        if self.base is None:
            return None, None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_kb("VmHWM") * 1024
        return (peak - self.base) / MB, peak / MB


def _proc_status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{key} is not in /proc/self/status")
    return int(match.group(1))


def activation_mb(model: nn.Module, xb: torch.Tensor, autocast: Callable[[], Any]) -> float:
    """MiB of tensors that one training forward pass saves for the backward pass: the activation memory.

    Exact and independent of the allocator, unlike a resident-set peak. With checkpointing these are
    the segments' inputs; the recomputation of one segment in backward comes on top of it. Parameters
    are not counted (they live anyway), and a storage saved by several ops counts once.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        model(xb)
    return sum(storages.values()) / MB


# ---------------------------------------------------------------------------------------------
# Kernels

PHASES = ("batch", "forward", "backward", "optimizer", "metrics")
# Aten calls that compute nothing beyond allocating (views and other metadata changes are told by their schema).
_ALLOCATION_ONLY = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


class KernelCount(TorchDispatchMode):
    """The aten operator calls that reach a backend kernel on ``device`` while it is active, by phase of a step.

    Use as ``with KernelCount(model, optimizer, device) as count: step()``. Counted are the calls that the
    dispatcher hands to a backend below autograd (``conv2d`` is one ``convolution``, its gradient one
    ``convolution_backward``) with a tensor on ``device``, less those that compute nothing: views and other
    metadata changes, and bare allocations. On CUDA each is roughly one kernel launch (a foreach op launches
    one per chunk of tensors, a cuDNN call may launch a few). The count is deterministic: it depends on the
    net and the code path, not on timing or data. ``calls`` is every aten call, views and allocations
    included, on any device: what the host dispatches.

    Phases: ``batch`` until the model's forward starts, ``forward`` the model and the loss, ``backward``
    what the autograd engine runs (checkpointing's recomputation included), ``optimizer`` the optimizer's
    step, ``metrics`` what follows it in the loop (the running loss and accuracy sums).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        super().__init__()
        self.model, self.optimizer, self.device_type = model, optimizer, device.type
        self.by_phase = dict.fromkeys(PHASES, 0)
        self.calls = 0
        self._phase = "batch"
        self._hooks: list[Any] = []

    @property
    def kernels(self) -> int:
        return sum(self.by_phase.values())

    def __enter__(self) -> KernelCount:
        self._hooks = [
            self.model.register_forward_pre_hook(lambda *_: self._enter("forward")),
            self.optimizer.register_step_pre_hook(lambda *_: self._enter("optimizer")),
            self.optimizer.register_step_post_hook(lambda *_: self._enter("metrics")),
        ]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        super().__exit__(*exc)

    def _enter(self, phase: str) -> None:
        self._phase = phase

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.namespace != "aten":  # the profiler's record_function markers, say
            return out
        self.calls += 1
        if func.is_view or torch.Tag.inplace_view in func.tags or func.overloadpacket.__name__ in _ALLOCATION_ONLY:
            return out
        if any(isinstance(t, torch.Tensor) and t.device.type == self.device_type
               for t in tree_leaves((args, kwargs, out))):
            # The autograd engine runs backward (on CUDA in its own thread, where this mode is active too).
            backward = torch._C._current_autograd_node() is not None
            self.by_phase["backward" if backward else self._phase] += 1
        return out


# ---------------------------------------------------------------------------------------------
# The host


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    return f"{found.group(1).strip() if found else 'CPU'}, {os.cpu_count()} cores"


def process_age() -> float | None:
    """Seconds since this process started (Linux), i.e. interpreter start and imports so far."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 2)


def load_avg() -> float | None:
    """The 1-minute load average: how busy the machine was, so a timing can be read against it."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
