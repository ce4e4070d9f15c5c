"""How early a SLURM job must be told to stop, so that its run checkpoints before the time limit kills it.

A run stops between two steps and then saves its checkpoint; after that the job still has to requeue
itself and exit. So the warning must come at least one step, one save and that margin before the
limit. Those times are measured: each job records, in the sweep's ``slurm/`` folder, the longest gap
it saw between two chances to stop (a step, or a step with an evaluation and a checkpoint) and how
long its stop took. The next submission of the run derives its lead from them (:class:`StopTiming`);
a run never measured gets defaults meant for a GPU-sized step, and a time limit too short to train
after that lead is refused up front (:func:`check_time_limit`).

SLURM's own warning (``--signal``) does not keep that time: it may come seconds early or late, and
after a requeue it can reach a restarted job before Python handles signals, and so kill it. So a job
keeps its own clock (:class:`JobClock`), from the end time ``squeue`` gives it and the lead it measures
itself, asks SLURM for a warning signal a process ignores until it handles it (URG, see
:func:`warning_signal`), and acts on SLURM's warning only when its clock is due too, or when it could
not learn its end time.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from depthbench import storage
from depthbench.errors import DepthbenchError

MARGIN_S = 10.0  # after the checkpoint: submitit writes the job's state, calls `scontrol requeue`, and exits
MIN_TRAIN_S = 15.0  # a job that cannot train this long between starting up and its warning makes no progress
CLOCK_SLACK_S = 5.0  # how far this node's clock and the controller's may disagree about the job's end
WARNING_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's setting for the signal it asks SLURM for and handles
WARNING_SIGNAL = "URG"  # ignored by a process that has no handler for it yet


def warning_signal() -> signal.Signals:
    """The signal a job takes as its time-limit warning: submitit's setting, which the job inherits."""
    return signal.Signals["SIG" + os.environ.get(WARNING_ENV, "USR2")]


@dataclass(frozen=True)
class StopTiming:
    """What a job measured of its run, in seconds; the defaults stand in for a run never measured."""

    gap_s: float = 5.0  # the longest time between two chances to stop (a step, plus evaluation and save)
    stop_s: float = 5.0  # from the stop request to the checkpoint on disk
    startup_s: float = 20.0  # from the job's start to the run's first step (interpreter, torch, data, model)

    def lead_s(self) -> float:
        """How long before the time limit the run must be asked to stop: twice what stopping took or
        could take (a stop waits up to one gap, then saves), and the requeue margin."""
        return MARGIN_S + 2 * max(self.gap_s, self.stop_s)

    @classmethod
    def read(cls, path: Path) -> StopTiming | None:
        try:
            data = storage.read_json(path)
            return cls(**{key: float(data[key]) for key in ("gap_s", "stop_s", "startup_s")})
        except (OSError, ValueError, KeyError, TypeError):
            return None  # never measured, or a damaged file: the defaults then

    def write(self, path: Path) -> None:
        storage.write_json(path, {key: round(value, 3) for key, value in asdict(self).items()})

    @staticmethod
    def worst(timings: Iterable[StopTiming]) -> StopTiming:
        """The slowest of each measure: one warning time serves every job of the array."""
        timings = list(timings) or [StopTiming()]
        return StopTiming(max(t.gap_s for t in timings), max(t.stop_s for t in timings),
                          max(t.startup_s for t in timings))


def check_time_limit(time_min: int, timing: StopTiming) -> int:
    """The warning lead in whole seconds for jobs of ``time_min`` minutes; refuses a limit too short to train."""
    lead = math.ceil(timing.lead_s())
    left = time_min * 60 - timing.startup_s - lead
    if left < MIN_TRAIN_S:
        enough = math.ceil((timing.startup_s + lead + 2 * MIN_TRAIN_S) / 60)
        raise DepthbenchError(
            f"resources.time_min = {time_min} min leaves no time to train: a job takes about {timing.startup_s:.0f} s "
            f"to start and must be told to stop {lead} s before its limit to checkpoint in time (slowest step "
            f"{timing.gap_s:.1f} s, stop {timing.stop_s:.1f} s); use --time-min {enough} or more")
    return lead


def job_end_time(job_id: str) -> float | None:
    """When SLURM will end the job ``job_id`` (epoch seconds), as the controller says; None if it cannot tell."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
        return datetime.fromisoformat(out).timestamp()  # the controller's local time, as this node's clock reads it
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class JobClock:
    """A job's own watch on its time limit: at ``end - lead`` it sends itself the warning signal SLURM would.

    ``lead`` is the larger of the submitted one and what this job measures: :meth:`tick` is called at
    every chance to stop, and the longest gap between two ticks bounds how long a stop waits.
    """

    def __init__(self, end: float, lead_s: float, *, started: float, poll_s: float = 0.5,
                 signum: int = signal.SIGUSR2, known_end: bool = True) -> None:
        self.signum, self.known_end = signum, known_end
        self.end, self.submitted_lead_s, self.started, self.poll_s = end, lead_s, started, poll_s
        self.gap_s = 0.0
        self.first_tick: float | None = None
        self._last_tick: float | None = None
        self._ticks = 0
        self.fired = threading.Event()
        self._done = threading.Event()

    def tick(self) -> None:
        now = time.time()
        self._ticks += 1
        if self._ticks == 1:
            self.first_tick = now
        elif self._ticks > 2:  # not the first step, which also compiles or captures: a stop never waits on it
            self.gap_s = max(self.gap_s, now - self._last_tick)
        self._last_tick = now

    def lead_s(self) -> float:
        return max(self.submitted_lead_s, MARGIN_S + 2 * self.gap_s)

    def expects_warning(self) -> bool:
        """Whether to act on a warning signal now: when this clock is (nearly) due itself, or always when the
        end time is a guess (SLURM did not say), as SLURM's warning then knows better."""
        return not self.known_end or time.time() >= self.end - self.lead_s() - CLOCK_SLACK_S

    def start(self) -> JobClock:
        threading.Thread(target=self._watch, name="time limit", daemon=True).start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(self.poll_s):
            if time.time() >= self.end - self.lead_s():
                self.fired.set()
                os.kill(os.getpid(), self.signum)  # handled like SLURM's own warning, in the main thread
                return

    def timing(self, stop_s: float) -> StopTiming:
        """What this job measured, for the next submission of its run."""
        startup = (self.first_tick - self.started) if self.first_tick is not None else StopTiming.startup_s
        return StopTiming(gap_s=self.gap_s or StopTiming.gap_s, stop_s=stop_s, startup_s=startup)
