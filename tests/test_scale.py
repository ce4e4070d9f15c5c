"""Sweeps at scale: a grid of 100,000 runs is planned in seconds, --dry-run summarises a long plan, a grid
beyond the limit is refused in one line, and the sweep's own work per run does not grow with the runs done."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from depthbench.cli import app
from depthbench.config import MAX_RUNS, RunConfig
from depthbench.sweep import plan
from tests.conftest import tiny_sweep

runner = CliRunner()


def test_runs_sharing_all_but_their_seed_are_the_runs_validated_one_by_one() -> None:
    # An axis after the seed keeps its place in the order; each run is what validating it alone gives.
    sweep = tiny_sweep(grid={"version": ["v1", "v2"], "depth": [8], "seed": [3, 0, 7], "train.lr": [0.1, 0.05]})
    runs = sweep.runs()
    assert [(r.version, r.seed, r.train.lr) for r in runs[:4]] == [("v1", 3, 0.1), ("v1", 3, 0.05),
                                                                  ("v1", 0, 0.1), ("v1", 0, 0.05)]
    alone = [RunConfig.model_validate(json.loads(r.model_dump_json())) for r in runs]
    assert [r.run_id for r in runs] == [r.run_id for r in alone]
    assert [r.model_dump() for r in runs] == [r.model_dump() for r in alone]
    assert sweep.runs() == runs and sweep.runs() is not sweep.runs()  # expanded once, handed out as copies
    other = sweep.model_copy(update={"grid": {"version": ["v1"], "depth": [8]}})
    assert [r.run_id for r in other.runs()] == [runs[3].run_id]  # v1, seed 0, the sweep's own lr


def test_a_changed_section_gets_its_own_hash() -> None:
    run = tiny_sweep().runs()[0]
    longer = run.model_copy(update={"train": run.train.model_copy(update={"steps": 9})})
    moved = run.model_copy(update={"train": run.train.model_copy(update={"device": "cuda"})})
    assert longer.content_hash != run.content_hash and moved.content_hash == run.content_hash
    assert longer.content_hash == RunConfig.model_validate(json.loads(longer.model_dump_json())).content_hash


def test_a_grid_of_100000_runs_is_loaded_and_planned_in_seconds(tmp_path: Path) -> None:
    started = time.perf_counter()
    sweep = tiny_sweep(grid={"version": ["v1", "v2"], "depth": [8], "seed": list(range(50_000))})
    runs, todo = plan(sweep, tmp_path, device="cpu")
    took = time.perf_counter() - started
    assert len(runs) == len(todo) == 100_000 and len({r.run_id for r in runs}) == 100_000
    assert runs[-1].run_id == f"v2-d8-s49999-{runs[0].content_hash}"
    assert took < 20, f"{took:.1f} s"  # a few seconds on an idle core; a busy shared machine is slower


def big_config(folder: Path, seeds: int, name: str = "big") -> Path:
    """The tiny sweep over 2 versions, 2 depths, ``seeds`` seeds and 2 learning rates, as a YAML file."""
    data = tiny_sweep(name).model_dump(mode="json", exclude_unset=True, exclude={"resources", "reference"})
    data["grid"] = {"version": ["v1", "v2"], "depth": [8, 14], "seed": list(range(seeds)), "train.lr": [0.1, 0.05]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_long_dry_run_shows_its_first_and_last_rows_and_counts_the_rest(tmp_path: Path) -> None:
    config = big_config(tmp_path, 12)
    result = runner.invoke(app, ["sweep", str(config), "--out", str(tmp_path / "runs"), "--dry-run"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│ v")]
    assert len(rows) == 40 and rows[0].startswith("│ v1-d8-s0-") and rows[-1].startswith("│ v2-d14-s11-")
    assert "│ ... 56 more runs" in result.output
    assert result.output.strip().splitlines()[-5:] == [
        "96 runs by state: pending -> to do 96 (--all lists every run)",
        "version: v1 (48 runs), v2 (48 runs)",
        "depth: 8 (48 runs), 14 (48 runs)",
        "seed: 12 values, 0 to 11, 8 run(s) each",
        "train.lr: 0.1 (48 runs), 0.05 (48 runs)",
    ]
    every = runner.invoke(app, ["sweep", str(config), "--out", str(tmp_path / "runs"), "--dry-run", "--all"])
    assert len([line for line in every.output.splitlines() if line.startswith("│ v")]) == 96
    assert every.output.strip().splitlines()[-1].startswith("grid: version: v1, v2; depth: 8, 14; seed: 0, 1, 2")


def test_a_grid_beyond_the_limit_is_refused_in_one_line_before_it_is_expanded(tmp_path: Path) -> None:
    seeds = MAX_RUNS // 8 + 1
    config = big_config(tmp_path, seeds)
    result = runner.invoke(app, ["sweep", str(config), "--out", str(tmp_path / "runs"), "--dry-run"])
    assert result.exit_code == 2
    assert result.output == (f"error: {config}: grid: {8 * seeds:,} runs, more than the limit of {MAX_RUNS:,}; "
                             f"check its axes, or raise the limit with --max-runs {8 * seeds}\n")
    small = big_config(tmp_path, 3, "small")
    refused = runner.invoke(app, ["sweep", str(small), "--out", str(tmp_path / "runs"), "--max-runs", "20"])
    assert refused.exit_code == 2 and "grid: 24 runs, more than the limit of 20;" in refused.output
    allowed = runner.invoke(app, ["sweep", str(small), "--out", str(tmp_path / "runs"), "--max-runs", "24",
                                  "--dry-run"])
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.parametrize(("seed", "problem"), [
    ("-1", "seed: input should be greater than or equal to 0 (in grid run version=v1, depth=8, seed=-1, "
           "train.lr=0.1)"),
    ("true", "grid.seed[1]: expected a number, got 'true' (YAML reads it as a boolean)"),
])
def test_a_bad_seed_is_one_line_as_before(seed: str, problem: str, tmp_path: Path) -> None:
    config = big_config(tmp_path, 2)
    result = runner.invoke(app, ["sweep", str(config), "--set", f"grid.seed=[0, {seed}]", "--dry-run"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert problem in result.output, result.output


def test_a_sweep_reads_its_run_folders_twice_however_many_runs_it_has(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Once when it starts and once when it ends; each finished run's folder alone in between, so the sweep's
    # own work per run does not grow with the runs done. The table it leaves is the one rebuilt from scratch.
    import depthbench.results as results
    from depthbench.sweep import run_sweep

    reads: list[Path] = []
    read_runs = results.read_runs
    monkeypatch.setattr(results, "read_runs", lambda folder, planned=(): reads.append(folder) or read_runs(folder, planned))
    sweep = tiny_sweep(train={"steps": 1, "eval_every": 1, "log_every": 1, "checkpoint_every": 1},
                       grid={"version": ["v2"], "depth": [8], "seed": [0, 1, 2, 3, 4]})
    run_sweep(sweep, tmp_path, handle_signals=False)
    assert reads == [tmp_path / "tiny"] * 2
    written = (tmp_path / "tiny" / "results.csv").read_text()
    assert written == results.collect(tmp_path / "tiny", sweep).to_csv(index=False)
    assert written.count("completed") == 5
