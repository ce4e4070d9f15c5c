"""The CLI end to end on real (tiny) work: sweep, skip on re-run, report numbers, models, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from depthbench.cli import app
from depthbench.config import dump_run_config
from depthbench.report import build_report
from tests.conftest import ROOT, tiny_sweep

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped smoke config swept once for the module (about 10 s on 2 cores)."""
    out = tmp_path_factory.mktemp("runs")
    result = invoke("sweep", ROOT / "configs/smoke.yaml", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_sweep_writes_every_run_and_a_complete_results_table(smoke: Path) -> None:
    folder = smoke / "smoke"
    table = pd.read_csv(folder / "results.csv")
    assert len(table) == 8
    required = ["run_id", "version", "depth", "seed", "block", "params", "status", "success", "steps",
                "train_loss", "train_acc", "test_acc", "best_test_acc", "wall_s"]
    assert [c for c in table.columns if c in required] == required
    assert set(table.status) == {"completed"} and set(table.steps) == {12}
    assert set(zip(table.depth, table.block, strict=True)) == {(8, "basic"), (11, "bottleneck")}
    assert table.test_acc.between(0, 1).all() and table.train_loss.gt(0).all()
    for run_id in table.run_id:
        files = {p.name for p in (folder / run_id).iterdir()}
        assert {"config.yaml", "metrics.jsonl", "result.json", "final.pt"} <= files
        assert "checkpoint.pt" not in files
    assert (folder / "sweep.yaml").is_file()


def test_second_sweep_skips_everything(smoke: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in (smoke / "smoke").glob("*/result.json")}
    result = invoke("sweep", ROOT / "configs/smoke.yaml", "--out", smoke)
    assert result.exit_code == 0
    assert "8 runs in the sweep, 8 already done (skipped), 0 to do" in result.output
    assert before == {p: p.stat().st_mtime_ns for p in (smoke / "smoke").glob("*/result.json")}


def test_dry_run_lists_runs_without_training(tmp_path: Path) -> None:
    result = invoke("sweep", ROOT / "configs/smoke.yaml", "--out", tmp_path, "--dry-run")
    assert result.exit_code == 0
    assert "8 of 8 runs to do" in result.output and "v2-d11-s1-" in result.output
    assert "bottleneck (n=1)" in result.output
    assert "grid: version: v1, v2; depth: 8, 11; seed: 0, 1\n" in result.output
    assert not (tmp_path / "smoke").exists()


def test_report_on_the_smoke_sweep(smoke: Path) -> None:
    result = invoke("report", smoke / "smoke")
    assert result.exit_code == 0, result.output
    assert "V1 vs V2 by depth (8/8 runs finished)" in result.output
    summary = pd.read_csv(smoke / "smoke/summary.csv")
    assert len(summary) == 4 and set(summary.runs) == {2}
    assert (smoke / "smoke/report.md").read_text().startswith("# smoke: ResNet V1 vs V2 by depth")


def _fake_run(folder: Path, version: str, depth: int, seed: int, acc: float | None, status: str = "completed") -> None:
    """A run folder as the trainer leaves it, with a known accuracy."""
    cfg = tiny_sweep().runs()[0].model_copy(update={"version": version, "depth": depth, "seed": seed})
    run_dir = folder / cfg.run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_run_config(cfg))
    result = {"run_id": cfg.run_id, "status": status, "version": version, "depth": depth, "seed": seed,
              "block": "basic", "params": 1, "steps": 8, "train_loss": 0.5 + seed / 10, "train_acc": 0.9,
              "test_loss": 1.0, "test_acc": acc, "best_test_acc": acc, "wall_s": 1.0}
    (run_dir / "result.json").write_text(json.dumps(result))


