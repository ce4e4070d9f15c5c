"""V1-vs-V2 statistics by depth, from a sweep's results table.

For each configuration (depth, plus any other setting the grid varies) and version: how many runs
finished, the success rate, test accuracy mean +- std over seeds, its 95% confidence interval, the
median (the statistic the V2 paper reports) and the best, and the final training loss. Where both
versions have results, the V2 - V1 difference of mean accuracy with a Welch t-test p-value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy import stats

from depthbench import storage
from depthbench.results import setting_columns, write_results

SUMMARY_CSV = "summary.csv"
REPORT_MD = "report.md"
FINISHED = ("completed", "diverged", "failed")


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration, version) with the statistics over its seeds."""
    keys = ["depth", *setting_columns(table), "version"]
    rows = []
    for key, group in table.groupby(keys, sort=True, dropna=False):
        finished = group[group.status.isin(FINISHED)]
        acc = finished.loc[finished.status == "completed", "test_acc"].astype(float).dropna()
        n = len(acc)
        mean, std = (acc.mean(), acc.std(ddof=1) if n > 1 else math.nan) if n else (math.nan, math.nan)
        half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
        rows.append({
            **dict(zip(keys, key, strict=True)),
            "runs": len(group),
            "finished": len(finished),
            "success_rate": finished.success.astype(bool).mean() if len(finished) else math.nan,
            "diverged": int((finished.status == "diverged").sum()),
            "failed": int((finished.status == "failed").sum()),
            "n": n,
            "test_acc_mean": mean,
            "test_acc_std": std,
            "test_acc_ci95_low": mean - half,
            "test_acc_ci95_high": mean + half,
            "test_acc_median": acc.median() if n else math.nan,
            "test_acc_best": acc.max() if n else math.nan,
            "train_loss_mean": finished.loc[finished.status == "completed", "train_loss"].astype(float).mean(),
        })
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Comparison:
    """V2 minus V1 at one configuration."""

    config: tuple
    diff: float
    p_value: float
    note: str


def compare(table: pd.DataFrame) -> list[Comparison]:
    """Welch's t-test of V2 against V1 test accuracy at each configuration where both have runs."""
    keys = ["depth", *setting_columns(table)]
    done = table[table.status == "completed"]
    comparisons = []
    for key, group in done.groupby(keys, sort=True, dropna=False):
        v1 = group.loc[group.version == "v1", "test_acc"].astype(float).dropna()
        v2 = group.loc[group.version == "v2", "test_acc"].astype(float).dropna()
        if v1.empty or v2.empty:
            continue
        diff = v2.mean() - v1.mean()
        if min(len(v1), len(v2)) < 2:
            p, note = math.nan, "n < 2 per version: no test possible"
        else:
            p = float(stats.ttest_ind(v2, v1, equal_var=False).pvalue)
            note = "n < 5 per version: weak evidence" if min(len(v1), len(v2)) < 5 else ""
            if math.isnan(p):  # identical values on both sides
                p = 1.0 if diff == 0 else 0.0
        comparisons.append(Comparison(key if isinstance(key, tuple) else (key,), diff, p, note))
    return comparisons


def _pct(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _acc(row: pd.Series) -> str:
    if row is None or not row["n"]:
        return "-"
    spread = f" ± {100 * row.test_acc_std:.2f}" if row["n"] > 1 else ""
    return f"{100 * row.test_acc_mean:.2f}{spread}"


def report_rows(summary: pd.DataFrame, comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table as header and string cells, shared by the console and report.md."""
    config_keys = [c for c in summary.columns if c == "depth" or "." in c]
    versions = sorted(summary.version.unique())
    header = [*config_keys]
    for v in versions:
        header += [f"{v.upper()} runs", f"{v.upper()} success", f"{v.upper()} acc % mean ± std",
                   f"{v.upper()} median", f"{v.upper()} best", f"{v.upper()} train loss"]
    if comparisons:
        header += ["V2−V1 (pts)", "p (Welch)"]
    by_config = {c.config: c for c in comparisons}
    cells = []
    for key, group in summary.groupby(config_keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        line = [str(k) for k in key]
        for v in versions:
            match = group[group.version == v]
            row = match.iloc[0] if len(match) else None
            if row is None:
                line += ["-"] * 6
                continue
            line += [
                f"{row.finished}/{row.runs}",
                "-" if math.isnan(row.success_rate) else f"{100 * row.success_rate:.0f}%",
                _acc(row), _pct(row.test_acc_median), _pct(row.test_acc_best),
                "-" if math.isnan(row.train_loss_mean) else f"{row.train_loss_mean:.3f}",
            ]
        if comparisons:
            c = by_config.get(key)
            line += ["-", "-"] if c is None else [f"{100 * c.diff:+.2f}", "-" if math.isnan(c.p_value) else f"{c.p_value:.3f}"]
        cells.append(line)
    return header, cells


def markdown(sweep_dir: Path, table: pd.DataFrame, summary: pd.DataFrame, comparisons: list[Comparison]) -> str:
    header, cells = report_rows(summary, comparisons)
    done = int(table.status.isin(FINISHED).sum())
    lines = [
        f"# {sweep_dir.name}: ResNet V1 vs V2 by depth",
        "",
        f"{done} of {len(table)} runs finished ({int((table.status == 'completed').sum())} completed, "
        f"{int((table.status == 'diverged').sum())} diverged, {int((table.status == 'failed').sum())} failed). "
        "Accuracy is final test accuracy in percent over completed runs (mean ± sample std over seeds); "
        "success rate is over finished runs.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(row) + " |" for row in cells),
        "",
    ]
    notes = sorted({c.note for c in comparisons if c.note})
    lines += [f"- Note: {n}." for n in notes]
    return "\n".join(lines).rstrip() + "\n"


@dataclass
class Report:
    sweep_dir: Path
    table: pd.DataFrame
    summary: pd.DataFrame
    comparisons: list[Comparison]
    markdown: str


def build_report(sweep_dir: Path) -> Report:
    """Rebuild results.csv from the run folders, then write summary.csv and report.md beside it."""
    table = write_results(sweep_dir)
    summary = summarize(table) if len(table) else pd.DataFrame()
    comparisons = compare(table) if len(table) else []
    text = markdown(sweep_dir, table, summary, comparisons) if len(table) else f"# {sweep_dir.name}\n\nNo runs yet.\n"
    storage.write_text(sweep_dir / SUMMARY_CSV, summary.to_csv(index=False))
    storage.write_text(sweep_dir / REPORT_MD, text)
    return Report(sweep_dir, table, summary, comparisons, text)


def find_sweeps(root: Path) -> list[Path]:
    """Sweep folders under ``root``: those with a sweep.yaml or any run folder."""
    if (root / "sweep.yaml").is_file():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (
        (p / "sweep.yaml").is_file() or any((q / "config.yaml").is_file() for q in p.iterdir() if q.is_dir())))
