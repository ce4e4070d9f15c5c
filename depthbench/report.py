"""The report of a sweep: V1 vs V2 by depth (or any grid axis), every unit against V2's, paper values
beside ours, plots; its numbers come from :mod:`depthbench.statistics`.

For each configuration (by default depth plus every other setting the grid varies; ``group_by`` picks
other axes) and version: how many runs finished, the success rate, test accuracy mean ± sample std over
seeds with its 95% t-interval, the median (the statistic [V2] reports) and the best, and the final
training loss. Where both versions have results, V2 − V1 of mean accuracy with Welch's t-test: the
p-value and the 95% interval of the difference (Welch–Satterthwaite degrees of freedom). Too few runs
to test anything are said so in words, not left to a blank cell.

Every model family (:mod:`depthbench.families`) has the same two versions, named as its papers name them:
a ResNet's V1 and V2, a ViT's Post-LN and Pre-LN. A sweep of both families gets a table per family, since
a ResNet and a ViT of one depth are different nets; runs of two families never share a row or a line.

A sweep that also trains other units (``model.unit``: Fixup, SkipInit, DeepNorm, ...) compares them
within their family in a units table: per configuration and unit the same statistics, and each unit
against the family's V2 unit (full_preact, pre_ln) with Welch's test. The V1 and V2 columns then hold
only the runs of each version's own unit, so that they compare the two designs; a run whose ``model.unit``
overrides its version is a row of the units table alone. A unit's runs are pooled over version labels
there, and ``summary.csv`` is that table, one row per (configuration, unit); without other units it is
one row per (configuration, version).

A sweep whose config carries a ``reference`` (the paper's table, see configs/paper/) gets a further
table: each published row beside the median test error of the runs it names, "fail" meaning an error
above 20% as in [V2] Table 1. ``build_report`` also draws the figures of :mod:`depthbench.plots` into
the sweep folder and links them from ``report.md``.

A tuned sweep (a ``tune`` section) gets a further section from :mod:`depthbench.tuned`: each arm at the
value of the tuned axes that validation chose, its test accuracy and success rate there, a verdict, a flag
where the choice is at the edge of the values tried, and V2 − V1 with each arm at its own selected value;
the figure ``sensitivity.png`` draws the validation metric against the tuned value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from depthbench import storage
from depthbench.config import SweepConfig
from depthbench.errors import DepthbenchError, did_you_mean
from depthbench.families import FAMILIES, version_label
from depthbench.layout import DIAGNOSE_JSON, ESTIMATE, RESULTS_CSV, SWEEP_FILE, RunFolder
from depthbench.plots import error_vs_depth, sensitivity, series_labels, training_curves, unit_flow
from depthbench.results import RunRecord, read_runs, saved_sweep, table_of
from depthbench.statistics import (
    FINISHED, NO_TEST, UNIT_NO_TEST, UNIT_WEAK_TEST, WEAK_TEST, Comparison, compare,
    compare_units, default_keys, families, groups, one_per_experiment, prepare, reference_unit, row_keys,
    summarize, summarize_units, unit_keys, unit_order, units_vary, version_split,
)
from depthbench.tuned import ArmOutcome, TunedSweep, outcome, sensitivity_points
from depthbench.tuning import Score, describe

SUMMARY_CSV = "summary.csv"
REPORT_MD = "report.md"
FAIL_ERROR = 20.0  # [V2] Table 1: "fail" means a test error above 20%
PLOT_FILES = {
    "error_vs_depth": "error_vs_depth.png",
    "curves": "curves.png",
    "grad_flow": "grad_flow.png",
    "sensitivity": "sensitivity.png",
}
FAMILY_TITLES = {"resnet": "ResNet", "vit": "ViT"}  # how titles and legends name a family
DEPTH_MEANS = {"resnet": "weight layers", "vit": "transformer blocks"}  # what a family's depth counts
METRIC_NAMES = {"val_acc": "validation accuracy", "best_val_acc": "best validation accuracy",  # the tune metrics
                "val_loss": "validation loss"}


def family_title(family: str) -> str:
    return FAMILY_TITLES.get(family, family)


# ---------------------------------------------------------------------------------------------
# The tables, as strings for the console and report.md
# ---------------------------------------------------------------------------------------------


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _same_key(key: tuple) -> tuple:
    # Missing values (None, NaN, NA) as one, so a configuration found in two tables is matched.
    return tuple(None if _missing(v) else v for v in key)


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


def _success(row: pd.Series) -> str:
    return "-" if math.isnan(row.success_rate) else f"{100 * row.success_rate:.0f}%"


def _difference(c: Comparison) -> list[str]:
    """A difference of means in points, its interval and its p-value, as cells."""
    return [f"{100 * c.diff:+.2f}", _ci(c.ci_low, c.ci_high, sign="+"),
            "-" if math.isnan(c.p_value) else f"{c.p_value:.3f}"]


def _stat_cells(row: pd.Series | None) -> list[str]:
    if row is None:
        return ["-"] * 7
    return [
        f"{row.finished}/{row.runs}", _success(row),
        _acc(row), _pct(row.test_acc_median), _pct(row.test_acc_best),
        "-" if math.isnan(row.train_loss_mean) else f"{row.train_loss_mean:.3f}",
        # a t-interval ignores that accuracy lies in [0, 1]; show it cut there
        _ci(row.test_acc_ci95_low, row.test_acc_ci95_high),
    ]


_STAT_NAMES = ("runs", "success", "acc % mean ± std", "median", "best", "train loss", "95% CI")


def version_names(family: str | None) -> dict[str, str]:
    """What a table calls the versions: a family's own names (V1, Post-LN), or v1 and v2 for a table
    whose rows are of several families (``None``)."""
    return {v: version_label(family, v) if family else v for v in ("v1", "v2")}


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


def _sorted(rows: list[tuple[tuple, list[str]]], keys: Sequence[str], sort: Sequence[str]) -> list[list[str]]:
    for name, descending in reversed(parse_sort(sort, keys)):
        index = keys.index(name)
        rows.sort(key=lambda r: _sort_value(r[0][index]), reverse=descending)
    return [line for _, line in rows]


def report_rows(
    summary: pd.DataFrame, comparisons: list[Comparison], keys: Sequence[str] | None = None,
    sort: Sequence[str] = (), names: dict[str, str] | None = None,
) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table as header and string cells, shared by the console and report.md.

    Rows are ``keys`` (default: depth and the varying settings), versions side by side unless
    ``version`` is a row key, named by ``names`` (default V1 and V2; :func:`version_names`). ``sort``
    orders rows by row keys (``key`` or ``key:desc``)."""
    keys = list(keys) if keys is not None else [c for c in summary.columns if c == "depth" or "." in c]
    names = names or version_names("resnet")
    split = version_split(keys)
    versions = sorted(summary.version.unique()) if split else [None]
    header = [*keys]
    for v in versions:
        header += [f"{names.get(v, v.upper())} {name}" if v else name for name in _STAT_NAMES]
    if comparisons:
        difference = f"{names['v2']}−{names['v1']}"
        header += [f"{difference} (pts)", f"{difference} 95% CI", "p (Welch)"]
    by_config = {_same_key(c.config): c for c in comparisons}
    rows: list[tuple[tuple, list[str]]] = []
    for key, group in groups(summary, keys):
        line = [_cell(k) for k in key]
        for v in versions:
            match = group[group.version == v] if v else group
            line += _stat_cells(match.iloc[0] if len(match) else None)
        if comparisons:
            c = by_config.get(_same_key(key))
            line += ["-"] * 3 if c is None else _difference(c)
        rows.append((key, line))
    return header, _sorted(rows, keys, sort)


