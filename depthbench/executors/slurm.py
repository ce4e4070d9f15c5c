"""``--executor slurm``: one SLURM job-array task per run, through submitit; time-outs checkpoint and requeue.

The driver follows the array with ``squeue``, which every cluster answers, rather than with ``sacct``,
which fails at every call on clusters without accounting; a finished run's outcome is read from its
own folder (``result.json``), never from submitit's pickled result. Near its time limit a job is told
to stop by its own clock (:class:`~depthbench.executors.timelimit.JobClock`, which also vets SLURM's
warning signal), early enough for its run to checkpoint, and requeues itself, up to ``max_restarts``
times.

``--slurm-local`` runs the same jobs with submitit's local executor on this machine, to try a sweep
before submitting it. submitit is an optional extra, imported only when jobs are submitted or requeued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from depthbench import faults, stopping, storage
from depthbench.config import ResourcesConfig, RunConfig
from depthbench.errors import DepthbenchError
from depthbench.executors.base import (
    LogFn, _gpus_for, _has_checkpoint, _LiveRuns, _on_assigned_gpu, _record_failure, engine_log,
)
from depthbench.executors.timelimit import (
    WARNING_ENV, WARNING_SIGNAL, JobClock, StopTiming, check_time_limit, job_end_time, warning_signal,
)
from depthbench.layout import RESULT, run_state
from depthbench.sweep import RunFlags, RunOutcome, SweepContext, execute_run
from depthbench.train import checkpoint_step

_STOPPED_EXIT = 128 + signal.SIGTERM  # a run stopped by SIGTERM/SIGINT leaves no result: see _SlurmRun
# squeue states of a job that will not run again (a requeued job goes back to PENDING instead).
_ENDED = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
          "PREEMPTED"}
_TIMED_OUT = "timed-out too many times"  # what submitit's job log says when it gives up requeueing


class _SlurmRun:
    """One run as a SLURM job.

    On the time-limit warning (URG on a cluster, USR2 locally; see :mod:`~depthbench.executors.timelimit`)
    submitit calls :meth:`checkpoint` and requeues what it returns; that is the protocol of
    ``submitit.helpers.Checkpointable``, which needs no base class (so this module imports without
    submitit). The run trains in a thread so that the main thread, where Python runs signal handlers,
    can ask it to stop and wait while it saves its checkpoint. On a real cluster the job also watches
    its own time limit (``lead_s`` before it), and records how long its steps and its stop took, from
    which the next submission derives its lead.
    """

    def __init__(self, cfg: RunConfig, sweep_dir: Path, flags: RunFlags, *, threads: int,
                 time_min: int, lead_s: float, on_cluster: bool, save_within_s: float = 60) -> None:
        self.cfg, self.sweep_dir, self.flags = cfg, sweep_dir, flags
        self.threads, self.time_min, self.lead_s, self.on_cluster = threads, time_min, lead_s, on_cluster
        self.save_within_s = save_within_s
        self.outcome: RunOutcome | None = None  # set when the run finished just as the job was told to stop
        self._stop: threading.Event | None = None
        self._result: Future[RunOutcome] | None = None
        self._clock: JobClock | None = None

    def __call__(self) -> RunOutcome:
        if self.outcome is not None:
            return self.outcome
        torch.set_num_threads(self.threads)
        stop, result = threading.Event(), Future()
        self._stop, self._result = stop, result
        self._clock = clock = self._start_clock()
        looping = threading.Event()  # the run reached its step loop, where a stop saves a checkpoint

        def on_stop(*_: Any) -> None:
            # SIGTERM (scancel, pre-emption) and SIGINT (submitit's local cancel): save and stop between steps.
            stop.set()
            if not looping.is_set():
                # Still loading data or building its model, which can take minutes with nothing to save: the
                # job ends now, and with it the claim on the run's folder.
                raise SystemExit(_STOPPED_EXIT)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_stop)
        if clock is not None:
            _vet_warnings(clock)

        def should_stop() -> bool:
            looping.set()
            if clock is not None:
                clock.tick()
            return stop.is_set()

        def train() -> None:
            try:
                result.set_result(execute_run(self.cfg, self.sweep_dir, self.flags, should_stop=should_stop))
            except BaseException as err:  # noqa: BLE001 - handed to the main thread, which re-raises it
                result.set_exception(err)

        threading.Thread(target=train, name=f"train {self.cfg.run_id}", daemon=True).start()
        try:
            outcome = result.result()
        finally:
            if clock is not None:
                clock.stop()
        if outcome.fault is not None:
            # The driver reads outcomes from the run folders, never from submitit's pickles: the fault is
            # left beside the job's logs, when the disk still takes that much, and the driver looks too.
            with contextlib.suppress(OSError):
                storage.write_json(_fault_path(self.sweep_dir, self.cfg), dataclasses.asdict(outcome.fault))
            sys.exit(faults.EXIT_CODE)
        if outcome.status == "interrupted":
            # Stopped by a signal with its checkpoint saved. Leaving no result keeps the job unfinished
            # for the driver, so a job SLURM requeues after pre-emption picks the run up where it stopped.
            sys.exit(_STOPPED_EXIT)
        return outcome

    def _start_clock(self) -> JobClock | None:
        job_id = os.environ.get("SLURM_JOB_ID")
        if not self.on_cluster or not job_id:
            return None
        limit_s = self.time_min * 60
        end = job_end_time(job_id)
        known = end is not None
        end = end if end is not None else time.time() + limit_s  # without squeue: as if the job started just now
        return JobClock(end, self.lead_s, started=end - limit_s, signum=warning_signal(), known_end=known).start()

    def checkpoint(self) -> Any:
        """Called by submitit on the warning: stop the run between two steps, let it save, and requeue this job."""
        from submitit.helpers import DelayedSubmission

        if self._stop is not None and self._result is not None:
            asked = time.time()
            self._stop.set()
            try:
                outcome = self._result.result(timeout=self.save_within_s)
            except Exception:  # noqa: BLE001 - too slow or failed: the requeued job sorts it out from the files
                outcome = None
            if self._clock is not None:
                self._clock.timing(time.time() - asked).write(_timing_path(self.sweep_dir, self.cfg))
            if outcome is not None and outcome.status != "interrupted":
                self.outcome = outcome
        return DelayedSubmission(self)

    def __getstate__(self) -> dict[str, Any]:
        # The requeued job gets a fresh stop flag, result and clock; threads and futures do not pickle.
        return {**self.__dict__, "_stop": None, "_result": None, "_clock": None}


@contextlib.contextmanager
def _warning_signal(*, on_cluster: bool) -> Iterator[None]:
    """While jobs are submitted: submitit asks SLURM for URG as the time-limit warning (in the job script,
    and in the environment the jobs inherit, from which they take the signal to handle), unless the user
    chose a signal. The local executor keeps submitit's USR2."""
    from submitit.core.job_environment import JobEnvironment

    if not on_cluster or WARNING_ENV in os.environ:
        yield
        return
    before = JobEnvironment.USR_SIG
    os.environ[WARNING_ENV] = JobEnvironment.USR_SIG = WARNING_SIGNAL
    try:
        yield
    finally:
        del os.environ[WARNING_ENV]
        JobEnvironment.USR_SIG = before


