"""The numbers of a report: which runs make a row, their statistics over seeds, and Welch's tests.

A row of a report is a configuration (depth and the other settings a sweep varies, or the axes of
``group_by``) and a version, or, where a sweep trains several units of a family, a unit. Its statistics
are over the seeds' completed runs: how many finished, the success rate, test accuracy mean ± sample std
with its 95% t-interval, the median and the best, and the final training loss. V2 − V1, and each unit −
its family's V2 unit, are Welch's t-test (unequal variances) with the Welch–Satterthwaite interval.
:mod:`depthbench.report` turns these into tables, report.md and plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from warnings import catch_warnings, simplefilter

import numpy as np
import pandas as pd
from scipy import stats

from depthbench.errors import DepthbenchError, did_you_mean
from depthbench.families import FAMILIES, family_of_unit
from depthbench.results import setting_columns

FINISHED = ("completed", "diverged", "failed")
WEAK_N = 5  # below this many runs per version a test can only flag large effects


# ---------------------------------------------------------------------------------------------
# Families, units and grouping
# ---------------------------------------------------------------------------------------------


def families(table: pd.DataFrame) -> pd.Series:
    """The model family of each run. ``model.family`` is a column only where the sweep varies it; else a ViT
    is told by its block ("transformer", as :func:`depthbench.results.table_of` gives it) and the rest are
    ResNets, the family of every config that does not name one."""
    if "model.family" in table.columns:
        return table["model.family"].astype(object)
    if "block" in table.columns:
        return table["block"].map(lambda block: "vit" if block == "transformer" else "resnet").astype(object)
    return pd.Series("resnet", index=table.index, dtype=object)


def prepare(table: pd.DataFrame) -> pd.DataFrame:
    """The results table as the report reads it, with ``family``, ``unit`` (the unit each run builds) and
    ``own_unit`` (the unit its version implies: original / full_preact for a ResNet, post_ln / pre_ln for a
    ViT) added. Where ``model.unit`` varies, runs that left it to their version show that unit there too."""
    table = table.copy()
    table["family"] = families(table)
    table["own_unit"] = pd.Series(
        [FAMILIES[f].version_unit[v] for f, v in zip(table.family, table.version, strict=True)],
        index=table.index, dtype=object)
    if "model.unit" in table.columns:
        table["model.unit"] = table["model.unit"].astype(object).where(table["model.unit"].notna(), table.own_unit)
        table["unit"] = table["model.unit"]
    else:
        table["unit"] = table.own_unit
    return table


def units_vary(table: pd.DataFrame) -> bool:
    """Whether some run of a prepared table builds a unit other than its version's own: the sweep
    compares units, not only versions."""
    return bool((table.unit != table.own_unit).any())


def default_keys(table: pd.DataFrame) -> list[str]:
    """The rows of the report when none are asked for: depth and every setting that varies within a
    family, after the family where a sweep has two. Not ``model.unit``: the version split and the units
    table show it. Nor a setting that only follows the family (a ViT's optimizer beside a ResNet's): it
    would repeat the family."""
    family = families(table)
    keys = ["depth"]
    for column in setting_columns(table):
        if column in ("model.family", "model.unit"):
            continue
        # a missing value counts as one (None beside 0.05 varies)
        if any(part.nunique(dropna=False) > 1 for _, part in table[column].groupby(family)):
            keys.append(column)
    return ["model.family", *keys] if family.nunique() > 1 else keys


def row_keys(table: pd.DataFrame, group_by: Sequence[str] | None = None) -> list[str]:
    """The axes that make a row of the report: ``group_by`` as given (checked against the grid's axes),
    else :func:`default_keys`. Version, unless grouped by, is the column split instead. Where the sweep
    has two families the family is always a key: their runs are never pooled."""
    axes = ["version", "depth", "seed", *setting_columns(table)]
    if not group_by:
        return default_keys(table)
    for key in group_by:
        if key not in axes:
            raise DepthbenchError(
                f"cannot group by '{key}'{did_you_mean(key, axes)}: it is not an axis that varies in this sweep; "
                f"one of {', '.join(axes)}"
            )
    keys = list(dict.fromkeys(group_by))
    if families(table).nunique() > 1 and "model.family" not in keys:
        keys.insert(0, "model.family")
    return keys


def unit_keys(keys: Sequence[str]) -> list[str]:
    """The row keys of the units table: the report's, less the version and the unit (the table's split)."""
    return [k for k in keys if k not in ("version", "model.unit")]


def version_runs(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The runs a V1-vs-V2 table compares (of a prepared table): those that build their version's own
    unit, so that V1 and V2 mean the two designs and a v1-labelled Fixup run is not pooled into V1. Only
    where ``model.unit`` is a row key (grouped by it) does every run have its row."""
    return table if "model.unit" in keys else table[table.unit == table.own_unit]


