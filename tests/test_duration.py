"""A sweep's duration before it runs (depthbench.duration): the arithmetic and the cache on injected timings,
the --dry-run columns and lines, and one real short sweep whose estimate meets what happened."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from depthbench import duration, storage
from depthbench.cli import app
from depthbench.config import load_sweep
from depthbench.duration import ShapeTiming, SweepEstimate, format_duration, run_seconds, wall_time
from tests.conftest import ROOT, tiny_run

runner = CliRunner()

SMOKE = ROOT / "configs" / "smoke.yaml"  # 8 runs, 4 shapes (v1, v2 x depth 8, 11), 12 steps, eval every 6
TIMING = ShapeTiming(step_s=0.5, eval_s=2.0, setup_s=1.0)


@pytest.fixture(autouse=True)
def _own_timings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test its own timings cache: injected timings must not stand in for a later test's real ones.
    monkeypatch.setattr(duration, "cache_path", lambda: tmp_path / "cache" / duration.CACHE_FILE)
    # A quiet machine, whatever else runs beside the tests; the busy case is tested on its own.
    monkeypatch.setattr(duration, "busy_cores", lambda: 0.0)


def fixed(calls: list[str]) -> duration.Measure:
    def measure(run, threads: int) -> ShapeTiming:
        calls.append(f"{run.version}-d{run.depth}/{threads}")
        return TIMING

    return measure


def test_a_run_is_its_steps_evaluations_and_setup() -> None:
    run = tiny_run(train={"steps": 10, "eval_every": 4})  # evaluations at 4, 8 and the last step, 10
    assert run_seconds(run, TIMING) == 10 * 0.5 + 3 * 2.0 + 1.0
    assert run_seconds(run, TIMING, done_steps=4) == 6 * 0.5 + 2 * 2.0 + 1.0  # resumed: 8 and 10 left
    assert run_seconds(run, TIMING, done_steps=10) == 0.0
    assert run_seconds(tiny_run(train={"steps": 8, "eval_every": 4}), TIMING) == 8 * 0.5 + 2 * 2.0 + 1.0


def test_diagnose_steps_left_are_counted() -> None:
    timing = ShapeTiming(step_s=0.5, eval_s=2.0, setup_s=1.0, diagnose_s=4.0)
    run = tiny_run(train={"steps": 10, "eval_every": 4, "diagnose_steps": [0, 5, 9]})
    assert run_seconds(run, timing) == 10 * 0.5 + 3 * 2.0 + 3 * 4.0 + 1.0
    assert run_seconds(run, timing, done_steps=6) == 4 * 0.5 + 2 * 2.0 + 1 * 4.0 + 1.0  # step 9 left
    key = duration.shape_key(run, torch.device("cpu"), threads=1)
    assert key["diagnose"] and not duration.shape_key(tiny_run(), torch.device("cpu"), threads=1)["diagnose"]


def test_wall_time_lays_runs_out_in_order_on_the_slots() -> None:
    assert wall_time([3, 1, 1, 1], 2) == 3  # one slot takes the 3, the other the three 1s
    assert wall_time([1, 2, 3], 2) == 4  # the 3 starts when the 1 ends
    assert wall_time([1, 2, 3], 1) == 6
    assert wall_time([5], 4) == 5
    assert wall_time([], 2) == 0
    estimate = SweepEstimate({"a": 0.1, "b": 0.1}, {"a": 30.0, "b": 90.0}, jobs=2)
    assert (estimate.total_s, estimate.wall_s) == (120.0, 90.0)


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.0123, "12 ms"), (42.4, "42 s"), (185, "3 min 05 s"), (7620, "2 h 07 min")])
def test_durations_read_plainly(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_each_shape_is_measured_once_and_cached(tmp_path: Path) -> None:
    runs = load_sweep(SMOKE).runs()
    calls: list[str] = []
    threads = torch.get_num_threads()  # one job: this process's threads
    first = duration.estimate_sweep(runs, tmp_path, jobs=1, measure=fixed(calls))
    assert sorted(calls) == sorted(f"{v}-d{d}/{threads}" for v in ("v1", "v2") for d in (8, 11))
    assert first.run_s == {r.run_id: 12 * 0.5 + 2 * 2.0 + 1.0 for r in runs}
    assert len(storage.read_json(duration.cache_path())) == 4

    again: list[str] = []  # a second dry-run, the sweep's own start line, a resume: nothing measured
    assert duration.estimate_sweep(runs, tmp_path, jobs=1, measure=fixed(again)).run_s == first.run_s
    assert again == []


def test_a_trial_on_a_busy_machine_says_so_and_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             ) -> None:
    runs = load_sweep(SMOKE).runs()[:1]
    monkeypatch.setattr(duration, "busy_cores", lambda: 1.6)
    estimate = duration.estimate_sweep(runs, tmp_path, jobs=1, measure=fixed([]))
    assert estimate.busy == 1.6 and storage.read_json(duration.cache_path()) is None
    assert "timed while other work kept 1.6 of " in duration.estimate_line(estimate)
    assert "cores busy, so likely long, and not cached; --no-estimate skips)" in duration.estimate_line(estimate)
    monkeypatch.setattr(duration, "busy_cores", lambda: 0.1)  # quiet again: measured anew, and cached
    calls: list[str] = []
    assert duration.estimate_sweep(runs, tmp_path, jobs=1, measure=fixed(calls)).busy is None
    assert len(calls) == 1 and len(storage.read_json(duration.cache_path())) == 1


def test_under_jobs_a_cpu_trial_runs_as_that_many_copies_at_once() -> None:
    # Real trials in two processes; the timing is the copies' mean, so it is a plain positive timing.
    run = tiny_run()
    timings, busy = duration.shape_timings([run], jobs=2)
    timing = timings[run.run_id]
    assert busy is None and timing.step_s > 0 and timing.eval_s > 0 and timing.diagnose_s == 0.0
    assert len(storage.read_json(duration.cache_path())) == 1


def test_the_cache_key_is_device_torch_threads_and_shape() -> None:
    run = tiny_run()
    key = duration.shape_key(run, torch.device("cpu"), threads=1)
    assert key["torch"] == torch.__version__ and key["threads"] == 1 and key["device"].endswith("cores")
    # Seeds, rates and step counts change no step's time; the batch and the precision do.
    same = [tiny_run(train={"lr": 0.2, "steps": 50}), tiny_run(grid={"version": ["v2"], "depth": [8], "seed": [3]})]
    assert all(duration.shape_key(r, torch.device("cpu"), 1) == key for r in same)
    other = [tiny_run(train={"batch_size": 32}), tiny_run(train={"precision": "bf16"})]
    assert all(duration.shape_key(r, torch.device("cpu"), 1) != key for r in other)
    assert duration.shape_key(run, torch.device("cpu"), 2) != key


def test_a_run_that_compiles_is_timed_compiled_with_its_compilation_in_its_setup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under compile auto a long bf16 run on a CPU with AMX compiles and a short one does not: the two are
    timed apart, each as it will train, and the compiled trial's first-step compilation is counted once."""
    from depthbench import devices

    monkeypatch.setattr(devices, "_amx", lambda: True)
    monkeypatch.setattr(devices, "cpp_compiler", lambda: True)

    class SlowFirstCall(torch.nn.Module):  # stands in for a compiled model: its first call compiles
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model, self.calls = model, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 1:
                time.sleep(0.5)
            return self.model(x)

    monkeypatch.setattr(torch, "compile", SlowFirstCall)
    long = tiny_run(train={"precision": "bf16", "steps": devices.COMPILE_MIN_STEPS})
    short = tiny_run(train={"precision": "bf16", "steps": devices.COMPILE_MIN_STEPS - 1})
    cpu = torch.device("cpu")
    assert duration.shape_key(long, cpu, 1)["train"]["compile"] is True
    assert duration.shape_key(short, cpu, 1)["train"]["compile"] is False
    compiled, eager = duration.measure_shape(long, 1), duration.measure_shape(short, 1)
    assert compiled.compile_s >= 0.5 > compiled.step_s and eager.compile_s == 0.0
    # Compiled once per shape: from the cached trial, the first run of it carries the compilation and the next
    # reuses the compiled code; right after a trial in this process, which compiled it, none pays it.
    seeds = [long, tiny_run(grid={"version": ["v2"], "depth": [8], "seed": [1]},
                            train={"precision": "bf16", "steps": devices.COMPILE_MIN_STEPS})]
    plain = duration.run_seconds(long, compiled)
    fresh = duration.estimate_sweep(seeds, Path("/nonexistent"), 1, measure=lambda run, threads: compiled)
    assert [fresh.run_s[run.run_id] for run in seeds] == pytest.approx([plain, plain])
    again = duration.estimate_sweep(seeds, Path("/nonexistent"), 1, measure=lambda run, threads: pytest.fail("cached"))
    assert [again.run_s[run.run_id] for run in seeds] == pytest.approx([plain + compiled.compile_s, plain])