def unit_rows(
    summary: pd.DataFrame, comparisons: list[Comparison], keys: Sequence[str], reference: str,
    sort: Sequence[str] = (),
) -> tuple[list[str], list[list[str]]]:
    """The units table of one family as header and string cells: a row per (configuration, unit) of
    :func:`summarize_units`, each unit against ``reference``, the family's V2 unit."""
    keys = [*keys, "model.unit"]
    difference = f"unit − {reference}"
    header = [*keys, "runs", "n", "success", "acc % mean ± std", "median",
              f"{difference} (pts)", f"{difference} 95% CI", "p (Welch)"]
    by_config = {(*_same_key(c.config), c.compared): c for c in comparisons}
    rows: list[tuple[tuple, list[str]]] = []
    for _, row in summary.iterrows():
        key = tuple(row[k] for k in keys)
        c = by_config.get(_same_key(key))
        if row["model.unit"] == reference:
            versus = ["reference", "-", "-"]
        else:
            versus = ["-"] * 3 if c is None else _difference(c)
        line = [*(_cell(k) for k in key), f"{row.finished}/{row.runs}", str(row.n), _success(row), _acc(row),
                _pct(row.test_acc_median), *versus]
        rows.append((key, line))
    return header, _sorted(rows, keys, sort)


def _describe(keys: Sequence[str], config: tuple) -> str:
    return ", ".join(f"{k} {_cell(v)}" for k, v in zip(keys, config, strict=True))


