"""How long a sweep will take, before it trains: a few timed steps of each distinct shape, cached.

A run's time is its steps times a step's, plus its evaluations and its setup. Runs of one shape (the same
net, data shape, batch, optimizer, precision and device) take the same time per step, so one trial per shape
times all of them: :data:`TRIAL_WARMUP` steps, then the median of :data:`TRIAL_STEPS` single steps of the
trainer's own step (:func:`depthbench.bench.trainer.trainer_step`), one evaluation and the setup. Trials are
cached in the user's cache folder (``timings.json`` beside the data cache) keyed by the device's name, the
torch version, the torch threads a run gets and the shape, so a second dry-run, a resumed sweep and the
real sweep's start line measure nothing again.

Under ``--jobs N`` (N > 1) each run trains in its own process with its share of the cores
(:func:`depthbench.executors.local.threads_per_job`), so trials run with that many threads (with one job,
this process's), and the wall time is the runs laid out in order on N slots, each starting when a slot
frees (as the pool takes them). On a CPU those N runs also share caches and memory bandwidth, and a step
of one is slower than alone (by 8% for a 200-layer to 45% for a 1001-layer ResNet of the depth challenge,
BENCHMARKS.md), so there each shape is timed as N copies at once in N processes, as the pool trains them.

A CPU trial that begins while other work keeps the cores busy says so in the estimate and is not cached, so
the next estimate on a quieter machine measures again. A run that will train compiled (``train.compile``,
resolved as the run resolves it) is timed compiled, its compilation counted once per shape (not at all
where the trial compiled it in the sweep's own process, whose runs reuse that compiled code).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from depthbench import storage
from depthbench.bench.probes import device_name, sync, timed
from depthbench.config import DatasetConfig, RunConfig
from depthbench.data import data_root, load_dataset
from depthbench.devices import resolve_compile, resolve_device, resolve_precision
from depthbench.errors import DepthbenchError
from depthbench.estimate import DataShape, check_fits, known_shape
from depthbench.executors.local import threads_per_job
from depthbench.layout import CHECKPOINT, ESTIMATE

TRIAL_WARMUP, TRIAL_STEPS = 2, 3
CACHE_FILE = "timings.json"
_CACHE_FORMAT = 2  # bump when what a trial measures changes


@dataclass(frozen=True)
class ShapeTiming:
    """What one shape's trial measured, in seconds."""

    step_s: float  # the median of the timed steps
    eval_s: float  # one evaluation: the whole test split, and the validation split where the run holds one out
    setup_s: float  # model built and moved, optimizer, data to the device
    diagnose_s: float = 0.0  # one gradient and signal flow measurement (train.diagnose_steps), when the run has any
    compile_s: float = 0.0  # compiling the model at the first step, when the run trains compiled


@dataclass(frozen=True)
class SweepEstimate:
    """Each run's step time and duration (seconds), their sum, and the wall time on ``jobs`` slots."""

    step_s: dict[str, float]  # run id -> seconds per step
    run_s: dict[str, float]  # run id -> seconds for the steps it has left
    jobs: int
    busy: float | None = None  # cores other work kept busy when a trial began, where that made it unrepresentative

    @property
    def total_s(self) -> float:
        return sum(self.run_s.values())

    @property
    def wall_s(self) -> float:
        return wall_time(list(self.run_s.values()), self.jobs)


def shape_key(run: RunConfig, device: torch.device, threads: int) -> dict[str, Any]:
    """Everything a step's time depends on, and nothing it does not (seed, rates, schedule, step counts)."""
    tc, ds = run.train, run.dataset
    return {
        "format": _CACHE_FORMAT, "device": device_name(device), "torch": torch.__version__, "threads": threads,
        "version": run.version, "depth": run.depth, "model": run.model.model_dump(mode="json"),
        "dataset": {"name": ds.name, "image_size": ds.image_size, "augment": ds.augment, "flip": ds.flip,
                    "test_subset": ds.test_subset,
                    # only where set: the cached timings of runs without a split keep their keys
                    **({"val_split": ds.val_split} if ds.val_split is not None else {})},
        "train": {key: getattr(tc, key) for key in (
            "batch_size", "optimizer", "precision", "channels_last", "cuda_graph", "clip_grad_norm",
            "decay_all", "scalar_lr", "eval_batch_size")}
        # compile as resolved: `auto` compiles long runs only, so one shape may be timed both ways
        | {"compile": _compiled(run, device)},
        "diagnose": bool(tc.diagnose_steps),
    }


