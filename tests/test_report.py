"""The report's statistics checked by hand, grouping and sorting by any axis, units and families, paper values
beside ours, plots."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from depthbench.cli import app
from depthbench.config import dump_run_config, parse_sweep
from depthbench.errors import DepthbenchError
from depthbench.plots import _depth_axis, series_labels
from depthbench.report import Report, build_report, plot_runs
from depthbench.statistics import prepare
from depthbench.results import collect
from depthbench.sweep import run_sweep, sweep_yaml
from tests.conftest import tiny_sweep

runner = CliRunner()


def _fake_run(folder: Path, version: str, depth: int, seed: int, acc: float | None, status: str = "completed",
              family: str = "resnet", train: dict[str, object] | None = None, **model: object) -> None:
    """A finished run folder as the trainer leaves it, with a known accuracy and model settings; a ViT's
    with the family's defaults filled in, as a sweep resolves them."""
    base = tiny_sweep(model={"family": "vit", "heads": 2}) if family == "vit" else tiny_sweep()
    cfg = base.runs()[0]
    cfg = cfg.model_copy(update={"version": version, "depth": depth, "seed": seed,
                                 "model": cfg.model.model_copy(update=model),
                                 "train": cfg.train.model_copy(update=train or {})})
    run_dir = folder / cfg.run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_run_config(cfg))
    result = {"run_id": cfg.run_id, "status": status, "version": version, "depth": depth, "seed": seed,
              "block": cfg.blocks[0], "params": 1, "steps": 8, "train_loss": 0.5, "train_acc": 0.9,
              "test_loss": 1.0, "test_acc": acc, "best_test_acc": acc, "wall_s": 1.0}
    (run_dir / "result.json").write_text(json.dumps(result))


def _row(rep: Report, **key: object) -> dict[str, str]:
    """The table line whose leading cells are ``key``'s values."""
    want = [str(v) for v in key.values()]
    (line,) = [c for c in rep.cells if c[: len(want)] == want]
    return dict(zip(rep.header, line, strict=True))


