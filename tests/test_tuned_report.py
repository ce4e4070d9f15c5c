"""The report of a tuned sweep: each arm at the value validation chose, its test numbers there, the verdict,
the edge flag, notes on ties and missing runs, V2 − V1 at each arm's own selected value, the sensitivity plot;
and the untuned report left as it was."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from depthbench.cli import app
from depthbench.config import RunConfig, SweepConfig, dump_run_config, parse_sweep
from depthbench.layout import RunFolder
from depthbench.report import Report, build_report
from depthbench.sweep import sweep_yaml
from depthbench.tuned import sensitivity_points

runner = CliRunner()
C = "completed"
Outcome = tuple[str, float | None, float | None] | None  # (status, val_acc, test_acc); None: never started

# Two seeds per (version, depth, train.lr). Validation and test disagree on purpose: V1 at depth 8 is best at
# lr 0.1 on validation and at 0.4 on test. V1 at depth 14 is best on validation at 0.01, where it fails the
# success rule (test_acc >= 0.5), and trains at 0.1. V2 at depth 14 ties at 0.1 and 0.4, fails at both, and
# was pruned at 0.01 (its value is the validation accuracy at the rung, step 4).
STUDY: dict[tuple[str, int, float], list[Outcome]] = {
    ("v1", 8, 0.01): [(C, 0.60, 0.70), (C, 0.62, 0.72)],
    ("v1", 8, 0.1): [(C, 0.80, 0.60), (C, 0.82, 0.62)],
    ("v1", 8, 0.4): [(C, 0.50, 0.90), ("failed", None, None)],
    ("v2", 8, 0.01): [(C, 0.70, 0.80), None],
    ("v2", 8, 0.1): [(C, 0.75, 0.82), (C, 0.77, 0.84)],
    ("v2", 8, 0.4): [(C, 0.85, 0.85), (C, 0.87, 0.87)],
    ("v1", 14, 0.01): [(C, 0.70, 0.30), (C, 0.72, 0.35)],
    ("v1", 14, 0.1): [(C, 0.50, 0.60), (C, 0.50, 0.65)],
    ("v1", 14, 0.4): [("diverged", None, None), ("diverged", None, None)],
    ("v2", 14, 0.01): [("pruned", 0.20, None), ("pruned", 0.22, None)],
    ("v2", 14, 0.1): [(C, 0.40, 0.30), (C, 0.40, 0.20)],
    ("v2", 14, 0.4): [(C, 0.40, 0.25), (C, 0.40, 0.20)],
}


def _sweep(tune: dict[str, Any] | None = None, model: dict[str, Any] | None = None, **grid: list[Any]) -> SweepConfig:
    data: dict[str, Any] = {
        "name": "tuned",
        "dataset": {"name": "synthetic", "train_subset": 128, "test_subset": 64, "image_size": 8, "val_split": 32},
        "model": {"width": 4, **(model or {})},
        "train": {"steps": 8, "batch_size": 16, "eval_every": 4, "device": "cpu"},
        "success": {"metric": "test_acc", "min": 0.5},
        "grid": grid or {"version": ["v1", "v2"], "depth": [8, 14], "train.lr": [0.01, 0.1, 0.4], "seed": [0, 1]},
    }
    if tune is not None:
        data["tune"] = tune
    return parse_sweep(data)


def _fabricate(folder: Path, sweep: SweepConfig, outcomes: dict[tuple, list[Outcome]],
               key: Callable[[RunConfig], tuple] | None = None) -> Path:
    """A sweep folder as a finished sweep leaves it: sweep.yaml, and per run config.yaml and result.json with
    the given validation and test accuracy (a pruned run also a metrics.jsonl with its rung's evaluation)."""
    key = key or (lambda cfg: (cfg.version, cfg.depth, cfg.train.lr))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.yaml").write_text(sweep_yaml(sweep))
    for cfg in sweep.runs():
        outcome = outcomes[key(cfg)][cfg.seed]
        if outcome is None:
            continue
        status, val, test = outcome
        run_dir = folder / cfg.run_id
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(dump_run_config(cfg))
        result: dict[str, Any] = {
            "run_id": cfg.run_id, "status": status, "version": cfg.version, "depth": cfg.depth, "seed": cfg.seed,
            "block": cfg.blocks[0], "params": 1, "steps": 8, "train_loss": 0.5, "train_acc": 0.9, "test_loss": 1.0,
            "test_acc": test, "best_test_acc": test, "wall_s": 1.0}
        if status == C:
            result.update(val_acc=val, best_val_acc=val, val_loss=1 - val)
        if status == "pruned":
            result.update(steps=4, pruned_at=4)
            rows = [{"step": 2, "train_loss": 2.0}, {"step": 4, "train_loss": 1.9, "val_acc": val, "val_loss": 1 - val}]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (run_dir / "result.json").write_text(json.dumps(result))
    return folder


def _arm_rows(rep: Report) -> dict[tuple[str, str], dict[str, str]]:
    """The tuned table's rows by (version, depth), each as {header: cell}."""
    table = rep.tuned.arms
    return {(row[0], row[1]): dict(zip(table.header, row, strict=True)) for row in table.cells}


@pytest.fixture
def study(tmp_path: Path) -> Path:
    return _fabricate(tmp_path / "study", _sweep({"axes": ["train.lr"]}), STUDY)


def test_each_arm_at_the_value_validation_selected(study: Path) -> None:
    rep = build_report(study, plots=False)
    rows = _arm_rows(rep)
    assert list(rows) == [("V1", "8"), ("V1", "14"), ("V2", "8"), ("V2", "14")]  # family, version, depth
    assert {k: r["train.lr selected"] for k, r in rows.items()} == {
        ("V1", "8"): "0.1", ("V1", "14"): "0.01", ("V2", "8"): "0.4", ("V2", "14"): "0.1"}
    v1 = rows["V1", "8"]
    # at lr 0.1: validation 0.80, 0.82; test 0.60, 0.62 (test alone would have taken 0.4, at 90%)
    assert v1["val acc % mean ± std"] == f"81.00 ± {100 * math.sqrt(2e-4):.2f}" == "81.00 ± 1.41"
    assert v1["test acc % mean ± std"] == "61.00 ± 1.41" and v1["success"] == "100%"
    assert (v1["tried"], v1["pruned"]) == ("3", "0")
    assert rows["V1", "14"]["test acc % mean ± std"] == "32.50 ± 3.54" and rows["V1", "14"]["success"] == "0%"
    assert rows["V2", "14"]["val acc % mean ± std"] == "40.00 ± 0.00" and rows["V2", "14"]["pruned"] == "1"
    assert "## Tuned: each arm at its selected train.lr" in rep.markdown
    assert "| V1 | 8 | 0.1 | 81.00 ± 1.41 | 61.00 ± 1.41 | 100% | 3 | 0 | trains |" in rep.markdown


def test_selection_follows_validation_whatever_the_test_metrics(tmp_path: Path, study: Path) -> None:
    """Every test accuracy turned into 1 - itself, which reverses each arm's order on test: every selection and
    validation score stays; only the test numbers at the selected values move."""
    flipped = {key: [o if o is None or o[2] is None else (o[0], o[1], 1 - o[2]) for o in outcomes]
               for key, outcomes in STUDY.items()}
    other = build_report(_fabricate(tmp_path / "flipped", _sweep({"axes": ["train.lr"]}), flipped), plots=False)
    before, after = _arm_rows(build_report(study, plots=False)), _arm_rows(other)
    for column in ("train.lr selected", "val acc % mean ± std", "tried", "pruned"):
        assert {k: r[column] for k, r in after.items()} == {k: r[column] for k, r in before.items()}
    assert before["V1", "8"]["test acc % mean ± std"] == "61.00 ± 1.41"
    assert after["V1", "8"]["test acc % mean ± std"] == "39.00 ± 1.41"
    selected = {(arm.version, arm.values["depth"]): arm.ranking.best for arm in other.tuned.outcome.arms}
    assert selected == {("v1", 8): (0.1,), ("v1", 14): (0.01,), ("v2", 8): (0.4,), ("v2", 14): (0.1,)}


def test_verdicts_say_trains_trains_elsewhere_or_fails_with_the_range(study: Path) -> None:
    rows = _arm_rows(build_report(study, plots=False))
    assert rows["V1", "8"]["verdict"] == "trains"
    assert rows["V1", "14"]["verdict"] == "trains at train.lr=0.1 (not selected)"
    # the pruned value counts as tried; the diverged and the failing ones as trained and failed
    assert rows["V2", "14"]["verdict"] == "fails at every value tried (train.lr 0.01 to 0.4; 1 pruned)"


def test_a_selection_at_the_edge_of_the_range_is_flagged(study: Path) -> None:
    rep = build_report(study, plots=False)
    rows = _arm_rows(rep)
    assert rows["V2", "8"]["notes"].startswith("at the edge of the range (train.lr=0.4 is the largest tried): widen it")
    assert rows["V1", "14"]["notes"] == "at the edge of the range (train.lr=0.01 is the smallest tried): widen it"
    assert "edge" not in rows["V1", "8"]["notes"] and "edge" not in rows["V2", "14"]["notes"]  # 0.1: inside
    assert rep.tuned.arms.notes == [
        "Warning: V1 depth=14: at the edge of the range (train.lr=0.01 is the smallest tried): widen it.",
        "Warning: V2 depth=8: at the edge of the range (train.lr=0.4 is the largest tried): widen it."]
    assert "- Warning: V2 depth=8: at the edge of the range" in rep.markdown


def test_ties_and_missing_runs_are_noted(study: Path) -> None:
    rows = _arm_rows(build_report(study, plots=False))
    assert rows["V2", "14"]["notes"] == "tie with train.lr=0.4; took the first listed"
    # lr 0.4 ranks on its one completed seed; V2's lr 0.01 never started its second seed
    assert rows["V1", "8"]["notes"] == "missing runs at train.lr=0.4 (1 failed)"
    assert rows["V2", "8"]["notes"].endswith("; missing runs at train.lr=0.01 (1 unfinished)")


def test_an_arm_without_any_measured_candidate_selects_nothing(tmp_path: Path) -> None:
    outcomes = {**STUDY, **{("v2", 14, lr): [("failed", None, None), None] for lr in (0.01, 0.1, 0.4)}}
    rep = build_report(_fabricate(tmp_path / "s", _sweep({"axes": ["train.lr"]}), outcomes), plots=False)
    row = _arm_rows(rep)["V2", "14"]
    assert row["train.lr selected"] == row["test acc % mean ± std"] == row["success"] == "-"
    assert row["verdict"] == "fails at every value tried (train.lr 0.01 to 0.4)"  # a failed run is a failure
    assert row["notes"] == ("missing runs at train.lr=0.01 (1 failed, 1 unfinished), train.lr=0.1 (1 failed, "
                            "1 unfinished), train.lr=0.4 (1 failed, 1 unfinished); no candidate measured")
    assert "Warning: V2 depth=14: no candidate measured, so nothing was selected." in rep.tuned.arms.notes
    assert [p.compared.name for p in rep.tuned.outcome.pairs] == ["V2 depth=8"]  # depth 14 has no V2 to compare
    assert ("- Note: V2 depth=14 against V1 depth=14: nothing to compare, as one side has no completed run at a "
            "selected value.") in rep.markdown


def test_versions_are_compared_each_at_its_own_selected_value(study: Path) -> None:
    rep = build_report(study, plots=False)
    pairs = rep.tuned.pairs
    rows = {row[0]: dict(zip(pairs.header, row, strict=True)) for row in pairs.cells}
    # depth 8: V2 at lr 0.4 (0.85, 0.87) against V1 at lr 0.1 (0.60, 0.62), not at one shared lr
    welch = stats.ttest_ind([0.85, 0.87], [0.60, 0.62], equal_var=False)
    assert rows["8"]["compared"] == "V2 at train.lr=0.4" and rows["8"]["against"] == "V1 at train.lr=0.1"
    assert rows["8"]["n"] == "2 vs 2" and rows["8"]["difference (pts)"] == "+25.00"
    assert rows["8"]["p (Welch)"] == f"{welch.pvalue:.3f}"
    interval = welch.confidence_interval(0.95)
    assert rows["8"]["95% CI"] == f"[{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]"
    assert rows["14"]["compared"] == "V2 at train.lr=0.1" and rows["14"]["difference (pts)"] == "-7.50"
    (c8, c14) = [p.comparison for p in rep.tuned.outcome.pairs]
    assert (c8.config, c8.compared, c8.reference, c8.per) == ((8,), "v2", "v1", "version")
    assert c8.p_value == pytest.approx(welch.pvalue) and c14.note == "n < 5 per version: weak evidence"
    assert "### Compared at each arm's own selected value" in rep.markdown
    assert "- Note: n < 5 per version: weak evidence at depth 8; depth 14." in rep.markdown


def test_a_vit_names_its_versions_and_units_are_compared_with_v2s(tmp_path: Path) -> None:
    vit = _sweep({"axes": ["train.lr"]}, model={"family": "vit", "heads": 2},
                 version=["v1", "v2"], depth=[2], **{"train.lr": [0.001, 0.003]}, seed=[0, 1])
    outcomes = {("v1", 2, 0.001): [(C, 0.5, 0.50), (C, 0.5, 0.52)], ("v1", 2, 0.003): [(C, 0.4, 0.9), (C, 0.4, 0.9)],
                ("v2", 2, 0.001): [(C, 0.6, 0.60), (C, 0.6, 0.62)], ("v2", 2, 0.003): [(C, 0.7, 0.70), (C, 0.7, 0.72)]}
    rep = build_report(_fabricate(tmp_path / "vit", vit, outcomes), plots=False)
    assert [row[:3] for row in rep.tuned.arms.cells] == [["Post-LN", "2", "0.001"], ["Pre-LN", "2", "0.003"]]
    assert rep.tuned.pairs.cells[0][1:5] == ["Pre-LN at train.lr=0.003", "Post-LN at train.lr=0.001", "2 vs 2",
                                             "+20.00"]
    assert "Pre-LN − Post-LN, each arm at the train.lr it selected" in rep.markdown
    units = _sweep({"axes": ["train.lr"]}, version=["v2"], depth=[8], **{"model.unit": ["full_preact", "fixup"]},
                   **{"train.lr": [0.01, 0.1]}, seed=[0, 1])
    outcomes = {("full_preact", 0.01): [(C, 0.8, 0.80), (C, 0.8, 0.82)], ("full_preact", 0.1): [(C, 0.7, 0.7)] * 2,
                ("fixup", 0.01): [(C, 0.5, 0.5)] * 2, ("fixup", 0.1): [(C, 0.6, 0.60), (C, 0.6, 0.64)]}
    folder = _fabricate(tmp_path / "units", units, outcomes, key=lambda cfg: (cfg.model.unit, cfg.train.lr))
    rep = build_report(folder, plots=False)
    assert rep.tuned.outcome.arm_axes == ("version", "depth", "model.unit")
    assert [row[:4] for row in rep.tuned.arms.cells] == [["V2", "8", "full_preact", "0.01"],
                                                         ["V2", "8", "fixup", "0.1"]]
    (pair,) = rep.tuned.outcome.pairs
    c = pair.comparison
    assert (c.compared, c.reference, c.per) == ("fixup", "full_preact", "unit")
    assert rep.tuned.pairs.cells[0][1:5] == ["fixup at train.lr=0.1", "V2 at train.lr=0.01", "2 vs 2", "-19.00"]


def test_arms_that_do_not_differ_by_version_are_not_compared(tmp_path: Path) -> None:
    rep = build_report(_fabricate(tmp_path / "s", _sweep({"axes": ["train.lr"], "arm": ["depth"]}), STUDY), plots=False)
    # V1's and V2's seeds pooled per value: at depth 8, lr 0.1 has the best mean of its four (0.785)
    assert [row[:2] for row in rep.tuned.arms.cells] == [["8", "0.1"], ["14", "0.01"]]
    assert rep.tuned.outcome.pairs == []
    assert "Note: no V1-vs-V2 comparison: the arms (depth) do not differ by version or unit (tune.arm)." in rep.markdown


def test_sensitivity_plot_is_drawn_and_linked(study: Path) -> None:
    rep = build_report(study)
    png = study / "sensitivity.png"
    assert rep.plots["sensitivity"] == png and "![sensitivity](sensitivity.png)" in rep.markdown
    with Image.open(png) as image:
        assert image.width > 500 and image.height > 300
    assert "open markers are candidates that successive halving stopped" in rep.markdown
    points = sensitivity_points(rep.tuned.outcome)
    v2 = points[(points.panel == "V2") & (points.series == "depth=14")].set_index("x")
    # the pruned candidate sits at its validation accuracy at the rung, the mean of 0.20 and 0.22
    assert bool(v2.loc[0.01, "pruned"]) and v2.loc[0.01, "mean"] == pytest.approx(21.0)
    assert v2.loc[0.1, "mean"] == pytest.approx(40.0) and not v2.loc[0.1, "pruned"]
    assert len(points) == 12  # every candidate of the four arms: 11 measured, 1 pruned


def test_the_untuned_report_is_left_as_it_was(tmp_path: Path) -> None:
    """The same runs without the tune section: report.md is the tuned one less its tuned section."""
    untuned = _fabricate(tmp_path / "untuned" / "sweep", _sweep(), STUDY)
    tuned = _fabricate(tmp_path / "tuned" / "sweep", _sweep({"axes": ["train.lr"]}), STUDY)
    plain, with_tune = build_report(untuned, plots=False), build_report(tuned, plots=False)
    assert plain.tuned is None and "## Tuned" not in plain.markdown
    assert with_tune.markdown.split("\n## Tuned", 1)[0] == plain.markdown
    assert (tuned / "summary.csv").read_text() == (untuned / "summary.csv").read_text()
    assert "sensitivity" not in build_report(untuned).plots and not (untuned / "sensitivity.png").exists()


def test_pruned_runs_are_read_as_finished(study: Path) -> None:
    states = {RunFolder(path).state() for path in study.iterdir() if path.is_dir()}
    assert states == {"completed", "diverged", "failed", "pruned"}


def test_the_command_prints_the_tuned_tables(study: Path) -> None:
    result = runner.invoke(app, ["report", str(study), "--no-plots"], terminal_width=240)
    assert result.exit_code == 0, result.output
    assert "tuned: each arm at its selected train.lr (chosen on val_acc)" in result.output
    assert "trains at train.lr=0.1 (not selected)" in result.output
    assert "warning: V2 depth=8: at the edge of the range" in result.output
    assert "tuned: compared at each arm's own selected value" in result.output and "V2 at train.lr=0.4" in result.output