def _compiled(run: RunConfig, device: torch.device) -> bool:
    return resolve_compile(run, device, resolve_precision(run.train.precision, device))


def _key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_path() -> Path:
    return data_root() / CACHE_FILE


def measure_shape(run: RunConfig, threads: int) -> ShapeTiming:
    """A trial of ``run``'s shape: the trainer's setup, :data:`TRIAL_WARMUP` steps, the median of
    :data:`TRIAL_STEPS` single steps, one evaluation; with ``threads`` torch threads, as the run will have."""
    from depthbench.bench.trainer import trainer_step
    from depthbench.train import TrainingSetup, evaluate

    shape = known_shape(run.dataset)
    if shape is not None:  # too big for the device: refused before any data is read
        check_fits(run, shape, resolve_device(run.train.device))
    # Enough steps to time: more than the trial takes, within the paper's schedule checks; compiled or not as
    # the run itself will be (its steps decide that under `auto`).
    compiled = _compiled(run, resolve_device(run.train.device))
    trial = run.model_copy(update={"dataset": _trial_dataset(run, shape), "train": run.train.model_copy(
        update={"steps": 1000, "milestones": (0.5, 0.75), "compile": compiled})})
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = load_dataset(trial.dataset)
        start = time.perf_counter()
        setup = TrainingSetup.create(trial, data)
        sync(setup.device)
        setup_s = time.perf_counter() - start
        step = trainer_step(setup)
        setup.model.train()
        first_s = timed(setup.device, lambda: step(0))
        for index in range(1, TRIAL_WARMUP):
            step(index)
        steps = [timed(setup.device, lambda i=index: step(i))
                 for index in range(TRIAL_WARMUP, TRIAL_WARMUP + TRIAL_STEPS)]
        splits = [(x.to(setup.device), y.to(setup.device)) for x, y in
                  ((data.test_x, data.test_y), (data.val_x, data.val_y)) if len(y)]
        eval_s = timed(setup.device, lambda: [evaluate(setup.model, x, y, setup.mean, setup.std,
                                                       trial.train.eval_batch_size, setup.autocast,
                                                       trial.train.channels_last) for x, y in splits])
        diagnose_s = 0.0
        if run.train.diagnose_steps:
            from depthbench.flow import measure

            xb, yb = setup.batch(0)
            diagnose_s = timed(setup.device, lambda: measure(setup.model, xb, yb))
    finally:
        torch.set_num_threads(before)
    step_s = statistics.median(steps)
    compile_s = max(first_s - step_s, 0.0) if compiled else 0.0
    return ShapeTiming(step_s, eval_s, setup_s, diagnose_s, compile_s)


def _trial_dataset(run: RunConfig, shape: DataShape | None) -> DatasetConfig:
    """What a trial trains on: a step's time depends on the images' shape, not on what they show, so a
    CIFAR run is timed on synthetic images of its shape and split sizes (nothing downloaded for a dry-run);
    the bundled digits (one channel) and image folders (shape known once read) are read as they are."""
    if run.dataset.name not in ("cifar10", "cifar100") or shape is None:
        return run.dataset
    trained = run.train.batch_size * (TRIAL_WARMUP + TRIAL_STEPS + 1)
    if shape.val_size:  # a validation split of the run's size, held out of enough that every class keeps one
        trained = max(trained, shape.num_classes) + shape.val_size
    return DatasetConfig(name="synthetic", image_size=shape.image_size, num_classes=shape.num_classes,
                         augment=run.dataset.augment, flip=run.dataset.flip, train_subset=trained,
                         test_subset=run.dataset.test_subset or shape.test_size, val_split=shape.val_size or None)


Measure = Callable[[RunConfig, int], ShapeTiming]


