"""Running a sweep: plan which runs are left, claim each with a lock, train it, record the outcome.

Runs live in ``<out>/<sweep name>/<run id>/``; the run id names the run's content, so re-running a
sweep skips finished runs, resumes interrupted ones from their checkpoint, and a changed setting
gets a new folder instead of overwriting an old result. :func:`execute_run` is the unit of work
every executor calls, in this process or on a cluster worker. A fault of the machine (a full disk, see
:mod:`depthbench.faults`) interrupts its run and stops the sweep; it never fails the run.

A sweep with ``tune.halving`` trains in rungs (:mod:`depthbench.halving`): the runs still in the race train
up to a rung's step and pause there, then each arm's worst candidates are pruned, and the next rung
begins; the survivors finish as usual. Each rung is one pass of the same executor.
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from filelock import FileLock, Timeout

from depthbench import stopping, storage
from depthbench.config import RunConfig, SweepConfig, dump_run_config
from depthbench.config.grid import axis_value
from depthbench.errors import DepthbenchError
from depthbench.data import load_dataset
from depthbench.devices import precision_name, resolve_device, resolve_precision
from depthbench.estimate import DataShape, best_segments, check_fits, known_shape
from depthbench.faults import MachineFault, machine_fault
from depthbench.halving import Halving, decide, pruned_result, read_rows, reached
from depthbench.layout import CONFIG, ERROR_LOG, LOCK, RESULT, SWEEP_FILE, RunState, run_state
from depthbench.results import LiveResults
from depthbench.tracking import TensorBoardLogger
from depthbench.train import (
    RunInterrupted, RunPaused, TrainingProgress, check_resume_origin, checkpoint_origin, checkpoint_step, train_run,
)

# "paused": stopped at a rung of successive halving, its checkpoint kept, until the sweep decides (not a result);
# "pruned": stopped there for good by that decision.
Status = Literal["completed", "diverged", "failed", "pruned", "paused", "interrupted", "skipped", "busy"]


@dataclass
class RunOutcome:
    cfg: RunConfig
    status: Status
    result: dict[str, Any] | None = None
    message: str = ""
    notes: list[str] = field(default_factory=list)
    fault: MachineFault | None = None  # an interrupted run stopped by the machine: the sweep stops too


class Reporter(Protocol):
    """What a sweep tells its user; the CLI shows it with rich, tests can record it."""

    def plan(self, todo: list[RunConfig], done: int, total: int) -> None: ...
    def run_started(self, cfg: RunConfig) -> None: ...
    def progress(self, cfg: RunConfig, progress: TrainingProgress) -> None: ...
    def run_finished(self, outcome: RunOutcome) -> None: ...


def _failure_message(err: BaseException, cfg: RunConfig) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError":
        return f"out of memory ({text[:120]}); {_memory_advice(cfg)}"
    if isinstance(err, DepthbenchError):  # a refusal found on the worker (its device, its checkpoint): says it all
        return text
    return f"{type(err).__name__}: {text}"


def _memory_advice(cfg: RunConfig) -> str:
    """What to change after running out of memory, with the checkpointing segment count that saves most
    (about sqrt(n) per stage of n units: :func:`depthbench.estimate.best_segments`)."""
    if cfg.model.family != "resnet":  # activation checkpointing is a ResNet setting
        return "lower train.batch_size"
    _, n = cfg.blocks
    segments = best_segments(n)
    if cfg.model.checkpointing and min(cfg.model.checkpointing, n) == segments:  # a stage splits as in models
        return "lower train.batch_size (activation checkpointing is already on)"
    return (f"lower train.batch_size or set model.checkpointing: {segments} (segments per stage: "
            "recomputes activations in backward to keep fewer of them)")


BUSY = "being trained by another process"


def claim(run_dir: Path) -> FileLock | None:
    """The run's lock, acquired, or None when another process holds it; the caller releases it.

    flock is released by the OS when its holder dies, so a killed sweep leaves no stale claim, and the
    temporary files of a writer that was killed are deleted here: the run's files are written only by
    the lock's holder. The sweep folder is not made again: if it vanished, that is for the caller to see.
    """
    run_dir.mkdir(exist_ok=True)
    lock = FileLock(run_dir / LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    storage.remove_stale_temps(run_dir)
    return lock


def write_failure(cfg: RunConfig, run_dir: Path, message: str, details: str) -> None:
    """Record a failed run: ``error.log`` with the details, ``result.json`` with status and message.

    The caller holds the run's lock. A failed run counts in results.csv and the exit code, is skipped
    by a plain re-run, and ``--retry-failed`` resumes it from whatever checkpoint it left.
    """
    try:
        (run_dir / ERROR_LOG).write_text(details, encoding="utf-8")
        if not (run_dir / CONFIG).exists():  # it failed before the trainer wrote it
            storage.write_text(run_dir / CONFIG, dump_run_config(cfg))
        storage.write_json(run_dir / RESULT, {"run_id": cfg.run_id, "status": "failed", "error": message})
    except OSError:
        pass  # the disk may be the failure; the console line still tells the user


@dataclass(frozen=True)
class RunFlags:
    """How the user asked each run to be executed: the command-line flags that reach the run itself (never
    part of a run id). Where runs train is :class:`depthbench.executors.ExecutorOptions`.

    Plain data, so it travels whole to a ``--jobs`` worker, a Ray task or a SLURM job.
    """

    retry_failed: bool = False  # re-run runs recorded as failed
    tensorboard: bool = False  # also write TensorBoard event files
    allow_device_change: bool = False  # resume checkpoints made on another device type or precision
    # Successive halving, set by run_sweep: evaluate at every rung step, and stop at this pass's rung.
    eval_at: tuple[int, ...] = ()
    pause_at: int | None = None


def execute_run(
    cfg: RunConfig,
    sweep_dir: Path,
    flags: RunFlags = RunFlags(),
    *,
    on_progress: Callable[[TrainingProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunOutcome:
    """Claim, train and record one run; never raises for a failure inside the run itself, nor for a fault
    of the machine (the run is then interrupted, with ``fault`` set).

    A run recorded as pruned is resumed: it is handed over only when the sweep's halving now keeps it.
    With ``flags.pause_at`` a run whose checkpoint is already at that step is paused without being built."""
    retry_failed, tensorboard = flags.retry_failed, flags.tensorboard
    run_dir = sweep_dir / cfg.run_id
    try:
        lock = claim(run_dir)
    except OSError as err:
        if (fault := machine_fault(err, run_dir)) is None:
            raise
        return _stopped_by(cfg, fault)
    if lock is None:
        return RunOutcome(cfg, "busy", message=BUSY)
    try:
        state = run_state(run_dir)
        if state in ("completed", "diverged") or (state == "failed" and not retry_failed):
            return RunOutcome(cfg, "skipped", storage.read_json(run_dir / RESULT))
        notes: list[str] = []
        if state in ("partial", "pending") and (run_dir / RESULT).exists():
            notes.append(f"{cfg.run_id}: result.json is unreadable, redoing the run")
        if state == "failed":
            (run_dir / RESULT).unlink()
        if state == "pruned":
            (run_dir / RESULT).unlink()
            notes.append(f"{cfg.run_id}: was pruned, and the sweep as it stands now keeps it (its halving changed "
                         "or is gone): it resumes")
        if flags.pause_at is not None and (done := checkpoint_step(run_dir)) >= flags.pause_at:
            return RunOutcome(cfg, "paused", message=f"paused at step {done}, checkpoint kept", notes=notes)
        if tensorboard:
            on_progress = TensorBoardLogger(run_dir, forward=on_progress)
        try:
            result = train_run(cfg, run_dir, on_progress=on_progress, should_stop=should_stop, notes=notes,
                               allow_device_change=flags.allow_device_change, pause_at=flags.pause_at,
                               eval_at=flags.eval_at)
        except RunInterrupted as stop:
            return RunOutcome(cfg, "interrupted", message=str(stop), notes=notes)
        except RunPaused as pause:
            return RunOutcome(cfg, "paused", pause.row, message=str(pause), notes=notes)
        except Exception as err:  # noqa: BLE001 - any failure of one run is recorded, and the sweep goes on
            if (fault := machine_fault(err, run_dir)) is not None:
                return _stopped_by(cfg, fault, notes)
            message = _failure_message(err, cfg)
            write_failure(cfg, run_dir, message, traceback.format_exc())
            return RunOutcome(cfg, "failed", message=message, notes=notes)
        return RunOutcome(cfg, result["status"], result, notes=notes)
    finally:
        if tensorboard and on_progress is not None and hasattr(on_progress, "close"):
            on_progress.close()
        lock.release()


def _stopped_by(cfg: RunConfig, fault: MachineFault, notes: list[str] | None = None) -> RunOutcome:
    return RunOutcome(cfg, "interrupted", message=f"stopped: {fault}; its last checkpoint is kept", notes=notes or [],
                      fault=fault)


class Executor(Protocol):
    """Runs pending runs somewhere and yields their outcomes as they finish.

    ``remote`` is true when the runs train on other machines, whose devices this one cannot check.
    :class:`SerialExecutor` is below; the others (``--jobs``, Ray, SLURM) are in :mod:`depthbench.executors`.
    This contract, its options and the default executor live here, with ``run_sweep`` which uses them,
    because the executors import :func:`execute_run` from this module: it cannot import them back.
    """

    remote: bool

    def execute(self, runs: list[RunConfig], sweep_dir: Path, context: SweepContext) -> Iterator[RunOutcome]: ...


@dataclass
class SweepContext:
    """What ``run_sweep`` hands an executor with the runs: the flags each run is executed with, whom to tell
    of progress, and the event that stops the sweep. Lives on the driver: only ``flags`` travels to workers."""

    flags: RunFlags = RunFlags()
    reporter: Reporter | None = None
    stop: threading.Event = field(default_factory=threading.Event)


class SerialExecutor:
    """One run after another in this process, so the dataset is loaded once for the whole sweep."""

    remote = False

    def execute(self, runs: list[RunConfig], sweep_dir: Path, context: SweepContext) -> Iterator[RunOutcome]:
        reporter = context.reporter
        for cfg in runs:
            if context.stop.is_set():
                return
            if reporter:
                reporter.run_started(cfg)
            yield execute_run(
                cfg, sweep_dir, context.flags,
                on_progress=(lambda p, c=cfg: reporter.progress(c, p)) if reporter else None,
                should_stop=context.stop.is_set,
            )


@dataclass
class SweepOutcome:
    sweep_dir: Path
    outcomes: list[RunOutcome]
    interrupted: bool = False
    failed: list[str] = field(default_factory=list)  # every failed run of the sweep, this time or before
    pruned: list[str] = field(default_factory=list)  # every run successive halving pruned, this time or before
    fault: MachineFault | None = None  # the machine's fault that stopped the sweep

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def sweep_dir_for(sweep: SweepConfig, out: Path) -> Path:
    return Path(out) / sweep.name


def plan(sweep: SweepConfig, out: Path, *, device: str | None = None, retry_failed: bool = False
         ) -> tuple[list[RunConfig], list[RunConfig]]:
    """(all runs, runs still to do) for a sweep, with an optional device override applied.

    A run is to do until it completed, diverged, failed (unless ``retry_failed``) or was pruned by the sweep's
    successive halving as it decides now: a run recorded as pruned that the halving now keeps is to do again.
    """
    runs = sweep.runs()
    if device:
        # One new train section for each the runs share, so that they still share it (and its hash).
        moved: dict[int, Any] = {}
        for r in runs:
            if id(r.train) not in moved:
                moved[id(r.train)] = r.train.model_copy(update={"device": device})
        runs = [r.model_copy(update={"train": moved[id(r.train)]}) for r in runs]
    folder = sweep_dir_for(sweep, out)
    states = run_states(folder, runs)
    retry = [run_id for run_id, state in states.items() if state == "failed"] if retry_failed else []
    pruned = halving_now(sweep, folder, runs, states, retry).pruned
    finished = ("completed", "diverged") if retry_failed else ("completed", "diverged", "failed")
    return runs, [r for r in runs if states[r.run_id] not in finished and r.run_id not in pruned]


def halving_now(sweep: SweepConfig, folder: Path, runs: list[RunConfig], states: dict[str, RunState],
                retry: Collection[str] = ()) -> Halving:
    """The sweep's successive halving as its run folders decide it now; runs in ``retry`` (failed, to be tried
    again) count as unfinished. Nothing is pruned in a sweep without ``tune.halving``."""
    if sweep.tune is None or sweep.tune.halving is None:
        return Halving({}, {run.run_id: None for run in runs}, {})
    finished = {run_id for run_id, state in states.items()
                if state in ("completed", "diverged", "failed") and run_id not in retry}
    return decide(runs, sweep.tune, list(sweep.axes()), read_rows(folder, runs), finished)


def run_states(folder: Path, runs: list[RunConfig]) -> dict[str, RunState]:
    """Each run's state by run id; a run without a folder is pending (one listing, not a look per run)."""
    try:
        present = set(os.listdir(folder))
    except OSError:
        present = set()
    return {r.run_id: run_state(folder / r.run_id) if r.run_id in present else "pending" for r in runs}


