"""Faults of the machine, not of the run: a full disk, an exceeded quota, a read-only filesystem or a vanished
folder interrupt the run (its last checkpoint kept), stop the sweep with one line, and a plain re-run resumes.

The faults are injected at the write layer (an OSError with the errno the kernel gives), so these tests need
no root; test_failures.py fills a real tmpfs where the machine allows it.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from depthbench import faults, storage
from depthbench.cli import app
from tests.conftest import steps, tiny_sweep, write_config

runner = CliRunner()


def four_runs(name: str) -> Path:
    return tiny_sweep(name, grid={"version": ["v1", "v2"], "depth": [8], "seed": [0, 1]})


def fail_checkpoints_from(monkeypatch: pytest.MonkeyPatch, step: int, code: int) -> None:
    """Every checkpoint at ``step`` or later meets ``code``, as a disk that fills up (and stays full) would."""
    save = storage.save_torch

    def save_or_fail(path: Path, obj: object) -> None:
        if path.name == "checkpoint.pt" and obj["step"] >= step:
            raise OSError(code, os.strerror(code), str(path))
        save(path, obj)

    monkeypatch.setattr(storage, "save_torch", save_or_fail)


def sweep(config: Path, out: Path, *extra: str):
    return runner.invoke(app, ["sweep", str(config), "--out", str(out), *extra])


@pytest.mark.parametrize(("code", "condition", "fix"), [
    (errno.ENOSPC, "no space left on device", "free space there"),
    (errno.EDQUOT, "disk quota exceeded", "free space there or raise the quota"),
    (errno.EROFS, "read-only file system", "make the filesystem writable again"),
])
def test_a_full_disk_interrupts_the_run_stops_the_sweep_and_a_plain_rerun_resumes(
        code: int, condition: str, fix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = four_runs("full")
    config = write_config(tmp_path / "full.yaml", cfg)
    first, second, *never = cfg.runs()
    fail_checkpoints_from(monkeypatch, 8, code)  # each run's step-4 checkpoint is written, its step-8 one is not
    result = sweep(config, tmp_path)
    assert result.exit_code == faults.EXIT_CODE, result.output
    lines = result.output.strip().splitlines()
    checkpoint = tmp_path / "full" / first.run_id / "checkpoint.pt"
    assert lines[-1] == (f"stopped: {condition} ({checkpoint}); 1 run(s) interrupted, each keeps its last "
                         f"checkpoint; {fix}, then run `depthbench sweep {config} --out {tmp_path}` to resume")
    assert f"‖ {first.run_id}  stopped: {condition} ({checkpoint}); its last checkpoint is kept" in result.output
    # The run is interrupted, not failed: no result, no error.log, its step-4 checkpoint whole.
    run_dir = tmp_path / "full" / first.run_id
    assert not (run_dir / "result.json").exists() and not list((tmp_path / "full").glob("*/error.log"))
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not list(run_dir.glob(".*.tmp"))
    # No run was started after the fault.
    assert not any((tmp_path / "full" / run.run_id).exists() for run in (second, *never))
    assert "Traceback" not in result.output

    monkeypatch.undo()  # the space is freed
    again = sweep(config, tmp_path)
    assert again.exit_code == 0, again.output
    assert f"{first.run_id}: resumed from its checkpoint at step 4" in again.output
    assert steps(run_dir) == [2, 4, 6, 8]
    assert "4 runs in the sweep, 4 to do" in again.output


def test_a_checkpoint_that_would_fill_the_disk_is_refused_before_it_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoint.pt"
    storage.save_torch(target, {"step": 4, "weights": torch.zeros(1000)})
    before = target.read_bytes()
    real = os.statvfs

    class Nearly:  # the fields check_space reads: a little more than the reserve is free
        f_frsize = 4096
        f_bavail = (storage.RESERVE + 2048) // 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Nearly() if Path(path) == tmp_path else real(path))
    with pytest.raises(OSError) as caught:
        storage.save_torch(target, {"step": 8, "weights": torch.zeros(1000)})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    size = len(before)
    assert caught.value.strerror == (f"not enough free space for checkpoint.pt ({size / 2**20:.1f} MB) and a "
                                     "margin of 1.0 MB: 1.0 MB free")
    assert target.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
    fault = faults.machine_fault(caught.value, tmp_path)
    assert fault == faults.MachineFault(caught.value.strerror, str(target), "free space there")


def test_an_output_folder_that_vanishes_mid_run_stops_the_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = four_runs("gone")
    out = tmp_path / "mount"
    config = write_config(tmp_path / "gone.yaml", cfg)
    append = storage.append_jsonl

    def vanish_at_step_6(path: Path, row: dict) -> None:
        if row["step"] == 6:
            shutil.rmtree(out)  # unmounted, or deleted by hand
        append(path, row)

    monkeypatch.setattr(storage, "append_jsonl", vanish_at_step_6)
    result = sweep(config, out)
    assert result.exit_code == faults.EXIT_CODE, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"stopped: folder vanished ({out}); 1 run(s) interrupted, each keeps its last checkpoint; restore the "
        f"folder (or mount it again), then run `depthbench sweep {config} --out {out}` to resume")
    assert not out.exists()  # nothing wrote into where the folder was


def test_a_full_disk_met_when_the_sweep_starts_is_the_same_one_line(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path / "f.yaml", four_runs("f"))
    real = Path.write_text

    def full(self: Path, *args: object, **kwargs: object) -> int:
        if self.name.startswith(".write-test-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    result = sweep(config, tmp_path)
    assert result.exit_code == faults.EXIT_CODE, result.output
    probe = tmp_path / "f" / f".write-test-{os.getpid()}"
    assert result.output.strip().splitlines()[-1] == (
        f"stopped: no space left on device ({probe}); 0 run(s) interrupted, each keeps its last checkpoint; "
        f"free space there, then run `depthbench sweep {config} --out {tmp_path}` to resume")


def test_a_missing_file_in_a_folder_that_is_still_there_is_a_failure_of_the_run(tmp_path: Path) -> None:
    err = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "data.bin"))
    assert faults.machine_fault(err, tmp_path) is None
    assert faults.machine_fault(RuntimeError("wrapped"), tmp_path) is None
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as inner:
            raise RuntimeError("writing the event file failed") from inner
    except RuntimeError as outer:
        assert faults.machine_fault(outer, tmp_path) == faults.MachineFault(
            "no space left on device", str(tmp_path), "free space there")


def test_temporary_files_of_killed_writers_are_cleaned_up(tmp_path: Path) -> None:
    cfg = tiny_sweep("tmp", grid={"version": ["v2"], "depth": [8]})
    run_dir = tmp_path / "tmp" / cfg.runs()[0].run_id
    run_dir.mkdir(parents=True)
    torn = run_dir / ".checkpoint.pt.k2j3h4.tmp"  # a checkpoint's writer killed with SIGKILL mid-write
    torn.write_bytes(b"half a checkpoint")
    old, fresh = tmp_path / "tmp" / ".results.csv.a1b2.tmp", tmp_path / "tmp" / ".results.csv.c3d4.tmp"
    old.write_text("run_id\n"), fresh.write_text("run_id\n")
    os.utime(old, (0, 0))  # a sweep killed long ago; `fresh` may be another sweep's, writing right now
    config = write_config(tmp_path / "tmp.yaml", cfg)
    assert sweep(config, tmp_path).exit_code == 0
    assert not torn.exists() and not old.exists() and fresh.exists()
    assert storage.remove_stale_temps(tmp_path / "tmp") == 1 and not fresh.exists()