def one_per_experiment(table: pd.DataFrame) -> pd.DataFrame:
    """A prepared table's runs, each experiment once. The version only picks the unit of a run that leaves
    ``model.unit`` out, so ``v1`` with unit full_preact and ``v2`` at the same seed and settings build the
    same net from the same draws: one experiment, kept as the run whose version implies its unit (a
    completed one first). Counting both would count one result twice and overstate what a test can tell."""
    identity = ["family", "unit", "depth", "seed", *(c for c in setting_columns(table) if c != "model.unit")]
    rank = 2 * (table.status != "completed").astype(int) + (table.unit != table.own_unit).astype(int)
    kept = table.assign(_rank=rank).sort_values("_rank", kind="stable").drop_duplicates(identity)
    return kept.drop(columns="_rank").sort_index()


def unit_order(unit: str) -> int:
    """Where a unit comes among its family's: V1's, V2's, then the others as the family lists them."""
    family = FAMILIES.get(family_of_unit(unit) or "")
    order = [*family.version_unit.values(), *family.units] if family else []
    return order.index(unit) if unit in order else len(order)


def reference_unit(family: str) -> str:
    """The unit every other unit of a family is compared with: V2's, the clean identity path."""
    return FAMILIES[family].version_unit["v2"]


def version_split(keys: Sequence[str]) -> list[str]:
    return [] if "version" in keys else ["version"]


def _key_tuple(key: Any) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def groups(table: pd.DataFrame, keys: Sequence[str]) -> Iterator[tuple[tuple, pd.DataFrame]]:
    """(key values, runs) for each configuration; the whole table as one group when there are no keys."""
    if table.empty:
        return
    if not keys:
        yield (), table
        return
    for key, group in table.groupby(list(keys), sort=True, dropna=False):
        yield _key_tuple(key), group


def _accuracies(runs: pd.DataFrame) -> pd.Series:
    return runs.loc[runs.status == "completed", "test_acc"].astype(float).dropna()


_STAT_COLUMNS = [
    "runs", "finished", "success_rate", "diverged", "failed", "n", "test_acc_mean", "test_acc_std",
    "test_acc_ci95_low", "test_acc_ci95_high", "test_acc_median", "test_acc_best", "train_loss_mean",
]


def seed_statistics(group: pd.DataFrame) -> dict[str, Any]:
    """The statistics of one configuration's runs over their seeds, as a row of summary.csv."""
    finished = group[group.status.isin(FINISHED)]
    acc = _accuracies(finished)
    n = len(acc)
    mean, std = (acc.mean(), acc.std(ddof=1) if n > 1 else math.nan) if n else (math.nan, math.nan)
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {
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
    }