def test_welch_interval_and_p_value_match_the_formula(tmp_path: Path) -> None:
    v1, v2 = [0.80, 0.90, 0.70], [0.85, 0.95, 0.90, 0.92]
    for seed, acc in enumerate(v1):
        _fake_run(tmp_path, "v1", 20, seed, acc)
    for seed, acc in enumerate(v2):
        _fake_run(tmp_path, "v2", 20, seed, acc)
    rep = build_report(tmp_path, plots=False)
    (c,) = rep.comparisons
    # Welch by hand: standard error and Welch-Satterthwaite degrees of freedom
    a, b = np.array(v2), np.array(v1)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se, df = math.sqrt(va + vb), (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    diff = a.mean() - b.mean()
    half = stats.t.ppf(0.975, df) * se
    assert (c.n_reference, c.n, c.compared, c.reference) == (3, 4, "v2", "v1") and c.diff == pytest.approx(diff)
    assert (c.ci_low, c.ci_high) == pytest.approx((diff - half, diff + half))
    assert c.p_value == pytest.approx(2 * stats.t.sf(abs(diff / se), df))
    row = _row(rep, depth=20)
    assert row["V2−V1 (pts)"] == f"{100 * diff:+.2f}"
    assert row["V2−V1 95% CI"] == f"[{100 * (diff - half):+.2f}, {100 * (diff + half):+.2f}]"
    # the per-version t-interval of the mean, 0.8 +- t(0.975, 2) * 0.1 / sqrt(3), cut at 100%
    assert row["V1 95% CI"] == "[55.16, 100.00]"
    v1_row = rep.summary[rep.summary.version == "v1"].iloc[0]  # summary.csv holds the same, cut interval
    assert (v1_row.test_acc_ci95_low, v1_row.test_acc_ci95_high) == pytest.approx((0.5516, 1.0), abs=1e-4)
    assert any("weak evidence at depth 20" in n for n in rep.notes)


def test_one_run_a_side_is_a_clear_warning_not_a_number(tmp_path: Path) -> None:
    _fake_run(tmp_path, "v1", 20, 0, 0.8)
    _fake_run(tmp_path, "v2", 20, 0, 0.9)
    rep = build_report(tmp_path, plots=False)
    (c,) = rep.comparisons
    assert math.isnan(c.p_value) and c.note == "n < 2 per version: no test possible"
    assert _row(rep, depth=20)["p (Welch)"] == "-"
    assert rep.notes[0].startswith("Warning: too few runs to say anything about V2 − V1 at depth 20 "
                                   "(V1 n = 1, V2 n = 1)")
    assert "- Warning: too few runs" in rep.markdown
    result = runner.invoke(app, ["report", str(tmp_path), "--no-plots"])
    assert "warning: too few runs to say anything" in result.output


def test_tied_seeds_give_a_test_and_no_library_warning(tmp_path: Path) -> None:
    for seed in (0, 1):  # V1's two seeds tie, as tiny runs that never leave chance often do
        _fake_run(tmp_path, "v1", 20, seed, 0.1171875)
    for seed, acc in enumerate((0.5, 0.6)):
        _fake_run(tmp_path, "v2", 20, seed, acc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's "catastrophic cancellation" warning would raise here
        (c,) = build_report(tmp_path, plots=False).comparisons
    assert c.diff == pytest.approx(0.55 - 0.1171875)
    # Welch with one variance zero: se from V2 alone, df = V2's n - 1
    se = np.std([0.5, 0.6], ddof=1) / math.sqrt(2)
    assert c.p_value == pytest.approx(2 * stats.t.sf(c.diff / se, 1))
    # the command itself keeps any other library warning off the terminal
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-m", "depthbench", "report", str(tmp_path), "--no-plots"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "Warning:" not in done.stderr and done.stderr == ""


@pytest.fixture
def units_study(tmp_path: Path) -> Path:
    """v1 runs with each unit at two depths, v2 presets at both; accuracies that make orders visible."""
    acc = {"original": 0.70, "bn_after_add": 0.60, "full_preact": 0.90}
    for depth, bonus in ((20, 0.0), (56, 0.05)):
        for unit, value in acc.items():
            for seed in (0, 1):
                _fake_run(tmp_path, "v1", depth, seed, value + bonus + seed / 100, unit=unit)
        for seed in (0, 1):
            _fake_run(tmp_path, "v2", depth, seed, 0.88 + bonus + seed / 100)
    return tmp_path


def test_units_leave_the_version_columns_to_each_versions_own_unit(units_study: Path) -> None:
    rep = build_report(units_study, plots=False)
    assert rep.keys == ["depth"] and rep.title.endswith("ResNet V1 vs V2 and units by depth")
    # V1 is the original unit alone and V2 full pre-activation: a v1 run of another unit is not pooled into V1
    row = _row(rep, depth=20)
    assert row["V1 runs"] == "2/2" and row["V1 acc % mean ± std"] == "70.50 ± 0.71"
    assert row["V2 acc % mean ± std"] == "88.50 ± 0.71" and row["V2−V1 (pts)"] == "+18.00"
    (section,) = rep.sections
    units = dict(zip(section.units.header, section.units.cells[1], strict=True))
    assert [c[:2] for c in section.units.cells] == [["20", "original"], ["20", "full_preact"], ["20", "bn_after_add"],
                                                    ["56", "original"], ["56", "full_preact"], ["56", "bn_after_add"]]
    # v1 with unit full_preact and v2 at the same seed are one experiment: counted once, as the v2 run
    assert units["runs"] == "2/2" and units["acc % mean ± std"] == "88.50 ± 0.71" and units["unit − full_preact (pts)"] == "reference"
    assert "- Note: 4 run(s) repeat another run's unit, seed and settings under the other version label" in rep.markdown
    assert "The V1 and V2 columns hold the runs of each version's own unit (V1: original, V2: full_preact)" in rep.markdown


def test_group_by_any_axis_pools_the_others_and_says_so(units_study: Path) -> None:
    rep = build_report(units_study, group_by=["model.unit"], plots=False)
    assert rep.keys == ["model.unit"] and rep.title.endswith("ResNet V1 vs V2 and units by model.unit")
    row = _row(rep, **{"model.unit": "original"})
    assert row["V1 runs"] == "4/4" and row["V1 median"] == "73.00"  # 0.70, 0.71, 0.75, 0.76 pooled over depth
    assert "Rows pool the runs of every depth." in rep.markdown
    assert len(rep.summary) == 4  # (unit, version) pairs that have runs: grouped by unit, every run has its row
    units = rep.sections[0].units
    assert units.keys == [] and [c[:2] for c in units.cells] == [["original", "4/4"], ["full_preact", "4/4"],
                                                                  ["bn_after_add", "4/4"]]
    assert "Every unit the sweep trained, pooled over every configuration, each against full_preact" in rep.markdown


def test_group_by_version_drops_the_side_by_side_split(units_study: Path) -> None:
    rep = build_report(units_study, group_by=["version", "depth"], plots=False)
    assert rep.header[:4] == ["version", "depth", "runs", "success"] and not rep.comparisons
    assert _row(rep, version="v2", depth=56)["acc % mean ± std"] == "93.50 ± 0.71"


def test_sort_by_axes_ascending_and_descending(units_study: Path) -> None:
    rep = build_report(units_study, sort=["model.unit:desc", "depth:desc"], plots=False)
    # each table is ordered by the sort keys it has: the versions table by depth, the units table by both
    assert [c[0] for c in rep.cells] == ["56", "20"]
    assert [c[:2] for c in rep.sections[0].units.cells] == [
        ["56", "original"], ["20", "original"], ["56", "full_preact"], ["20", "full_preact"],
        ["56", "bn_after_add"], ["20", "bn_after_add"]]
    result = runner.invoke(app, ["report", str(units_study), "--group-by", "model.unit", "--sort", "model.unit:desc",
                                 "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "V1 vs V2 and units by model.unit" in result.output
    assert result.output.index("original") < result.output.index("full_preact") < result.output.index("bn_after_add")


# Accuracy of seeds 0, 1, 2 as configs/study-normfree-digits.yaml lays the runs out: v1 and v2 BN nets, and
# Fixup and SkipInit labelled v1. None is a diverged run; a missing seed never ran.
NORMFREE: dict[tuple[str, str | None], dict[int, list[float | None]]] = {
    ("v1", None): {20: [0.90, 0.92, 0.91], 56: [0.80, 0.84, 0.82]},
    ("v2", None): {20: [0.93, 0.94, 0.95], 56: [0.94, 0.95, 0.93]},
    ("v1", "fixup"): {20: [0.89, 0.91, 0.90], 56: [0.70, None, 0.74]},
    ("v1", "skipinit"): {20: [0.92, 0.93, 0.94], 56: [0.91]},
}


@pytest.fixture
def normfree_study(tmp_path: Path) -> Path:
    for (version, unit), by_depth in NORMFREE.items():
        for depth, accs in by_depth.items():
            for seed, acc in enumerate(accs):
                model = {"unit": unit} if unit else {}
                _fake_run(tmp_path, version, depth, seed, acc, "completed" if acc else "diverged", **model)
    return tmp_path


def test_units_table_numbers_against_v2s_unit(normfree_study: Path) -> None:
    rep = build_report(normfree_study, plots=False)
    # the V1 column is the original unit's three runs, not pooled with the v1-labelled Fixup and SkipInit runs
    assert _row(rep, depth=20)["V1 acc % mean ± std"] == "91.00 ± 1.00" and _row(rep, depth=20)["V1 runs"] == "3/3"
    (section,) = rep.sections
    rows = {(c[0], c[1]): dict(zip(section.units.header, c, strict=True)) for c in section.units.cells}
    assert list(rows) == [(str(d), u) for d in (20, 56) for u in ("original", "full_preact", "fixup", "skipinit")]
    fixup, reference = [0.70, 0.74], [0.94, 0.95, 0.93]
    assert rows["56", "fixup"]["runs"] == "3/3" and rows["56", "fixup"]["n"] == "2"
    assert rows["56", "fixup"]["success"] == "67%"  # the diverged run is a finished failure
    assert rows["56", "fixup"]["acc % mean ± std"] == f"72.00 ± {100 * np.std(fixup, ddof=1):.2f}" == "72.00 ± 2.83"
    assert rows["56", "fixup"]["median"] == "72.00"
    # Welch's test, computed here with scipy, and its interval by the Welch-Satterthwaite formula
    welch = stats.ttest_ind(fixup, reference, equal_var=False)
    va, vb = np.var(fixup, ddof=1) / 2, np.var(reference, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 + vb**2 / 2)
    diff, half = np.mean(fixup) - np.mean(reference), stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert rows["56", "fixup"]["unit − full_preact (pts)"] == f"{100 * diff:+.2f}" == "-22.00"
    assert rows["56", "fixup"]["unit − full_preact 95% CI"] == f"[{100 * (diff - half):+.2f}, {100 * (diff + half):+.2f}]"
    assert rows["56", "fixup"]["p (Welch)"] == f"{welch.pvalue:.3f}"
    (c,) = [c for c in rep.unit_comparisons if c.config == (56,) and c.compared == "fixup"]
    assert (c.n, c.n_reference, c.reference) == (2, 3, "full_preact") and c.p_value == pytest.approx(welch.pvalue)
    # the V2 unit is the reference; a unit with one run gets a difference and no test, said in words
    assert rows["20", "full_preact"]["unit − full_preact (pts)"] == "reference"
    assert rows["56", "skipinit"]["unit − full_preact (pts)"] == "-3.00" and rows["56", "skipinit"]["p (Welch)"] == "-"
    assert ("- Warning: too few runs to compare with full_preact: skipinit at depth 56 (skipinit n = 1, "
            "full_preact n = 3).") in rep.markdown
    # summary.csv: one row per (depth, unit), every run counted once
    summary = pd.read_csv(normfree_study / "summary.csv")
    assert list(summary.columns[:4]) == ["depth", "model.unit", "runs", "finished"] and "version" not in summary
    assert len(summary) == 8 and not summary.duplicated(["depth", "model.unit"]).any()
    assert summary.runs.sum() == len(rep.table) == 22
    # the figures draw a line per unit, in the family's order
    runs, series = plot_runs(prepare(rep.table))
    assert series == ["line"] and list(dict.fromkeys(runs.line)) == ["original", "full_preact", "fixup", "skipinit"]


def test_a_vit_sweep_names_its_versions_post_ln_and_pre_ln(tmp_path: Path) -> None:
    for depth in (2, 48):
        _fake_run(tmp_path, "v1", depth, 0, 0.60, family="vit")
        _fake_run(tmp_path, "v2", depth, 0, 0.70, family="vit")
    rep = build_report(tmp_path)
    assert "model.family" not in rep.table  # one family: told by the block, not by a column
    assert rep.title.endswith("ViT Post-LN vs Pre-LN by depth")
    assert rep.header[1:3] == ["Post-LN runs", "Post-LN success"] and rep.header[8] == "Pre-LN runs"
    assert rep.header[-3:] == ["Pre-LN−Post-LN (pts)", "Pre-LN−Post-LN 95% CI", "p (Welch)"]
    row = _row(rep, depth=48)
    assert row["Post-LN acc % mean ± std"] == "60.00" and row["Pre-LN−Post-LN (pts)"] == "+10.00"
    assert rep.notes[0].startswith("Warning: too few runs to say anything about Pre-LN − Post-LN at depth 2 "
                                   "(Post-LN n = 1, Pre-LN n = 1)")
    assert "Pre-LN−Post-LN is the difference of mean accuracy" in rep.markdown
    assert not any("V1" in name or "V2" in name for name in rep.header)
    runs, _ = plot_runs(prepare(rep.table))
    assert list(dict.fromkeys(runs.line)) == ["Post-LN", "Pre-LN"] and list(rep.plots) == ["error_vs_depth"]


def test_two_families_get_a_table_each_and_are_never_pooled(tmp_path: Path) -> None:
    for seed in (0, 1):
        _fake_run(tmp_path, "v1", 8, seed, 0.80 + seed / 100)
        _fake_run(tmp_path, "v2", 8, seed, 0.85 + seed / 100)
        _fake_run(tmp_path, "v1", 8, seed, 0.50 + seed / 100, unit="fixup")
        _fake_run(tmp_path, "v1", 8, seed, 0.60 + seed / 100, family="vit")
        _fake_run(tmp_path, "v2", 8, seed, 0.70 + seed / 100, family="vit")
        _fake_run(tmp_path, "v1", 8, seed, 0.75 + seed / 100, family="vit", unit="deepnorm")
    rep = build_report(tmp_path, plots=False)
    assert rep.title.endswith("ResNet V1 vs V2, ViT Post-LN vs Pre-LN and units by depth")
    # the family is a row key; settings that only follow it (a ViT's optimizer) are not
    assert rep.keys == ["model.family", "depth"] and "train.optimizer" in rep.table
    assert [c[:3] for c in rep.cells] == [["resnet", "8", "2/2"], ["vit", "8", "2/2"]]
    assert rep.header[2] == "v1 runs"  # the console's one table of both families names versions plainly
    resnet, vit = rep.sections
    assert (resnet.family, vit.family) == ("resnet", "vit") and resnet.versions.keys == vit.versions.keys == ["depth"]
    resnet_row = dict(zip(resnet.versions.header, resnet.versions.cells[0], strict=True))
    vit_row = dict(zip(vit.versions.header, vit.versions.cells[0], strict=True))
    assert resnet_row["V1 acc % mean ± std"] == "80.50 ± 0.71" and resnet_row["V2−V1 (pts)"] == "+5.00"
    assert vit_row["Post-LN acc % mean ± std"] == "60.50 ± 0.71" and vit_row["Pre-LN−Post-LN (pts)"] == "+10.00"
    assert [c[1] for c in resnet.units.cells] == ["original", "full_preact", "fixup"]
    assert [c[1] for c in vit.units.cells] == ["post_ln", "pre_ln", "deepnorm"]
    deepnorm = dict(zip(vit.units.header, vit.units.cells[2], strict=True))
    p = stats.ttest_ind([0.75, 0.76], [0.70, 0.71], equal_var=False).pvalue
    assert deepnorm["unit − pre_ln (pts)"] == "+5.00" and deepnorm["p (Welch)"] == f"{p:.3f}" == "0.019"
    for heading in ("\n## ResNet\n", "\n## ViT\n", "Pre-LN−Post-LN is the difference"):
        assert heading in rep.markdown
    assert rep.markdown.count("\n### Units\n") == 2
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary[["model.family", "model.unit"]].itertuples(index=False, name=None)) == [
        ("resnet", "original"), ("resnet", "full_preact"), ("resnet", "fixup"),
        ("vit", "post_ln"), ("vit", "pre_ln"), ("vit", "deepnorm")]
    runs, series = plot_runs(prepare(collect(tmp_path)))
    assert series == ["line"] and list(dict.fromkeys(runs.line)) == [
        "ResNet original", "ResNet full_preact", "ResNet fixup", "ViT post_ln", "ViT pre_ln", "ViT deepnorm"]


def test_plot_lines_of_a_resnet_sweep_name_versions_and_settings(tmp_path: Path) -> None:
    for width in (4, 8):
        _fake_run(tmp_path, "v2", 20, 0, 0.9, width=width)
        _fake_run(tmp_path, "v1", 20, 0, 0.8, width=width)
    runs, series = plot_runs(prepare(collect(tmp_path)))
    assert series == ["line", "model.width"]
    assert list(series_labels(runs, series)) == ["V1 width=4", "V1 width=8", "V2 width=4", "V2 width=8"]


def test_depth_axis_labels_a_vits_many_depths_on_a_log_scale() -> None:
    ax = Figure().add_subplot()
    _depth_axis(ax, list(range(2, 50, 2)), "depth (transformer blocks)")
    ticks = [int(t) for t in ax.get_xticks()]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "depth (transformer blocks)"
    assert ticks[0] == 2 and ticks[-1] == 48 and len(ticks) <= 12
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(t) for t in ticks]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"group_by": ["model.unti"]}, "cannot group by 'model.unti' (did you mean 'model.unit'?)"),
        ({"group_by": ["model.width"]}, "it is not an axis that varies in this sweep"),
        ({"sort": ["seed"]}, "cannot sort by 'seed': sort by a row key of the table, one of depth, model.unit"),
        ({"sort": ["depth:down"]}, "--sort depth:down: the direction after ':' must be asc or desc"),
    ],
)
def test_bad_group_or_sort_is_one_clear_error(units_study: Path, options: dict, message: str) -> None:
    with pytest.raises(DepthbenchError) as info:
        build_report(units_study, plots=False, **options)
    assert message in str(info.value)


