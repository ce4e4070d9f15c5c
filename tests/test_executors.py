"""The executors on real engines: worker processes, a local Ray instance, submitit's local stand-in for SLURM.

Each sweep here must give the same learned numbers as the plain in-process executor. CPU results
depend on torch's thread count, so each comparison trains its reference on as many threads as the
executor's workers use: resources.cpus_per_run (1) on Ray and SLURM, cores // jobs with --jobs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from depthbench import faults, storage
from depthbench.cli import app
from depthbench.config import SweepConfig
from depthbench.executors import ParallelExecutor, RayExecutor, SlurmExecutor, make_executor
from depthbench.executors.base import _Attempt, _LiveRuns
from depthbench.executors.local import _cores
from depthbench.stopping import workers_born_deaf
from depthbench.sweep import RunFlags, RunOutcome, SweepContext, SweepOutcome, run_sweep
from tests.conftest import ROOT, learned, steps, tiny_sweep, write_config

runner = CliRunner()
CRASH_SWEEP = "crash"  # Ray workers kill themselves once in a sweep of this name, see `ray_cluster`
FULL_DISK = "disk-full"  # while a file of this name lies in a sweep folder, checkpoints from step 8 on meet ENOSPC
FULL_DISK_HOOK = ROOT / "tests" / "full_disk"  # the same for the processes of --jobs and submitit (sitecustomize)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def sweep(out: Path, cfg: SweepConfig, executor: object = None) -> SweepOutcome:
    return run_sweep(cfg, out, executor=executor, handle_signals=False)


_references: dict[int, pd.DataFrame] = {}


def reference(tmp_path_factory: pytest.TempPathFactory, threads: int) -> pd.DataFrame:
    """The tiny sweep (v1 and v2, depth 8, seed 0) trained one run after another in this process."""
    if threads not in _references:
        out = tmp_path_factory.mktemp(f"reference-{threads}-threads")
        with pytest.MonkeyPatch.context() as mp, torch_threads(threads):
            mp.setenv("DEPTHBENCH_DATA", str(out / "data"))
            sweep(out, tiny_sweep())
        _references[threads] = learned(out / "tiny")
    assert list(_references[threads].status) == ["completed", "completed"]
    return _references[threads]


@pytest.fixture(scope="module")
def one_thread_reference(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return reference(tmp_path_factory, 1)


# --- local --jobs -----------------------------------------------------------------------------------

SHARE = max(1, _cores() // 2)  # the torch threads of each of 2 workers


def test_a_start_whose_message_was_lost_is_said_with_the_outcome() -> None:
    # Start events and outcomes travel on different channels; a killed worker may never send its start,
    # and a start may arrive after the outcome. Each attempt's start line is said once either way.
    (run,) = tiny_sweep(grid={"version": ["v2"], "depth": [8], "seed": [0]}).runs()
    lines: list[str] = []
    live = _LiveRuns([run], None, lines.append)
    live.on(("started", run.run_id, ("node a, pid 1", False)))  # the first attempt, killed later
    outcome = RunOutcome(run, "completed")
    assert live.returned(_Attempt(outcome, "node a, pid 2", True)) is outcome  # the retry's start was lost
    live.ended(outcome)
    live.on(("started", run.run_id, ("node a, pid 2", True)))  # ... and arrives late: dropped
    assert [line.split("  [")[0] for line in lines] == [
        f"started {run.run_id} on node a, pid 1",
        f"started {run.run_id} again on node a, pid 2, resuming from its checkpoint",
    ]
    assert live.returned(_Attempt(outcome, "node a, pid 2", True)) is outcome and len(lines) == 2  # heard already


def test_status_lines_say_where_runs_are_at_which_step_and_what_waits_after_a_requeue(tmp_path: Path) -> None:
    # What the SLURM and Ray drivers print between events, read from the runs' own metrics files; every line
    # also goes, timestamped, to the sweep's sweep.log.
    first, second = tiny_sweep(grid={"version": ["v1", "v2"], "depth": [8], "seed": [0]}).runs()
    lines: list[str] = []
    live = _LiveRuns([first, second], None, lines.append, sweep_dir=tmp_path)
    live.started(first.run_id, "node1 (job 7_0)")
    live.started(second.run_id, "node2 (job 7_1)")
    (tmp_path / first.run_id).mkdir()
    storage.append_jsonl(tmp_path / first.run_id / "metrics.jsonl", {"step": 4, "train_loss": 2.0})
    live.status(every_s=0)
    live.status(every_s=0)  # nothing moved: not said again
    live.queued_again(second.run_id, "requeued (restart 1 of at most 3), eligible at 12:00:00")
    live.status(every_s=0)  # the requeue line said it all: not repeated
    assert [line.split("  [")[0] for line in lines[2:]] == [
        f"{first.run_id} at step 4/8 on node1 (job 7_0); {second.run_id} starting on node2 (job 7_1)",
        f"{second.run_id} is requeued (restart 1 of at most 3), eligible at 12:00:00; it resumes from its "
        "checkpoint when it runs again",
    ]
    assert lines[-1].endswith("[1 running, 0 done, 0 failed, 0 queued, 1 requeued]")
    live.ended(RunOutcome(first, "completed"))  # shown by the reporter; recorded in the sweep log
    logged = (tmp_path / "sweep.log").read_text().splitlines()
    assert len(logged) == 5 and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d started ", logged[0])
    assert logged[-1].endswith(f" completed {first.run_id}  [0 running, 1 done, 0 failed, 0 queued, 1 requeued]")


def test_engine_messages_go_to_the_sweep_log_unless_verbose(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from submitit.core.logger import get_logger

    from depthbench.executors.base import engine_log

    logger = get_logger()  # submitit's own logger, with the handler to stderr it installs
    handlers = list(logger.handlers)
    with engine_log(tmp_path):
        logger.warning("Call #1 - Bypassing sacct error")
    with engine_log(tmp_path, verbose=True):
        logger.warning("shown with --verbose")
    assert logger.handlers == handlers  # as it was
    err = capfd.readouterr().err
    assert "Bypassing" not in err and "shown with --verbose" in err
    logged = (tmp_path / "sweep.log").read_text()
    assert "submitit WARNING: Call #1 - Bypassing sacct error" in logged and "shown with --verbose" in logged


def test_local_jobs_2_matches_sequential(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", tiny_sweep())
    result = runner.invoke(app, ["sweep", str(config), "--jobs", "2", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(learned(tmp_path / "tiny"), reference(tmp_path_factory, SHARE))
    assert result.output.count("started v") == 2 and result.output.count("✓ v") == 2


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_workers_are_born_deaf_to_ctrl_c_and_the_driver_still_gets_it() -> None:
    # A worker spends seconds importing torch before its initializer runs; a Ctrl-C or SIGTERM then must
    # not kill it (with a traceback). Workers are started by fork+exec, as this subprocess is.
    heard: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: heard.append(signum))
    deaf = "import os, signal; [os.kill(os.getpid(), sig) for sig in (signal.SIGINT, signal.SIGTERM)]; print('alive')"
    try:
        with workers_born_deaf():
            child = subprocess.run([sys.executable, "-c", deaf], capture_output=True, text=True, check=True)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # a Ctrl-C while the workers start ...
            assert heard == []
        assert heard == [signal.SIGINT]  # ... reaches the driver's handler once they have started
    finally:
        signal.signal(signal.SIGINT, before)
    assert child.stdout.strip() == "alive"


def test_local_jobs_pin_each_worker_to_its_own_gpu() -> None:
    # The GPU list is given, so this runs anywhere: what is checked is the assignment itself,
    # made in each worker before torch could initialise CUDA (the workers never touch a GPU here).
    pool, events, _ = ParallelExecutor(2)._open_pool(["0", "1"])
    with pool:
        assert list(pool.map(abs, [-1, -2])) == [1, 2]  # each submit starts a worker, up to --jobs
        workers = dict(events.get(timeout=60)[1:] for _ in range(2))
    assert sorted(workers.values()) == [("0", SHARE), ("1", SHARE)]  # a GPU each, and a share of the cores


# --- ray --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real Ray instance on loopback, 2 CPUs, a small object store; yields its scratch folder.

    Every worker runs a setup hook: in a sweep named CRASH_SWEEP, the first checkpoint written kills
    its worker process (SIGKILL, as the OOM killer would), once, after saving a copy of the metrics
    log as it was, so the test can tell a resumed run from a restarted one. In a sweep folder holding
    a FULL_DISK file, checkpoints from step 8 on meet ENOSPC.
    """
    ray = pytest.importorskip("ray")
    scratch = tmp_path_factory.mktemp("ray")
    marker = scratch / "killed"

    def die_after_first_checkpoint() -> None:
        from depthbench import storage as worker_storage

        save = worker_storage.save_torch

        def save_then_die(path: Path, obj: dict) -> None:
            if path.name == "checkpoint.pt" and obj["step"] >= 8 and (path.parent.parent / FULL_DISK).exists():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            save(path, obj)
            if path.name == "checkpoint.pt" and path.parent.parent.name == CRASH_SWEEP and not marker.exists():
                marker.write_text((path.parent / "metrics.jsonl").read_text())
                os.kill(os.getpid(), signal.SIGKILL)

        worker_storage.save_torch = save_then_die

    with pytest.MonkeyPatch.context() as mp:
        # Ray binds to loopback only when it believes multi-node clusters are off (read at import).
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr("ray._private.ray_constants.ENABLE_RAY_CLUSTER", False)
        mp.setenv("DEPTHBENCH_DATA", str(scratch / "data"))
        ray.init(address="local", num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                 runtime_env={"worker_process_setup_hook": die_after_first_checkpoint})
        try:
            yield scratch
        finally:
            ray.shutdown()


