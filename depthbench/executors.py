"""Where a sweep's runs train: several local processes, a Ray cluster, or a SLURM cluster.

Every executor hands each pending run to :func:`depthbench.sweep.execute_run`, so wherever a run
trains it is claimed by the lock in its folder, resumes from its ``checkpoint.pt`` and records its own
failure; every executor yields the same :class:`RunOutcome` objects to ``run_sweep``, so
``results.csv`` and the sweep's exit code do not depend on where the runs trained. The schedulers
are real ones (``concurrent.futures``, Ray, SLURM through submitit); this module only maps a run onto
them and reports what they do. Ray and submitit are optional extras, imported only when used.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depthbench import stopping, storage
from depthbench.config import ResourcesConfig, RunConfig
from depthbench.errors import DepthbenchError, did_you_mean
from depthbench.sweep import (
    BUSY, Executor, LocalExecutor, Reporter, RunOptions, RunOutcome, RunSettings, claim, execute_run, run_state,
    write_failure,
)
from depthbench.train import CHECKPOINT, METRICS, RESULT, Progress

EXECUTORS = ("local", "ray", "slurm")
LogFn = Callable[[str], None]
# Which executors each option of the sweep command means something to.
_OPTION_OWNERS = {
    "jobs": ("local",), "address": ("ray",), "slurm_local": ("slurm",), "max_restarts": ("ray", "slurm"),
    "partition": ("slurm",), "time_min": ("slurm",), "array_parallelism": ("slurm",),
}


def make_executor(
    name: str,
    resources: ResourcesConfig,
    *,
    jobs: int = 1,
    address: str | None = None,
    slurm_local: bool = False,
    max_restarts: int | None = None,
    partition: str | None = None,
    time_min: int | None = None,
    array_parallelism: int | None = None,
    log: LogFn | None = None,
) -> Executor:
    """The executor the ``sweep`` command's options describe; options given replace ``resources`` fields.

    An option that belongs to another executor is an error rather than silently ignored, and a missing
    optional package is reported here, before the sweep writes anything.
    """
    if name not in EXECUTORS:
        raise DepthbenchError(f"unknown executor '{name}'{did_you_mean(name, EXECUTORS)}; use local, ray or slurm")
    if jobs < 1:
        raise DepthbenchError(f"--jobs must be at least 1 (got {jobs})")
    given = {key: value for key, value in {"max_restarts": max_restarts, "partition": partition,
                                           "time_min": time_min, "array_parallelism": array_parallelism}.items()
             if value is not None}
    used = {*given, *(["jobs"] if jobs > 1 else []), *(["address"] if address is not None else []),
            *(["slurm_local"] if slurm_local else [])}
    for option, owners in _OPTION_OWNERS.items():
        if option in used and name not in owners:
            raise DepthbenchError(f"--{option.replace('_', '-')} is an option of --executor {' and '.join(owners)}, "
                                  f"not of --executor {name}")
    resources = ResourcesConfig.model_validate({**resources.model_dump(), **given})
    if name == "local":
        return ParallelExecutor(jobs, log=log) if jobs > 1 else LocalExecutor()
    if name == "ray":
        _require("ray", "ray")
        return RayExecutor(resources, address=address, log=log)
    _require("submitit", "slurm")
    return SlurmExecutor(resources, local=slurm_local, log=log)


def _require(module: str, extra: str) -> None:
    # Found, not imported: importing Ray here would freeze settings the ray executor sets first.
    if importlib.util.find_spec(module) is None:
        raise DepthbenchError(f"--executor {extra} needs the '{module}' package: pip install 'depthbench[{extra}]'")


def _gpus_for(cfg: RunConfig, resources: ResourcesConfig) -> float:
    # A run pinned to the CPU never touches a GPU, so it must not hold one another run could use.
    return 0.0 if cfg.train.device == "cpu" else resources.gpus_per_run


def _on_assigned_gpu(cfg: RunConfig) -> RunConfig:
    """The run on the GPU its scheduler gave the process, which that process sees as ``cuda:0``.

    The device is not part of the run id, so the run keeps its folder and its checkpoint.
    """
    if not cfg.train.device.startswith("cuda:"):
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cuda"})})


def _record_failure(cfg: RunConfig, sweep_dir: Path, message: str, details: str) -> RunOutcome:
    """A run whose worker or job died without a word, recorded as execute_run records a failed run.

    So it counts as failed in results.csv and in the exit code, and ``--retry-failed`` resumes it
    from the checkpoint it left.
    """
    run_dir = sweep_dir / cfg.run_id  # a job may have died before its run began: claim makes the folder
    lock = claim(run_dir)
    if lock is None:
        return RunOutcome(cfg, "busy", message=BUSY)
    try:
        if run_state(run_dir) in ("completed", "diverged"):
            return RunOutcome(cfg, "skipped", storage.read_json(run_dir / RESULT))
        write_failure(cfg, run_dir, message, f"{message}\n\n{details}")
    finally:
        lock.release()
    return RunOutcome(cfg, "failed", message=message)


def _has_checkpoint(sweep_dir: Path, cfg: RunConfig) -> bool:
    """Whether the run resumes from a checkpoint when it starts now (said in its start line)."""
    return (sweep_dir / cfg.run_id / CHECKPOINT).exists()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _LiveRuns:
    """The driver's view of runs training in parallel: what runs where, and the counts for each log line.

    Workers report when a run starts and stops training, in order, on one channel; outcomes arrive on
    another, possibly later. The reporter shows one run's progress bar; with several runs at once it
    follows the oldest one still running, and every start is a log line saying where the run trains.
    """

    def __init__(self, runs: list[RunConfig], reporter: Reporter | None, log: LogFn | None) -> None:
        self.by_id = {cfg.run_id: cfg for cfg in runs}
        self.reporter, self.log = reporter, log
        self.running: dict[str, str] = {}  # run id -> where; insertion order is start order
        self.starts: Counter[str] = Counter()
        self.places: dict[str, set[str]] = {}  # run id -> where its attempts started, as the driver heard
        self.over: set[str] = set()  # runs that stopped training; their outcome may still be on its way
        self.finished: Counter[str] = Counter()  # outcome status -> runs
        self.finished_ids: set[str] = set()
        self.focus: str | None = None
        self.focus_progress: Progress | None = None

    def started(self, run_id: str, where: str, resuming: bool = False) -> None:
        if run_id in self.finished_ids:
            return  # a late event from a run whose outcome is already in
        self.starts[run_id] += 1
        self.places.setdefault(run_id, set()).add(where)
        self.over.discard(run_id)  # a requeued or retried run trains again
        # A worker process trains one run at a time: its next start means its last run is over, even
        # if word of that is still on its way (Ray does not order messages from different tasks).
        for other in [other for other, place in self.running.items() if place == where]:
            self.stopped(other)
        self.running[run_id] = where
        again = " again" if self.starts[run_id] > 1 else ""
        self.say(f"started {run_id}{again} on {where}" + (", resuming from its checkpoint" if resuming else ""))
        if self.focus is None:
            self._follow(run_id)

    def progress(self, run_id: str, progress: Progress) -> None:
        if run_id == self.focus and self.reporter:
            self.focus_progress = progress
            self.reporter.progress(self.by_id[run_id], progress)

    def stopped(self, run_id: str) -> None:
        self.running.pop(run_id, None)
        self.over.add(run_id)

    def queued_again(self, run_id: str, why: str) -> None:
        """A run whose job was requeued (time-out, pre-emption): it waits for a node again."""
        self.running.pop(run_id, None)
        self.say(f"{run_id} is {why}; it resumes from its checkpoint when it runs again")

    def returned(self, attempt: _Attempt) -> RunOutcome:
        """The outcome a worker returned, after saying the start of its attempt if that was never heard.

        The start event travels on the other channel: it may arrive after the outcome (and is then
        dropped as late) or never, when the worker that sent it was killed with the message unsent.
        """
        if attempt.where not in self.places.get(attempt.outcome.cfg.run_id, ()):
            self.started(attempt.outcome.cfg.run_id, attempt.where, attempt.resumed)
        return attempt.outcome

    def ended(self, outcome: RunOutcome) -> None:
        """Count an outcome; call before yielding it to run_sweep."""
        self.stopped(outcome.cfg.run_id)
        self.finished[outcome.status] += 1
        self.finished_ids.add(outcome.cfg.run_id)
        if self.focus == outcome.cfg.run_id:
            self.focus = None

    def resume_display(self) -> None:
        """After run_sweep showed an outcome (which hides the run bar), show the followed run again."""
        if self.focus is None and self.running:
            self._follow(next(iter(self.running)))
        elif self.focus is not None and self.reporter:
            self.reporter.run_started(self.by_id[self.focus])
            if self.focus_progress:
                self.reporter.progress(self.by_id[self.focus], self.focus_progress)

    def say(self, text: str) -> None:
        if not self.log:
            return
        done = sum(n for status, n in self.finished.items() if status != "failed")
        # A run that stopped training but whose outcome is still on its way is in none of the counts.
        waiting = len(self.by_id) - len(self.running) - len(self.over)
        self.log(f"{text}  [{len(self.running)} running, {done} done, {self.finished['failed']} failed, "
                 f"{waiting} waiting]")

    def on(self, event: tuple[str, str, Any]) -> None:
        """Apply a worker's ("started", run id, (where, resuming)), ("progress", run id, Progress) or
        ("stopped", run id, None)."""
        kind, run_id, payload = event
        if kind == "started":
            self.started(run_id, *payload)
        elif kind == "progress":
            self.progress(run_id, payload)
        else:
            self.stopped(run_id)

    def _follow(self, run_id: str) -> None:
        self.focus, self.focus_progress = run_id, None
        if self.reporter:
            self.reporter.run_started(self.by_id[run_id])


@dataclass(frozen=True)
class _Attempt:
    """What a worker returns for one run: its outcome, and where and how that attempt began."""

    outcome: RunOutcome
    where: str
    resumed: bool


# ---------------------------------------------------------------------------------------------------
# local: N processes on this machine, each pinned to its own GPU when there are several


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
    import torch

    torch.set_num_threads(threads)
    _WORKER = _Worker(gpu, events, stop)
    events.put(("worker", str(os.getpid()), (gpu, threads)))


def _train_in_worker(cfg: RunConfig, sweep_dir: Path, settings: RunSettings) -> _Attempt | None:
    worker = _WORKER
    assert worker is not None, "runs only in a process started by ParallelExecutor"
    if worker.stop.is_set():
        return None  # the sweep was stopped before this run began: leave it untouched
    if worker.gpu is not None:
        cfg = _on_assigned_gpu(cfg)
    where = f"process {os.getpid()}" + (f", GPU {worker.gpu}" if worker.gpu is not None else "")
    resumed = _has_checkpoint(sweep_dir, cfg)
    worker.events.put(("started", cfg.run_id, (where, resumed)))

    def progress(p: Progress) -> None:
        if p.row is not None:  # log points only: a queue message per step would cost more than the step
            worker.events.put(("progress", cfg.run_id, p))

    try:
        # Loading data or building its model, the run stops at once; in its step loop, at the next step.
        with stopping.stop_on(worker.stop):
            outcome = execute_run(cfg, sweep_dir, settings, on_progress=progress, should_stop=worker.stop.is_set)
    except stopping.StopRequested:
        outcome = RunOutcome(cfg, "interrupted", message="stopped outside its step loop; it resumes from its last checkpoint")
    finally:
        worker.events.put(("stopped", cfg.run_id, None))
    return _Attempt(outcome, where, resumed)


def _visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class ParallelExecutor:
    """``jobs`` runs at once on this machine, each in its own (spawned) process.

    With several GPUs, worker ``i`` owns GPU ``i mod #GPUs`` for its whole life, so runs spread over
    the GPUs instead of piling onto GPU 0; on CPUs the cores are split between the workers.
    """

    remote = False

    def __init__(self, jobs: int, *, log: LogFn | None = None, gpus: list[str] | None = None) -> None:
        self.jobs, self.log, self.gpus = jobs, log, gpus

    def execute(self, runs: list[RunConfig], sweep_dir: Path, options: RunOptions) -> Iterator[RunOutcome]:
        if not runs:
            return
        wants_gpu = any(cfg.train.device != "cpu" for cfg in runs)
        gpus = (self.gpus if self.gpus is not None else _visible_gpus()) if wants_gpu else []
        live = _LiveRuns(runs, options.reporter, self.log)
        with stopping.deferred():  # this loop stops the runs itself, so that each keeps its last step
            # The pool starts its processes (and the queues their threads, which must not take a signal
            # the main thread blocks meanwhile) in open and submit.
            with stopping.workers_born_deaf():
                pool, events, stop = self._open_pool(gpus)
                futures = {pool.submit(_train_in_worker, cfg, sweep_dir, options.settings): cfg for cfg in runs}
            try:
                pending = set(futures)
                while pending:
                    if options.stop.is_set():
                        stop.set()
                        for future in pending:
                            future.cancel()  # not started yet; the running ones checkpoint and return
                    done, pending = wait_futures(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    self._drain(events, live)
                    for future in done:
                        outcome = self._outcome(future, futures[future], sweep_dir, live)
                        if outcome is None:
                            continue
                        live.ended(outcome)
                        yield outcome
                        live.resume_display()
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
        threads = max(1, _cores() // self.jobs)
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


# ---------------------------------------------------------------------------------------------------
# ray: one Ray task per run, with the run's GPUs and CPUs as its resources


class _Board:
    """A small Ray actor the tasks tell when their run starts, logs and stops; the driver drains it.

    Tasks only ever send to it and never wait on it: Ray lends the CPU of a task that blocks to
    another task, so a waiting task would let more runs train at once than there are CPUs.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    def tell(self, event: tuple[str, str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[tuple[str, str, Any]]:
        events, self.events = self.events, []
        return events


def _where_in_ray() -> str:
    import ray

    gpus = ray.get_gpu_ids()
    where = f"{ray.util.get_node_ip_address()} ({socket.gethostname()}), pid {os.getpid()}"
    return where + (f", GPU {','.join(map(str, gpus))}" if gpus else "")


def _train_in_ray(cfg: RunConfig, sweep_dir: Path, settings: RunSettings, board: Any,
                  stop_file: Path, threads: int) -> _Attempt | None:
    """The body of a run's Ray task; a retry after its worker died resumes from the run's checkpoint.

    The driver asks for a stop by creating ``stop_file`` in the sweep folder, which every node shares.
    """
    import ray
    import torch

    if stop_file.exists():
        return None  # the sweep was stopped before this run began: leave it untouched
    torch.set_num_threads(threads)
    if ray.get_gpu_ids():
        cfg = _on_assigned_gpu(cfg)
    where, resumed = _where_in_ray(), _has_checkpoint(sweep_dir, cfg)
    board.tell.remote(("started", cfg.run_id, (where, resumed)))
    looked, stopping = 0.0, False

    def should_stop() -> bool:
        # The trainer asks every step; the shared folder is looked at once a second at most.
        nonlocal looked, stopping
        if not stopping and time.monotonic() - looked >= 1.0:
            looked, stopping = time.monotonic(), stop_file.exists()
        return stopping

    def progress(p: Progress) -> None:
        if p.row is not None:
            board.tell.remote(("progress", cfg.run_id, p))

    try:
        outcome = execute_run(cfg, sweep_dir, settings, on_progress=progress, should_stop=should_stop)
        return _Attempt(outcome, where, resumed)
    finally:
        board.tell.remote(("stopped", cfg.run_id, None))


def _probe_shared(path: str, token: str) -> tuple[bool, str]:
    """On one node: can it read the driver's probe file, and write one the driver can read back?"""
    import ray

    probe = Path(path)
    try:
        seen = probe.read_text(encoding="utf-8") == token
        if seen:
            (probe.parent / f"{probe.name}.{ray.get_runtime_context().get_node_id()}").write_text(token)
    except OSError:
        seen = False
    return seen, _where_in_ray()


class RayExecutor:
    """Each pending run is a Ray task asking for ``resources.gpus_per_run`` GPUs and ``cpus_per_run`` CPUs.

    ``address`` is that of a running cluster (``auto`` finds the one on this machine); without it a
    private Ray instance is started for the sweep, on this machine's loopback address only. A task
    whose worker dies is retried up to ``resources.max_restarts`` times and resumes from the run's
    checkpoint, which is why the sweep folder must be on storage every node shares (checked first).
    """

    remote = True  # even a local instance: Ray, not this process, matches runs to GPUs

    def __init__(self, resources: ResourcesConfig, *, address: str | None = None, log: LogFn | None = None,
                 poll_s: float = 0.5) -> None:
        self.resources, self.address, self.log, self.poll_s = resources, address, log, poll_s

    def execute(self, runs: list[RunConfig], sweep_dir: Path, options: RunOptions) -> Iterator[RunOutcome]:
        if not runs:
            return
        connected_here = self._connect()
        import ray

        live = _LiveRuns(runs, options.reporter, self.log)
        refs: dict[Any, RunConfig] = {}
        pending: list[Any] = []
        board = None
        stop_file = sweep_dir / f".ray-stop-{uuid.uuid4().hex}"
        try:
            self._check_resources(runs)
            self._check_shared(sweep_dir)
            board = ray.remote(_Board).options(num_cpus=0).remote()
            task = ray.remote(_train_in_ray)
            threads = max(1, math.floor(self.resources.cpus_per_run))
            for cfg in runs:
                ref = task.options(
                    num_cpus=self.resources.cpus_per_run, num_gpus=_gpus_for(cfg, self.resources),
                    max_retries=self.resources.max_restarts, retry_exceptions=False, name=cfg.run_id,
                ).remote(cfg, sweep_dir, options.settings, board, stop_file, threads)
                refs[ref] = cfg
                pending.append(ref)  # wound down below, even if a stop cuts this loop short
            with stopping.deferred():  # this loop stops the runs itself, so that each keeps its last step
                while pending:
                    if options.stop.is_set() and not stop_file.exists():
                        self._stop(stop_file, board, live, pending, refs)
                    ready, pending = ray.wait(pending, num_returns=len(pending), timeout=self.poll_s)
                    for event in ray.get(board.drain.remote()):
                        live.on(event)
                    for ref in ready:
                        outcome = self._outcome(ref, refs[ref], sweep_dir, live)
                        if outcome is None:
                            continue
                        live.ended(outcome)
                        yield outcome
                        live.resume_display()
        finally:
            try:
                if board is not None:
                    self._wind_down(stop_file, board, live, pending, refs)
            finally:  # also after a second Ctrl-C
                stop_file.unlink(missing_ok=True)
                if connected_here:
                    ray.shutdown()

    def _connect(self) -> bool:
        """Connect to the cluster, or start a private instance; False when this process was connected already."""
        if self.address is None and "ray" not in sys.modules:
            # A private instance for this sweep: keep every Ray port on loopback. Ray only does that when
            # it believes multi-node clusters are off, a switch it reads when it is first imported.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        if ray.is_initialized():
            return False  # a connection this process made itself (a library user, a test): use it as it is
        # Where the datasets live is the driver's choice; tasks on other nodes do not inherit its environment.
        env_vars = {key: os.environ[key] for key in ("DEPTHBENCH_DATA",) if key in os.environ}
        runtime_env = {"env_vars": env_vars} if env_vars else None
        # ray.init replaces the SIGTERM handler with one that exits at once, and leaves it there.
        handlers = {sig: signal.getsignal(sig) for sig in stopping.STOP_SIGNALS}
        try:
            if self.address is None:
                ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                         logging_level=logging.WARNING, runtime_env=runtime_env)
            else:
                ray.init(address=self.address, logging_level=logging.WARNING, runtime_env=runtime_env)
        except ConnectionError as err:
            raise DepthbenchError(f"cannot connect to a Ray cluster at '{self.address}': {str(err).splitlines()[0]}; "
                                  "start one with `ray start --head`, or leave out --address for a local one") from None
        except (KeyboardInterrupt, SystemExit) as err:  # stopped while starting: leave no Ray process behind
            ray.shutdown()
            if isinstance(err, SystemExit) and err.code == signal.SIGTERM:  # what Ray's handler made of a SIGTERM
                raise stopping.StopRequested(signal.SIGTERM.name) from None
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return True

    def _check_resources(self, runs: list[RunConfig]) -> None:
        """Refuse up front what no node can ever run, instead of leaving the tasks pending forever."""
        import ray

        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        if not nodes:
            raise DepthbenchError("the Ray cluster has no live node; check `ray status`")
        gpus = max(_gpus_for(cfg, self.resources) for cfg in runs)
        cpus = self.resources.cpus_per_run
        most_gpus = max(node.get("GPU", 0) for node in nodes)
        most_cpus = max(node.get("CPU", 0) for node in nodes)
        if gpus > 0 and most_gpus == 0:
            total_cpus = sum(node.get("CPU", 0) for node in nodes)
            raise DepthbenchError(
                f"the Ray cluster has no GPU ({len(nodes)} node(s), {total_cpus:g} CPUs), but each run asks for "
                f"{gpus:g} (resources.gpus_per_run); add GPU nodes, or train on CPUs with --device cpu")
        if gpus > most_gpus:
            raise DepthbenchError(f"no Ray node has {gpus:g} GPUs (the most on one node is {most_gpus:g}); "
                                  "lower resources.gpus_per_run")
        if cpus > most_cpus:
            raise DepthbenchError(f"no Ray node has {cpus:g} CPUs (the most on one node is {most_cpus:g}); "
                                  "lower resources.cpus_per_run")

    @staticmethod
    def _check_shared(sweep_dir: Path, timeout_s: float = 120) -> None:
        """Every node must read and write the sweep folder: that is where runs resume and results land."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = uuid.uuid4().hex
        probe = sweep_dir / f".ray-probe-{token}"
        probe.write_text(token, encoding="utf-8")
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        task = ray.remote(_probe_shared)
        refs = [task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(str(probe), token) for node in nodes]
        try:
            ready, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            if late:
                raise DepthbenchError(f"{len(late)} Ray node(s) ran no task within {timeout_s:g} s; "
                                      "check `ray status` for dead or busy nodes")
            try:
                answers = ray.get(ready)
            except ray.exceptions.RayError as err:
                last = str(err).strip().splitlines()[-1]
                raise DepthbenchError(f"a Ray worker cannot run depthbench ({last}); install the same depthbench "
                                      "in the same Python environment on every node") from None
            blind = [where for (seen, where), node in zip(answers, nodes, strict=True)
                     if not (seen and (probe.parent / f"{probe.name}.{node}").exists())]
            if blind:
                raise DepthbenchError(
                    f"the sweep folder {sweep_dir.resolve()} is not shared with Ray node(s) {', '.join(blind)}; "
                    "put --out on storage every node mounts at the same path (NFS, Lustre, ...)")
        finally:
            for path in sweep_dir.glob(f"{probe.name}*"):
                path.unlink(missing_ok=True)

    def _outcome(self, ref: Any, cfg: RunConfig, sweep_dir: Path, live: _LiveRuns) -> RunOutcome | None:
        import ray

        try:
            attempt = ray.get(ref)
            return live.returned(attempt) if attempt is not None else None
        except ray.exceptions.TaskCancelledError:
            return None
        except ray.exceptions.RayTaskError:
            raise  # execute_run records every failure inside a run, so this is a bug: keep its traceback
        except ray.exceptions.RayError as err:
            # The worker (or its node) died more often than max_restarts allows; the checkpoint is kept.
            reason = str(err).strip().splitlines()[0][:160]
            message = f"its Ray worker died {self.resources.max_restarts + 1} time(s) ({type(err).__name__}: {reason})"
            return _record_failure(cfg, sweep_dir, message, str(err))

    @staticmethod
    def _stop(stop_file: Path, board: Any, live: _LiveRuns, pending: list[Any], refs: dict[Any, RunConfig]) -> None:
        """Runs training see the stop file within a second, save a checkpoint and return; the rest are cancelled.

        A run that started after the last look at the board is cancelled too: it loses the steps since its
        last checkpoint, never more.
        """
        import ray

        stop_file.write_text("stop", encoding="utf-8")
        for event in ray.get(board.drain.remote()):
            live.on(event)
        for ref in pending:
            if refs[ref].run_id not in live.running:
                ray.cancel(ref)

    def _wind_down(self, stop_file: Path, board: Any, live: _LiveRuns, pending: list[Any],
                   refs: dict[Any, RunConfig], timeout_s: float = 120) -> None:
        """Leaving early (--fail-fast, an error): stop what still runs, so it checkpoints rather than dies."""
        import ray

        try:
            if pending:
                if not stop_file.exists():
                    self._stop(stop_file, board, live, pending, refs)
                ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
            ray.kill(board)
        except (ray.exceptions.RayError, OSError):
            pass  # best effort while the sweep is already ending


# ---------------------------------------------------------------------------------------------------
# slurm: one job-array task per run, through submitit; time-outs checkpoint and requeue

_STOPPED_EXIT = 128 + signal.SIGTERM  # a run stopped by SIGTERM/SIGINT leaves no result: see _SlurmRun
_QUEUED_AGAIN = {"PENDING", "REQUEUED", "PREEMPTED", "SUSPENDED"}  # states of a job SLURM requeued or paused


class _SlurmRun:
    """One run as a SLURM job.

    On a time-out or pre-emption signal (USR2) submitit calls :meth:`checkpoint` and requeues what it
    returns; that is the protocol of ``submitit.helpers.Checkpointable``, which needs no base class
    (so this module imports without submitit). The run trains in a thread so that the main thread,
    where Python runs signal handlers, can ask it to stop and wait while it saves its checkpoint.
    """

    def __init__(self, cfg: RunConfig, sweep_dir: Path, settings: RunSettings, *, threads: int,
                 save_within_s: float = 60) -> None:
        self.cfg, self.sweep_dir, self.settings = cfg, sweep_dir, settings
        self.threads, self.save_within_s = threads, save_within_s
        self.outcome: RunOutcome | None = None  # set when the run finished just as the job was told to stop
        self._stop: threading.Event | None = None
        self._result: Future[RunOutcome] | None = None

    def __call__(self) -> RunOutcome:
        if self.outcome is not None:
            return self.outcome
        import torch

        torch.set_num_threads(self.threads)
        stop, result = threading.Event(), Future()
        self._stop, self._result = stop, result
        # SIGTERM (scancel, pre-emption) and SIGINT (submitit's local cancel): save and stop between steps.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

        def train() -> None:
            try:
                result.set_result(execute_run(self.cfg, self.sweep_dir, self.settings, should_stop=stop.is_set))
            except BaseException as err:  # noqa: BLE001 - handed to the main thread, which re-raises it
                result.set_exception(err)

        threading.Thread(target=train, name=f"train {self.cfg.run_id}", daemon=True).start()
        outcome = result.result()
        if outcome.status == "interrupted":
            # Stopped by a signal with its checkpoint saved. Leaving no result keeps the job unfinished
            # for the driver, so a job SLURM requeues after pre-emption picks the run up where it stopped.
            sys.exit(_STOPPED_EXIT)
        return outcome

    def checkpoint(self) -> Any:
        """Called by submitit on USR2: stop the run between two steps, let it save, and requeue this job."""
        from submitit.helpers import DelayedSubmission

        if self._stop is not None and self._result is not None:
            self._stop.set()
            try:
                outcome = self._result.result(timeout=self.save_within_s)
            except Exception:  # noqa: BLE001 - too slow or failed: the requeued job sorts it out from the files
                outcome = None
            if outcome is not None and outcome.status != "interrupted":
                self.outcome = outcome
        return DelayedSubmission(self)

    def __getstate__(self) -> dict[str, Any]:
        # The requeued job gets a fresh stop flag and result; threads and futures do not pickle.
        return {**self.__dict__, "_stop": None, "_result": None}


class SlurmExecutor:
    """Pending runs as one SLURM job array through submitit, one array task (one node, one task) per run.

    A job gets ``resources.gpus_per_run`` whole GPUs and ``cpus_per_run`` CPUs for ``time_min`` minutes.
    Near its time limit SLURM signals it (USR2): the run checkpoints and the job is requeued, up to
    ``max_restarts`` times. ``local=True`` runs the same jobs with submitit's local executor on this
    machine (all at once), to try a sweep before submitting it.
    """

    def __init__(self, resources: ResourcesConfig, *, local: bool = False, log: LogFn | None = None,
                 poll_s: float | None = None) -> None:
        self.resources, self.local, self.log = resources, local, log
        self.remote = not local
        self.poll_s = poll_s if poll_s is not None else (0.5 if local else 15.0)

    def execute(self, runs: list[RunConfig], sweep_dir: Path, options: RunOptions) -> Iterator[RunOutcome]:
        if not runs:
            return
        pending: dict[Any, RunConfig] = {}
        try:
            # Cut short, sbatch may still queue the array, and no one would cancel its jobs: a stop waits for
            # the submission (seconds), then the loop below sees it and the jobs are cancelled.
            with stopping.deferred():
                jobs = self._submit(runs, sweep_dir, options)
                pending.update(zip(jobs, runs, strict=True))
            live = _LiveRuns(runs, options.reporter, self.log)
            kind = "local jobs" if self.local else f"SLURM job array {jobs[0].job_id.split('_')[0]}"
            live.say(f"submitted {len(jobs)} runs as {kind}; job logs in {sweep_dir / 'slurm'}")
            while pending and not options.stop.is_set():
                for job, cfg in list(pending.items()):
                    if job.done():
                        del pending[job]
                        outcome = self._outcome(job, cfg, sweep_dir)
                        live.ended(outcome)
                        yield outcome
                        live.resume_display()
                        continue
                    state = job.state
                    if cfg.run_id not in live.running and state == "RUNNING":
                        live.started(cfg.run_id, self._where(job), _has_checkpoint(sweep_dir, cfg))
                    elif cfg.run_id in live.running and state in _QUEUED_AGAIN:
                        live.queued_again(cfg.run_id, f"{state.lower()} (job {job.job_id})")
                if pending:
                    self._follow_metrics(live, sweep_dir)
                    time.sleep(self.poll_s)
        finally:
            # Stopped (Ctrl-C, --fail-fast): cancelled jobs get SIGTERM, save their run and end.
            for job in pending:
                job.cancel(check=False)

    def _parameters(self, runs: list[RunConfig], name: str) -> dict[str, Any]:
        r = self.resources
        gpus = max(_gpus_for(cfg, r) for cfg in runs)
        if not float(gpus).is_integer():
            raise DepthbenchError(f"resources.gpus_per_run is {gpus:g}, but SLURM hands out whole GPUs; use a whole "
                                  "number, or --executor ray to share a GPU between runs")
        params: dict[str, Any] = {
            "name": f"depthbench-{name}", "timeout_min": r.time_min, "nodes": 1, "tasks_per_node": 1,
            "cpus_per_task": math.ceil(r.cpus_per_run), "gpus_per_node": int(gpus),
        }
        if not self.local:
            params.update(slurm_partition=r.partition, slurm_array_parallelism=r.array_parallelism,
                          slurm_additional_parameters=dict(r.slurm_extra) or None)
        return params

    def _submit(self, runs: list[RunConfig], sweep_dir: Path, options: RunOptions) -> list[Any]:
        import submitit

        cluster = "local" if self.local else "slurm"
        if not self.local and shutil.which("srun") is None:
            raise DepthbenchError("--executor slurm needs SLURM (srun and sbatch), which is not on this machine's "
                                  "PATH; run the sweep from a login node, or try it here with --slurm-local")
        params = self._parameters(runs, sweep_dir.name)  # before anything is written: it may refuse the config
        # submitit's job files (pickles, logs) sit in the sweep folder, which compute nodes share anyway.
        executor = submitit.AutoExecutor(folder=sweep_dir / "slurm", cluster=cluster,
                                         **{f"{cluster}_max_num_timeout": self.resources.max_restarts})
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
        threads = max(1, math.floor(self.resources.cpus_per_run))
        gpus = params["gpus_per_node"] > 0
        try:
            with executor.batch():
                jobs = [executor.submit(_SlurmRun(_on_assigned_gpu(cfg) if gpus else cfg, sweep_dir, options.settings,
                                                  threads=threads))
                        for cfg in runs]
        except Exception as err:  # noqa: BLE001 - sbatch's refusal (bad partition, account, ...) in its own words
            lines = [line for line in str(err).splitlines() if line.strip()]
            raise DepthbenchError(f"submitting the jobs failed: {lines[-1] if lines else type(err).__name__}") from None
        return jobs

    def _outcome(self, job: Any, cfg: RunConfig, sweep_dir: Path) -> RunOutcome:
        try:
            return job.result()
        except Exception as err:  # noqa: BLE001 - submitit's UncompletedJobError and kin: no result came back
            text = str(err)
            if "timed-out too many times" in text:
                reason = (f"timed out {self.resources.max_restarts + 1} time(s) at resources.time_min = "
                          f"{self.resources.time_min} min (raise time_min or max_restarts)")
            else:
                lines = [line.strip() for line in text.splitlines() if line.strip()]
                reason = f"its job ended without a result ({lines[0][:160] if lines else 'no output'})"
            return _record_failure(cfg, sweep_dir, f"SLURM job {job.job_id}: {reason}; log {job.paths.stderr}", text)

    def _where(self, job: Any) -> str:
        if self.local:
            return f"this machine (local job {job.job_id})"
        node = job.get_info().get("NodeList") or "a node"
        return f"{node} (job {job.job_id})"

    @staticmethod
    def _follow_metrics(live: _LiveRuns, sweep_dir: Path) -> None:
        # A SLURM job cannot call back to the driver; its metrics file on the shared folder tells the step.
        if live.focus is None:
            return
        rows = storage.read_jsonl(sweep_dir / live.focus / METRICS)
        if rows and (live.focus_progress is None or rows[-1].get("step") != live.focus_progress.step):
            cfg = live.by_id[live.focus]
            live.progress(live.focus, Progress(int(rows[-1].get("step", 0)), cfg.train.steps, rows[-1]))