def _vet_warnings(clock: JobClock) -> None:
    """Let submitit's warning handler (checkpoint, then requeue) act only when the job's clock is due, or does
    not know the end: SLURM's warning can come early, or at a restarted job's start."""
    requeue = signal.getsignal(clock.signum)

    def on_warning(signum: int, frame: Any) -> None:
        if not clock.expects_warning():
            print(f"depthbench: ignored SLURM's time-limit warning {clock.end - time.time():.0f} s before the "
                  f"limit; the job's own clock stops the run {clock.lead_s():.0f} s before it", file=sys.stderr)
            return
        if callable(requeue):
            requeue(signum, frame)

    signal.signal(clock.signum, on_warning)


def _timing_path(sweep_dir: Path, cfg: RunConfig) -> Path:
    return sweep_dir / "slurm" / f"{cfg.run_id}.timing.json"


def _fault_path(sweep_dir: Path, cfg: RunConfig) -> Path:
    return sweep_dir / "slurm" / f"{cfg.run_id}.fault.json"


def _fault_of(sweep_dir: Path, cfg: RunConfig) -> faults.MachineFault | None:
    """The machine fault that stopped a job without a result: as the job left it, or as the driver meets
    it now in the sweep folder (a disk too full for the job to say so)."""
    path = _fault_path(sweep_dir, cfg)
    said = storage.read_json(path)
    if isinstance(said, dict) and set(said) == {"condition", "path", "fix"}:
        path.unlink(missing_ok=True)
        return faults.MachineFault(**{key: str(value) for key, value in said.items()})
    return faults.probe(sweep_dir)


