"""How early a SLURM job is told to stop: the lead derived from measured timings, the refusal of a time limit
too short to train, and the job's own clock."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from depthbench.errors import DepthbenchError
from depthbench.executors.timelimit import CLOCK_SLACK_S, MARGIN_S, JobClock, StopTiming, check_time_limit


def test_lead_is_twice_the_slower_of_a_step_and_a_stop_plus_the_requeue_margin() -> None:
    assert MARGIN_S == 10
    assert StopTiming().lead_s() == 20  # never measured: 5 s steps and stops assumed
    assert StopTiming(gap_s=0.05, stop_s=0.3, startup_s=8).lead_s() == pytest.approx(10.6)
    assert StopTiming(gap_s=12, stop_s=1).lead_s() == 34
    worst = StopTiming.worst([StopTiming(1, 9, 3), StopTiming(4, 2, 30)])
    assert worst == StopTiming(gap_s=4, stop_s=9, startup_s=30)
    assert StopTiming.worst([]) == StopTiming()


def test_timings_round_trip_and_a_damaged_file_means_never_measured(tmp_path: Path) -> None:
    path = tmp_path / "run.timing.json"
    StopTiming(gap_s=1.23456, stop_s=0.5, startup_s=7).write(path)
    assert StopTiming.read(path) == StopTiming(gap_s=1.235, stop_s=0.5, startup_s=7)
    for text in ("{not json", '{"gap_s": "slow"}', "[1, 2]", '{"gap_s": 1}'):
        path.write_text(text)
        assert StopTiming.read(path) is None
    assert StopTiming.read(tmp_path / "missing.json") is None


def test_time_limit_leaves_training_time_or_is_refused_with_the_limit_that_would() -> None:
    assert check_time_limit(1, StopTiming()) == 20  # 60 s - 20 s start-up - 20 s lead leaves 20 s to train
    assert check_time_limit(60, StopTiming(gap_s=12, stop_s=1)) == 34
    with pytest.raises(DepthbenchError) as refused:
        check_time_limit(1, StopTiming(gap_s=40, stop_s=3, startup_s=12))
    assert str(refused.value) == (
        "resources.time_min = 1 min leaves no time to train: a job takes about 12 s to start and must be told to "
        "stop 90 s before its limit to checkpoint in time (slowest step 40.0 s, stop 3.0 s); use --time-min 3 or more")
    assert check_time_limit(3, StopTiming(gap_s=40, stop_s=3, startup_s=12)) == 90  # the advice holds


@pytest.fixture
def caught() -> list[float]:
    """SIGUSR1 deliveries (times), handled as a job's warning handler would be, in the main thread."""
    times: list[float] = []
    before = signal.signal(signal.SIGUSR1, lambda *_: times.append(time.time()))
    yield times
    signal.signal(signal.SIGUSR1, before)


def test_job_clock_warns_the_job_at_end_minus_lead(caught: list[float]) -> None:
    end = time.time() + MARGIN_S + 0.6  # lead: the requeue margin, as nothing slower was measured or submitted
    clock = JobClock(end, 0, started=time.time(), poll_s=0.05, signum=signal.SIGUSR1).start()
    assert not clock.fired.wait(0.3)
    assert clock.fired.wait(5)
    deadline = time.time() + 5
    while not caught and time.time() < deadline:
        time.sleep(0.01)  # the handler runs between two bytecodes of this (main) thread
    assert len(caught) == 1 and caught[0] == pytest.approx(end - MARGIN_S, abs=0.5)


def test_job_clock_stops_earlier_when_its_steps_are_slower_than_submitted(caught: list[float]) -> None:
    clock = JobClock(time.time() + 150, 20, started=time.time() - 5, poll_s=0.05, signum=signal.SIGUSR1)
    for pause_s in (0.5, 0.2):  # the first step (compilation, graph capture) is not a gap a stop waits on
        clock.tick()
        time.sleep(pause_s)
    clock.tick()
    assert 0.2 <= clock.gap_s < 0.45
    assert clock.lead_s() == 20 and not clock.expects_warning()  # 150 s left: too early to stop
    clock.gap_s = 70.0  # a step as slow as this needs 150 s of warning: it is due at once
    assert clock.lead_s() == 150 and clock.expects_warning()
    timing = clock.timing(stop_s=1.5)
    assert timing.gap_s == 70 and timing.stop_s == 1.5 and 4.9 < timing.startup_s < 6.5
    clock.start()
    assert clock.fired.wait(5)


def test_a_warning_before_the_clock_is_due_is_ignored_unless_the_end_time_is_a_guess() -> None:
    # SLURM's warning came 10 s early on the test cluster, and at a restarted job's very start: with its end
    # time from SLURM, a job trains on until its own clock is due (give or take the clocks' disagreement).
    clock = JobClock(time.time() + 20 + CLOCK_SLACK_S + 3, 20, started=time.time())
    assert not clock.expects_warning()
    clock.end -= 5
    assert clock.expects_warning()
    guessed = JobClock(time.time() + 3600, 20, started=time.time(), known_end=False)
    assert guessed.expects_warning()  # squeue did not say: SLURM's warning knows better than the guess