def test_dry_run_shows_each_runs_time_and_the_total(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(duration._Trials, "measure", lambda self, run, threads, alongside: TIMING)
    result = runner.invoke(app, ["sweep", str(SMOKE), "--out", str(tmp_path), "--dry-run", "--jobs", "2"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # Each run: 12 steps x 0.5 s, 2 evaluations x 2 s, 1 s setup = 11 s; 8 runs on 2 slots.
    assert result.output.count("│ 500 ms │ 11 s │") == 8
    assert ("estimated: 8 run(s), 1 min 28 s of training in all, 44 s wall time with --jobs 2 "
            "(3 timed steps per shape on this machine; --no-estimate skips)") in result.output

    skipped = runner.invoke(app, ["sweep", str(SMOKE), "--out", str(tmp_path), "--dry-run", "--no-estimate"],
                            catch_exceptions=False)
    assert "estimated: " not in skipped.output and "500 ms" not in skipped.output


def test_a_real_sweep_takes_about_its_estimate(tmp_path: Path) -> None:
    # Real trials and a real sweep (4 runs of 12 steps). Timings on a shared machine are noisy, so the bound
    # is generous: the test is that the estimate is of the right size, not its precision.
    result = runner.invoke(app, ["sweep", str(SMOKE), "--out", str(tmp_path), "--set", "grid.seed=[0]"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert re.search(r"estimated: 4 run\(s\), .* wall time with --jobs 1", result.output)
    off = int(re.search(r"took .*, estimated .* \(([+-]\d+)%\)", result.output).group(1))
    assert -67 <= off <= 200, result.output

    # The report sets the estimate kept in the sweep folder beside what the runs took.
    saved = storage.read_json(tmp_path / "smoke" / "estimate.json")
    assert saved["jobs"] == 1 and len(saved["run_s"]) == 4 and saved["wall_s"] == pytest.approx(sum(saved["run_s"].values()), abs=0.01)
    report = runner.invoke(app, ["report", str(tmp_path / "smoke")], catch_exceptions=False)
    assert report.exit_code == 0, report.output
    line = next(x for x in (tmp_path / "smoke" / "report.md").read_text().splitlines() if x.startswith("Duration: "))
    assert re.fullmatch(r"Duration: when the sweep last started, a trial of each distinct net estimated its 4 run\(s\) "
                        r"at [\d,]+ s of training \([\d,]+ s of wall time with --jobs 1\); the 4 of them that "
                        r"finished were estimated at [\d,]+ s and took [\d,]+ s \([+-]\d+%\)\.", line), line


def test_a_cifar_run_is_timed_on_synthetic_images_of_its_shape() -> None:
    run = tiny_run(dataset={"name": "cifar100", "train_subset": None, "test_subset": None, "image_size": None})
    trial = duration._trial_dataset(run, duration.known_shape(run.dataset))
    assert (trial.name, trial.image_size, trial.num_classes, trial.test_subset) == ("synthetic", 32, 100, 10_000)
    assert trial.train_subset == 16 * (duration.TRIAL_WARMUP + duration.TRIAL_STEPS + 1)
    digits = tiny_run(dataset={"name": "digits", "image_size": 8, "train_subset": None, "test_subset": None})
    assert duration._trial_dataset(digits, duration.known_shape(digits.dataset)) == digits.dataset


def test_the_reports_duration_line_counts_every_finished_run_pruned_ones_too(tmp_path: Path) -> None:
    import pandas as pd

    from depthbench.report import duration_note

    storage.write_json(tmp_path / "estimate.json", {"jobs": 2, "wall_s": 30.0, "run_s": {"a": 20.0, "b": 10.0, "c": 30.0}})
    table = pd.DataFrame({"run_id": ["a", "b", "c"], "status": ["completed", "pruned", "partial"],
                          "wall_s": [25.0, 11.0, None]})
    assert duration_note(tmp_path, table) == (
        "Duration: when the sweep last started, a trial of each distinct net estimated its 3 run(s) at 60 s of "
        "training (30 s of wall time with --jobs 2); the 2 of them that finished were estimated at 30 s and took "
        "36 s (+20%).")
    assert duration_note(tmp_path / "none", table) is None