def test_report_numbers_for_a_hand_checked_case(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    for seed, acc in enumerate([0.80, 0.90, 0.70]):
        _fake_run(folder, "v1", 20, seed, acc)
    for seed, acc in enumerate([0.85, 0.95]):
        _fake_run(folder, "v2", 20, seed, acc)
    _fake_run(folder, "v2", 20, 2, None, status="diverged")
    (folder / "v1-d20-s9-unfinished").mkdir()  # a folder without config.yaml is not a run
    rep = build_report(folder)
    v1 = rep.summary[rep.summary.version == "v1"].iloc[0]
    v2 = rep.summary[rep.summary.version == "v2"].iloc[0]
    assert (v1.runs, v1.n, v1.success_rate) == (3, 3, 1.0)
    assert v1.test_acc_mean == pytest.approx(0.80) and v1.test_acc_std == pytest.approx(0.10)
    assert v1.test_acc_median == pytest.approx(0.80) and v1.test_acc_best == pytest.approx(0.90)
    assert v1.train_loss_mean == pytest.approx(0.6)
    assert (v2.runs, v2.finished, v2.n, v2.diverged) == (3, 3, 2, 1)
    assert v2.success_rate == pytest.approx(2 / 3)
    assert v2.test_acc_mean == pytest.approx(0.90) and v2.test_acc_std == pytest.approx(math.sqrt(0.005))
    # 95% CI of v1: mean +- t(0.975, 2) * s / sqrt(3) = 0.8 +- 4.3027 * 0.1 / 1.7321, cut at 100%
    assert (v1.test_acc_ci95_low, v1.test_acc_ci95_high) == pytest.approx((0.8 - 0.24841, 1.0), abs=1e-4)
    (comparison,) = rep.comparisons
    assert comparison.diff == pytest.approx(0.10)
    assert 0.2 < comparison.p_value < 0.4 and "weak evidence" in comparison.note
    assert "| 20 | 3/3 | 100% | 80.00 ± 10.00 | 80.00 | 90.00 | 0.600 |" in rep.markdown
    assert "| 3/3 | 67% | 90.00 ± 7.07 | 90.00 | 95.00 |" in rep.markdown and "+10.00" in rep.markdown
    assert len(pd.read_csv(folder / "results.csv")) == 6


def test_report_rebuilds_a_lost_results_table(smoke: Path, tmp_path: Path) -> None:
    copy = tmp_path / "smoke"
    shutil.copytree(smoke / "smoke", copy)
    original = pd.read_csv(copy / "results.csv")
    (copy / "results.csv").unlink()
    assert invoke("report", copy).exit_code == 0
    pd.testing.assert_frame_equal(pd.read_csv(copy / "results.csv"), original)


def test_report_default_covers_every_sweep(smoke: Path) -> None:
    result = invoke("report", "--out", smoke)
    assert result.exit_code == 0 and "smoke: ResNet V1 vs V2 by depth" in result.output


def test_models_table_has_paper_counts() -> None:
    result = invoke("models")
    assert result.exit_code == 0
    for count in ("269,722", "1,727,962", "19,421,274", "1,703,258", "10,327,706"):
        assert count in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sweep", "nope.yaml"], "error: config file 'nope.yaml' does not exist"),
        (["report", "no-such-folder"], "error: 'no-such-folder' is not a folder"),
    ],
)
def test_user_errors_are_one_line_exit_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_config_names_key_and_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    data = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text())
    data["train"]["lr"] = -1
    config.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["sweep", str(config), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "train.lr: input should be greater than 0" in result.output
    assert not (tmp_path / "runs").exists()


# --- --set and --version ---------------------------------------------------------------------------

SHORT = ("--set", "train.steps=2", "--set", "grid.depth=[8]", "--set", "grid.seed=[0]")


def test_set_changes_the_runs_and_the_saved_sweep_so_a_plain_rerun_sees_them(tmp_path: Path) -> None:
    result = invoke("sweep", ROOT / "configs/smoke.yaml", "--out", tmp_path, *SHORT)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "smoke"
    # train.steps is hashed: the ids are not the file's (cbb445c5)
    assert sorted(p.name for p in folder.glob("v*")) == ["v1-d8-s0-81bb8470", "v2-d8-s0-81bb8470"]
    saved = yaml.safe_load((folder / "sweep.yaml").read_text())
    assert saved["train"]["steps"] == 2 and saved["grid"] == {"version": ["v1", "v2"], "depth": [8], "seed": [0]}
    again = invoke("sweep", folder / "sweep.yaml", "--out", tmp_path)
    assert "2 runs in the sweep, 2 already done (skipped), 0 to do" in again.output


def test_dry_run_honours_set(tmp_path: Path) -> None:
    result = invoke("sweep", ROOT / "configs/smoke.yaml", "--out", tmp_path, "--dry-run", "--set", "grid.seed=[0]",
                    "--set", "train.steps=2")
    assert result.exit_code == 0
    assert "4 of 4 runs to do" in result.output and "v2-d11-s0-81bb8470" in result.output
    assert "grid: version: v1, v2; depth: 8, 11; seed: 0\n" in result.output


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.stpes=5", "error: --set train.stpes=5: unknown key 'train.stpes' (did you mean 'train.steps'?)"),
        ("train.steps", "error: --set 'train.steps' must be KEY=VALUE, e.g. --set train.steps=2000 or --set "
                        "grid.seed=[0,1]"),
        ("train.steps=-1", f"error: {ROOT / 'configs/smoke.yaml'} with --set: train.steps: input should be greater than 0"),
    ],
    ids=["typo", "no-equals", "value"],
)
def test_a_bad_set_is_one_line_exit_2(tmp_path: Path, setting: str, message: str) -> None:
    result = runner.invoke(app, ["sweep", str(ROOT / "configs/smoke.yaml"), "--out", str(tmp_path), "--set", setting])
    assert result.exit_code == 2
    assert result.output.strip() == message
    assert not (tmp_path / "smoke").exists()


def test_version_prints_the_installed_version_which_is_pyprojects() -> None:
    from importlib.metadata import version

    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    result = invoke("--version")
    assert result.exit_code == 0 and result.output == f"depthbench {version('depthbench')}\n"
    assert version("depthbench") == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
