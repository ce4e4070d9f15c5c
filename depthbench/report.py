"""V1-vs-V2 statistics by depth (or by any grid axis), published values beside ours, and the study's plots.

For each configuration (by default depth plus every other setting the grid varies; ``group_by`` picks
other axes) and version: how many runs finished, the success rate, test accuracy mean ± sample std over
seeds with its 95% t-interval, the median (the statistic [V2] reports) and the best, and the final
training loss. Where both versions have results, V2 − V1 of mean accuracy with Welch's t-test: the
p-value and the 95% interval of the difference (Welch–Satterthwaite degrees of freedom). Too few runs
to test anything are said so in words, not left to a blank cell.

A sweep whose config carries a ``reference`` (the paper's table, see configs/paper/) gets a second
table: each published row beside the median test error of the runs it names, "fail" meaning an error
above 20% as in [V2] Table 1. ``build_report`` also draws the figures of :mod:`depthbench.plots` into
the sweep folder and links them from ``report.md``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from warnings import catch_warnings, simplefilter

import numpy as np
import pandas as pd
from scipy import stats

from depthbench import storage
from depthbench.architecture import VERSION_UNIT
from depthbench.config import SweepConfig
from depthbench.errors import DepthbenchError, did_you_mean
from depthbench.layout import DIAGNOSE_JSON, RESULTS_CSV, SWEEP_FILE, RunFolder
from depthbench.plots import error_vs_depth, series_labels, training_curves, unit_flow
from depthbench.results import RunRecord, read_runs, saved_sweep, setting_columns, table_of

SUMMARY_CSV = "summary.csv"
REPORT_MD = "report.md"
FINISHED = ("completed", "diverged", "failed")
FAIL_ERROR = 20.0  # [V2] Table 1: "fail" means a test error above 20%
WEAK_N = 5  # below this many runs per version a test can only flag large effects
PLOT_FILES = {
    "error_vs_depth": "error_vs_depth.png",
    "curves": "curves.png",
    "grad_flow": "grad_flow.png",
}


# ---------------------------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------------------------


def prepare(table: pd.DataFrame) -> pd.DataFrame:
    """The results table as the report reads it: where ``model.unit`` varies, runs that left it to their
    version show the unit that version implies (original for v1, full_preact for v2)."""
    table = table.copy()
    if "model.unit" in table.columns:
        implied = table.version.map(VERSION_UNIT)
        table["model.unit"] = table["model.unit"].where(table["model.unit"].notna(), implied)
    return table


def row_keys(table: pd.DataFrame, group_by: Sequence[str] | None = None) -> list[str]:
    """The axes that make a row of the report: ``group_by`` as given (checked against the grid's axes),
    else depth and every varying setting. Version, unless grouped by, is the column split instead."""
    axes = ["version", "depth", "seed", *setting_columns(table)]
    if not group_by:
        return ["depth", *setting_columns(table)]
    for key in group_by:
        if key not in axes:
            raise DepthbenchError(
                f"cannot group by '{key}'{did_you_mean(key, axes)}: it is not an axis that varies in this sweep; "
                f"one of {', '.join(axes)}"
            )
    return list(dict.fromkeys(group_by))


def _split(keys: Sequence[str]) -> list[str]:
    return [] if "version" in keys else ["version"]


def _key_tuple(key: Any) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def summarize(table: pd.DataFrame, group_by: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (configuration, version) with the statistics over its seeds."""
    table = prepare(table)
    keys = [*row_keys(table, group_by), *_split(row_keys(table, group_by))]
    rows = []
    for key, group in table.groupby(keys, sort=True, dropna=False):
        finished = group[group.status.isin(FINISHED)]
        acc = finished.loc[finished.status == "completed", "test_acc"].astype(float).dropna()
        n = len(acc)
        mean, std = (acc.mean(), acc.std(ddof=1) if n > 1 else math.nan) if n else (math.nan, math.nan)
        half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
        rows.append({
            **dict(zip(keys, _key_tuple(key), strict=True)),
            "runs": len(group),
            "finished": len(finished),
            "success_rate": finished.success.astype(bool).mean() if len(finished) else math.nan,
            "diverged": int((finished.status == "diverged").sum()),
            "failed": int((finished.status == "failed").sum()),
            "n": n,
            "test_acc_mean": mean,
            "test_acc_std": std,
            # An accuracy lies in [0, 1]; so does its interval (the t-interval alone may leave it).
            "test_acc_ci95_low": float(np.clip(mean - half, 0.0, 1.0)),  # NaN stays NaN
            "test_acc_ci95_high": float(np.clip(mean + half, 0.0, 1.0)),
            "test_acc_median": acc.median() if n else math.nan,
            "test_acc_best": acc.max() if n else math.nan,
            "train_loss_mean": finished.loc[finished.status == "completed", "train_loss"].astype(float).mean(),
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# V2 - V1
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """V2 minus V1 of mean test accuracy at one configuration, with Welch's test and interval."""

    config: tuple
    diff: float
    p_value: float
    n_v1: int = 0
    n_v2: int = 0
    ci_low: float = math.nan
    ci_high: float = math.nan

    @property
    def note(self) -> str:
        """What the sample sizes allow: no test, a weak one, or '' for a usable one."""
        n = min(self.n_v1, self.n_v2)
        return NO_TEST if n < 2 else WEAK_TEST if n < WEAK_N else ""


NO_TEST = "n < 2 per version: no test possible"
WEAK_TEST = f"n < {WEAK_N} per version: weak evidence"


def compare(table: pd.DataFrame, group_by: Sequence[str] | None = None) -> list[Comparison]:
    """Welch's t-test of V2 against V1 test accuracy at each configuration where both have runs."""
    table = prepare(table)
    keys = row_keys(table, group_by)
    if "version" in keys:
        return []
    done = table[table.status == "completed"]
    comparisons = []
    for key, group in done.groupby(keys, sort=True, dropna=False):
        v1 = group.loc[group.version == "v1", "test_acc"].astype(float).dropna()
        v2 = group.loc[group.version == "v2", "test_acc"].astype(float).dropna()
        if v1.empty or v2.empty:
            continue
        diff = v2.mean() - v1.mean()
        low = high = math.nan
        if min(len(v1), len(v2)) < 2:
            p = math.nan
        else:
            with catch_warnings():
                # scipy warns of "catastrophic cancellation" when one version's seeds tie; Welch's test is still
                # defined then (one variance is zero), and both tying gives the nan handled below.
                simplefilter("ignore", RuntimeWarning)
                test = stats.ttest_ind(v2, v1, equal_var=False)
            p = float(test.pvalue)
            if math.isnan(p):  # identical values on both sides: no spread to test against
                p = 1.0 if diff == 0 else 0.0
                low = high = diff
            else:
                interval = test.confidence_interval(0.95)
                low, high = float(interval.low), float(interval.high)
        comparisons.append(Comparison(_key_tuple(key), diff, p, len(v1), len(v2), low, high))
    return comparisons


# ---------------------------------------------------------------------------------------------
# The table, as strings for the console and report.md
# ---------------------------------------------------------------------------------------------


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pct(value: float) -> str:
    return "-" if _missing(value) else f"{100 * value:.2f}"


def _acc(row: pd.Series) -> str:
    if row is None or not row["n"]:
        return "-"
    spread = f" ± {100 * row.test_acc_std:.2f}" if row["n"] > 1 else ""
    return f"{100 * row.test_acc_mean:.2f}{spread}"


def _ci(low: float, high: float, scale: float = 100, sign: str = "") -> str:
    return "-" if _missing(low) else f"[{scale * low:{sign}.2f}, {scale * high:{sign}.2f}]"


def _cell(value: Any) -> str:
    if _missing(value):
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _stat_cells(row: pd.Series | None) -> list[str]:
    if row is None:
        return ["-"] * 7
    return [
        f"{row.finished}/{row.runs}",
        "-" if math.isnan(row.success_rate) else f"{100 * row.success_rate:.0f}%",
        _acc(row), _pct(row.test_acc_median), _pct(row.test_acc_best),
        "-" if math.isnan(row.train_loss_mean) else f"{row.train_loss_mean:.3f}",
        # a t-interval ignores that accuracy lies in [0, 1]; show it cut there
        _ci(row.test_acc_ci95_low, row.test_acc_ci95_high),
    ]


_STAT_NAMES = ("runs", "success", "acc % mean ± std", "median", "best", "train loss", "95% CI")


def _sort_value(value: Any) -> tuple:
    # Missing values last, numbers by value, anything else by its text.
    if _missing(value):
        return (2, 0, "")
    if isinstance(value, numbers.Real):
        return (0, float(value), "")
    return (1, 0, str(value))


def parse_sort(sort: Sequence[str], keys: Sequence[str]) -> list[tuple[str, bool]]:
    """``["depth", "model.unit:desc"]`` as (key, descending) pairs, each key one of the row keys."""
    order = []
    for item in sort:
        key, _, direction = item.partition(":")
        if direction not in ("", "asc", "desc"):
            raise DepthbenchError(f"--sort {item}: the direction after ':' must be asc or desc")
        if key not in keys:
            raise DepthbenchError(
                f"cannot sort by '{key}'{did_you_mean(key, keys)}: sort by a row key of the table, "
                f"one of {', '.join(keys)} (use --group-by to change them)"
            )
        order.append((key, direction == "desc"))
    return order


def report_rows(
    summary: pd.DataFrame, comparisons: list[Comparison], keys: Sequence[str] | None = None,
    sort: Sequence[str] = (),
) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table as header and string cells, shared by the console and report.md.

    Rows are ``keys`` (default: depth and the varying settings), versions side by side unless
    ``version`` is a row key. ``sort`` orders rows by row keys (``key`` or ``key:desc``)."""
    keys = list(keys) if keys is not None else [c for c in summary.columns if c == "depth" or "." in c]
    split = _split(keys)
    versions = sorted(summary.version.unique()) if split else [None]
    header = [*keys]
    for v in versions:
        header += [f"{v.upper()} {name}" if v else name for name in _STAT_NAMES]
    if comparisons:
        header += ["V2−V1 (pts)", "V2−V1 95% CI", "p (Welch)"]
    by_config = {c.config: c for c in comparisons}
    rows: list[tuple[tuple, list[str]]] = []
    for key, group in summary.groupby(keys, sort=True, dropna=False):
        key = _key_tuple(key)
        line = [_cell(k) for k in key]
        for v in versions:
            match = group[group.version == v] if v else group
            line += _stat_cells(match.iloc[0] if len(match) else None)
        if comparisons:
            c = by_config.get(key)
            line += ["-"] * 3 if c is None else [
                f"{100 * c.diff:+.2f}", _ci(c.ci_low, c.ci_high, sign="+"),
                "-" if math.isnan(c.p_value) else f"{c.p_value:.3f}",
            ]
        rows.append((key, line))
    for name, descending in reversed(parse_sort(sort, keys)):
        index = keys.index(name)
        rows.sort(key=lambda r: _sort_value(r[0][index]), reverse=descending)
    return header, [line for _, line in rows]


def _describe(keys: Sequence[str], config: tuple) -> str:
    return ", ".join(f"{k} {_cell(v)}" for k, v in zip(keys, config, strict=True))


def warnings(summary: pd.DataFrame, comparisons: list[Comparison], keys: Sequence[str]) -> list[str]:
    """What the numbers cannot say, in words: too few runs to test, too few for more than a rough test."""
    lines = []
    untestable = [c for c in comparisons if c.note == NO_TEST]
    if untestable:
        where = "; ".join(f"{_describe(keys, c.config)} (V1 n = {c.n_v1}, V2 n = {c.n_v2})" for c in untestable)
        lines.append(f"Warning: too few runs to say anything about V2 − V1 at {where}: with one run a side the "
                     "difference may be seed noise of any size. Run 2 or more seeds per version (5 for a usable test).")
    weak = [c for c in comparisons if c.note == WEAK_TEST]
    if weak:
        where = "; ".join(_describe(keys, c.config) for c in weak)
        lines.append(f"Note: {WEAK_TEST} at {where}. With so few seeds only a large "
                     "difference can reach a small p-value, and a large p-value does not mean the versions are equal.")
    single = int((summary.n < 2).sum()) if "n" in summary.columns else 0
    if single and not untestable:
        lines.append(f"Note: {single} configuration(s) have fewer than 2 completed runs: no spread or interval there.")
    return lines


# ---------------------------------------------------------------------------------------------
# Published values beside ours
# ---------------------------------------------------------------------------------------------


def fail_error(success: Any) -> float:
    """The test error (%) above which a run "fails": the sweep's success rule when it sets a minimum
    test accuracy (0.80 for CIFAR-10, as [V2] Table 1's 20%), else 20%."""
    if success.metric == "test_acc" and success.min is not None:
        return 100 * (1 - success.min)
    return FAIL_ERROR


def reference_rows(
    sweep: SweepConfig | None, records: Sequence[RunRecord], table: pd.DataFrame,
) -> tuple[list[str], list[list[str]]] | None:
    """Each row of the sweep's ``reference`` beside the median test error of the started runs it matches,
    or None when the sweep has no reference. Diverged runs count as failed ones (no usable error); "fail"
    is a median error above :func:`fail_error`."""
    if sweep is None or not sweep.reference:
        return None
    threshold = fail_error(sweep.success)
    by_id = table.set_index("run_id")
    configs = {record.run_id: record.cfg for record in records if record.started}
    header = ["paper row", "settings", "paper error %", "our error % (median)", "ours mean ± std", "runs", "ours − paper"]
    cells = []
    for row in sweep.reference:
        runs = by_id.loc[[run_id for run_id, cfg in configs.items() if row.matches(cfg)]]
        done = runs[runs.status == "completed"]
        errors = [100 * (1 - a) for a in done.test_acc.astype(float).dropna()]
        errors += [math.inf] * int((runs.status == "diverged").sum())
        median = float(pd.Series(errors).median()) if errors else math.nan
        finite = pd.Series([e for e in errors if math.isfinite(e)])
        if _missing(median):
            ours = "-"
        elif median > threshold:
            ours = f"fail ({median:.2f})" if math.isfinite(median) else "fail (diverged)"
        else:
            ours = f"{median:.2f}"
        spread = f"{finite.mean():.2f} ± {finite.std(ddof=1):.2f}" if len(finite) > 1 else (
            f"{finite.iloc[0]:.2f}" if len(finite) else "-")
        paper = "fail" if row.error == "fail" else f"{row.error:.2f}"
        delta = (f"{median - row.error:+.2f}" if row.error != "fail" and math.isfinite(median) else "-")
        settings = ", ".join(f"{k}={v}" for k, v in row.match.items())
        finished = int(runs.status.isin(FINISHED).sum())
        cells.append([row.label or "-", settings, paper, ours, spread, f"{finished}/{len(runs)}", delta])
    return header, cells


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _series(table: pd.DataFrame) -> list[str]:
    """What tells the lines of a figure apart: the version and every varying setting (depth is the x axis)."""
    return ["version", *setting_columns(table)]


def _curves(sweep_dir: Path, table: pd.DataFrame, series: list[str]) -> pd.DataFrame:
    runs = table[table.status.isin(("completed", "diverged"))]
    labels = series_labels(runs, series)
    frames = []
    for (_, run), label in zip(runs.iterrows(), labels, strict=True):
        rows = RunFolder(sweep_dir / run.run_id).metrics()
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        frame["test_error"] = 100 * (1 - frame["test_acc"]) if "test_acc" in frame else math.nan
        frame = frame.assign(series=label, depth=run.depth, seed=run.seed)
        frames.append(frame[["series", "depth", "seed", "step", "train_loss", "test_error"]])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _flow_entries(sweep_dir: Path, table: pd.DataFrame, series: list[str]) -> list[dict[str, Any]]:
    labels = series_labels(table, series)
    entries = []
    for (_, run), label in zip(table.iterrows(), labels, strict=True):
        for row in RunFolder(sweep_dir / run.run_id).diagnostics():
            entries.append({"series": label, "depth": run.depth, "step": row["step"], "units": row["units"]})
    return entries


def draw_plots(sweep_dir: Path, table: pd.DataFrame) -> dict[str, Path]:
    """Every figure the sweep has data for, written into the sweep folder: {name: path}."""
    table = prepare(table)
    series = _series(table)
    drawn = {
        "error_vs_depth": error_vs_depth(
            table, series, sweep_dir / PLOT_FILES["error_vs_depth"],
            title=f"{sweep_dir.name}: final test error against depth (mean ± std over seeds)"),
        "curves": training_curves(
            _curves(sweep_dir, table, series), sweep_dir / PLOT_FILES["curves"],
            title=f"{sweep_dir.name}: training loss and test error against step (mean over seeds, band = min..max)"),
        "grad_flow": unit_flow(
            _flow_entries(sweep_dir, table, series), sweep_dir / PLOT_FILES["grad_flow"],
            title=f"{sweep_dir.name}: gradient norm reaching each residual unit (geometric mean over seeds)"),
    }
    for name, path in drawn.items():
        if path is None:  # nothing to draw now: drop a figure left from an earlier report
            (sweep_dir / PLOT_FILES[name]).unlink(missing_ok=True)
    return {name: path for name, path in drawn.items() if path is not None}


_PLOT_CAPTIONS = {
    "error_vs_depth": "Final test error against depth, one line per version (and setting), error bars ± 1 std over seeds.",
    "curves": "Training loss (top) and test error (bottom) against step for each depth, the views of [V2] Fig. 1 and 6.",
    "grad_flow": "Norm of the loss gradient reaching each residual unit's input (from diagnostics.jsonl, "
                 "recorded at train.diagnose_steps); dotted lines mark the first unit of each stage.",
}


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------


def _markdown_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(row) + " |" for row in cells),
    ]


@dataclass
class Report:
    sweep_dir: Path
    table: pd.DataFrame
    summary: pd.DataFrame
    comparisons: list[Comparison]
    markdown: str
    keys: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reference: tuple[list[str], list[list[str]]] | None = None
    plots: dict[str, Path] = field(default_factory=dict)
    fail_error: float = FAIL_ERROR
    success: str = "completed"  # the sweep's success rule in words

    @property
    def by(self) -> str:
        """What the rows are: "depth" for the default rows, else the row keys."""
        return "depth" if self.keys == ["depth", *setting_columns(self.table)] else ", ".join(self.keys)

    @property
    def title(self) -> str:
        return f"{self.sweep_dir.name}: ResNet V1 vs V2 by {self.by}"


def markdown(rep: Report) -> str:
    table = rep.table
    done = int(table.status.isin(FINISHED).sum())
    pooled = [k for k in ["depth", *setting_columns(table)] if k not in rep.keys]
    lines = [
        f"# {rep.title}",
        "",
        f"{done} of {len(table)} runs finished ({int((table.status == 'completed').sum())} completed, "
        f"{int((table.status == 'diverged').sum())} diverged, {int((table.status == 'failed').sum())} failed). "
        "Accuracy is final test accuracy in percent over completed runs (mean ± sample std over seeds, "
        "95% CI a t-interval of the mean, cut at 0 and 100); success rate is over finished runs, "
        + ("a success being any completed run." if rep.success == "completed" else
           f"a success being a completed run with {rep.success}.")
        + (f" Rows pool the runs of every {', '.join(pooled)}." if pooled else ""),
        "",
        *_markdown_table(rep.header, rep.cells),
        "",
        *(f"- {note}" for note in rep.notes),
    ]
    if rep.comparisons:
        lines += ["", ("V2−V1 is the difference of mean accuracy in percentage points; its 95% CI and p-value are "
                       "Welch's t-test (unequal variances), which needs 2 or more completed runs per version.")]
    if rep.reference:
        lines += ["", "## Paper vs measured", "",
                  (f"Test error in percent; the paper reports the median of 5 runs. \"fail\" means an error above "
                   f"{rep.fail_error:g}% ([V2] Table 1 uses 20%; here the sweep's success rule); diverged runs "
                   "count as failed."), "",
                  *_markdown_table(*rep.reference)]
    if rep.plots:
        lines += ["", "## Plots", ""]
        for name, path in rep.plots.items():
            lines += [f"![{name}]({path.name})", "", _PLOT_CAPTIONS[name], ""]
    return "\n".join(lines).rstrip() + "\n"


def build_report(
    sweep_dir: Path, *, group_by: Sequence[str] | None = None, sort: Sequence[str] = (), plots: bool = True,
) -> Report:
    """Rebuild results.csv from the run folders, then write summary.csv, report.md and the plots beside it."""
    sweep_dir = Path(sweep_dir)
    sweep = saved_sweep(sweep_dir)
    records = read_runs(sweep_dir, sweep.runs() if sweep else ())
    table = table_of(records, sweep.success if sweep else None)
    storage.write_text(sweep_dir / RESULTS_CSV, table.to_csv(index=False))
    if not len(table):
        text = f"# {sweep_dir.name}\n\nNo runs yet.\n"
        storage.write_text(sweep_dir / SUMMARY_CSV, pd.DataFrame().to_csv(index=False))
        storage.write_text(sweep_dir / REPORT_MD, text)
        return Report(sweep_dir, table, pd.DataFrame(), [], text)
    keys = row_keys(prepare(table), group_by)
    summary = summarize(table, keys)
    comparisons = compare(table, keys)
    header, cells = report_rows(summary, comparisons, keys, sort)
    rep = Report(sweep_dir, table, summary, comparisons, "", keys, header, cells,
                 warnings(summary, comparisons, keys), reference_rows(sweep, records, table),
                 draw_plots(sweep_dir, table) if plots else {},
                 fail_error(sweep.success) if sweep else FAIL_ERROR, sweep.success.describe() if sweep else "completed")
    rep.markdown = markdown(rep)
    storage.write_text(sweep_dir / SUMMARY_CSV, summary.to_csv(index=False))
    storage.write_text(sweep_dir / REPORT_MD, rep.markdown)
    return rep


def find_sweeps(root: Path) -> list[Path]:
    """Sweep folders under ``root``: ``root`` itself when it is one, else its folders that are: a sweep
    folder has a sweep.yaml or any run folder (one with a config.yaml). The output folder of
    ``depthbench diagnose`` holds run folders too, but is not a sweep."""

    def is_sweep(folder: Path) -> bool:
        if (folder / DIAGNOSE_JSON).is_file():
            return False
        return (folder / SWEEP_FILE).is_file() or any(RunFolder(q).has_config() for q in folder.iterdir()
                                                        if q.is_dir())

    if is_sweep(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and is_sweep(p))
