"""``--executor slurm`` against a real one-node SLURM cluster that this module starts and stops.

The cluster is Debian's slurmctld, slurmd and munge (scripts/slurm_cluster.sh), without accounting, as
many lab clusters run: so the driver must never need ``sacct``. Its node claims 4 CPUs on this 2-core
machine so the module's sweeps run side by side, and a requeued job may start again after 10 s rather
than SLURM's default 2 minutes (``cred_expire``). Jobs train with one thread, as the local references
here do: CPU results depend on the thread count, not on how busy the machine is.

The long sweeps (jobs that outlive their 1-minute limit) start when the module does and run while the
other tests do; each test waits for its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from depthbench import storage
from depthbench.config import SweepConfig
from depthbench.sweep import run_sweep, sweep_yaml
from tests.conftest import learned, steps, tiny_sweep

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the test cluster is Debian's SLURM")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
# About 3 ms a step on one core here: 16000 steps (50 s) outlive the training time of a 1-minute job that is
# told to stop 34 s before its limit, as a run whose slowest step took 12 s must be (10 s + 2 x 12 s).
STEPS = 16000
# Eager: on a CPU with AMX compile auto would compile a run this long, a first step of many seconds in every
# attempt under its one-minute limit, which this test times.
LONG = {"train": {"steps": STEPS, "eval_every": STEPS // 2, "log_every": 400, "checkpoint_every": STEPS // 2,
                  "compile": False},
        "grid": {"version": ["v2"], "depth": [8], "seed": [0]}}
SLOW_STEPS = {"gap_s": 12.0, "stop_s": 1.0, "startup_s": 10.0}
CHATTER = ("sacct", "Bypassing", "submitit WARNING", "accounting storage")


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, all different (each held until every one is chosen)."""
    with contextlib.ExitStack() as held:
        probes = [held.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The running cluster: the environment its clients need (SLURM_CONF), for this process and its children."""
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root; run the tests as root (as CI does)")
    install = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"SLURM cannot be installed here: {install.stderr.strip().splitlines()[-1:]}")
    folder = tmp_path_factory.mktemp("slurm-cluster")
    ctld, slurmd = free_ports(2)  # beside any SLURM already on this machine
    ports = {"SLURMCTLD_PORT": str(ctld), "SLURMD_PORT": str(slurmd)}
    env = {**os.environ, "SLURM_CPUS": "4", "CRED_EXPIRE_S": "10", **ports}
    start = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], env=env, capture_output=True, text=True,
                           timeout=120)
    if start.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], timeout=120)
        pytest.fail(f"the SLURM test cluster did not start: {start.stdout}{start.stderr}")
    conf = {"SLURM_CONF": str(folder / "slurm.conf")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", conf["SLURM_CONF"])
        try:
            yield conf
        finally:
            subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], timeout=120)


class Sweep:
    """``depthbench sweep`` in a subprocess, its output (stdout and stderr, interleaved) in a file."""

    def __init__(self, folder: Path, cfg: SweepConfig, *flags: str, env: dict[str, str],
                 timing: dict[str, float] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.config, self.out, self.log = folder / f"{cfg.name}.yaml", folder / "runs", folder / "output.txt"
        self.config.write_text(sweep_yaml(cfg))
        self.dir = self.out / cfg.name
        if timing is not None:  # as if an earlier job of each run had measured it
            (self.dir / "slurm").mkdir(parents=True)
            for run in cfg.runs():
                storage.write_json(self.dir / "slurm" / f"{run.run_id}.timing.json", timing)
        self.command = [sys.executable, "-m", "depthbench", "sweep", str(self.config), "--out", str(self.out),
                        "--executor", "slurm", *flags]
        child_env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
        with self.log.open("w") as output:
            self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT, env=child_env,
                                            cwd=ROOT, stdin=subprocess.DEVNULL)

    def wait(self, timeout_s: float) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the sweep did not end within {timeout_s:g} s:\n{self.output()}") from None
        return code, self.output()

    def output(self) -> str:
        return self.log.read_text()

    def array_id(self, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if match := re.search(r"submitted \d+ runs as SLURM job array (\d+)", self.output()):
                return match.group(1)
            time.sleep(0.5)
        raise AssertionError(f"no array was submitted:\n{self.output()}")


def job_logs(sweep_dir: Path) -> str:
    return "".join(path.read_text() for path in sorted((sweep_dir / "slurm").glob("*_log.*")))


_references: dict[str, pd.DataFrame] = {}


def reference(cfg: SweepConfig, folder: Path) -> pd.DataFrame:
    """``cfg`` trained in this process, one run after another, with one thread as the jobs use."""
    key = cfg.model_dump_json(exclude={"resources"})
    if key not in _references:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_sweep(cfg, folder, handle_signals=False)
        finally:
            torch.set_num_threads(before)
        _references[key] = learned(folder / cfg.name)
    return _references[key]


@pytest.fixture(scope="module")
def data_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    data = str(tmp_path_factory.mktemp("slurm-data"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEPTHBENCH_DATA", data)
        yield {"DEPTHBENCH_DATA": data}


@pytest.fixture(scope="module")
def long_sweeps(cluster: dict[str, str], data_env: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sweep]:
    """Started at once, awaited by their tests: a run that needs several 1-minute jobs, with restarts to spare
    and with none."""
    env = {**cluster, **data_env}
    folder = tmp_path_factory.mktemp("slurm-long")
    return {
        "requeued": Sweep(folder / "requeued", tiny_sweep("long", **LONG), "--time-min", "1", "--max-restarts", "8",
                          env=env, timing=SLOW_STEPS),
        "exhausted": Sweep(folder / "exhausted", tiny_sweep("long", **LONG), "--time-min", "1", "--max-restarts", "0",
                           env=env, timing=SLOW_STEPS),
    }


def test_sweep_as_job_array_matches_local(cluster: dict[str, str], data_env: dict[str, str],
                                          long_sweeps: dict[str, Sweep], tmp_path: Path) -> None:
    cfg = tiny_sweep()
    sweep = Sweep(tmp_path / "array", cfg, "--time-min", "1", env={**cluster, **data_env})
    code, output = sweep.wait(300)
    assert code == 0, output
    assert re.search(r"submitted 2 runs as SLURM job array \d+; job logs in ", output)
    assert output.count("✓ v") == 2 and re.search(r"started v\S+ on \S+ \(job \d+_\d\)", output)
    pd.testing.assert_frame_equal(learned(sweep.dir), reference(cfg, tmp_path / "local"))
    # No engine chatter on the terminal: submitit's lines, if any, are in sweep.log with the driver's own.
    assert not any(word in output for word in CHATTER), output
    assert "submitted 2 runs as SLURM job array" in (sweep.dir / "sweep.log").read_text()


def test_run_longer_than_its_time_limit_is_requeued_and_matches_an_uninterrupted_run(
    long_sweeps: dict[str, Sweep], tmp_path: Path
) -> None:
    sweep = long_sweeps["requeued"]
    code, output = sweep.wait(900)
    assert code == 0, output
    (run_dir,) = [path for path in sweep.dir.iterdir() if path.name.startswith("v2-")]
    assert steps(run_dir) == list(range(400, STEPS + 1, 400))  # nothing lost, nothing repeated
    pd.testing.assert_frame_equal(learned(sweep.dir), reference(tiny_sweep("long", **LONG), tmp_path))
    logs = job_logs(sweep.dir)
    # Every attempt but the last was told to stop in time: it checkpointed and requeued itself, and SLURM
    # never had to kill it at the limit.
    requeues = logs.count("Calling checkpoint method")
    assert requeues >= 1 and logs.count("Requeued job") == requeues, logs
    assert "DUE TO TIME LIMIT" not in logs
    assert re.search(rf"{run_dir.name} is requeued \(restart 1 of at most 8\)", output), output
    assert f"started {run_dir.name} again on " in output and "resuming from its checkpoint" in output
    assert re.search(rf"{run_dir.name} at step \d+/{STEPS} on ", output), output  # the status lines
    assert not any(word in output for word in CHATTER), output
    timing = storage.read_json(sweep.dir / "slurm" / f"{run_dir.name}.timing.json")
    assert 0 < timing["stop_s"] < 10 and 0 < timing["gap_s"] < 10 and 0 < timing["startup_s"] < 60


def test_a_run_that_exhausts_its_restarts_says_how_far_it_got_and_how_to_finish(
    long_sweeps: dict[str, Sweep]
) -> None:
    sweep = long_sweeps["exhausted"]
    code, output = sweep.wait(600)
    assert code == 1, output
    (run_dir,) = [path for path in sweep.dir.iterdir() if path.name.startswith("v2-")]
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < saved < STEPS  # the time-out checkpointed the run
    message = storage.read_json(run_dir / "result.json")["error"]
    assert re.match(rf"SLURM job \d+: timed out 1 time\(s\) at resources.time_min = 1 min with {saved} of {STEPS} "
                    r"steps done, checkpoint kept; raise time_min or max_restarts", message), message
    # The resume line keeps the time limit and asks for the restarts the steps left need at this pace.
    needed = -(-(STEPS - saved) // saved)
    resume = re.search(r"then `(depthbench sweep .*) --retry-failed`", " ".join(output.split()))
    assert resume, output
    assert f"--max-restarts {needed} --time-min 1" in resume.group(1) and "--executor slurm" in resume.group(1)


def test_scancel_of_a_running_job_keeps_its_checkpoint_and_retry_resumes_it(
    cluster: dict[str, str], data_env: dict[str, str], long_sweeps: dict[str, Sweep], tmp_path: Path
) -> None:
    cfg = tiny_sweep("long", **LONG)
    sweep = Sweep(tmp_path / "cancelled", cfg, "--time-min", "5", env={**cluster, **data_env})
    array = sweep.array_id()
    run_dir = sweep.dir / cfg.runs()[0].run_id
    deadline = time.monotonic() + 240
    while not steps(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert steps(run_dir), sweep.output()
    subprocess.run(["scancel", array], check=True, timeout=60)  # a lone job: its id is the array's
    code, output = sweep.wait(240)
    assert code == 1, output
    message = storage.read_json(run_dir / "result.json")["error"]
    assert re.match(rf"SLURM job {array}: its job was cancelled \(scancel, or an administrator\) with \d+ of "
                    f"{STEPS} steps done, checkpoint kept", message), message
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    before = (run_dir / "metrics.jsonl").read_text()
    assert saved > 0 and steps(run_dir)[-1] <= saved

    # --retry-failed resumes it (here on this machine) from the checkpoint the cancelled job saved.
    retried = subprocess.run([sys.executable, "-m", "depthbench", "sweep", str(sweep.config), "--out", str(sweep.out),
                              "--retry-failed"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert (run_dir / "metrics.jsonl").read_text().startswith(before)
    assert steps(run_dir) == list(range(400, STEPS + 1, 400))
    pd.testing.assert_frame_equal(learned(sweep.dir), reference(cfg, tmp_path / "local"))


def test_a_time_limit_too_short_to_train_is_refused_up_front(
    cluster: dict[str, str], data_env: dict[str, str], tmp_path: Path
) -> None:
    # What an earlier job of this run measured: 40 s steps. A 1-minute job could not train at all.
    cfg = tiny_sweep()
    timing = tmp_path / "runs" / cfg.name / "slurm" / f"{cfg.runs()[0].run_id}.timing.json"
    timing.parent.mkdir(parents=True)
    timing.write_text('{"gap_s": 40, "stop_s": 3, "startup_s": 12}')
    code, output = Sweep(tmp_path, cfg, "--time-min", "1", env={**cluster, **data_env}).wait(120)
    assert code == 2 and "Traceback" not in output
    assert output.strip().splitlines()[-1] == (
        "error: resources.time_min = 1 min leaves no time to train: a job takes about 12 s to start and must be "
        "told to stop 90 s before its limit to checkpoint in time (slowest step 40.0 s, stop 3.0 s); "
        "use --time-min 3 or more")
    assert not list(timing.parent.glob("*.pkl"))  # nothing was submitted