def summarize(table: pd.DataFrame, group_by: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (configuration, version) with the statistics over its seeds, over the runs of each
    version's own unit (:func:`version_runs`)."""
    table = prepare(table)
    keys = row_keys(table, group_by)
    keys = [*keys, *version_split(keys)]
    rows = [{**dict(zip(keys, key, strict=True)), **seed_statistics(group)}
            for key, group in groups(version_runs(table, keys), keys)]
    return pd.DataFrame(rows, columns=[*keys, *_STAT_COLUMNS])


def summarize_units(table: pd.DataFrame, group_by: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (configuration, unit): every run, once per experiment (:func:`one_per_experiment`),
    whichever version label it carries; units in their family's order (V1's, V2's, the others)."""
    table = prepare(table)
    keys = unit_keys(row_keys(table, group_by))
    rows = []
    for key, group in groups(one_per_experiment(table), keys):
        for unit in sorted(group.unit.unique(), key=unit_order):
            rows.append({**dict(zip(keys, key, strict=True)), "model.unit": unit,
                         **seed_statistics(group[group.unit == unit])})
    return pd.DataFrame(rows, columns=[*keys, "model.unit", *_STAT_COLUMNS])


# ---------------------------------------------------------------------------------------------
# Welch's test: V2 - V1, and each unit - V2's unit
# ---------------------------------------------------------------------------------------------


def _welch(a: pd.Series, b: pd.Series) -> tuple[float, float, float, float]:
    """Mean of ``a`` minus mean of ``b`` with Welch's p-value and 95% interval: (diff, p, low, high),
    p and interval NaN when a side has fewer than 2 values."""
    diff = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return diff, math.nan, math.nan, math.nan
    with catch_warnings():
        # scipy warns of "catastrophic cancellation" when one side's seeds tie; Welch's test is still
        # defined then (one variance is zero), and both tying gives the nan handled below.
        simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_ind(a, b, equal_var=False)
    p = float(test.pvalue)
    if math.isnan(p):  # identical values on both sides: no spread to test against
        return diff, (1.0 if diff == 0 else 0.0), diff, diff
    interval = test.confidence_interval(0.95)
    return diff, p, float(interval.low), float(interval.high)


def _test_note(n: int, per: str) -> str:
    """What ``n`` runs on the smaller side allow: no test, a weak one, or '' for a usable one."""
    if n < 2:
        return f"n < 2 per {per}: no test possible"
    return f"n < {WEAK_N} per {per}: weak evidence" if n < WEAK_N else ""


NO_TEST = _test_note(1, "version")
WEAK_TEST = _test_note(2, "version")
UNIT_NO_TEST = _test_note(1, "unit")
UNIT_WEAK_TEST = _test_note(2, "unit")


@dataclass(frozen=True)
class Comparison:
    """``compared`` minus ``reference`` of mean test accuracy at one configuration, with Welch's test and
    interval: V2 against V1 (``per`` "version"), or a unit against its family's V2 unit (``per`` "unit")."""

    config: tuple
    compared: str  # v2, or a unit
    reference: str  # v1, or the family's V2 unit
    diff: float
    p_value: float
    n: int  # completed runs of ``compared``
    n_reference: int
    ci_low: float = math.nan
    ci_high: float = math.nan
    per: str = "version"

    @property
    def note(self) -> str:
        """What the sample sizes allow: no test, a weak one, or '' for a usable one."""
        return _test_note(min(self.n, self.n_reference), self.per)


# For one configuration's runs: the reference's name and runs, and each compared side's name and runs.
_Sides = tuple[str, pd.DataFrame, list[tuple[str, pd.DataFrame]]]


def _compare(done: pd.DataFrame, keys: Sequence[str], per: str,
             sides: Callable[[pd.DataFrame], _Sides]) -> list[Comparison]:
    """Welch's test of each compared side against the reference at each configuration of ``done`` where both
    have completed runs."""
    comparisons = []
    for key, group in groups(done, keys):
        reference, reference_runs, compared = sides(group)
        for name, runs in compared:
            comparison = welch_comparison(key, name, runs, reference, reference_runs, per)
            if comparison is not None:
                comparisons.append(comparison)
    return comparisons


def welch_comparison(config: tuple, name: str, runs: pd.DataFrame, reference: str, reference_runs: pd.DataFrame,
                     per: str = "version") -> Comparison | None:
    """Welch's test of ``runs``' completed test accuracies against ``reference_runs``', or None when a side
    has no completed run."""
    acc, base = _accuracies(runs), _accuracies(reference_runs)
    if acc.empty or base.empty:
        return None
    diff, p, low, high = _welch(acc, base)
    return Comparison(config, name, reference, diff, p, len(acc), len(base), low, high, per)


def compare(table: pd.DataFrame, group_by: Sequence[str] | None = None) -> list[Comparison]:
    """Welch's t-test of V2 against V1 test accuracy at each configuration where both have runs of their
    own unit."""
    table = prepare(table)
    keys = row_keys(table, group_by)
    if "version" in keys:
        return []
    done = version_runs(table[table.status == "completed"], keys)
    return _compare(done, keys, "version",
                    lambda group: ("v1", group[group.version == "v1"], [("v2", group[group.version == "v2"])]))


def compare_units(table: pd.DataFrame, group_by: Sequence[str] | None = None) -> list[Comparison]:
    """Welch's t-test of each unit against its family's V2 unit at each configuration where both have
    completed runs, every run counted once per experiment."""
    table = prepare(table)
    keys = unit_keys(row_keys(table, group_by))
    done = one_per_experiment(table)
    done = done[done.status == "completed"]

    def sides(group: pd.DataFrame) -> _Sides:
        # the family is a row key where a sweep has two (row_keys): a group is one family's
        reference = reference_unit(group.family.iloc[0])
        units = sorted(set(group.unit) - {reference}, key=unit_order)
        return (reference, _reference_runs(done, group, keys, reference),
                [(unit, group[group.unit == unit]) for unit in units])

    return _compare(done, keys, "unit", sides)


# Settings that the reference units (full_preact, pre_ln) do not read: a group of other units that sets
# one is compared with the reference runs whatever their value (Fixup's lower scalar_lr against BN runs).
_UNREAD_BY_REFERENCE = ("train.scalar_lr",)


def _reference_runs(done: pd.DataFrame, group: pd.DataFrame, keys: Sequence[str], reference: str) -> pd.DataFrame:
    """The reference unit's runs that a group of other units' runs is compared with: those at the group's
    value of every row key but the settings the reference does not read."""
    runs = done[(done.unit == reference) & (done.family == group.family.iloc[0])]
    for key in keys:
        if key not in _UNREAD_BY_REFERENCE:  # as text, so that None and NaN count as values
            runs = runs[runs[key].astype(str) == str(group[key].iloc[0])]
    return runs