def _at(keys: Sequence[str], config: tuple) -> str:
    return f" at {_describe(keys, config)}" if keys else ""


def warnings(
    summary: pd.DataFrame, comparisons: list[Comparison], keys: Sequence[str], names: dict[str, str] | None = None,
) -> list[str]:
    """What the numbers cannot say, in words: too few runs to test, too few for more than a rough test."""
    names = names or version_names("resnet")
    v1, v2 = names["v1"], names["v2"]
    lines = []
    untestable = [c for c in comparisons if c.note == NO_TEST]
    if untestable:
        where = "; ".join(f"{_describe(keys, c.config)} ({v1} n = {c.n_reference}, {v2} n = {c.n})" for c in untestable)
        lines.append(f"Warning: too few runs to say anything about {v2} − {v1} at {where}: with one run a side the "
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


def unit_warnings(
    summary: pd.DataFrame, comparisons: list[Comparison], keys: Sequence[str], reference: str, repeats: int = 0,
) -> list[str]:
    """What the units table cannot say, in words: too few runs to test, no reference runs to test against,
    and runs that repeat an experiment under the other version label (``repeats``)."""
    lines = []
    untestable = [c for c in comparisons if c.note == UNIT_NO_TEST]
    if untestable:
        where = "; ".join(f"{c.compared}{_at(keys, c.config)} ({c.compared} n = {c.n}, {reference} n = {c.n_reference})"
                          for c in untestable)
        lines.append(f"Warning: too few runs to compare with {reference}: {where}. With one run a side the "
                     "difference may be seed noise of any size. Run 2 or more seeds per unit (5 for a usable test).")
    weak = list(dict.fromkeys(_describe(keys, c.config) for c in comparisons if c.note == UNIT_WEAK_TEST))
    if weak:
        where = f" at {'; '.join(weak)}" if keys else ""
        lines.append(f"Note: {UNIT_WEAK_TEST}{where}. With so few seeds only a large difference can reach a "
                     "small p-value, and a large p-value does not mean the units are equal.")
    lacking = []
    compared = {c.config for c in comparisons}
    for key, group in groups(summary, keys):
        with_runs = set(group.loc[group.n > 0, "model.unit"])
        if with_runs and reference not in with_runs and key not in compared:
            lacking.append(_describe(keys, key) if keys else "")
    if lacking:
        where = f" at {'; '.join(lacking)}" if keys else ""
        lines.append(f"Note: no completed {reference} runs{where}: the units there have nothing to be compared with.")
    if repeats:
        lines.append(f"Note: {repeats} run(s) repeat another run's unit, seed and settings under the other version "
                     "label, the same experiment: each is counted once.")
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


def plot_runs(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The runs the figures draw, of a prepared table: each experiment once, in line order, with a ``line``
    column naming its family (where a sweep has two), then its version as the family names it (V1,
    Post-LN) or, in a family that trains other units, its unit. Returned with the series columns that
    tell lines apart: ``line`` and every other setting that varies within a family (depth is the x axis)."""
    runs = one_per_experiment(table)
    series = ["line", *(k for k in default_keys(table) if k not in ("depth", "model.family"))]
    if runs.empty:
        return runs.assign(line=pd.Series(dtype=object)), series
    mixed = runs.family.nunique() > 1
    by_unit = {family for family, part in runs.groupby("family") if units_vary(part)}

    def line(run: pd.Series) -> str:
        name = run.unit if run.family in by_unit else version_label(run.family, run.version)
        return f"{family_title(run.family)} {name}" if mixed else name

    def order(run: pd.Series) -> tuple:
        # families as FAMILIES lists them, V1's unit before V2's before the rest, then the settings
        return (list(FAMILIES).index(run.family), unit_order(run.unit), *(_sort_value(run[k]) for k in series[1:]))

    runs = runs.assign(line=[line(run) for _, run in runs.iterrows()])
    return runs.iloc[sorted(range(len(runs)), key=lambda i: order(runs.iloc[i]))], series


def _depth_label(runs: pd.DataFrame) -> str:
    present = [f for f in FAMILIES if f in set(runs.family)]
    if len(present) == 1:
        return f"depth ({DEPTH_MEANS[present[0]]})"
    return "depth (" + "; ".join(f"{family_title(f)}: {DEPTH_MEANS[f]}" for f in present) + ")"


def _curves(sweep_dir: Path, runs: pd.DataFrame, series: list[str]) -> pd.DataFrame:
    runs = runs[runs.status.isin(("completed", "diverged"))]
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


def _flow_entries(sweep_dir: Path, runs: pd.DataFrame, series: list[str]) -> list[dict[str, Any]]:
    labels = series_labels(runs, series)
    entries = []
    for (_, run), label in zip(runs.iterrows(), labels, strict=True):
        for row in RunFolder(sweep_dir / run.run_id).diagnostics():
            entries.append({"series": label, "depth": run.depth, "step": row["step"], "units": row["units"]})
    return entries


def draw_plots(sweep_dir: Path, table: pd.DataFrame, tuned: TunedSweep | None = None) -> dict[str, Path]:
    """Every figure the sweep has data for, written into the sweep folder: {name: path}."""
    runs, series = plot_runs(prepare(table))
    drawn = {
        "error_vs_depth": error_vs_depth(
            runs, series, sweep_dir / PLOT_FILES["error_vs_depth"],
            title=f"{sweep_dir.name}: final test error against depth (mean ± std over seeds)",
            depth_label=_depth_label(runs) if len(runs) else "depth"),
        "curves": training_curves(
            _curves(sweep_dir, runs, series), sweep_dir / PLOT_FILES["curves"],
            title=f"{sweep_dir.name}: training loss and test error against step (mean over seeds, band = min..max)"),
        "grad_flow": unit_flow(
            _flow_entries(sweep_dir, runs, series), sweep_dir / PLOT_FILES["grad_flow"],
            title=f"{sweep_dir.name}: gradient norm reaching each residual unit (geometric mean over seeds)"),
        "sensitivity": None if tuned is None else sensitivity(
            sensitivity_points(tuned), sweep_dir / PLOT_FILES["sensitivity"], tuned.tune.axes[0],
            METRIC_NAMES[tuned.tune.metric] + (" (%)" if tuned.tune.metric.endswith("acc") else ""),
            title=f"{sweep_dir.name}: {METRIC_NAMES[tuned.tune.metric]} against {tuned.tune.axes[0]} "
                  "(mean ± std over seeds)"),
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
_UNITS_CAPTION = "Final test error against depth, one line per unit (and setting), error bars ± 1 std over seeds."


# ---------------------------------------------------------------------------------------------
# A tuned sweep: each arm at its selected value
# ---------------------------------------------------------------------------------------------


def _score(score: Score, metric: str) -> str:
    """A validation score over seeds: accuracies in percent, a loss as it is."""
    if not score.seeds:
        return "-"
    scale, digits = (100, 2) if metric.endswith("acc") else (1, 3)
    spread = f" ± {scale * score.std:.{digits}f}" if score.seeds > 1 else ""
    return f"{scale * score.mean:.{digits}f}{spread}"


def _arm_cell(arm: ArmOutcome, axis: str) -> str:
    value = arm.values[axis]
    if axis == "version":
        return version_label(arm.family, value)
    return family_title(value) if axis == "model.family" else _cell(value)


def tuned_rows(tuned: TunedSweep) -> Table:
    """Each arm at its selected value: the value, the validation score that chose it, test accuracy and
    success rate there, how many values were tried and pruned, the verdict and notes."""
    axes, metric = tuned.tune.axes, tuned.tune.metric
    shown = f"{metric.replace('_', ' ')} {'% ' if metric.endswith('acc') else ''}mean ± std"  # val acc % mean ± std
    header = [*tuned.arm_axes, *(f"{axis} selected" for axis in axes), shown,
              "test acc % mean ± std", "success", "tried", "pruned", "verdict", "notes"]
    cells = []
    for arm in tuned.arms:
        chosen = arm.selected
        picked = ["-"] * len(axes) if chosen is None else [_cell(v) for v in chosen.values]
        measured = ["-"] * 3 if chosen is None else [_score(chosen.score, metric), _acc(chosen.stats),
                                                     _success(chosen.stats)]
        cells.append([*(_arm_cell(arm, axis) for axis in tuned.arm_axes), *picked, *measured,
                      str(len(arm.candidates)), str(arm.pruned), arm.verdict, "; ".join(arm.notes) or "-"])
    return Table(list(tuned.arm_axes), header, cells, list(tuned.warnings))


def tuned_pair_rows(tuned: TunedSweep) -> Table:
    """V2 − V1 and each unit − its family's V2 unit, each arm at its own selected value, with Welch's test."""
    header = [*tuned.pair_axes, "compared", "against", "n", "difference (pts)", "95% CI", "p (Welch)"]
    cells = []
    for pair in tuned.pairs:
        c = pair.comparison
        sides = [f"{arm.design} at {describe(tuned.tune.axes, arm.ranking.best)}"
                 for arm in (pair.compared, pair.reference)]
        cells.append([*(_arm_cell(pair.compared, axis) for axis in tuned.pair_axes), *sides,
                      f"{c.n} vs {c.n_reference}", *_difference(c)])
    notes = []
    for per in ("version", "unit"):
        for note in dict.fromkeys(p.comparison.note for p in tuned.pairs if p.comparison.per == per):
            if note:
                where = [_describe(tuned.pair_axes, p.comparison.config) or "every arm" for p in tuned.pairs
                         if p.comparison.per == per and p.comparison.note == note]
                notes.append(f"Note: {note} at {'; '.join(dict.fromkeys(where))}.")
    return Table(list(tuned.pair_axes), header, cells, notes)


@dataclass
class TunedSection:
    """report.md's part for a tuned sweep: ``arms`` (its notes are the warnings) and ``pairs`` as tables,
    ``outcome`` their numbers."""

    outcome: TunedSweep
    arms: Table
    pairs: Table


def _sensitivity_caption(tuned: TunedSweep) -> str:
    axis, *others = tuned.tune.axes
    lines = f"one line per arm and value of {', '.join(others)}" if others else "one line per arm"
    pruned = any(arm.pruned for arm in tuned.arms)
    when = "" if tuned.tune.metric == "best_val_acc" else " at the end of training"
    return (f"{METRIC_NAMES[tuned.tune.metric].capitalize()}{when}, the tune metric, against {axis}, {lines}, "
            "error bars ± 1 std over seeds"
            + ("; open markers are candidates that successive halving stopped, at their value at the rung where "
               "they stopped." if pruned else "."))


def tuned_section(tuned: TunedSweep) -> TunedSection:
    return TunedSection(tuned, tuned_rows(tuned), tuned_pair_rows(tuned))


def _tuned_markdown(section: TunedSection, success: str) -> list[str]:
    tune = section.outcome.tune
    axes = ", ".join(tune.axes)
    rule = "a success being any completed run" if success == "completed" else f"a success being {success}"
    lines = [
        "", f"## Tuned: each arm at its selected {axes}", "",
        (f"Each arm ({', '.join(section.outcome.arm_axes) or 'the whole sweep'}) tried every {axes} the grid lists "
         f"and selected the one with the best mean {tune.metric} over seeds, measured on the validation split "
         "(dataset.val_split); test metrics play no part in the choice. Test accuracy (mean ± sample std over "
         f"completed runs) and success rate (over the runs trained to the end, {rule}) are those of the selected "
         "value's runs. tried counts the values of an arm, pruned those that successive halving stopped before "
         "the end. The verdict is 'trains' where the selected value's success rate is at least 1/2; else the "
         "values tried that reach it, not selected; else 'fails at every value tried' with the range tried. "
         "A selected value at the smallest or largest value tried is flagged: the best may lie beyond it."),
        "", *_markdown_table(section.arms.header, section.arms.cells), "",
        *(f"- {note}" for note in section.arms.notes),
    ]
    pairs = section.pairs
    if pairs.cells or pairs.notes:
        present = [f for f in FAMILIES if f in {arm.family for arm in section.outcome.arms}]
        versus = " and ".join(f"{version_label(f, 'v2')} − {version_label(f, 'v1')}" for f in present)
        units = [p for p in section.outcome.pairs if p.comparison.per == "unit"]
        if units:
            versus += ", and each other unit − " + " or ".join(dict.fromkeys(p.comparison.reference for p in units))
        lines += [
            "", "### Compared at each arm's own selected value", "",
            (f"{versus}, each arm at the {axes} it selected: the difference of mean test accuracy in percentage "
             "points; its 95% CI and p-value are Welch's t-test (unequal variances), which needs 2 or more completed "
             "runs a side. The untuned tables above compare them at each shared value instead."),
            "", *(_markdown_table(pairs.header, pairs.cells) if pairs.cells else ["No pair had runs to compare."]),
            "", *(f"- {note}" for note in pairs.notes),
        ]
    return lines


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
class Table:
    """One table of report.md: its row keys, header and cells, and the notes under it."""

    keys: list[str]
    header: list[str]
    cells: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Section:
    """One family's part of report.md: its V1-vs-V2 table and, where the family trains other units, its
    units table. ``own_units_only``: the version columns leave those other units' runs to the units table."""

    family: str
    versions: Table
    compared: bool  # some V2 − V1 was computed: the table has its columns
    units: Table | None = None
    own_units_only: bool = False

    @property
    def names(self) -> dict[str, str]:
        return version_names(self.family)


def _applicable(sort: Sequence[str], keys: Sequence[str]) -> list[str]:
    """The ``--sort`` items that order a table with these row keys (each was checked against some table's)."""
    return [item for item in sort if item.partition(":")[0] in keys]


def family_section(table: pd.DataFrame, family: str, keys: Sequence[str], sort: Sequence[str] = ()) -> Section:
    """The report of ``table``'s runs of one ``family``, as if they were a sweep of their own, by ``keys``."""
    runs = table[families(table) == family]
    prepared = prepare(runs)
    names = version_names(family)
    summary, comparisons = summarize(runs, keys), compare(runs, keys)
    header, cells = report_rows(summary, comparisons, keys, _applicable(sort, keys), names)
    section = Section(family, Table(list(keys), header, cells, warnings(summary, comparisons, keys, names)),
                      bool(comparisons))
    if units_vary(prepared):
        ukeys, reference = unit_keys(keys), reference_unit(family)
        unit_summary, unit_comparisons = summarize_units(runs, keys), compare_units(runs, keys)
        header, cells = unit_rows(unit_summary, unit_comparisons, ukeys, reference,
                                  _applicable(sort, [*ukeys, "model.unit"]))
        repeats = len(prepared) - len(one_per_experiment(prepared))
        section.units = Table(ukeys, header, cells,
                              unit_warnings(unit_summary, unit_comparisons, ukeys, reference, repeats))
        section.own_units_only = "model.unit" not in keys
    return section


def _family_keys(table: pd.DataFrame, family: str, keys: Sequence[str], group_by: Sequence[str] | None) -> list[str]:
    """A family's row keys: its own varying settings by default, else the sweep's keys less the family
    (itself a key only when nothing else is, so that the table has a row)."""
    if not group_by:
        return default_keys(table[families(table) == family])
    return [k for k in keys if k != "model.family"] or ["model.family"]


@dataclass
class Report:
    """A sweep's report. ``header``, ``cells``, ``notes``, ``summary`` and ``comparisons`` are the V1-vs-V2
    table of the whole sweep, by ``keys`` (the console's); ``sections`` are report.md's tables, one per
    family; ``unit_summary`` and ``unit_comparisons`` the units tables' numbers where units vary."""

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
    sections: list[Section] = field(default_factory=list)
    unit_summary: pd.DataFrame | None = None
    unit_comparisons: list[Comparison] = field(default_factory=list)
    tuned: TunedSection | None = None
    duration: str | None = None  # the sweep's estimated duration beside what its runs took
    pruned: int = 0  # runs pruned by successive halving: in results.csv, left out of ``table`` and every statistic

    @property
    def by(self) -> str:
        """What the rows are: "depth" for the default rows, else the row keys."""
        return "depth" if self.keys == default_keys(self.table) else ", ".join(self.keys)

    @property
    def title(self) -> str:
        present = [s.family for s in self.sections] or ["resnet"]
        versus = ", ".join(f"{family_title(f)} {version_label(f, 'v1')} vs {version_label(f, 'v2')}" for f in present)
        units = " and units" if any(s.units for s in self.sections) else ""
        return f"{self.sweep_dir.name}: {versus}{units} by {self.by}"


def _section_markdown(section: Section, mixed: bool) -> list[str]:
    """A family's tables, each opened by a blank line; under a heading of its own where the sweep has two."""
    v1, v2 = section.names["v1"], section.names["v2"]
    own = FAMILIES[section.family].version_unit
    lines = ["", f"## {family_title(section.family)}"] if mixed else []
    if not section.versions.cells:
        lines += ["", f"No runs of {v1}'s or {v2}'s own unit ({own['v1']}, {own['v2']}): every run is below."]
    else:
        if section.own_units_only:
            lines += ["", (f"The {v1} and {v2} columns hold the runs of each version's own unit ({v1}: {own['v1']}, "
                           f"{v2}: {own['v2']}); every unit, these included, is in the units table below.")]
        lines += ["", *_markdown_table(section.versions.header, section.versions.cells), "",
                  *(f"- {note}" for note in section.versions.notes)]
    if section.compared:
        lines += ["", (f"{v2}−{v1} is the difference of mean accuracy in percentage points; its 95% CI and p-value "
                       "are Welch's t-test (unequal variances), which needs 2 or more completed runs per version.")]
    if section.units:
        units, reference = section.units, reference_unit(section.family)
        per = f"per {' and '.join(units.keys)}" if units.keys else "pooled over every configuration"
        lines += [
            "", f"{'###' if mixed else '##'} Units", "",
            (f"Every unit the sweep trained, {per}, each against {reference}, {v2}'s unit ({v1}'s is {own['v1']}). "
             f"A unit's runs are pooled over their version labels, since the version only picks the unit of a run "
             f"that leaves model.unit out; n counts completed runs. unit − {reference} is the difference of mean "
             "accuracy in percentage points; its 95% CI and p-value are Welch's t-test (unequal variances), which "
             "needs 2 or more completed runs per unit."),
            "", *_markdown_table(units.header, units.cells), "", *(f"- {note}" for note in units.notes),
        ]
    return lines


def markdown(rep: Report) -> str:
    table = rep.table
    done = int(table.status.isin(FINISHED).sum())
    pooled = [k for k in default_keys(table) if k not in rep.keys]
    lines = [
        f"# {rep.title}",
        "",
        f"{done} of {len(table)} runs finished ({int((table.status == 'completed').sum())} completed, "
        f"{int((table.status == 'diverged').sum())} diverged, {int((table.status == 'failed').sum())} failed). "
        "Accuracy is final test accuracy in percent over completed runs (mean ± sample std over seeds, "
        "95% CI a t-interval of the mean, cut at 0 and 100); success rate is over finished runs, "
        + ("a success being any completed run." if rep.success == "completed" else
           f"a success being a completed run with {rep.success}.")
        + (f" Rows pool the runs of every {', '.join(pooled)}." if pooled else "")
        + (f" {rep.pruned} run(s) pruned by successive halving (tune.halving) are left out of these counts and of "
           "the tables and figures by depth and unit; the tuned section counts them, results.csv lists them."
           if rep.pruned else ""),
    ]
    for section in rep.sections:
        lines += _section_markdown(section, mixed=len(rep.sections) > 1)
    if rep.duration:
        lines += ["", rep.duration]
    if rep.tuned:
        lines += _tuned_markdown(rep.tuned, rep.success)
    if rep.reference:
        lines += ["", "## Paper vs measured", "",
                  (f"Test error in percent; the paper reports the median of 5 runs. \"fail\" means an error above "
                   f"{rep.fail_error:g}% ([V2] Table 1 uses 20%; here the sweep's success rule); diverged runs "
                   "count as failed."), "",
                  *_markdown_table(*rep.reference)]
    if rep.plots:
        by_unit = any(s.units for s in rep.sections)
        lines += ["", "## Plots", ""]
        for name, path in rep.plots.items():
            if name == "sensitivity" and rep.tuned:
                caption = _sensitivity_caption(rep.tuned.outcome)
            else:
                caption = _UNITS_CAPTION if by_unit and name == "error_vs_depth" else _PLOT_CAPTIONS[name]
            lines += [f"![{name}]({path.name})", "", caption, ""]
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
    # A pruned run stopped early by design: neither a success nor a failure, and no final accuracy. The tuned
    # section alone reads the pruned runs, at the rung where they stopped.
    every_record, every_run = records, table
    pruned = int((table.status == "pruned").sum())
    table = table[table.status != "pruned"].reset_index(drop=True)
    records = [record for record in records if record.status != "pruned"]
    if not len(table):
        text = f"# {sweep_dir.name}\n\nNo runs yet.\n"
        storage.write_text(sweep_dir / SUMMARY_CSV, pd.DataFrame().to_csv(index=False))
        storage.write_text(sweep_dir / REPORT_MD, text)
        return Report(sweep_dir, table, pd.DataFrame(), [], text)
    prepared = prepare(table)
    keys = row_keys(prepared, group_by)
    with_units = units_vary(prepared)
    # --sort may name a key of either table; each table is ordered by the keys it has
    parse_sort(sort, list(dict.fromkeys([*keys, *([*unit_keys(keys), "model.unit"] if with_units else [])])))
    present = [f for f in FAMILIES if f in set(prepared.family)]
    names = version_names(present[0] if len(present) == 1 else None)
    summary, comparisons = summarize(table, keys), compare(table, keys)
    header, cells = report_rows(summary, comparisons, keys, _applicable(sort, keys), names)
    tuned = outcome(sweep, every_record, every_run, sweep_dir) if sweep else None
    rep = Report(sweep_dir, table, summary, comparisons, "", keys, header, cells,
                 warnings(summary, comparisons, keys, names), reference_rows(sweep, records, table),
                 draw_plots(sweep_dir, table, tuned) if plots else {},
                 fail_error(sweep.success) if sweep else FAIL_ERROR, sweep.success.describe() if sweep else "completed",
                 [family_section(table, f, _family_keys(table, f, keys, group_by), sort) for f in present])
    if with_units:
        rep.unit_summary, rep.unit_comparisons = summarize_units(table, keys), compare_units(table, keys)
    if tuned is not None:
        rep.tuned = tuned_section(tuned)
    rep.duration = duration_note(sweep_dir, every_run)  # pruned runs trained too
    rep.pruned = pruned
    rep.markdown = markdown(rep)
    # One row per (configuration, unit) where units vary, which holds the version rows too; else per version.
    storage.write_text(sweep_dir / SUMMARY_CSV, (rep.unit_summary if with_units else summary).to_csv(index=False))
    storage.write_text(sweep_dir / REPORT_MD, rep.markdown)
    return rep


def duration_note(sweep_dir: Path, table: pd.DataFrame) -> str | None:
    """The duration estimated when the sweep last started (estimate.json) beside what the runs it estimated
    took to train (their wall_s), over those that have finished; None without an estimate or a finished run."""
    saved = storage.read_json(sweep_dir / ESTIMATE)
    if not isinstance(saved, dict) or not isinstance(saved.get("run_s"), dict) or "wall_s" not in table:
        return None
    took = table.set_index("run_id").wall_s.dropna()
    finished = [run_id for run_id in saved["run_s"] if run_id in took.index]
    if not finished:
        return None
    total = sum(float(s) for s in saved["run_s"].values())
    estimated, actual = sum(float(saved["run_s"][r]) for r in finished), float(took[finished].sum())
    off = f" ({100 * (actual / estimated - 1):+.0f}%)" if estimated > 0 else ""
    return (f"Duration: when the sweep last started, a trial of each distinct net estimated its {len(saved['run_s'])} "
            f"run(s) at {total:,.0f} s of training ({float(saved['wall_s']):,.0f} s of wall time with "
            f"--jobs {saved.get('jobs', 1)}); the {len(finished)} of them that finished were estimated at "
            f"{estimated:,.0f} s and took {actual:,.0f} s{off}.")


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
