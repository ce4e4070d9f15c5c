"""Every unit placement and shortcut gate of [V2] trains in a real sweep, with diagnostics and TensorBoard
event files per run; sub-grids and the paper configs resolve to the paper's rows."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from depthbench.cli import app
from depthbench.config import ConfigError, load_sweep, parse_sweep
from depthbench.diagnose import read_diagnostics
from depthbench.errors import DepthbenchError
from depthbench.models import PLACEMENTS, SHORTCUT_GATES
from depthbench.sweep import RunFlags, run_sweep
from depthbench.tracking import EVENTS_DIR, TensorBoardLogger
from depthbench.train import TrainingProgress
from tests.conftest import ROOT

UNITS = list(PLACEMENTS)
GATES = list(SHORTCUT_GATES)


TINY = {
    "dataset": {"name": "synthetic", "train_subset": 64, "test_subset": 32, "image_size": 8},
    "model": {"width": 4},
    "train": {"steps": 4, "batch_size": 16, "lr": 0.05, "eval_every": 4, "log_every": 2, "checkpoint_every": 4,
              "device": "cpu", "diagnose_steps": [0, 2], "keep_checkpoint": "none"},
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, list]:
    """7 units x {basic 8, bottleneck 11} and 6 gates x {basic 8, bottleneck 11}: 26 runs, a few seconds."""
    sweep = parse_sweep({
        "name": "variants", **TINY,
        "grid": [
            {"version": ["v1"], "depth": [8, 11], "model.unit": UNITS},
            # each gate with the settings it reads (another gate's are refused)
            {"version": ["v1"], "depth": [8, 11], "model.shortcut_gate": ["identity", "conv1x1", "dropout"]},
            {"version": ["v1"], "depth": [8, 11], "model.shortcut_gate": ["constant_scaling"],
             "model.shortcut_scale": [0.5]},
            {"version": ["v1"], "depth": [8, 11], "model.shortcut_gate": ["exclusive_gating", "shortcut_only_gating"],
             "model.gate_bias": [-2.0]},
        ],
    })
    out = tmp_path_factory.mktemp("runs")
    outcome = run_sweep(sweep, out, handle_signals=False, flags=RunFlags(tensorboard=True))
    return outcome.sweep_dir, pd.read_csv(outcome.sweep_dir / "results.csv"), outcome.outcomes


def test_every_unit_and_gate_trains_to_a_finite_loss(variants: tuple[Path, pd.DataFrame, list]) -> None:
    _, table, outcomes = variants
    # the unit sub-grid's "original" runs and the gate sub-grid's "identity" runs differ only in whether
    # model.unit is set, which is part of what a run is: 14 + 12 distinct runs
    assert len(outcomes) == 2 * len(UNITS) + 2 * len(GATES) and {o.status for o in outcomes} == {"completed"}
    assert all(math.isfinite(o.result["train_loss"]) and 0 <= o.result["test_acc"] <= 1 for o in outcomes)
    blocks = dict(zip(table.depth, table.block, strict=False))
    assert blocks == {8: "basic", 11: "bottleneck"}
    units = table.dropna(subset=["model.unit"])
    assert sorted(zip(units["model.unit"], units.depth)) == sorted((u, d) for u in UNITS for d in (8, 11))
    gates = table[table["model.unit"].isna()]
    assert sorted(zip(gates["model.shortcut_gate"], gates.depth)) == sorted((g, d) for g in GATES for d in (8, 11))


def test_every_run_recorded_its_diagnostics(variants: tuple[Path, pd.DataFrame, list]) -> None:
    folder, table, _ = variants
    for _, run in table.iterrows():
        rows = read_diagnostics(folder / run.run_id)
        assert [r["step"] for r in rows] == [0, 2], run.run_id
        units = rows[0]["units"]
        # Fixup's zero classifier passes no gradient below it at step 0; by step 2 it has moved
        flowing = rows[1]["units"] if run["model.unit"] == "fixup" else units
        assert len(units) == 3 and all(u["grad_input"] > 0 and u["grad_params"] > 0 for u in flowing)
        # gate runs leave model.unit unset: v1's original unit, with its ReLU after the addition
        unit = "original" if pd.isna(run["model.unit"]) else run["model.unit"]
        relu_after_add = "relu" in PLACEMENTS[unit].after_add.split()
        assert (sum(u["relu_zeroed"] for u in units) > 0) == relu_after_add, run.run_id


def test_tensorboard_event_files_hold_the_metrics(variants: tuple[Path, pd.DataFrame, list]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, table, _ = variants
    for run_id in table.run_id:
        assert list((folder / run_id / EVENTS_DIR).glob("events.out.tfevents.*")), run_id
    events = EventAccumulator(str(folder / table.run_id[0] / EVENTS_DIR))
    events.Reload()
    assert {"train_loss", "train_acc", "test_acc", "test_loss", "lr", "img_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train_loss")] == [2, 4]
    assert [e.step for e in events.Scalars("test_acc")] == [4]


def test_tensorboard_logger_forwards_every_call(tmp_path: Path) -> None:
    seen: list[TrainingProgress] = []
    logger = TensorBoardLogger(tmp_path, forward=seen.append)
    calls = [TrainingProgress(1, 2),
             TrainingProgress(2, 2, {"step": 2, "lr": 0.1, "train_loss": 1.5, "img_per_s": math.nan})]
    for call in calls:
        logger(call)
    logger.close()
    assert seen == calls and list((tmp_path / EVENTS_DIR).iterdir())


def test_missing_tensorboard_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(DepthbenchError, match=r"pip install 'depthbench\[tensorboard\]'"):
        TensorBoardLogger(tmp_path)
    result = CliRunner().invoke(app, ["sweep", str(ROOT / "configs/smoke.yaml"), "--out", str(tmp_path), "--tensorboard"])
    assert result.exit_code == 2 and "--tensorboard needs the tensorboard package" in result.output
    assert not (tmp_path / "smoke").exists()


def test_sub_grids_concatenate_and_share_runs() -> None:
    base = {"name": "t", "dataset": {"name": "synthetic"}}
    sweep = parse_sweep({**base, "grid": [
        {"version": ["v1", "v2"], "depth": [20]},
        {"version": ["v1"], "depth": [20, 56], "model": {"width": [16, 8]}},  # width 16 at depth 20 repeats a run
    ]})
    runs = sweep.runs()
    assert [(r.version, r.depth, r.model.width) for r in runs] == [
        ("v1", 20, 16), ("v2", 20, 16), ("v1", 20, 8), ("v1", 56, 16), ("v1", 56, 8)]
    assert sweep.axes() == {"version": ["v1", "v2"], "depth": [20, 56], "seed": [0], "model.width": [16, 8]}


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([{"version": ["v1"], "depth": [20]}, {"depth": [20]}], "grid: sub-grid 2 of 2: needs a 'version' list"),
        ([{"version": ["v1"], "depth": [20]}, [1]], "grid: sub-grid 2 of 2 must be a mapping"),
        ([], "grid: must be a mapping of setting: [values], or a non-empty list"),
        ([{"version": ["v1"], "depth": [20], "model.widht": [4]}], "sub-grid 1 of 1: unknown key 'model.widht'"),
        ({"version": ["v1"], "depth": 20}, "grid: 'depth' must be a list of values, e.g. [20]"),
        ([{"version": ["v1"], "depth": [20]}, {"version": ["v1"], "depth": [21]}], "(in grid run sub-grid 2, version=v1"),
    ],
)
def test_bad_sub_grids_give_one_clear_line(grid: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sweep({"name": "t", "grid": grid}, source="cfg.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ([{"match": {"depth": 56}, "error": 6.0}], "reference[0] (depth=56) matches no run of the grid"),
        ([{"match": {"depth": 20}, "error": 6.0}, {"match": {"version": "v1"}, "error": 7.0}],
         "reference[1] (version=v1) and reference[0] (depth=20) both match run v1-d20-s0-"),
        ([{"match": {"model.gate_bais": 1}, "error": 6.0}], "unknown key 'model.gate_bais' (did you mean 'model.gate_bias'?)"),
        ([{"match": {"depth": 20}, "error": 120}], "must be a test error in percent (0 to 100) or 'fail' (got 120)"),
        ([{"match": {"depth": 20}, "error": "failed"}], "or 'fail' (got 'failed')"),
    ],
)
def test_bad_reference_rows_give_one_clear_line(reference: list, message: str) -> None:
    data = {"name": "t", "grid": {"version": ["v1", "v2"], "depth": [20]}, "reference": reference}
    with pytest.raises(ConfigError) as info:
        parse_sweep(data, source="cfg.yaml")
    assert message in str(info.value)


def test_paper_configs_hold_every_row_of_the_paper_tables() -> None:
    paper = ROOT / "configs/paper"
    table1 = load_sweep(paper / "table1.yaml")
    runs = table1.runs()
    assert len(runs) == 11 * 5 and {(r.version, r.depth) for r in runs} == {("v1", 110)}
    assert [row.error for row in table1.reference] == [6.61, "fail", "fail", 12.35, "fail", 8.70, 9.81, 12.86, 6.91,
                                                       12.22, "fail"]
    for row in table1.reference:  # each published row names exactly one configuration of 5 seeds
        assert sorted(r.seed for r in runs if row.matches(r)) == [0, 1, 2, 3, 4], row.label
    gated = [r for r in runs if table1.reference[5].matches(r)]
    assert {(r.model.shortcut_gate, r.model.gate_bias) for r in gated} == {("exclusive_gating", -6.0)}

    table2 = load_sweep(paper / "table2.yaml")
    assert len(table2.runs()) == 2 * 5 * 5
    assert {(r.match["depth"], r.match["model.unit"]): r.error for r in table2.reference}[(164, "full_preact")] == 5.46

    table3 = {name: load_sweep(paper / f"table3-{name}.yaml") for name in ("cifar10", "cifar100")}
    assert {(r.match["version"], r.match["depth"]): r.error for r in table3["cifar10"].reference} == {
        ("v1", 110): 6.61, ("v2", 110): 6.37, ("v1", 164): 5.93, ("v2", 164): 5.46, ("v1", 1001): 7.61, ("v2", 1001): 4.92}
    assert {(r.match["version"], r.match["depth"]): r.error for r in table3["cifar100"].reference} == {
        ("v1", 164): 25.16, ("v2", 164): 24.33, ("v1", 1001): 27.82, ("v2", 1001): 22.71}
    assert table3["cifar100"].runs()[0].dataset.name == "cifar100"
