"""``--jobs N``: N runs at once on this machine, each in its own process and, with several GPUs, on its own GPU.

The pool is ``concurrent.futures``' process pool; this module gives each worker its GPU and its share
of the cores, and stops the workers itself on Ctrl-C, so that each run keeps its last step. One run
after another in this process (``--jobs 1``) is :class:`depthbench.sweep.SerialExecutor`, the default
of ``run_sweep``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from depthbench import stopping
from depthbench.config import RunConfig
from depthbench.executors.base import (
    LogFn, _Attempt, _has_checkpoint, _LiveRuns, _on_assigned_gpu, _record_failure,
)
from depthbench.sweep import RunFlags, RunOutcome, SweepContext, execute_run
from depthbench.train import TrainingProgress


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_job(jobs: int) -> int:
    """The torch threads of each of ``jobs`` processes sharing this machine: its share of the cores."""
    return max(1, _cores() // jobs)


@dataclass
class _Worker:
    """What a worker process of :class:`ParallelExecutor` was given when it started."""

    gpu: str | None
    events: Any  # multiprocessing.Queue to the driver: ("worker" | "started" | "progress" | "stopped", id, payload)
    stop: Any  # multiprocessing.Event set by the driver


_WORKER: _Worker | None = None


def _start_worker(gpus: Any, events: Any, stop: Any, threads: int) -> None:
    global _WORKER
    gpu = gpus.get()
    if gpu is not None:
        # Before torch first touches CUDA in this process, which then sees only its own GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    # Ctrl-C and SIGTERM reach every process of the terminal's group; the driver decides, and tells
    # the workers through `stop`, so each run checkpoints instead of dying mid-step.
    stopping.ignore_stop_signals()
    torch.set_num_threads(threads)
    _WORKER = _Worker(gpu, events, stop)
    events.put(("worker", str(os.getpid()), (gpu, threads)))


def _train_in_worker(cfg: RunConfig, sweep_dir: Path, flags: RunFlags) -> _Attempt | None:
    worker = _WORKER
    assert worker is not None, "runs only in a process started by ParallelExecutor"
    if worker.stop.is_set():
        return None  # the sweep was stopped before this run began: leave it untouched
    if worker.gpu is not None:
        cfg = _on_assigned_gpu(cfg)
    where = f"process {os.getpid()}" + (f", GPU {worker.gpu}" if worker.gpu is not None else "")
    resumed = _has_checkpoint(sweep_dir, cfg)
    worker.events.put(("started", cfg.run_id, (where, resumed)))

    def progress(p: TrainingProgress) -> None:
        if p.row is not None:  # log points only: a queue message per step would cost more than the step
            worker.events.put(("progress", cfg.run_id, p))

    try:
        # Loading data or building its model, the run stops at once; in its step loop, at the next step.
        with stopping.stop_on(worker.stop):
            outcome = execute_run(cfg, sweep_dir, flags, on_progress=progress, should_stop=worker.stop.is_set)
    except stopping.StopRequested:
        outcome = RunOutcome(cfg, "interrupted", message="stopped outside its step loop; it resumes from its last checkpoint")
    finally:
        worker.events.put(("stopped", cfg.run_id, None))
    return _Attempt(outcome, where, resumed)


def _visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


class ParallelExecutor:
    """``jobs`` runs at once on this machine, each in its own (spawned) process.

    With several GPUs, worker ``i`` owns GPU ``i mod #GPUs`` for its whole life, so runs spread over
    the GPUs instead of piling onto GPU 0; on CPUs the cores are split between the workers.
    """

    remote = False

    def __init__(self, jobs: int, *, log: LogFn | None = None, gpus: list[str] | None = None) -> None:
        self.jobs, self.log, self.gpus = jobs, log, gpus

    def runs_per_device(self, device: torch.device) -> int:
        """How many runs train on ``device`` at once, sharing its memory: all of them on the CPU, those of
        the workers that own the same GPU on a GPU."""
        if device.type != "cuda":
            return self.jobs
        gpus = self.gpus if self.gpus is not None else _visible_gpus()
        return math.ceil(self.jobs / max(1, len(gpus)))

    def execute(self, runs: list[RunConfig], sweep_dir: Path, context: SweepContext) -> Iterator[RunOutcome]:
        if not runs:
            return
        wants_gpu = any(cfg.train.device != "cpu" for cfg in runs)
        gpus = (self.gpus if self.gpus is not None else _visible_gpus()) if wants_gpu else []
        live = _LiveRuns(runs, context.reporter, self.log)
        with stopping.deferred():  # this loop stops the runs itself, so that each keeps its last step
            # The pool starts its processes (and the queues their threads, which must not take a signal
            # the main thread blocks meanwhile) in open and submit.
            with stopping.workers_born_deaf():
                pool, events, stop = self._open_pool(gpus)
                futures = {pool.submit(_train_in_worker, cfg, sweep_dir, context.flags): cfg for cfg in runs}
            try:
                pending = set(futures)
                while pending:
                    if context.stop.is_set():
                        stop.set()
                        for future in pending:
                            future.cancel()  # not started yet; the running ones checkpoint and return
                    done, pending = wait_futures(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    self._drain(events, live)
                    yield from live.deliver(self._outcome(future, futures[future], sweep_dir, live) for future in done)
            finally:
                # Reached early on --fail-fast or an error: runs still training checkpoint and stop.
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)

    def _open_pool(self, gpus: list[str]) -> tuple[ProcessPoolExecutor, Any, Any]:
        """The worker pool, its event queue and its stop flag; worker ``i`` gets GPU ``gpus[i % len(gpus)]``."""
        # spawn, not fork: a forked child would inherit the parent's torch threads and any CUDA state.
        ctx = multiprocessing.get_context("spawn")
        slots, events, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        for i in range(self.jobs):
            slots.put(gpus[i % len(gpus)] if gpus else None)
        threads = threads_per_job(self.jobs)
        pool = ProcessPoolExecutor(self.jobs, mp_context=ctx, initializer=_start_worker,
                                   initargs=(slots, events, stop, threads))
        return pool, events, stop

    @staticmethod
    def _drain(events: Any, live: _LiveRuns) -> None:
        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "worker":
                _, pid, (gpu, threads) = event
                owns = f"GPU {gpu}" if gpu is not None else f"{threads} CPU thread(s)"
                live.say(f"worker process {pid} up: {owns}")
            else:
                live.on(event)

    @staticmethod
    def _outcome(future: Future, cfg: RunConfig, sweep_dir: Path, live: _LiveRuns) -> RunOutcome | None:
        if future.cancelled():
            return None
        try:
            attempt = future.result()
            return live.returned(attempt) if attempt is not None else None
        except BrokenProcessPool as err:
            # A worker was killed from outside (the OS out-of-memory killer, say): the pool stops every
            # worker. Runs that were training are failed with their checkpoint kept; the others are left
            # as they were, for the next sweep.
            if not live.starts[cfg.run_id]:
                return None
            return _record_failure(cfg, sweep_dir, "a worker process died (killed by the OS? out of memory?) "
                                                   "and took the worker pool down", repr(err))
