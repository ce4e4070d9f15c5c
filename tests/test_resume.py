"""Crash safety with real processes and real signals: SIGKILL, Ctrl-C, two sweeps at once, a kill loop.

Each test drives `python -m depthbench sweep` as a subprocess, the way a user (or a lost machine)
would interrupt it, and compares what is left on disk with an uninterrupted sweep of the same config.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from depthbench import storage
from tests.conftest import ROOT

LEARNED = ["run_id", "status", "success", "steps", "train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc"]


def write_config(folder: Path, name: str, *, seeds: int = 1, steps: int = 240, depth: int = 8) -> Path:
    config = {
        "name": name,
        "dataset": {"name": "synthetic", "train_subset": 256, "test_subset": 64, "image_size": 16},
        "model": {"width": 4},
        "train": {"steps": steps, "batch_size": 32, "lr": 0.05, "eval_every": 40, "log_every": 10,
                  "checkpoint_every": 20, "device": "cpu"},
        "success": {"metric": "test_acc", "min": 0.0},
        "grid": {"version": ["v1", "v2"], "depth": [depth], "seed": list(range(seeds))},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sweep_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "depthbench", "sweep", str(config), "--out", str(out), *extra]


def env() -> dict[str, str]:
    # One thread per process keeps two concurrent sweeps from fighting over the 2 cores, and the
    # same thread count in every process keeps CPU results bit-identical between them.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def run(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_cmd(config, out, *extra), env=env(), capture_output=True, text=True, timeout=300)


def start(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(sweep_cmd(config, out, *extra), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def learned_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("img_per_s", "elapsed_s")}
            for row in storage.read_jsonl(run_dir / "metrics.jsonl")]


def learned_table(sweep_dir: Path) -> pd.DataFrame:
    return pd.read_csv(sweep_dir / "results.csv")[LEARNED]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted sweep of the config the kill tests interrupt: (config, sweep folder)."""
    folder = tmp_path_factory.mktemp("reference")
    # 480 steps: room for 20 kills even where a kill lands up to 0.2 s (tens of steps) after its target
    config = write_config(folder, "crash", seeds=2, steps=480)
    done = run(config, folder / "runs")
    assert done.returncode == 0, done.stderr
    return config, folder / "runs" / "crash"


def checkpoint_step(run_dir: Path) -> int:
    import torch

    try:
        return torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    except Exception:  # noqa: BLE001 - not written yet, or being replaced this instant
        return 0


def test_sigkill_mid_run_then_resume_equals_uninterrupted(reference: tuple[Path, Path], tmp_path: Path) -> None:
    config, expected = reference
    out = tmp_path / "runs"
    proc = start(config, out)
    first = out / "crash" / sorted(p.name for p in expected.iterdir() if p.name.startswith("v1-d8-s0"))[0]
    wait_for(lambda: checkpoint_step(first) >= 60)
    proc.kill()
    proc.wait()
    assert not (first / "result.json").exists()
    rows_at_kill = len(storage.read_jsonl(first / "metrics.jsonl"))
    assert 6 <= rows_at_kill < 48

    resumed = run(config, out)  # also takes over the killed process's lock: flock died with it
    assert resumed.returncode == 0, resumed.stderr
    assert learned_rows(first) == learned_rows(expected / first.name)
    steps = [row["step"] for row in storage.read_jsonl(first / "metrics.jsonl")]
    assert steps == list(range(10, 481, 10))  # no step missing, none repeated
    pd.testing.assert_frame_equal(learned_table(out / "crash"), learned_table(expected))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_stop_signal_checkpoints_and_says_how_to_resume(
    sig: signal.Signals, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    config, expected = reference
    out = tmp_path / "runs"
    proc = start(config, out)
    wait_for(lambda: any(checkpoint_step(p) >= 20 for p in (out / "crash").glob("v*")))
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"run `depthbench sweep {config} --out {out}` again to resume" in stderr
    assert "Traceback" not in stderr
    (interrupted,) = [p for p in (out / "crash").glob("v*") if (p / "checkpoint.pt").exists()]
    assert not (interrupted / "result.json").exists()
    finished = run(config, out)
    assert finished.returncode == 0, finished.stderr
    pd.testing.assert_frame_equal(learned_table(out / "crash"), learned_table(expected))


def test_two_processes_never_train_the_same_run(tmp_path: Path) -> None:
    config = write_config(tmp_path, "shared", seeds=3, steps=60)
    out = tmp_path / "runs"
    procs = [start(config, out) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trained = [{line.split()[1] for line in stdout.splitlines() if line.startswith("✓ ")} for stdout, _ in outputs]
    assert not trained[0] & trained[1], "a run was trained by both processes"
    table = pd.read_csv(out / "shared/results.csv")
    assert trained[0] | trained[1] == set(table.run_id) and len(table) == 6
    assert set(table.status) == {"completed"}


def test_twenty_random_kills_give_the_same_results(reference: tuple[Path, Path], tmp_path: Path) -> None:
    config, expected = reference
    out = tmp_path / "runs"
    rng = random.Random(0)

    def rows_logged() -> int:
        return sum(len(storage.read_jsonl(p / "metrics.jsonl")) for p in (out / "crash").glob("v*"))

    for kill in range(20):
        # Kill a random moment after 1-4 more log rows (10-40 steps), whatever this machine's speed:
        # inside a step, a checkpoint write, a metrics append or a run's finish, and never so late
        # that the sweep could finish before the 20th kill (4 runs x 480 steps).
        target = rows_logged() + rng.randint(1, 4)
        proc = start(config, out)
        wait_for(lambda: rows_logged() >= target or proc.poll() is not None)
        time.sleep(rng.uniform(0.0, 0.2))
        assert proc.poll() is None, f"the sweep finished after only {kill} kills"
        proc.kill()
        proc.wait()
    final = run(config, out)
    assert final.returncode == 0, final.stderr
    pd.testing.assert_frame_equal(learned_table(out / "crash"), learned_table(expected))
    for run_dir in expected.glob("v*"):
        assert learned_rows(out / "crash" / run_dir.name) == learned_rows(run_dir)
