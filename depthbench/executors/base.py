"""What every executor shares: the options that choose one, the driver's view of runs training elsewhere,
and the recording of a run whose worker or job died without a word.

The contract itself, :class:`~depthbench.sweep.Executor` and :class:`~depthbench.sweep.SweepContext`, is
in :mod:`depthbench.sweep`, next to ``run_sweep`` which drives it: the executors import
:func:`~depthbench.sweep.execute_run` from there, so that module cannot import this package back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from depthbench import storage
from depthbench.config import ResourcesConfig, RunConfig
from depthbench.errors import DepthbenchError, did_you_mean
from depthbench.layout import CHECKPOINT, METRICS, RESULT, run_state
from depthbench.sweep import BUSY, Reporter, RunOutcome, claim, write_failure
from depthbench.train import TrainingProgress

EXECUTORS = ("local", "ray", "slurm")
LogFn = Callable[[str], None]
SWEEP_LOG = "sweep.log"  # in the sweep folder: the driver's lines, timestamped, and the engines' own messages
ENGINE_LOGGERS = ("submitit", "ray")


def _option_of(*executors: str, default: Any) -> Any:
    """A field of :class:`ExecutorOptions` that only ``executors`` understand."""
    return field(default=default, metadata={"executors": executors})


@dataclass(frozen=True)
class ExecutorOptions:
    """Where a sweep's runs train, as the ``sweep`` command's options say; checked when built.

    An option left at its default is not given. One named as a ``resources`` field of the sweep's config
    replaces that field when given (``None`` keeps it). A given option that belongs to another executor
    is an error rather than silently ignored. Fields are in the order the options are checked.
    """

    executor: str = "local"
    jobs: int = _option_of("local", default=1)
    address: str | None = _option_of("ray", default=None)
    slurm_local: bool = _option_of("slurm", default=False)
    max_restarts: int | None = _option_of("ray", "slurm", default=None)
    partition: str | None = _option_of("slurm", default=None)
    time_min: int | None = _option_of("slurm", default=None)
    array_parallelism: int | None = _option_of("slurm", default=None)
    verbose: bool = _option_of("ray", "slurm", default=False)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise DepthbenchError(f"unknown executor '{self.executor}'{did_you_mean(self.executor, EXECUTORS)}; "
                                  f"use {', '.join(EXECUTORS[:-1])} or {EXECUTORS[-1]}")
        if self.jobs < 1:
            raise DepthbenchError(f"--jobs must be at least 1 (got {self.jobs})")
        given = self.given()
        for option in dataclasses.fields(self):
            owners = option.metadata.get("executors")
            if owners and option.name in given and self.executor not in owners:
                raise DepthbenchError(f"{_flag(option.name)} is an option of --executor {' and '.join(owners)}, "
                                      f"not of --executor {self.executor}")

    def given(self) -> dict[str, Any]:
        """The options set away from their defaults, by field name, in field order."""
        return {option.name: value for option in dataclasses.fields(self)
                if (value := getattr(self, option.name)) != option.default}

    def resources(self, resources: ResourcesConfig) -> ResourcesConfig:
        """``resources`` with the fields these options give replaced (validated as the config is)."""
        given = self.given()
        replaced = {key: given[key] for key in ResourcesConfig.model_fields if key in given}
        return ResourcesConfig.model_validate({**resources.model_dump(), **replaced})

    def flags(self) -> list[str]:
        """The command-line arguments that give these options again: those with a value, then the switches.

        For the line that resumes a sweep: a Ray or SLURM sweep resumed without them would train
        everything on this machine.
        """
        given = self.given()
        valued = [arg for name, value in given.items() if not isinstance(value, bool)
                  for arg in (_flag(name), str(value))]
        return [*valued, *(_flag(name) for name, value in given.items() if value is True)]


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


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


def _has_checkpoint(sweep_dir: Path, cfg: RunConfig) -> bool:
    """Whether the run resumes from a checkpoint when it starts now (said in its start line)."""
    return (sweep_dir / cfg.run_id / CHECKPOINT).exists()


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


def steps_done(run_dir: Path) -> int:
    """The last step the run logged (its metrics file, which a resumed run cuts back to its checkpoint)."""
    rows = storage.read_jsonl(run_dir / METRICS)
    return int(rows[-1].get("step", 0)) if rows else 0


_engine_handler: logging.Handler | None = None  # the sweep log's, while engine_log is open


@contextlib.contextmanager
def engine_log(sweep_dir: Path, *, verbose: bool = False) -> Iterator[None]:
    """While a sweep runs on an engine, its loggers (submitit's, Ray's) write to ``sweep.log``, not the terminal.

    ``verbose`` leaves them where they were, and adds the file. :func:`quiet_engines` repeats the move for
    handlers an engine installs later (importing Ray configures its logger, ``ray.init`` again).
    """
    global _engine_handler
    handler = logging.FileHandler(sweep_dir / SWEEP_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
             for name in ENGINE_LOGGERS}
    before, _engine_handler = _engine_handler, handler
    try:
        quiet_engines(verbose=verbose)
        yield
    finally:
        _engine_handler = before
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        handler.close()


def quiet_engines(*, verbose: bool = False) -> None:
    """Send the engines' loggers to the open sweep log, and (unless ``verbose``) nowhere else."""
    if _engine_handler is None:
        return
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if not verbose:
            logger.handlers[:] = []
            logger.propagate = False
        if _engine_handler not in logger.handlers:
            logger.addHandler(_engine_handler)