def busy_cores(window_s: float = 0.25) -> float | None:
    """How many of this machine's cores other work keeps busy, sampled over ``window_s`` while this process
    waits (from /proc/stat); None where there is no /proc/stat."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            ticks = [int(t) for t in stat.readline().split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle and iowait
        return sum(ticks), idle

    try:
        total, idle = sample()
        time.sleep(window_s)
        total2, idle2 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total2 <= total:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle2 - idle) / (total2 - total))


# Other work on more than this many cores makes a trial's time unrepresentative of a quiet machine.
BUSY_CORES = 0.5


def shape_timings(runs: Sequence[RunConfig], jobs: int, measure: Measure | None = None,
                  ) -> tuple[dict[str, ShapeTiming], float | None]:
    """run id -> its shape's timing: from the cache, or measured once per shape missing there and cached; a run
    whose trial cannot run (it would not fit its device, its data is missing) is left out. Also the most cores
    that other work kept busy when a CPU trial began, if it was more than :data:`BUSY_CORES` (such a trial is
    used but not cached), else None."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    by_run: dict[str, ShapeTiming] = {}
    failed: set[str] = set()
    measured: dict[str, ShapeTiming] = {}
    busy: float | None = None
    with FileLock(f"{path}.lock"), _Trials(jobs, measure) as trials:
        cached = storage.read_json(path) or {}
        for run in runs:
            device = resolve_device(run.train.device)
            # One job trains in this process, with its threads; N jobs each in a process with a share of the cores.
            threads = threads_per_job(jobs) if device.type == "cpu" and jobs > 1 else torch.get_num_threads()
            key_id = _key_id(shape_key(run, device, threads))
            if key_id in failed:
                continue
            if key_id not in cached and key_id not in measured:
                others = busy_cores() if device.type == "cpu" else None
                try:
                    timing = trials.measure(run, threads, alongside=device.type == "cpu")
                except DepthbenchError:  # too big, data missing: the sweep's own checks say so; no estimate
                    failed.add(key_id)
                    continue
                if others is not None and others > BUSY_CORES:
                    busy = max(busy or 0.0, others)
                else:
                    cached[key_id] = asdict(timing)
                    storage.write_json(path, cached)
                if trials.here(alongside=device.type == "cpu"):
                    # A compiled trial in this process leaves its compiled code to this process's runs of the shape.
                    timing = replace(timing, compile_s=0.0)
                measured[key_id] = timing
            by_run[run.run_id] = measured.get(key_id) or ShapeTiming(**cached[key_id])
    return by_run, busy


class _Trials:
    """Where trials run: in this process, or, for N jobs on a CPU, as N copies at once in N processes, so that
    a step is timed sharing the cores as the sweep's runs will share them."""

    def __init__(self, jobs: int, measure: Measure | None) -> None:
        self.jobs, self.injected = jobs, measure
        self.pool: Any = None

    def __enter__(self) -> _Trials:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()  # also on a stop signal mid-trial: the copies end with the estimate
            self.pool.join()

    def here(self, *, alongside: bool) -> bool:
        """Whether a trial runs in this process (else as copies in a pool of others)."""
        return self.injected is not None or self.jobs == 1 or not alongside

    def measure(self, run: RunConfig, threads: int, *, alongside: bool) -> ShapeTiming:
        if self.here(alongside=alongside):
            return (self.injected or measure_shape)(run, threads)
        if self.pool is None:
            # The copies start with Ctrl-C held off (a signal mask survives exec), so one that reaches the process
            # group while they start up cannot kill them mid-import; each then ignores it, and this process ends them.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                self.pool = multiprocessing.get_context("spawn").Pool(self.jobs, initializer=_trial_worker)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        copies = [self.pool.apply_async(measure_shape, (run, threads)) for _ in range(self.jobs)]
        timings = [copy.get() for copy in copies]
        return ShapeTiming(*(statistics.fmean(values) for values in zip(*(astuple(t) for t in timings), strict=True)))


