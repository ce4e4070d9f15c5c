"""Failures never cost a result: failing runs are recorded and skipped, bad input is one line and exit 2,
and a runs/ folder left broken (torn logs, corrupt files, a full disk) is repaired run by run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

import depthbench.sweep
from depthbench import storage
from depthbench.cli import app
from depthbench.train import train_run
from tests.conftest import ROOT, tiny_run

runner = CliRunner()


def config_file(folder: Path, name: str = "f", **train: object) -> Path:
    data = {
        "name": name,
        "dataset": {"name": "synthetic", "train_subset": 128, "test_subset": 64, "image_size": 8},
        "model": {"width": 4},
        "train": {"steps": 8, "batch_size": 16, "lr": 0.05, "eval_every": 4, "log_every": 2,
                  "checkpoint_every": 4, "device": "cpu", **train},
        "grid": {"version": ["v1", "v2"], "depth": [8], "seed": [0, 1]},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sweep(config: Path, out: Path, *extra: str):
    return runner.invoke(app, ["sweep", str(config), "--out", str(out), *extra])


@pytest.fixture
def fail_v1_seed1(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make one run raise inside training, as a data or numerical error would."""
    real = depthbench.sweep.train_run

    def flaky(cfg, run_dir, **kwargs):
        if cfg.version == "v1" and cfg.seed == 1:
            raise RuntimeError("boom in the data pipeline")
        return real(cfg, run_dir, **kwargs)

    monkeypatch.setattr(depthbench.sweep, "train_run", flaky)


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path: Path, fail_v1_seed1: None) -> None:
    result = sweep(config_file(tmp_path), tmp_path / "runs")
    assert result.exit_code == 1
    assert "✗ v1-d8-s1-" in result.output and "RuntimeError: boom in the data pipeline" in result.output
    assert "1 run(s) failed" in result.output and "--retry-failed" in result.output
    table = pd.read_csv(tmp_path / "runs/f/results.csv")
    assert sorted(table.status) == ["completed", "completed", "completed", "failed"]
    failed = table[table.status == "failed"].iloc[0]
    assert not failed.success and failed.error == "RuntimeError: boom in the data pipeline"
    log = (tmp_path / "runs/f" / failed.run_id / "error.log").read_text()
    assert "Traceback" in log and "boom in the data pipeline" in log
    # A plain re-run leaves the failure alone (and still says so); --retry-failed redoes only it.
    again = sweep(config_file(tmp_path), tmp_path / "runs")
    assert again.exit_code == 1 and "0 to do" in again.output