@dataclass(frozen=True)
class _Attempt:
    """What a worker returns for one run: its outcome, and where and how that attempt began."""

    outcome: RunOutcome
    where: str
    resumed: bool


class _LiveRuns:
    """The driver's view of runs training in parallel: what runs where, and the counts for each log line.

    Workers report when a run starts and stops training, in order, on one channel; outcomes arrive on
    another, possibly later. The reporter shows one run's progress bar; with several runs at once it
    follows the oldest one still running, and every start is a log line saying where the run trains.
    """

    def __init__(self, runs: list[RunConfig], reporter: Reporter | None, log: LogFn | None,
                 sweep_dir: Path | None = None) -> None:
        self.by_id = {cfg.run_id: cfg for cfg in runs}
        self.reporter, self.log = reporter, log
        self.sweep_dir = sweep_dir  # where the status lines read the runs' metrics
        self.record = sweep_dir / SWEEP_LOG if sweep_dir is not None else None  # every line also goes there
        self.requeued: dict[str, str] = {}  # run id -> why it waits again (a SLURM requeue)
        self._last_status = ("", 0.0)  # the last status line and when it was said
        self.running: dict[str, str] = {}  # run id -> where; insertion order is start order
        self.starts: Counter[str] = Counter()
        self.places: dict[str, set[str]] = {}  # run id -> where its attempts started, as the driver heard
        self.over: set[str] = set()  # runs that stopped training; their outcome may still be on its way
        self.finished: Counter[str] = Counter()  # outcome status -> runs
        self.finished_ids: set[str] = set()
        self.focus: str | None = None
        self.focus_progress: TrainingProgress | None = None

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
        self.requeued.pop(run_id, None)
        again = " again" if self.starts[run_id] > 1 else ""
        self.say(f"started {run_id}{again} on {where}" + (", resuming from its checkpoint" if resuming else ""))
        if self.focus is None:
            self._follow(run_id)

    def progress(self, run_id: str, progress: TrainingProgress) -> None:
        if run_id == self.focus and self.reporter:
            self.focus_progress = progress
            self.reporter.progress(self.by_id[run_id], progress)

    def stopped(self, run_id: str) -> None:
        self.running.pop(run_id, None)
        self.over.add(run_id)

    def queued_again(self, run_id: str, why: str) -> None:
        """A run whose job was requeued (time-out, pre-emption): it waits for a node again."""
        self.running.pop(run_id, None)
        self.requeued[run_id] = why
        self.say(f"{run_id} is {why}; it resumes from its checkpoint when it runs again")
        self._last_status = (self._status_text(), time.monotonic())  # just said: no status line repeats it

    def returned(self, attempt: _Attempt) -> RunOutcome:
        """The outcome a worker returned, after saying the start of its attempt if that was never heard.

        The start event travels on the other channel: it may arrive after the outcome (and is then
        dropped as late) or never, when the worker that sent it was killed with the message unsent.
        """
        if attempt.where not in self.places.get(attempt.outcome.cfg.run_id, ()):
            self.started(attempt.outcome.cfg.run_id, attempt.where, attempt.resumed)
        return attempt.outcome

    def deliver(self, outcomes: Iterable[RunOutcome | None]) -> Iterator[RunOutcome]:
        """Yield each outcome to run_sweep as it is read, counted first; ``None`` is a run that never
        began (cancelled, or stopped before it started) and is left out.

        Every executor's polling loop ends here, so all of them count, show and hand on outcomes alike.
        """
        for outcome in outcomes:
            if outcome is None:
                continue
            self.ended(outcome)
            yield outcome
            self.resume_display()

    def ended(self, outcome: RunOutcome) -> None:
        """Count an outcome; call before yielding it to run_sweep (whose reporter shows it)."""
        self.stopped(outcome.cfg.run_id)
        self.finished[outcome.status] += 1
        self.finished_ids.add(outcome.cfg.run_id)
        if self.focus == outcome.cfg.run_id:
            self.focus = None
        self._record(f"{outcome.status} {outcome.cfg.run_id}" + (f": {outcome.message}" if outcome.message else ""))

    def resume_display(self) -> None:
        """After run_sweep showed an outcome (which hides the run bar), show the followed run again."""
        if self.focus is None and self.running:
            self._follow(next(iter(self.running)))
        elif self.focus is not None and self.reporter:
            self.reporter.run_started(self.by_id[self.focus])
            if self.focus_progress:
                self.reporter.progress(self.by_id[self.focus], self.focus_progress)

    def counts(self) -> str:
        done = sum(n for status, n in self.finished.items() if status not in ("failed", "paused"))
        # Runs paused at a rung of successive halving: their work in this pass is done, the run is not.
        paused = f"{self.finished['paused']} paused, " if self.finished["paused"] else ""
        # A run that stopped training but whose outcome is still on its way is in none of the counts.
        waiting = len(self.by_id) - len(self.running) - len(self.over)
        requeued = len(self.requeued.keys() - self.finished_ids)
        queued = f"{waiting - requeued} queued, {requeued} requeued" if requeued else f"{waiting} waiting"
        return f"[{len(self.running)} running, {done} done, {paused}{self.finished['failed']} failed, {queued}]"

    def say(self, text: str) -> None:
        """A line for the terminal and the sweep log."""
        if self.log:
            self.log(f"{text}  {self.counts()}")
        self._record(text)

    def _record(self, text: str) -> None:
        """A line for the sweep log only (outcomes: the reporter shows them on the terminal)."""
        if self.record is None:
            return
        try:
            with self.record.open("a", encoding="utf-8") as file:
                file.write(f"{datetime.now().isoformat(sep=' ', timespec='seconds')} {text}  {self.counts()}\n")
        except OSError:
            pass  # the sweep log is a convenience: a full disk must not stop the sweep

    def status(self, *, every_s: float) -> None:
        """Every ``every_s`` seconds at most, and only when something moved: where each running run is, at
        which step (read from its own metrics file), and which runs wait after a requeue."""
        text = self._status_text()
        last, when = self._last_status
        if text and text != last and time.monotonic() - when >= every_s:
            self._last_status = (text, time.monotonic())
            self.say(text)

    def _status_text(self, show: int = 4) -> str:
        parts = []
        for run_id, where in list(self.running.items())[:show]:
            step = steps_done(self.sweep_dir / run_id) if self.sweep_dir is not None else 0
            parts.append(f"{run_id} at step {step}/{self.by_id[run_id].train.steps} on {where}" if step
                         else f"{run_id} starting on {where}")
        if len(self.running) > show:
            parts.append(f"{len(self.running) - show} more running")
        parts += [f"{run_id} {why}" for run_id, why in self.requeued.items() if run_id not in self.finished_ids]
        return "; ".join(parts)

    def follow_metrics(self) -> None:
        """The followed run's progress bar, from its metrics file: for jobs that cannot call back to the driver."""
        if self.focus is None or self.sweep_dir is None:
            return
        rows = storage.read_jsonl(self.sweep_dir / self.focus / METRICS)
        if rows and (self.focus_progress is None or rows[-1].get("step") != self.focus_progress.step):
            cfg = self.by_id[self.focus]
            step = int(rows[-1].get("step", 0))
            self.progress(self.focus, TrainingProgress(step, cfg.train.steps, rows[-1]))

    def on(self, event: tuple[str, str, Any]) -> None:
        """Apply a worker's ("started", run id, (where, resuming)), ("progress", run id, TrainingProgress) or
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