@dataclass(frozen=True)
class _Queued:
    """One array task as ``squeue`` shows it."""

    state: str
    node: str
    restarts: int
    start: str  # when it started, or (pending) when it may start


@dataclass(frozen=True)
class _Seen:
    """What one look at the queue says of a job."""

    ended: bool
    running: bool = False
    waiting: bool = False  # pending: not started yet, or requeued
    where: str = ""  # the node, and the job id
    final: str = ""  # how it ended, while SLURM still lists it (COMPLETED, TIMEOUT, CANCELLED, ...)
    restarts: int = 0
    eligible: str = ""  # a pending job: when it may start (after a requeue, SLURM's requeue delay)


def _read_queue(array_id: str) -> dict[str, _Queued] | None:
    """The jobs of the array (or the one job) ``array_id`` still known to SLURM, by submitit's job id
    (``<array>_<task>``, or the plain id of a lone job); None when squeue did not answer.

    Ended jobs are listed too (``-t all``) for as long as the controller keeps them (MinJobAge, 5 minutes
    by default), so the driver usually learns how a job ended: completed, timed out, cancelled.
    """
    fields = ("ArrayJobID", "ArrayTaskID", "State", "NodeList", "RestartCnt", "StartTime")
    try:
        columns = ",".join(f"{name}:60|" for name in fields)
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", array_id, "-O", columns],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    jobs = {}
    for line in out.splitlines():
        parts = [part.strip() for part in line.split("|")]
        if len(parts) <= len(fields):
            continue
        array, task, state, node, restarts, start = parts[:len(fields)]
        job_id = f"{array}_{task}" if task.isdigit() else array
        jobs[job_id] = _Queued(state, node, int(restarts) if restarts.isdigit() else 0, start)
    return jobs