def _trial_worker() -> None:
    # The sweep's process answers Ctrl-C and SIGTERM and ends the copies; they must not die mid-message first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def run_seconds(run: RunConfig, timing: ShapeTiming, done_steps: int = 0) -> float:
    """The time ``run`` needs for its steps after ``done_steps``: the steps, the evaluations among them
    (every ``eval_every`` steps and at the last), and its setup."""
    tc = run.train
    left = max(tc.steps - done_steps, 0)
    if left == 0:
        return 0.0
    evals = tc.steps // tc.eval_every - done_steps // tc.eval_every + (tc.steps % tc.eval_every != 0)
    diagnosed = sum(done_steps <= step < tc.steps for step in tc.diagnose_steps)
    return left * timing.step_s + evals * timing.eval_s + diagnosed * timing.diagnose_s + timing.setup_s


def wall_time(durations: Sequence[float], jobs: int) -> float:
    """The time ``durations`` take in order on ``jobs`` slots, each run starting when a slot frees."""
    slots = [0.0] * max(1, min(jobs, len(durations)))
    for seconds in durations:
        heapq.heapreplace(slots, slots[0] + seconds)
    return max(slots) if durations else 0.0


def estimate_sweep(todo: Sequence[RunConfig], folder: Path, jobs: int, measure: Measure | None = None,
                   share: Mapping[str, float] | None = None) -> SweepEstimate:
    """Each run of ``todo``'s step time and remaining duration (from its checkpoint on), on ``jobs`` slots;
    under successive halving each run's duration is its expected ``share`` of it
    (:func:`depthbench.halving.expected_share`)."""
    from depthbench.train import checkpoint_step

    timings, busy = shape_timings(todo, jobs, measure)
    run_s = {}
    compiled: set[ShapeTiming] = set()
    for run in (r for r in todo if r.run_id in timings):
        timing = timings[run.run_id]
        done = checkpoint_step(folder / run.run_id) if (folder / run.run_id / CHECKPOINT).exists() else 0
        run_s[run.run_id] = run_seconds(run, timing, done) * (share or {}).get(run.run_id, 1.0)
        if timing.compile_s and run_s[run.run_id] and timing not in compiled:
            # A compiled shape is compiled once: later models of it reuse the compiled code in the same process,
            # and PyTorch's on-disk cache in another (seconds). The first run of the shape carries it; none does
            # where the trial compiled it in this process (shape_timings).
            compiled.add(timing)
            run_s[run.run_id] += timing.compile_s
    return SweepEstimate({run_id: timings[run_id].step_s for run_id in run_s}, run_s, jobs, busy)


def save_estimate(folder: Path, estimate: SweepEstimate) -> None:
    """Keep ``estimate`` in the sweep folder, so that the report can set it beside what the runs took."""
    storage.write_json(folder / ESTIMATE, {"jobs": estimate.jobs, "wall_s": round(estimate.wall_s, 3),
                                           "run_s": {run_id: round(s, 3) for run_id, s in estimate.run_s.items()}})


def format_duration(seconds: float) -> str:
    """``850 ms``, ``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if seconds < 1:
        return f"{1000 * seconds:.0f} ms"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds / 60), 60)
    return f"{hours} h {rest:02d} min"


def estimate_line(estimate: SweepEstimate, *, halved: bool = False) -> str:
    """One line: the runs' total and the wall time on the sweep's slots; ``halved`` where successive halving
    stops some runs early, which the total expects (the wall time does not wait at the rungs)."""
    runs = len(estimate.run_s)
    bound = "with successive halving, " if halved else ""
    busy = (f"; timed while other work kept {estimate.busy:.1f} of {os.cpu_count()} cores busy, so likely long, "
            "and not cached" if estimate.busy is not None else "")
    return (f"estimated: {runs} run(s), {bound}{format_duration(estimate.total_s)} of training in all, "
            f"{format_duration(estimate.wall_s)} wall time with --jobs {estimate.jobs} "
            f"({TRIAL_STEPS} timed steps per shape on this machine{busy}; --no-estimate skips)")


def compare_line(estimate: SweepEstimate, took_s: float) -> str:
    """How the wall time that passed compares with the estimate."""
    off = took_s / estimate.wall_s - 1 if estimate.wall_s > 0 else math.nan
    return f"took {format_duration(took_s)}, estimated {format_duration(estimate.wall_s)} ({100 * off:+.0f}%)"