def test_paper_values_beside_ours(tmp_path: Path) -> None:
    sweep = parse_sweep({
        "name": "paper", "dataset": {"name": "synthetic"}, "success": {"metric": "test_acc", "min": 0.8},
        "grid": [{"version": ["v1"], "depth": [20], "seed": [0, 1, 2]},
                 {"version": ["v1"], "depth": [20], "seed": [0, 1, 2], "model.shortcut_gate": ["dropout"]},
                 {"version": ["v1"], "depth": [20], "seed": [0, 1, 2], "model.shortcut_gate": ["conv1x1"]}],
        "reference": [
            {"label": "original", "error": 6.61, "match": {"model.shortcut_gate": "identity"}},
            {"label": "dropout shortcut", "error": "fail", "match": {"model.shortcut_gate": "dropout"}},
            {"label": "1x1 conv", "error": 12.22, "match": {"model.shortcut_gate": "conv1x1"}},
        ],
    })
    (tmp_path / "sweep.yaml").write_text(sweep_yaml(sweep))
    for seed, acc in enumerate([0.93, 0.94, 0.92]):
        _fake_run(tmp_path, "v1", 20, seed, acc)
    for seed, acc in enumerate([0.30, 0.25]):
        _fake_run(tmp_path, "v1", 20, seed, acc, shortcut_gate="dropout")
    _fake_run(tmp_path, "v1", 20, 2, None, status="diverged", shortcut_gate="dropout")
    _fake_run(tmp_path, "v1", 20, 0, 0.88, shortcut_gate="conv1x1")
    rep = build_report(tmp_path, plots=False)
    header, cells = rep.reference
    rows = {c[0]: dict(zip(header, c, strict=True)) for c in cells}
    assert rows["original"]["paper error %"] == "6.61" and rows["original"]["our error % (median)"] == "7.00"
    assert rows["original"]["ours mean ± std"] == "7.00 ± 1.00" and rows["original"]["ours − paper"] == "+0.39"
    # errors 70, 75 and a diverged run (no error: counts as failed): the median is 75%, a fail
    assert rows["dropout shortcut"]["paper error %"] == "fail"
    assert rows["dropout shortcut"]["our error % (median)"] == "fail (75.00)"
    assert rows["dropout shortcut"]["runs"] == "3/3" and rows["dropout shortcut"]["ours − paper"] == "-"
    assert rows["1x1 conv"]["our error % (median)"] == "12.00" and rows["1x1 conv"]["ours mean ± std"] == "12.00"
    assert "## Paper vs measured" in rep.markdown and '"fail" means an error above 20%' in rep.markdown
    result = runner.invoke(app, ["report", str(tmp_path), "--no-plots"])
    assert "paper vs measured" in result.output and "fail (75.00)" in result.output


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny sweep with diagnostics: 2 versions x 2 depths x 2 seeds, a few seconds."""
    sweep = tiny_sweep("plots", train={"diagnose_steps": [0, 4], "keep_checkpoint": "none"})
    sweep = sweep.model_copy(update={"grid": {"version": ["v1", "v2"], "depth": [8, 11], "seed": [0, 1]}})
    return run_sweep(sweep, tmp_path_factory.mktemp("runs"), handle_signals=False).sweep_dir


def test_report_draws_the_three_plots_and_embeds_them(real_sweep: Path) -> None:
    result = runner.invoke(app, ["report", str(real_sweep)])
    assert result.exit_code == 0, result.output
    text = (real_sweep / "report.md").read_text()
    for name in ("error_vs_depth", "curves", "grad_flow"):
        png = real_sweep / f"{name}.png"
        assert f"![{name}]({name}.png)" in text and str(png) in result.output
        assert 10_000 < png.stat().st_size < 200_000
        with Image.open(png) as image:
            assert image.width > 500 and image.height > 300
    with Image.open(real_sweep / "curves.png") as image:  # a column per depth: wider than tall
        assert image.width > image.height


def test_no_plots_leaves_them_out_of_the_report(real_sweep: Path) -> None:
    rep = build_report(real_sweep, plots=False)
    assert rep.plots == {} and "## Plots" not in rep.markdown


def test_runs_not_started_yet_are_pending_rows_of_the_table(tmp_path: Path) -> None:
    cfg = tiny_sweep()  # v1 and v2 at depth 8
    run_sweep(cfg.model_copy(update={"grid": {"version": ["v1"], "depth": [8], "seed": [0]}}), tmp_path,
              handle_signals=False)
    (tmp_path / cfg.name / "sweep.yaml").write_text(sweep_yaml(cfg))  # as an interrupted sweep leaves it
    rep = build_report(tmp_path / cfg.name, plots=False)
    table = rep.table.set_index("version")
    assert list(table.status) == ["completed", "pending"]
    assert table.loc["v2", "run_id"] == cfg.runs()[1].run_id and table.loc["v2", "block"] == "basic"
    assert str(table.params.dtype) == "Int64" and table.loc["v1", "params"] > 0  # not 1234.0
    assert rep.markdown.splitlines()[2].startswith("1 of 2 runs finished")
    result = runner.invoke(app, ["report", str(tmp_path / cfg.name), "--no-plots"])
    assert result.exit_code == 0 and "(1/2 runs finished)" in result.output


def test_a_setting_only_other_units_vary_keeps_the_reference(tmp_path: Path) -> None:
    # full_preact at scalar_lr 1 only; fixup at 0.1 (its default) and 1: both are compared with full_preact
    for seed, acc in enumerate([0.90, 0.92, 0.94]):
        _fake_run(tmp_path, "v2", 20, seed, acc, unit="full_preact")
    for seed, (slow, full) in enumerate([(0.80, 0.50), (0.84, 0.52), (0.82, 0.48)]):
        _fake_run(tmp_path, "v1", 20, seed, slow, unit="fixup", train={"scalar_lr": 0.1})
        _fake_run(tmp_path, "v1", 20, seed, full, unit="fixup", train={"scalar_lr": 1.0})
    rep = build_report(tmp_path, plots=False)
    diffs = {c.config: round(100 * c.diff, 2) for c in rep.unit_comparisons}
    assert diffs == {(20, 0.1): -10.0, (20, 1.0): -42.0}
    assert "nothing to be compared with" not in rep.markdown


def test_a_unit_is_never_compared_with_the_reference_at_another_depth(tmp_path: Path) -> None:
    for seed, acc in enumerate([0.94, 0.95, 0.96]):
        _fake_run(tmp_path, "v2", 20, seed, acc, unit="full_preact")
        _fake_run(tmp_path, "v1", 20, seed, acc - 0.1, unit="fixup")
        _fake_run(tmp_path, "v1", 110, seed, acc - 0.3, unit="fixup")
    rep = build_report(tmp_path, plots=False)
    assert [c.config for c in rep.unit_comparisons] == [(20,)]
    assert "no completed full_preact runs at depth 110" in rep.markdown
