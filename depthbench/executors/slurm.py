"""``--executor slurm``: one SLURM job-array task per run, through submitit; time-outs checkpoint and requeue.

``--slurm-local`` runs the same jobs with submitit's local executor on this machine, to try a sweep
before submitting it. submitit is an optional extra, imported only when jobs are submitted or requeued.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from depthbench import stopping, storage
from depthbench.config import ResourcesConfig, RunConfig
from depthbench.errors import DepthbenchError
from depthbench.executors.base import LogFn, _gpus_for, _has_checkpoint, _LiveRuns, _on_assigned_gpu, _record_failure
from depthbench.layout import METRICS
from depthbench.sweep import RunOptions, RunOutcome, RunSettings, execute_run
from depthbench.train import Progress

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
                        yield from live.deliver([self._outcome(job, cfg, sweep_dir)])
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
