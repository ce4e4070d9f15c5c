"""Several runs sharing one device at once, as ``sweep --jobs N`` trains them: the instrument of
``bench --concurrent``.

:func:`share_device` starts ``n`` copies of one measurement, each in its own spawned process: on a CPU
each gets its share of the cores (``cores // n`` torch threads, as a ``--jobs`` worker does), on CUDA
every one trains on the same GPU. Each loads its data, sets up the trainer and takes its warmup steps;
then a barrier releases them together and each times its steady-state steps, in a few windows whose
spread says how noisy the timing is. Figures are per process; :mod:`depthbench.bench.modes` sums them.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from depthbench import stopping
from depthbench.bench.probes import MB, PeakMemory, sync, timed
from depthbench.bench.trainer import trainer_step
from depthbench.config import RunConfig
from depthbench.data import load_dataset
from depthbench.errors import DepthbenchError
from depthbench.executors.local import threads_per_job
from depthbench.train import TrainingSetup

WINDOWS = 4  # each run times its steps in up to this many windows; their spread is the timing's noise
BARRIER_TIMEOUT_S = 1800  # a run left waiting this long at the barrier gives up (its parent is gone)


@dataclass(frozen=True)
class SharedRun:
    """One of the runs that shared the device: its own rate, while all of them trained."""

    threads: int  # its torch threads
    steps: int
    batch_size: int
    seconds: float  # its timed steps, all windows together
    window_img_per_s: list[float]
    start: float  # time.monotonic() when its timed steps began and ended: the same clock in every process
    end: float
    peak_mem_mb: float | None  # its peak in total: the resident set on CPU, the CUDA allocator's peak on a GPU
    device_used_mb: float | None  # CUDA: the GPU's memory in use with every run alive (contexts included)

    @property
    def img_per_s(self) -> float:
        return self.steps * self.batch_size / self.seconds


def share_device(cfg: RunConfig, n: int, *, steps: int, warmup: int) -> list[SharedRun]:
    """Train ``cfg`` in ``n`` processes at once on its device and time each one's steady-state steps."""
    # spawn, not fork: a forked child would inherit this process's torch threads and any CUDA state.
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    runs = [ctx.Process(target=_run, args=(i, cfg, steps, warmup, threads_per_job(n), barrier, results),
                        name=f"depthbench-bench-{i + 1}-of-{n}", daemon=True) for i in range(n)]
    try:
        with stopping.workers_born_deaf():  # a Ctrl-C is this process's to handle; it ends the runs below
            for run in runs:
                run.start()
        return _collect(runs, barrier, results, n)
    finally:
        for run in runs:
            run.join(timeout=10)
            if run.is_alive():
                run.kill()  # it ignores SIGINT and SIGTERM (see _run)
                run.join()


def _collect(runs: list[Any], barrier: Any, results: Any, n: int) -> list[SharedRun]:
    done: dict[int, SharedRun] = {}
    failure: str | None = None
    while len(done) < n and failure is None:
        try:
            index, kind, payload = results.get(timeout=0.5)
        except queue.Empty:
            crashed = [run for run in runs if run.exitcode not in (None, 0)]
            if crashed:  # killed (out of memory?) without a word: release the others from the barrier
                failure = (f"with {n} runs at once, bench process {crashed[0].name} died "
                           f"(exit code {crashed[0].exitcode}; out of memory?)")
            continue
        if kind == "done":
            done[index] = payload
        elif kind == "error":  # a user-facing error, such as a run that does not fit beside the others
            failure = f"with {n} runs at once: {payload}"
        elif kind == "bug":
            barrier.abort()
            raise RuntimeError(f"bench process {index + 1} of {n} failed:\n{payload}")
        # "aborted": another run failed first; its message is on its way
    if failure is not None:
        barrier.abort()
        raise DepthbenchError(failure)
    return [done[i] for i in range(n)]


def _run(index: int, cfg: RunConfig, steps: int, warmup: int, threads: int, barrier: Any, results: Any) -> None:
    """A spawned bench process: one run's measurement, its outcome put on ``results``."""
    stopping.ignore_stop_signals()  # the parent decides when to stop, and kills its runs
    torch.set_num_threads(threads)
    try:
        results.put((index, "done", _measure(cfg, steps, warmup, threads, barrier)))
    except threading.BrokenBarrierError:
        results.put((index, "aborted", None))
    except DepthbenchError as err:
        barrier.abort()
        results.put((index, "error", str(err)))
    except BaseException:  # noqa: BLE001  a bug: its traceback goes to the parent, which raises it
        barrier.abort()
        results.put((index, "bug", traceback.format_exc()))


def _measure(cfg: RunConfig, steps: int, warmup: int, threads: int, barrier: Any) -> SharedRun:
    # Data, setup and warmup: in each run's own time, before the barrier.
    setup = TrainingSetup.create(cfg, load_dataset(cfg.dataset))
    device, step = setup.device, trainer_step(setup)
    setup.model.train()
    peak = PeakMemory(device)
    peak.start()
    for index in range(warmup):
        step(index)
    sync(device)

    # Timed steps: every run at once, from the barrier on.
    barrier.wait(BARRIER_TIMEOUT_S)
    start = time.monotonic()
    window_s, sizes = [], _window_sizes(steps)
    first = warmup
    for size in sizes:
        window_s.append(timed(device, lambda a=first, b=first + size: [step(i) for i in range(a, b)]))
        first += size
    end = time.monotonic()
    _, peak_mb = peak.stop()

    # Memory: read once every run has finished its steps but none has exited, so the device holds them all.
    barrier.wait(BARRIER_TIMEOUT_S)
    used = None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = (total - free) / MB
    batch = cfg.train.batch_size
    rates = [size * batch / s for size, s in zip(sizes, window_s, strict=True)]
    return SharedRun(threads, steps, batch, sum(window_s), rates, start, end, peak_mb, used)


def _window_sizes(steps: int) -> list[int]:
    """``steps`` split into up to WINDOWS windows of near-equal size: 10 -> [3, 3, 2, 2]."""
    windows = min(WINDOWS, steps)
    return [steps // windows + (i < steps % windows) for i in range(windows)]
