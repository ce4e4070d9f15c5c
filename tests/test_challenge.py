"""The depth challenge that `make demo` runs: its grid, and the whole config trained for a few steps."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from depthbench.cli import app
from depthbench.config import load_sweep
from tests.conftest import ROOT

CHALLENGE = ROOT / "configs" / "challenge.yaml"
DEPTHS = [47, 101, 200, 497, 1001]  # the valid bottleneck depths nearest 50, 100, 200, 500 and 1000


def test_the_challenge_is_v1_against_v2_on_bottleneck_nets_from_47_to_1001_layers() -> None:
    runs = load_sweep(CHALLENGE).runs()
    assert len(runs) == 20
    assert sorted({r.depth for r in runs}) == DEPTHS
    assert {r.blocks for r in runs} == {("bottleneck", (d - 2) // 9) for d in DEPTHS}
    assert {(r.version, r.seed) for r in runs} == {(v, s) for v in ("v1", "v2") for s in (0, 1)}
    assert {r.run_id.rsplit("-", 1)[1] for r in runs} == {"b5152a17"}  # pinned: the demo's results keep their ids
    assert {(r.dataset.name, r.dataset.augment, r.train.device) for r in runs} == {("digits", False, "cpu")}


def test_the_challenge_trains_and_reports_every_depth(tmp_path: Path) -> None:
    # The shipped config at four steps (the fewest its milestones allow) and one seed: every depth builds, trains and reaches the report and plot.
    runner = CliRunner()
    swept = runner.invoke(app, ["sweep", str(CHALLENGE), "--out", str(tmp_path), "--set", "train.steps=4",
                                "--set", "grid.seed=[0]"], catch_exceptions=False)
    assert swept.exit_code == 0, swept.output
    assert "10 runs in the sweep, 10 to do" in swept.output
    table = pd.read_csv(tmp_path / "challenge" / "results.csv")
    assert sorted(zip(table.version, table.depth)) == sorted((v, d) for v in ("v1", "v2") for d in DEPTHS)
    assert set(table.status) == {"completed"} and set(table.steps) == {4}
    reported = runner.invoke(app, ["report", str(tmp_path / "challenge")], catch_exceptions=False)
    assert reported.exit_code == 0, reported.output
    summary = pd.read_csv(tmp_path / "challenge" / "summary.csv")
    assert sorted(summary.depth.unique()) == DEPTHS
    assert (tmp_path / "challenge" / "error_vs_depth.png").stat().st_size > 0