def test_ray_cli_sweep_matches_local(ray_cluster: Path, one_thread_reference: pd.DataFrame, tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", tiny_sweep())
    result = runner.invoke(app, ["sweep", str(config), "--executor", "ray", "--out", str(tmp_path)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(learned(tmp_path / "tiny"), one_thread_reference)
    assert result.output.count("started v") == 2 and "on 127.0.0.1 (" in result.output
    assert not list((tmp_path / "tiny").glob(".ray-probe*"))  # the shared-folder probe cleans up


def test_ray_worker_killed_mid_run_resumes_from_checkpoint(
    ray_cluster: Path, one_thread_reference: pd.DataFrame, tmp_path: Path
) -> None:
    cfg = tiny_sweep(CRASH_SWEEP, grid={"version": ["v2"], "depth": [8], "seed": [0]})
    lines: list[str] = []
    outcome = sweep(tmp_path, cfg, RayExecutor(cfg.resources, log=lines.append))
    (run,) = outcome.outcomes
    assert run.status == "completed"
    assert (ray_cluster / "killed").exists(), "the worker was never killed"
    # "started ... again" when word of the first attempt's start reached the driver before the kill.
    assert any(re.match(rf"started {run.cfg.run_id}( again)? on 127\.0\.0\.1", line)
               and "resuming from its checkpoint" in line for line in lines), lines
    run_dir = tmp_path / CRASH_SWEEP / run.cfg.run_id
    assert steps(run_dir) == [2, 4, 6, 8]  # nothing lost, nothing repeated
    # The rows written before the kill are byte for byte those of the first attempt, timings included:
    # the second attempt resumed from step 4 rather than starting over.
    before_kill = (ray_cluster / "killed").read_text()
    assert before_kill and (run_dir / "metrics.jsonl").read_text().startswith(before_kill)
    expected = one_thread_reference[one_thread_reference.run_id == run.cfg.run_id].reset_index(drop=True)
    pd.testing.assert_frame_equal(learned(tmp_path / CRASH_SWEEP), expected)


def test_ray_says_there_is_no_gpu_instead_of_waiting(ray_cluster: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "gpu.yaml", tiny_sweep(train={"device": "auto"}))
    result = runner.invoke(app, ["sweep", str(config), "--executor", "ray", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: the Ray cluster has no GPU (1 node(s), 2 CPUs), but each run asks for 1 "
        "(resources.gpus_per_run); add GPU nodes, or train on CPUs with --device cpu")


# --- slurm through submitit's local executor -------------------------------------------------------


def slurm_sweep(**resources: object) -> SweepConfig:
    """Runs long enough (60 steps) to be interrupted between their first checkpoint (step 4) and their end."""
    return tiny_sweep("slurm", train={"steps": 60, "eval_every": 20}, resources={"time_min": 1, **resources})


def _task_training(sweep_dir: Path, run_dir: Path) -> int:
    """The pid of the local submitit task training ``run_dir``: the child of a job's controller holding its lock."""
    lock = str((run_dir / ".lock").resolve())
    for job in (p.name.split("_")[0] for p in (sweep_dir / "slurm").glob("*_submitted.pkl")):
        for task in Path(f"/proc/{job}/task/{job}/children").read_text().split():
            if any(os.path.realpath(fd) == lock for fd in Path(f"/proc/{task}/fd").iterdir()):
                return int(task)
    raise AssertionError(f"no local job task holds {lock}")


def time_out_at_first_checkpoint(sweep_dir: Path, run_dir: Path) -> dict[str, str]:
    """Send USR2, SLURM's time-limit warning, to the task training ``run_dir`` once it wrote a checkpoint.

    Returns, once the signalled task has exited, the metrics log as the first attempt left it.
    (submitit's LocalJob._interrupt() signals the job's controller, which does not pass USR2 on.)
    """
    seen: dict[str, str] = {}

    def interrupt() -> None:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        task = _task_training(sweep_dir, run_dir)
        os.kill(task, signal.SIGUSR2)
        while Path(f"/proc/{task}").exists():
            time.sleep(0.005)
        seen["metrics"] = (run_dir / "metrics.jsonl").read_text()

    threading.Thread(target=interrupt, daemon=True).start()
    return seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job's task through /proc")
def test_slurm_jobs_time_out_checkpoint_requeue_and_match_local(one_thread: None, tmp_path: Path) -> None:
    cfg = slurm_sweep(max_restarts=1)
    sweep(tmp_path / "local", cfg)
    v2 = cfg.runs()[-1]
    run_dir = tmp_path / "slurm" / v2.run_id
    first_attempt = time_out_at_first_checkpoint(tmp_path / "slurm", run_dir)
    lines: list[str] = []
    outcome = sweep(tmp_path, cfg, SlurmExecutor(cfg.resources, local=True, log=lines.append))
    assert [o.status for o in outcome.outcomes] == ["completed", "completed"]
    pd.testing.assert_frame_equal(learned(tmp_path / "slurm"), learned(tmp_path / "local" / "slurm"))
    assert lines[0].startswith("submitted 2 runs as local jobs")
    logs = "".join(p.read_text() for p in (tmp_path / "slurm" / "slurm").glob("*_log.out"))
    assert logs.count("this job is timed-out") == 1 and logs.count("Calling checkpoint method") == 1
    assert logs.count("(0 remaining timeouts)") == 1 and logs.count("Job completed successfully") == 2
    assert steps(run_dir) == list(range(2, 61, 2))
    # The requeued job resumed: the first attempt's rows are still there, timings included.
    assert first_attempt["metrics"] and (run_dir / "metrics.jsonl").read_text().startswith(first_attempt["metrics"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job's task through /proc")
def test_slurm_run_timing_out_too_often_fails_then_resumes(one_thread: None, tmp_path: Path) -> None:
    cfg = slurm_sweep(max_restarts=0).model_copy(update={"grid": {"version": ["v2"], "depth": [8]}})
    (run,) = cfg.runs()
    run_dir = tmp_path / "slurm" / run.run_id
    time_out_at_first_checkpoint(tmp_path / "slurm", run_dir)
    outcome = sweep(tmp_path, cfg, SlurmExecutor(cfg.resources, local=True))
    (failed,) = outcome.outcomes
    assert failed.status == "failed" and outcome.failed == [run.run_id]
    assert pd.read_csv(tmp_path / "slurm" / "results.csv").status.tolist() == ["failed"]
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    assert 4 <= saved < 60  # the time-out still checkpointed the run
    assert failed.message.startswith(f"SLURM job {failed.message.split()[2]} timed out 1 time(s) at "
                                     f"resources.time_min = 1 min with {saved} of 60 steps done, checkpoint kept; "
                                     "raise time_min or max_restarts; log ")

    retried = run_sweep(cfg, tmp_path, flags=RunFlags(retry_failed=True), handle_signals=False)
    assert [o.status for o in retried.outcomes] == ["completed"] and retried.failed == []
    assert steps(run_dir) == list(range(2, 61, 2))
    sweep(tmp_path / "local", cfg)
    pd.testing.assert_frame_equal(learned(tmp_path / "slurm"), learned(tmp_path / "local" / "slurm"))


# --- the command line: missing packages, misplaced options ---------------------------------------


@pytest.mark.parametrize(("executor", "module"), [("ray", "ray"), ("slurm", "submitit")])
def test_missing_engine_is_one_line_exit_2(
    executor: str, module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import ray` now fails as if it were not installed
    config = write_config(tmp_path / "tiny.yaml", tiny_sweep())
    result = runner.invoke(app, ["sweep", str(config), "--executor", executor, "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert result.output == (f"error: --executor {executor} needs the '{module}' package: "
                             f"pip install 'depthbench[{executor}]'\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "resources", "message"),
    [
        (["--executor", "ray", "--jobs", "2"], {},
         "error: --jobs is an option of --executor local, not of --executor ray"),
        (["--partition", "gpu"], {}, "error: --partition is an option of --executor slurm, not of --executor local"),
        (["--max-restarts", "0"], {},
         "error: --max-restarts is an option of --executor ray and slurm, not of --executor local"),
        (["--executor", "rai"], {}, "error: unknown executor 'rai' (did you mean 'ray'?); use local, ray or slurm"),
        (["--executor", "slurm", "--slurm-local", "--device", "auto"], {"gpus_per_run": 0.5},
         "error: resources.gpus_per_run is 0.5, but SLURM hands out whole GPUs; use a whole number, "
         "or --executor ray to share a GPU between runs"),
    ],
)
def test_executor_option_errors_are_one_line_exit_2(
    args: list[str], resources: dict, message: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "tiny.yaml", tiny_sweep(resources=resources))
    result = runner.invoke(app, ["sweep", str(config), "--out", str(tmp_path / "runs"), *args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == message


def test_slurm_submission_script_carries_the_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No SLURM here: stand-ins for srun and sbatch on PATH let submitit write and "submit" the real
    # job-array script, which the fake sbatch keeps for inspection.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/job.sh\necho "$SUBMITIT_PREEMPT_SIGNAL" '
                                    f'> {tmp_path}/signal.txt\necho "Submitted batch job 4242"\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = tiny_sweep(train={"device": "cuda:1"}, resources={
        "partition": "gpu", "time_min": 30, "cpus_per_run": 2.5, "slurm_extra": {"account": "proj"}})
    executor = make_executor("slurm", cfg.resources, time_min=90, array_parallelism=1, max_restarts=5)
    jobs = executor._submit(cfg.runs(), tmp_path / "tiny", SweepContext())
    assert [job.job_id for job in jobs] == ["4242_0", "4242_1"]
    script = (tmp_path / "job.sh").read_text()
    # The time-limit warning: URG, which a job not yet able to handle it ignores, 20 s before the limit for a run
    # never measured (timelimit.StopTiming); the jobs inherit the signal's name, this process does not keep it.
    assert (tmp_path / "signal.txt").read_text() == "URG\n" and "SUBMITIT_PREEMPT_SIGNAL" not in os.environ
    for line in ("--array=0-1%1", "--partition=gpu", "--time=90", "--signal=URG@20", "--gpus-per-node=1",
                 "--cpus-per-task=3", "--nodes=1", "--ntasks-per-node=1", "--account=proj",
                 "--job-name=depthbench-tiny"):
        assert f"#SBATCH {line}\n" in script
    assert f"--output={tmp_path}/tiny/slurm/%A_%a_0_log.out" in script
    pickled = jobs[1].submission()
    assert pickled._timeout_countdown == 5 and pickled.function.cfg.train.device == "cuda"  # its GPU is cuda:0
    assert callable(pickled.function.checkpoint)


# --- a full disk, on every executor ---------------------------------------------------------------


def wait_unclaimed(sweep_dir: Path, timeout_s: float = 120) -> None:
    """Until no process holds a run's lock: jobs a stopped sweep cancelled take a moment to end."""
    from filelock import FileLock, Timeout

    deadline = time.monotonic() + timeout_s
    for lock in sweep_dir.glob("*/.lock"):
        while True:
            try:
                FileLock(lock).acquire(timeout=0.2).lock.release()
                break
            except Timeout:
                assert time.monotonic() < deadline, f"{lock} is still held"


def full_disk_then_plain_rerun(tmp_path: Path, runs: int, *options: str) -> None:
    """A sweep whose disk fills up stops with the fault's line (exit 75), records no run as failed, and a plain
    re-run on the same executor, once the space is freed, finishes every run."""
    cfg = tiny_sweep("full", grid={"version": ["v1", "v2"], "depth": [8], "seed": list(range(runs // 2))})
    config = write_config(tmp_path / "full.yaml", cfg)
    sweep_dir = tmp_path / "full"
    sweep_dir.mkdir()
    (sweep_dir / FULL_DISK).write_text("")
    args = ["sweep", str(config), "--out", str(tmp_path), *options]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == faults.EXIT_CODE, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("stopped: no space left on device (") and last.endswith(
        f"free space there, then run `depthbench sweep {config} --out {tmp_path}{''.join(' ' + o for o in options)}` "
        "to resume"), last
    wait_unclaimed(sweep_dir)
    assert not list(sweep_dir.glob("*/error.log")) and not list(sweep_dir.glob("*/result.json"))
    assert "✗" not in result.output and "Traceback" not in result.output

    (sweep_dir / FULL_DISK).unlink()  # the space is freed
    again = runner.invoke(app, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert set(pd.read_csv(sweep_dir / "results.csv").status) == {"completed"}
    assert "resumed from its checkpoint at step 4" in again.output or "resuming from its checkpoint" in again.output


def test_a_full_disk_stops_a_jobs_sweep_and_a_plain_rerun_resumes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", f"{FULL_DISK_HOOK}{os.pathsep}{ROOT}")  # the workers' start-up hook
    full_disk_then_plain_rerun(tmp_path, 4, "--jobs", "2")


def test_a_full_disk_stops_a_ray_sweep_and_a_plain_rerun_resumes(ray_cluster: Path, tmp_path: Path) -> None:
    full_disk_then_plain_rerun(tmp_path, 2, "--executor", "ray")


def test_a_full_disk_stops_a_slurm_sweep_and_a_plain_rerun_resumes(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", f"{FULL_DISK_HOOK}{os.pathsep}{ROOT}")  # the jobs' start-up hook
    full_disk_then_plain_rerun(tmp_path, 2, "--executor", "slurm", "--slurm-local")


_BUILDING_FOREVER = """
import sys, time
from pathlib import Path
import depthbench.train
from depthbench.config import load_run_config
from depthbench.executors.slurm import _SlurmRun
from depthbench.sweep import RunFlags

def build_slowly(*args, **kwargs):
    time.sleep(600)  # a model that takes minutes to build

depthbench.train.model_from_config = build_slowly
cfg = load_run_config(sys.argv[1])
_SlurmRun(cfg, Path(sys.argv[2]), RunFlags(), threads=1, time_min=5, lead_s=0, on_cluster=False)()
"""


def test_a_slurm_job_cancelled_while_building_its_model_ends_at_once_and_frees_its_run(tmp_path: Path) -> None:
    from filelock import FileLock, Timeout

    cfg = tiny_sweep()
    run = cfg.runs()[0]
    sweep_dir = tmp_path / cfg.name
    sweep_dir.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run.model_dump(mode="json")))
    job = subprocess.Popen([sys.executable, "-c", _BUILDING_FOREVER, str(config), str(sweep_dir)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    lock = FileLock(sweep_dir / run.run_id / ".lock")
    deadline = time.monotonic() + 120
    while (sweep_dir / run.run_id / "config.yaml").exists() is False and time.monotonic() < deadline:
        time.sleep(0.05)  # the trainer writes config.yaml first, then loads data and builds the model
    with pytest.raises(Timeout):
        lock.acquire(timeout=0)  # held by the job
    job.send_signal(signal.SIGTERM)  # scancel
    assert job.wait(timeout=20) == 128 + signal.SIGTERM
    lock.acquire(timeout=0)  # free at once, not when SLURM's kill comes
    lock.release()


def test_the_slurm_driver_never_unpickles_what_its_jobs_leave(one_thread: None, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A file planted in runs/<sweep>/slurm/ while the sweep waits could run code when unpickled: the driver
    # reads each outcome from the run's folder (JSON) and the queue, never from submitit's result pickles.
    submitit_utils = pytest.importorskip("submitit.core.utils")
    unpickled: list[str] = []
    monkeypatch.setattr(submitit_utils, "pickle_load", lambda path: unpickled.append(str(path)))
    cfg = tiny_sweep("slurm")
    outcome = sweep(tmp_path, cfg, SlurmExecutor(cfg.resources, local=True))
    assert [o.status for o in outcome.outcomes] == ["completed", "completed"]
    assert len(list((tmp_path / "slurm" / "slurm").glob("*_result.pkl"))) == 2  # there, and never read
    assert unpickled == []