def test_retry_failed_reruns_only_failed_runs(tmp_path: Path, fail_v1_seed1: None, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_file(tmp_path)
    sweep(config, tmp_path / "runs")
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs/f").glob("*/result.json")}
    monkeypatch.undo()
    result = sweep(config, tmp_path / "runs", "--retry-failed")
    assert result.exit_code == 0, result.output
    assert "1 to do" in result.output
    table = pd.read_csv(tmp_path / "runs/f/results.csv")
    assert set(table.status) == {"completed"}
    changed = [p for p, t in done.items() if p.stat().st_mtime_ns != t]
    assert [p.parent.name.split("-")[:3] for p in changed] == [["v1", "d8", "s1"]]


def test_fail_fast_stops_at_the_first_failure(tmp_path: Path, fail_v1_seed1: None) -> None:
    result = sweep(config_file(tmp_path), tmp_path / "runs", "--fail-fast")
    assert result.exit_code == 1
    table = pd.read_csv(tmp_path / "runs/f/results.csv")
    # grid order: v1 s0, v1 s1 (fails), then nothing more: the v2 runs are listed as never started
    assert list(table.status) == ["completed", "failed", "pending", "pending"]
    assert not any((tmp_path / "runs/f" / run_id).exists() for run_id in table.run_id[2:])


def test_diverged_is_a_result_not_a_failure(tmp_path: Path) -> None:
    result = sweep(config_file(tmp_path, lr=1e6, steps=20, milestones=[0.9]), tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "diverged (non-finite loss)" in result.output
    table = pd.read_csv(tmp_path / "runs/f/results.csv")
    assert set(table.status) == {"diverged"} and not table.success.any()


def test_second_ctrl_c_aborts_with_one_line_saying_how_to_resume(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def abort(*args, **kwargs):
        raise KeyboardInterrupt  # what the sweep's handler raises on a second Ctrl-C

    monkeypatch.setattr(depthbench.sweep, "run_sweep", abort)
    config = config_file(tmp_path)
    result = sweep(config, tmp_path / "runs")
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.output.strip() == (f"aborted: runs in progress keep their last checkpoint; "
                                     f"run `depthbench sweep {config} --out {tmp_path / 'runs'}` again to resume")


def test_the_resume_line_repeats_the_options_that_say_where_runs_train(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(sweep, out, **kwargs):
        return depthbench.sweep.SweepOutcome(Path(out) / sweep.name, [], interrupted=True)

    monkeypatch.setattr(depthbench.sweep, "run_sweep", interrupted)
    config = config_file(tmp_path)
    result = sweep(config, tmp_path / "runs", "--jobs", "2", "--device", "cpu", "--tensorboard")
    assert result.exit_code == 130
    assert (f"run `depthbench sweep {config} --out {tmp_path / 'runs'} --device cpu --jobs 2 --tensorboard` "
            "again to resume") in result.output


def test_out_of_memory_says_what_to_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(depthbench.sweep, "train_run", oom)
    result = sweep(config_file(tmp_path), tmp_path / "runs")
    assert result.exit_code == 1
    assert "out of memory" in result.output
    assert "lower train.batch_size or set model.checkpointing: 1 (segments per stage" in result.output


@pytest.mark.parametrize(("depth", "checkpointing", "advice"), [
    (1001, 0, "set model.checkpointing: 11 (segments per stage"),  # n = 111 units per stage
    (1001, True, "set model.checkpointing: 11 (segments per stage"),  # one per unit keeps all 111 inputs
    (110, 0, "set model.checkpointing: 4 (segments per stage"),  # basic, n = 18
    (1001, 11, "lower train.batch_size (activation checkpointing is already on)"),
])
def test_out_of_memory_advice_names_the_segments_that_save_most(depth: int, checkpointing: object, advice: str) -> None:
    cfg = tiny_run(grid={"version": ["v2"], "depth": [depth], "seed": [0]}, model={"checkpointing": checkpointing})
    assert advice in depthbench.sweep._failure_message(torch.OutOfMemoryError("CUDA out of memory."), cfg)


# ---- bad input: one line, exit 2, no traceback, nothing written ------------------------------------

def _bad_yaml(tmp: Path, text: str) -> Path:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return path


def _with(tmp: Path, **changes: object) -> Path:
    data = yaml.safe_load(config_file(tmp).read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return _bad_yaml(tmp, yaml.safe_dump(data))


BAD_INPUT = {
    "yaml_syntax": (lambda t: _bad_yaml(t, "name: x\ngrid: {version: [v1, depth: [8]}\n"), "YAML does not parse at line 2"),
    "missing_file": (lambda t: t / "nope.yaml", "does not exist"),
    "empty_file": (lambda t: _bad_yaml(t, ""), "is empty"),
    "unknown_nested_key": (lambda t: _with(t, **{"train.warmup.stpes": 3}), "unknown key 'train.warmup.stpes' (did you mean 'steps'?)"),
    "wrong_type": (lambda t: _with(t, **{"train.batch_size": "big"}), "train.batch_size: input should be a valid integer"),
    "missing_required": (lambda t: _bad_yaml(t, "grid: {version: [v1], depth: [8]}\n"), "missing required key 'name'"),
    "bad_depth": (lambda t: _with(t, **{"grid.depth": [9]}), "depth 9 fits no block type"),
    "unknown_version": (lambda t: _with(t, **{"grid.version": ["v1", "v4"]}), "'v4' is not allowed"),
    "zero_lr": (lambda t: _with(t, **{"train.lr": 0}), "train.lr: input should be greater than 0"),
    "zero_steps": (lambda t: _with(t, **{"train.steps": 0}), "train.steps: input should be greater than 0"),
    "negative_batch": (lambda t: _with(t, **{"train.batch_size": -1}), "train.batch_size: input should be greater than 0"),
    "milestone_past_end": (lambda t: _with(t, **{"train.milestones": [4, 9]}), "step 9 is beyond steps (8)"),
    "empty_grid_list": (lambda t: _with(t, **{"grid.seed": []}), "'seed' is an empty list"),
    "duplicate_grid_value": (lambda t: _with(t, **{"grid.seed": [1, 1]}), "'seed' lists 1 more than once"),
    "unrecorded_metric": (lambda t: _with(t, **{"success.metric": "f1"}), "'f1' is not recorded"),
    "cifar_offline": (lambda t: _with(t, **{"dataset": {"name": "cifar10", "root": str(t / "cifar")}}), str("cifar")),
    "imagefolder_no_split": (lambda t: _with(t, **{"dataset": {"name": "imagefolder", "root": str(t)}}), "train"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make, expected = BAD_INPUT[case]
    if case == "cifar_offline":
        import urllib.request

        def offline(*args, **kwargs):
            raise OSError("network is unreachable")

        monkeypatch.setattr(urllib.request, "urlopen", offline)
    config = make(tmp_path)
    result = sweep(config, tmp_path / "runs")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and expected in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_unknown_device_option_is_one_line_exit_2(tmp_path: Path) -> None:
    result = sweep(config_file(tmp_path), tmp_path / "runs", "--device", "gpu")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == "error: --device 'gpu' is unknown; auto, cpu, cuda or cuda:N"
    assert not (tmp_path / "runs").exists()


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = sweep(config_file(tmp_path), blocker / "runs")
    assert result.exit_code == 2
    assert result.output.startswith("error: cannot write to output folder") and "--out" in result.output


def _images(root: Path, layout: dict[str, int]) -> None:
    from PIL import Image

    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / folder / f"{i}.png")


@pytest.mark.parametrize(
    ("layout", "junk", "expected"),
    [
        ({"train/cat": 2, "train/dog": 2, "test/cat": 2}, None, "dog"),
        ({"train/cat": 2, "train/dog": 2, "test/cat": 2, "test/dog": 2}, "train/dog/notes.png", "notes.png"),
    ],
    ids=["class_missing_in_test", "non_image_file"],
)
def test_imagefolder_problems(tmp_path: Path, layout: dict, junk: str | None, expected: str) -> None:
    root = tmp_path / "images"
    _images(root, layout)
    if junk:
        (root / junk).write_text("this is not an image")
    config = _with(tmp_path, **{"dataset": {"name": "imagefolder", "root": str(root)}, "train.batch_size": 2})
    result = sweep(config, tmp_path / "runs")
    assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# ---- a broken runs/ folder is detected and repaired, one run at a time ------------------------------

@pytest.fixture
def finished(tmp_path: Path) -> tuple[Path, Path]:
    """A finished 4-run sweep and its config, with checkpoints kept so runs can be damaged mid-way."""
    config = config_file(tmp_path, keep_checkpoint="full")
    assert sweep(config, tmp_path / "runs").exit_code == 0
    return config, tmp_path / "runs" / "f"


def _rewind(run_dir: Path, step: int) -> None:
    """Put a finished run back to how a crash at `step` leaves it (checkpoint at `step`, no result)."""
    cfg_path = run_dir / "config.yaml"
    from depthbench.config import load_run_config

    cfg = load_run_config(cfg_path).model_copy()
    scratch = run_dir.parent / f".scratch-{run_dir.name}"
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > step

    from depthbench.train import RunInterrupted

    with pytest.raises(RunInterrupted):
        train_run(cfg, scratch, should_stop=stop)
    for name in ("checkpoint.pt", "metrics.jsonl"):
        os.replace(scratch / name, run_dir / name)
    (run_dir / "result.json").unlink()
    (run_dir / "final.pt").unlink(missing_ok=True)


def _others_untouched(sweep_dir: Path, damaged: Path):
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/result.json") if p.parent != damaged}

    def check() -> None:
        assert before == {p: p.stat().st_mtime_ns for p in before}

    return check


def test_torn_metrics_line_resumes_from_checkpoint(finished: tuple[Path, Path]) -> None:
    config, sweep_dir = finished
    run_dir = sorted(sweep_dir.glob("v2-*"))[0]
    expected = json.loads((run_dir / "result.json").read_text())
    untouched = _others_untouched(sweep_dir, run_dir)
    _rewind(run_dir, 5)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "lr": 0.0')  # the crash tore this append
    result = sweep(config, sweep_dir.parent)
    assert result.exit_code == 0 and "1 to do" in result.output
    again = json.loads((run_dir / "result.json").read_text())
    assert again["test_acc"] == expected["test_acc"] and again["train_loss"] == expected["train_loss"]
    assert [r["step"] for r in storage.read_jsonl(run_dir / "metrics.jsonl")] == [2, 4, 6, 8]
    untouched()


def test_metrics_missing_rows_restarts_the_run(finished: tuple[Path, Path]) -> None:
    config, sweep_dir = finished
    run_dir = sorted(sweep_dir.glob("v1-*"))[0]
    expected = json.loads((run_dir / "result.json").read_text())
    _rewind(run_dir, 6)
    rows = storage.read_jsonl(run_dir / "metrics.jsonl")
    storage.write_jsonl(run_dir / "metrics.jsonl", rows[1:])  # lost the first row
    result = sweep(config, sweep_dir.parent)
    assert result.exit_code == 0
    assert "metrics.jsonl is damaged (2 of 3 rows), starting over" in result.output
    assert json.loads((run_dir / "result.json").read_text())["test_acc"] == expected["test_acc"]
    assert [r["step"] for r in storage.read_jsonl(run_dir / "metrics.jsonl")] == [2, 4, 6, 8]


def test_corrupt_checkpoint_restarts_the_run(finished: tuple[Path, Path]) -> None:
    config, sweep_dir = finished
    run_dir = sorted(sweep_dir.glob("v1-*"))[1]
    expected = json.loads((run_dir / "result.json").read_text())
    untouched = _others_untouched(sweep_dir, run_dir)
    _rewind(run_dir, 4)
    (run_dir / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
    result = sweep(config, sweep_dir.parent)
    assert result.exit_code == 0 and UNREADABLE in result.output
    assert json.loads((run_dir / "result.json").read_text())["test_acc"] == expected["test_acc"]
    untouched()


UNREADABLE = "checkpoint is unreadable or holds more than tensors and plain data; not loaded, starting the run over"


class _Payload:
    """What a hostile checkpoint pickles: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_checkpoint_never_runs_its_code(finished: tuple[Path, Path], tmp_path: Path) -> None:
    config, sweep_dir = finished
    run_dir = sorted(sweep_dir.glob("v2-*"))[0]
    expected = json.loads((run_dir / "result.json").read_text())
    _rewind(run_dir, 4)
    marker = tmp_path / "pwned"
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, run_dir / "checkpoint.pt")  # a valid checkpoint, plus code
    result = sweep(config, sweep_dir.parent)
    assert not marker.exists()
    assert result.exit_code == 0 and f"{run_dir.name}: {UNREADABLE}" in result.output
    assert json.loads((run_dir / "result.json").read_text())["test_acc"] == expected["test_acc"]


def test_resuming_on_another_device_or_precision_is_refused_unless_asked(finished: tuple[Path, Path]) -> None:
    config, sweep_dir = finished
    run_dir = sorted(sweep_dir.glob("v1-*"))[0]
    expected = json.loads((run_dir / "result.json").read_text())
    _rewind(run_dir, 4)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    here = expected["precision"]  # precision auto: bfloat16 on CPUs with native bf16, float32 elsewhere
    assert (state["device_type"], state["precision"]) == ("cpu", here)  # recorded by the trainer
    torch.save({**state, "device_type": "cuda", "precision": "bfloat16"}, run_dir / "checkpoint.pt")
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}

    refused = sweep(config, sweep_dir.parent)
    assert refused.exit_code == 2
    assert refused.output == (
        f"error: {run_dir.name}: its checkpoint was trained on cuda in bfloat16, this resume would run on cpu in "
        f"{here}; resume it where it started (--device cuda, train.precision bf16) or pass --allow-device-change "
        "to continue here\n")
    assert before == {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}  # nothing written

    allowed = sweep(config, sweep_dir.parent, "--allow-device-change")
    assert allowed.exit_code == 0 and "resumed from its checkpoint at step 4" in allowed.output
    assert json.loads((run_dir / "result.json").read_text())["test_acc"] == expected["test_acc"]


def test_unparseable_result_is_redone(finished: tuple[Path, Path]) -> None:
    config, sweep_dir = finished
    run_dir = sorted(sweep_dir.glob("v2-*"))[1]
    expected = json.loads((run_dir / "result.json").read_text())
    untouched = _others_untouched(sweep_dir, run_dir)
    (run_dir / "result.json").write_text('{"status": "compl')
    result = sweep(config, sweep_dir.parent)
    assert result.exit_code == 0 and "result.json is unreadable, redoing the run" in result.output
    assert json.loads((run_dir / "result.json").read_text())["test_acc"] == expected["test_acc"]
    untouched()


# ---- a disk that fills up -----------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): " + made.stderr.decode().strip())
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_up_interrupts_the_run_keeps_earlier_results_and_a_plain_rerun_resumes(
        small_disk: Path, tmp_path: Path) -> None:
    config = config_file(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["grid"]["seed"] = [0]
    config.write_text(yaml.safe_dump(data))
    assert sweep(config, small_disk).exit_code == 0
    before = (small_disk / "f/results.csv").read_text()
    results = {p: p.read_bytes() for p in small_disk.glob("f/*/result.json")}
    # Fill the disk to its last few KB, then ask for one more seed.
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - 24 * 1024))
    data["grid"]["seed"] = [0, 1]
    config.write_text(yaml.safe_dump(data))
    result = sweep(config, small_disk)
    assert result.exit_code == 75, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("stopped: ") and last.endswith(
        f"then run `depthbench sweep {config} --out {small_disk}` to resume"), last
    assert "Traceback" not in result.output and not list(small_disk.glob("f/*/error.log"))
    # The checkpoint was refused before it filled the disk, so the table still had room to be updated.
    assert "not enough free space for checkpoint.pt" in last
    assert set(before.splitlines()) <= set((small_disk / "f/results.csv").read_text().splitlines())
    assert results == {p: p.read_bytes() for p in results}
    assert not list(small_disk.glob("f/*/.*.tmp"))
    # Free the space: a plain re-run does what is left.
    (small_disk / "filler").unlink()
    again = sweep(config, small_disk)
    assert again.exit_code == 0, again.output
    assert set(pd.read_csv(small_disk / "f/results.csv").status) == {"completed"}
    assert ROOT.exists()


def test_a_refusal_met_on_a_worker_fails_that_run_with_its_own_line(finished: tuple[Path, Path]) -> None:
    # A Ray or SLURM worker meets the checkpoint only when it starts the run: the run fails, with the
    # refusal as its message (no exception type in front), and the sweep goes on.
    from depthbench.config import load_run_config
    from depthbench.sweep import execute_run

    _, sweep_dir = finished
    run_dir = sorted(sweep_dir.glob("v2-*"))[1]
    _rewind(run_dir, 4)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    here = state["precision"]
    torch.save({**state, "device_type": "cuda"}, run_dir / "checkpoint.pt")
    outcome = execute_run(load_run_config(run_dir / "config.yaml"), sweep_dir)
    assert outcome.status == "failed"
    assert outcome.message.startswith(f"{run_dir.name}: its checkpoint was trained on cuda in {here}, this resume "
                                      f"would run on cpu in {here};")
    assert json.loads((run_dir / "result.json").read_text())["error"] == outcome.message
    assert (run_dir / "checkpoint.pt").exists()  # kept for a resume where it started