class SlurmExecutor:
    """Pending runs as one SLURM job array through submitit, one array task (one node, one task) per run.

    A job gets ``resources.gpus_per_run`` whole GPUs and ``cpus_per_run`` CPUs for ``time_min`` minutes.
    Before its time limit it stops (its own clock, or SLURM's warning), early enough to checkpoint: the
    run checkpoints and the job requeues itself, up to ``max_restarts`` times. ``local=True`` runs the same jobs with
    submitit's local executor on this machine (all at once), to try a sweep before submitting it.
    Engine messages (submitit's) go to the sweep's ``sweep.log`` unless ``verbose``.
    """

    def __init__(self, resources: ResourcesConfig, *, local: bool = False, log: LogFn | None = None,
                 poll_s: float | None = None, status_every_s: float = 30.0, verbose: bool = False) -> None:
        self.resources, self.local, self.log, self.verbose = resources, local, log, verbose
        self.remote = not local
        self.poll_s = poll_s if poll_s is not None else (0.5 if local else 5.0)
        self.status_every_s = status_every_s
        # Options for the resume line when runs ran out of restarts: enough restarts for what is left.
        self.resume_options: dict[str, int] = {}

    def execute(self, runs: list[RunConfig], sweep_dir: Path, context: SweepContext) -> Iterator[RunOutcome]:
        if not runs:
            return
        with engine_log(sweep_dir, verbose=self.verbose):
            yield from self._execute(runs, sweep_dir, context)

    def _execute(self, runs: list[RunConfig], sweep_dir: Path, context: SweepContext) -> Iterator[RunOutcome]:
        pending: dict[str, tuple[Any, RunConfig]] = {}
        jobs: list[Any] = []
        try:
            # Cut short, sbatch may still queue the array, and no one would cancel its jobs: a stop waits for
            # the submission (seconds), then the loop below sees it and the jobs are cancelled.
            with stopping.deferred():
                jobs = self._submit(runs, sweep_dir, context)
                pending.update((job.job_id, (job, cfg)) for job, cfg in zip(jobs, runs, strict=True))
            live = _LiveRuns(runs, context.reporter, self.log, sweep_dir=sweep_dir)
            array_id = jobs[0].job_id.split("_")[0]
            kind = "local jobs" if self.local else f"SLURM job array {array_id}"
            live.say(f"submitted {len(jobs)} runs as {kind}; job logs in {sweep_dir / 'slurm'}")
            restarts: dict[str, int] = {}  # job id -> requeues seen so far
            while pending and not context.stop.is_set():
                queue = None if self.local else _read_queue(array_id)
                for job_id, (job, cfg) in list(pending.items()):
                    seen = self._look(job, queue)
                    if seen is None:
                        continue  # squeue did not answer this time
                    again = seen.restarts > restarts.get(job_id, 0)
                    restarts[job_id] = max(restarts.get(job_id, 0), seen.restarts)
                    if seen.ended:
                        del pending[job_id]
                        if cfg.run_id not in live.places and seen.where:  # it ran between two looks at the queue
                            live.started(cfg.run_id, seen.where)
                        yield from live.deliver([self._outcome(job, cfg, sweep_dir, seen.final,
                                                               context.flags.pause_at)])
                    elif seen.running and (cfg.run_id not in live.running or again):
                        live.started(cfg.run_id, seen.where, _has_checkpoint(sweep_dir, cfg))
                    elif seen.waiting and cfg.run_id in live.running:
                        eligible = f", eligible at {seen.eligible}" if seen.eligible else ""
                        live.queued_again(cfg.run_id, f"requeued (restart {seen.restarts} of at most "
                                                      f"{self.resources.max_restarts}){eligible}")
                if pending:
                    live.follow_metrics()
                    live.status(every_s=self.status_every_s)
                    context.stop.wait(self.poll_s)
        finally:
            # Stopped (Ctrl-C, --fail-fast): cancelled jobs get SIGTERM, save their run and end.
            for job, _ in pending.values():
                job.cancel(check=False)

    def _look(self, job: Any, queue: dict[str, _Queued] | None) -> _Seen | None:
        """What the queue (or, for local jobs, submitit) says of ``job`` now; None when it could not be asked."""
        if self.local:
            ended = job.done()
            return _Seen(ended, running=not ended and job.state == "RUNNING",
                         where=f"this machine (local job {job.job_id})")
        if queue is None:
            return None
        entry = queue.get(job.job_id)
        if entry is None:  # no longer listed: it ended a while ago
            return _Seen(ended=True)
        ended = entry.state in _ENDED
        start = entry.start if entry.start not in ("", "N/A", "Unknown") else ""
        where = f"{entry.node or 'a node'} (job {job.job_id})"
        running, waiting = not ended and entry.state == "RUNNING", not ended and entry.state == "PENDING"
        return _Seen(ended, running=running, waiting=waiting, where=where, final=entry.state if ended else "",
                     restarts=entry.restarts, eligible=start)

    def _lead_s(self, runs: list[RunConfig], sweep_dir: Path) -> int:
        """The warning lead for this array, from what earlier jobs of these runs measured; checks time_min."""
        measured = [t for cfg in runs if (t := StopTiming.read(_timing_path(sweep_dir, cfg))) is not None]
        return check_time_limit(self.resources.time_min, StopTiming.worst(measured) if measured else StopTiming())

    def _parameters(self, runs: list[RunConfig], name: str, lead_s: int) -> dict[str, Any]:
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
                          slurm_signal_delay_s=lead_s, slurm_additional_parameters=dict(r.slurm_extra) or None)
        return params

    def _submit(self, runs: list[RunConfig], sweep_dir: Path, context: SweepContext) -> list[Any]:
        import submitit

        cluster = "local" if self.local else "slurm"
        if not self.local and shutil.which("srun") is None:
            raise DepthbenchError("--executor slurm needs SLURM (srun and sbatch), which is not on this machine's "
                                  "PATH; run the sweep from a login node, or try it here with --slurm-local")
        # Before anything is written: these may refuse the config.
        lead_s = self._lead_s(runs, sweep_dir) if not self.local else 0
        params = self._parameters(runs, sweep_dir.name, lead_s)
        # submitit's job files (pickles, logs) sit in the sweep folder, which compute nodes share anyway.
        executor = submitit.AutoExecutor(folder=sweep_dir / "slurm", cluster=cluster,
                                         **{f"{cluster}_max_num_timeout": self.resources.max_restarts})
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
        threads = max(1, math.floor(self.resources.cpus_per_run))
        gpus = params["gpus_per_node"] > 0
        try:
            with _warning_signal(on_cluster=not self.local), executor.batch():
                jobs = [executor.submit(_SlurmRun(_on_assigned_gpu(cfg) if gpus else cfg, sweep_dir, context.flags,
                                                  threads=threads, time_min=self.resources.time_min, lead_s=lead_s,
                                                  on_cluster=not self.local))
                        for cfg in runs]
        except Exception as err:  # noqa: BLE001 - sbatch's refusal (bad partition, account, ...) in its own words
            lines = [line for line in str(err).splitlines() if line.strip()]
            raise DepthbenchError(f"submitting the jobs failed: {lines[-1] if lines else type(err).__name__}") from None
        return jobs

    def _outcome(self, job: Any, cfg: RunConfig, sweep_dir: Path, final: str, pause_at: int | None) -> RunOutcome:
        """The run's outcome, read from its folder; a job that ended without one is recorded as failed. A job
        asked to pause at a rung (``pause_at``) leaves no result there, only its checkpoint at that step."""
        run_dir = sweep_dir / cfg.run_id
        state = run_state(run_dir)
        if state in ("completed", "diverged", "failed"):
            result = storage.read_json(run_dir / RESULT)
            return RunOutcome(cfg, state, result, message=str(result.get("error", "")) if state == "failed" else "")
        if pause_at is not None and state == "partial" and (done := checkpoint_step(run_dir)) >= pause_at:
            return RunOutcome(cfg, "paused", message=f"paused at step {done}, checkpoint kept")
        if (fault := _fault_of(sweep_dir, cfg)) is not None:
            return RunOutcome(cfg, "interrupted", message=f"stopped: {fault}; its last checkpoint is kept", fault=fault)
        log = _tail(Path(job.paths.stderr))
        done, total = checkpoint_step(run_dir), cfg.train.steps
        progress = f"{done} of {total} steps done, checkpoint kept" if done else "no step done"
        if _TIMED_OUT in log:
            attempts = self.resources.max_restarts + 1
            reason = (f"timed out {attempts} time(s) at resources.time_min = {self.resources.time_min} min with "
                      f"{progress}; raise time_min or max_restarts")
            self._advise(done, total, attempts)
        elif final == "TIMEOUT":  # SLURM's kill at the limit came before the job stopped and requeued itself
            reason = (f"was killed at its time limit ({self.resources.time_min} min) before it could checkpoint and "
                      f"requeue itself, with {progress}")
        elif final == "CANCELLED":
            reason = f"its job was cancelled (scancel, or an administrator) with {progress}"
        else:
            lines = [line.strip() for line in log.splitlines() if line.strip()]
            last = lines[-1][:160] if lines else "no output"
            reason = f"its job ended ({final or 'left the queue'}) without a result, {progress} ({last})"
        return _record_failure(cfg, sweep_dir, f"SLURM job {job.job_id}: {reason}; log {job.paths.stderr}", log)

    def _advise(self, done: int, total: int, attempts: int) -> None:
        """Options for the resume line: the same time limit and enough restarts for the steps left, at the pace
        of the attempts so far; a longer time limit when those attempts made no progress."""
        time_min, restarts = self.resources.time_min, self.resources.max_restarts
        if done > 0:
            restarts = max(restarts, math.ceil((total - done) / (done / attempts)))
        else:
            time_min *= 2
        self.resume_options = {"time_min": max(time_min, self.resume_options.get("time_min", 0)),
                               "max_restarts": max(restarts, self.resume_options.get("max_restarts", 0))}


def _tail(path: Path, chars: int = 20_000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-chars:]