def plan_summary(runs: list[RunConfig], states: dict[str, RunState], todo: set[str], axes: list[str], *,
                 listed: int = 8) -> list[str]:
    """A plan too long to list, in a few lines: its runs counted by state, then by their value of each grid axis
    in ``axes`` (dotted keys; an axis of more than ``listed`` values as its count and its first and last value)."""
    by_state = Counter(f"{states[r.run_id]} -> to do" if r.run_id in todo else states[r.run_id] for r in runs)
    lines = [f"{len(runs):,} runs by state: " + ", ".join(f"{state} {n:,}" for state, n in by_state.most_common())
             + " (--all lists every run)"]
    for axis in axes:
        counts = Counter(str(axis_value(run, axis)) for run in runs)
        if len(counts) <= listed:
            lines.append(f"{axis}: " + ", ".join(f"{value} ({n:,} runs)" for value, n in counts.items()))
        else:
            values, each = list(counts), sorted(set(counts.values()))
            runs_each = f"{each[0]:,}" if len(each) == 1 else f"{each[0]:,} to {each[-1]:,}"
            lines.append(f"{axis}: {len(values):,} values, {values[0]} to {values[-1]}, {runs_each} run(s) each")
    return lines


def _check_writable(folder: Path) -> None:
    """Refuse an output folder this process may not write to; a machine fault (a full disk) is raised as it is."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        try:
            probe.write_text("ok")
        finally:
            probe.unlink(missing_ok=True)  # also when a stop signal lands in between
    except OSError as err:
        if machine_fault(err, folder) is not None:
            raise
        raise DepthbenchError(f"cannot write to output folder '{folder}': {err.strerror or err}; "
                              "choose another with --out") from None


def run_sweep(
    sweep: SweepConfig,
    out: Path,
    *,
    device: str | None = None,
    flags: RunFlags = RunFlags(),
    fail_fast: bool = False,
    executor: Executor | None = None,
    reporter: Reporter | None = None,
    handle_signals: bool = True,
    before_training: Callable[[list[RunConfig]], None] | None = None,
) -> SweepOutcome:
    """Train every run of the sweep that is not finished yet, then rebuild ``results.csv``.

    ``before_training`` is called with the runs to do once every check has passed, just before they train
    (the CLI times a few steps there to estimate the sweep's duration).

    With ``handle_signals``, Ctrl-C and SIGTERM stop the sweep from its first instruction on: data
    decoding and model building included (see :mod:`depthbench.stopping`).
    """
    signals = stopping.stop_signals() if handle_signals else contextlib.nullcontext(threading.Event())
    with signals as stop:
        return _run_sweep(sweep, out, stop, device=device, flags=flags, fail_fast=fail_fast,
                          executor=executor, reporter=reporter, before_training=before_training)


def _run_sweep(
    sweep: SweepConfig,
    out: Path,
    stop: threading.Event,
    *,
    device: str | None,
    flags: RunFlags,
    fail_fast: bool,
    executor: Executor | None,
    reporter: Reporter | None,
    before_training: Callable[[list[RunConfig]], None] | None,
) -> SweepOutcome:
    folder = sweep_dir_for(sweep, out)
    runs, todo = plan(sweep, out, device=device, retry_failed=flags.retry_failed)
    local = not getattr(executor, "remote", False)
    preflight(todo, devices=local, share=getattr(executor, "runs_per_device", None))
    if local and not flags.allow_device_change:
        check_resume_origins(todo, folder)
    try:
        _check_writable(folder)
        storage.write_text(folder / SWEEP_FILE, sweep_yaml(sweep))
    except OSError as err:
        if (fault := machine_fault(err, folder)) is not None:
            return SweepOutcome(folder, [], interrupted=True, fault=fault)
        raise DepthbenchError(f"cannot write {folder / SWEEP_FILE}: {err.strerror or err}") from None
    # Temporary files of a sweep killed mid-write; a concurrent sweep's own take milliseconds.
    storage.remove_stale_temps(folder, older_than_s=600)
    if reporter:
        reporter.plan(todo, len(runs) - len(todo), len(runs))
    if before_training and todo:
        before_training(todo)

    halving = sweep.tune.halving if sweep.tune else None
    if halving is not None:  # every run is evaluated at every rung, however its passes fall
        flags = replace(flags, eval_at=halving.rungs)
    passes = _Passes(executor or SerialExecutor(), folder, SweepContext(flags=flags, reporter=reporter, stop=stop),
                     _live_results(folder, sweep, runs), fail_fast)
    if halving is None:
        passes.run(todo)
    else:
        _halve(sweep, folder, runs, todo, passes)
    _refresh_results(passes.table)
    states = run_states(folder, runs)
    return SweepOutcome(folder, passes.outcomes, interrupted=stop.is_set(),
                        failed=[run_id for run_id, state in states.items() if state == "failed"],
                        pruned=[run_id for run_id, state in states.items() if state == "pruned"], fault=passes.fault)


@dataclass
class _Passes:
    """The executor's passes over a sweep's runs (one, or one per rung of successive halving); each outcome is
    kept, put in results.csv and shown as it comes. After a stop, a fault or --fail-fast no pass starts."""

    executor: Executor
    folder: Path
    context: SweepContext
    table: LiveResults | None
    fail_fast: bool
    outcomes: list[RunOutcome] = field(default_factory=list)
    fault: MachineFault | None = None  # the machine's fault that stopped the sweep
    ended: bool = False

    def run(self, runs: list[RunConfig], pause_at: int | None = None) -> None:
        """Train ``runs`` to their end, or to step ``pause_at`` where they pause."""
        if self.ended or self.context.stop.is_set() or not runs:
            self.ended = self.ended or self.context.stop.is_set()
            return
        context = replace(self.context, flags=replace(self.context.flags, pause_at=pause_at))
        # Closed at once when this loop ends early (--fail-fast, a stop), so the executor winds down its runs now.
        with contextlib.closing(self.executor.execute(runs, self.folder, context)) as finished:
            for outcome in finished:
                self.record(outcome)
                if outcome.status == "failed" and self.fail_fast:
                    self.ended = True
                    break
        self.ended = self.ended or self.context.stop.is_set()

    def record(self, outcome: RunOutcome) -> None:
        self.outcomes.append(outcome)
        _refresh_results(self.table, outcome)
        if self.context.reporter:
            self.context.reporter.run_finished(outcome)
        if outcome.fault is not None and self.fault is None:
            # Every run would meet it: start no more, and let those training stop as on Ctrl-C.
            self.fault = outcome.fault
            self.context.stop.set()


def _halve(sweep: SweepConfig, folder: Path, runs: list[RunConfig], todo: list[RunConfig], passes: _Passes) -> None:
    """Successive halving: a pass per rung, in which the runs still in the race that have not reached its step
    train up to it and pause; before each pass (and after the last) the rungs every run of an arm has reached
    are decided, and the runs of the candidates they drop are recorded as pruned. Then the survivors finish.

    An arm whose rung cannot be decided (a run busy in another process) waits there for the next sweep; the
    other arms go on.
    """
    assert sweep.tune is not None and sweep.tune.halving is not None
    states = run_states(folder, runs)
    # Failed runs to try again (once, in this sweep); one whose candidate is dropped at a rung it reached is pruned.
    retry = {run_id for run_id, state in states.items() if state == "failed" and passes.context.flags.retry_failed}
    for rung in (*sweep.tune.halving.rungs, None):
        states = run_states(folder, runs)
        now = halving_now(sweep, folder, runs, states, retry)
        for run in runs:
            if run.run_id in now.pruned and (states[run.run_id] in ("partial", "pending") or run.run_id in retry):
                passes.record(_record_pruned(run, folder, now, sweep.tune.metric))
                if passes.fault is not None:
                    return

        def trains(run: RunConfig, rung: int | None = rung) -> bool:
            state, run_id = states[run.run_id], run.run_id
            finished = state in ("completed", "diverged") or (state == "failed" and run_id not in retry)
            return (run_id not in now.pruned and not finished and now.open_rung[run_id] == rung
                    and (rung is None or not reached(now.rows[run_id], rung)))

        batch = [run for run in todo if trains(run)]
        retry -= {run.run_id for run in batch}
        passes.run(batch, pause_at=rung)
        if passes.ended:
            return


def _record_pruned(cfg: RunConfig, folder: Path, now: Halving, metric: str) -> RunOutcome:
    """Write the pruned result.json of a run the halving dropped, under the run's lock."""
    run_dir = folder / cfg.run_id
    rung = now.pruned[cfg.run_id]
    try:
        lock = claim(run_dir)
        if lock is None:
            return RunOutcome(cfg, "busy", message=BUSY)
        try:
            if (state := run_state(run_dir)) in ("completed", "diverged", "pruned"):  # by another sweep, meanwhile
                return RunOutcome(cfg, "skipped", storage.read_json(run_dir / RESULT), message=state)
            result = pruned_result(cfg, now.rows[cfg.run_id], rung, metric)
            storage.write_json(run_dir / RESULT, result)
        finally:
            lock.release()
    except OSError as err:
        if (fault := machine_fault(err, run_dir)) is None:
            raise
        return _stopped_by(cfg, fault)
    value = result[metric]
    measured = f"{metric} {value:.4g}" if value is not None else f"no {metric} there"
    return RunOutcome(cfg, "pruned", result, message=f"pruned at step {rung} ({measured}); checkpoint kept")


def preflight(runs: list[RunConfig], *, devices: bool = True, share: Callable[[Any], int] | None = None) -> None:
    """Fail before anything is written if a device (when ``devices``) or dataset the runs need is not there,
    a batch is larger than its training set (what a validation split leaves of it), or (when ``devices``) a
    run cannot fit its device's memory, or its part of it when ``share(device)`` runs train on that device at
    once (``--jobs``)."""
    resolved = {device: resolve_device(device) for device in sorted({r.train.device for r in runs})} if devices else {}
    shares = {name: share(device) if share else 1 for name, device in resolved.items()}
    for run in runs if devices else ():  # sizes the config alone tells: refused before any data is read or fetched
        if (shape := known_shape(run.dataset)) is not None:
            check_fits(run, shape, resolved[run.train.device], share=shares[run.train.device])
    datasets = {r.dataset.model_dump_json(): r.dataset for r in runs}
    shapes = {key: DataShape.of(load_dataset(dataset)) for key, dataset in datasets.items()}  # also warms the cache
    for run in runs:
        shape = shapes[run.dataset.model_dump_json()]
        if run.train.batch_size > shape.train_size:
            held = f" once dataset.val_split holds {shape.val_size} out" if shape.val_size else ""
            raise DepthbenchError(f"{run.run_id}: train.batch_size ({run.train.batch_size}) is larger than the "
                                  f"training set ({shape.train_size} images{held}); lower it")
        if devices:  # a run that cannot fit its device is refused here, before its model is ever built
            check_fits(run, shape, resolved[run.train.device], share=shares[run.train.device])


def check_resume_origins(runs: list[RunConfig], folder: Path) -> None:
    """Refuse, before anything is written, to resume here a checkpoint made on another device type or precision."""
    for run in runs:
        origin = checkpoint_origin(folder / run.run_id)
        if origin is not None:
            device = resolve_device(run.train.device)
            check_resume_origin(run, origin, device, precision_name(resolve_precision(run.train.precision, device)))


def _live_results(folder: Path, sweep: SweepConfig, runs: list[RunConfig]) -> LiveResults | None:
    try:
        return LiveResults(folder, sweep, runs)
    except OSError:
        return None  # the folder cannot be read now: results.csv is rebuilt by `depthbench report`


def _refresh_results(table: LiveResults | None, outcome: RunOutcome | None = None) -> None:
    """results.csv with ``outcome``'s run read again, rewritten when due; at the sweep's end (no outcome), always."""
    if table is None:
        return
    try:
        if outcome is not None:
            table.update(outcome.cfg)
        table.write(now=outcome is None)
    except OSError as err:
        # The previous results.csv stays whole (atomic write); `depthbench report` rebuilds it later.
        if outcome is not None:
            outcome.notes.append(f"could not update results.csv ({err.strerror or err}); "
                                 "run `depthbench report` once the problem is fixed")


def sweep_yaml(sweep: SweepConfig) -> str:
    """The sweep as written: the shared sections keep only the settings it set, so that loading it back
    resolves each run's defaults as the sweep did (a ViT's differ from the ResNet's)."""
    data = sweep.model_dump(mode="json")
    for section in ("dataset", "model", "train"):
        data[section] = getattr(sweep, section).model_dump(mode="json", exclude_unset=True)
    return yaml.safe_dump(data, sort_keys=False)

