"""A tuned sweep's outcome: each arm at the value of the tuned axes that validation chose, with the test
accuracy and success rate there, a verdict, a flag where the choice sits at the edge of the values tried,
and V2 − V1 (or each unit − its family's V2 unit) with every arm at its own selected value.

The choice reads validation metrics only (:mod:`depthbench.tuning`), as AlgoPerf does (Dahl et al., 2023,
arXiv:2306.07179), so the test accuracy of a row is not inflated by having been picked on. Comparing
versions at each one's own best learning rate asks whether a design trains when tuned, not at a rate that
suits the other. A value that successive halving stopped (Li et al., 2018, arXiv:1603.06560) counts as
tried, not as trained to the end. :mod:`depthbench.report` renders this, :mod:`depthbench.plots` draws the
sensitivity of each arm to the tuned value. Torch-free.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from depthbench.config import RunConfig, SweepConfig, TuneConfig
from depthbench.families import FAMILIES, version_label
from depthbench.layout import RunFolder
from depthbench.results import RunRecord
from depthbench.statistics import Comparison, reference_unit, seed_statistics, unit_order, welch_comparison
from depthbench.tuning import Arm, Ranking, Score, Values, arms, describe, final_value, rank, rung_value, value_text

TRAINS = 0.5  # a value "trains" where at least this share of its runs trained to the end succeed
# Arm axes that say what a run builds; the others (depth, settings) are where two arms are compared.
_DESIGN_AXES = ("model.family", "version", "model.unit")


@dataclass(frozen=True)
class Candidate:
    """One value of the tuned axes in one arm: its validation score over seeds, the statistics of its runs
    (:func:`~depthbench.statistics.seed_statistics`: test accuracy over completed runs, success rate over
    those trained to the end), and its runs without a validation value, by why."""

    values: Values
    score: Score
    stats: pd.Series
    pruned: int  # runs stopped by successive halving
    failed: int
    unfinished: int
    unmeasured: int  # completed, but result.json has no value of the tune metric
    rung: float  # mean tune metric of the pruned runs at the step where they stopped; NaN without any

    @property
    def was_pruned(self) -> bool:
        """Stopped by successive halving: tried, but none of its runs trained to the end."""
        return self.pruned > 0 and not self.stats.finished

    @property
    def trains(self) -> bool:
        return bool(self.stats.finished) and self.stats.success_rate >= TRAINS


@dataclass(frozen=True)
class ArmOutcome:
    """One arm: its candidates in grid order, their ranking on validation, and what the report says of it."""

    values: dict[str, Any]  # arm axis -> value
    family: str
    version: str
    unit: str  # the unit its runs build
    design: str  # the version as its family names it (V1, Post-LN), or the unit where it is not the version's
    name: str  # "V1 depth=20", as the figures label it
    candidates: dict[Values, Candidate]
    ranking: Ranking
    verdict: str
    edges: tuple[str, ...]  # a note per numeric tuned axis whose selected value is the smallest or largest tried
    notes: tuple[str, ...]

    @property
    def selected(self) -> Candidate | None:
        best = self.ranking.best
        return None if best is None else self.candidates[best]

    @property
    def pruned(self) -> int:
        return sum(c.was_pruned for c in self.candidates.values())


@dataclass(frozen=True)
class Pair:
    """V2 − V1, or a unit − its family's V2 unit, of test accuracy, each arm at its own selected value."""

    comparison: Comparison
    compared: ArmOutcome
    reference: ArmOutcome


@dataclass(frozen=True)
class TunedSweep:
    """Every arm of a tuned sweep at its selected value, the pairs compared there, and what to warn of."""

    tune: TuneConfig
    arm_axes: tuple[str, ...]
    arms: list[ArmOutcome]  # by family, version (then unit), depth, then the other arm axes
    pair_axes: tuple[str, ...]  # the arm axes two compared arms share: all but what the runs build
    pairs: list[Pair]
    warnings: list[str]


def outcome(sweep: SweepConfig, records: Sequence[RunRecord], table: pd.DataFrame, sweep_dir: Path
            ) -> TunedSweep | None:
    """A tuned sweep's outcome from its planned runs' records and results table (success judged by the sweep's
    rule), or None for a sweep without a ``tune`` section. Pruned runs' rung values are read from their
    metrics.jsonl under ``sweep_dir``."""
    tune = sweep.tune
    if tune is None:
        return None
    grid = sweep.axes()
    arm_axes = tune.arm_axes(list(grid))
    by_id = {record.run_id: record for record in records}
    found = [_arm(arm, arm_axes, tune, by_id, table, sweep_dir) for arm in arms(sweep.runs(), tune, list(grid))]
    found.sort(key=lambda arm: _order(arm, arm_axes, grid))
    pair_axes = tuple(axis for axis in arm_axes if axis not in _DESIGN_AXES)
    pairs, said = _pairs(found, arm_axes, pair_axes, table)
    warnings = [f"Warning: {arm.name}: {edge}." for arm in found for edge in arm.edges]
    warnings += [f"Warning: {arm.name}: no candidate measured, so nothing was selected." for arm in found
                 if arm.selected is None]
    return TunedSweep(tune, arm_axes, found, pair_axes, pairs, warnings + said)


# ---------------------------------------------------------------------------------------------
# One arm: candidates, selection, verdict, notes
# ---------------------------------------------------------------------------------------------


def _arm(arm: Arm, arm_axes: Sequence[str], tune: TuneConfig, records: Mapping[str, RunRecord],
         table: pd.DataFrame, sweep_dir: Path) -> ArmOutcome:
    def value_of(run: RunConfig) -> float | None:
        return final_value(records[run.run_id].result or None, tune.metric)

    ranking = rank(arm, value_of, tune.higher_is_better)
    candidates = {values: _candidate(values, runs, ranking.scores[values], records, table, sweep_dir, tune.metric)
                  for values, runs in arm.candidates.items()}
    first = next(iter(arm.candidates.values()))[0]
    family, version = first.model.family, first.version
    unit = FAMILIES[family].unit_of(version, first.model.unit)
    values = dict(zip(arm_axes, arm.values, strict=True))
    selected = None if ranking.best is None else candidates[ranking.best]
    edges = tuple(_edges(list(candidates.values()), selected, tune.axes))
    notes = [*edges]
    if ranking.ties:
        tied = " and ".join(describe(tune.axes, tie) for tie in ranking.ties)
        notes.append(f"tie with {tied}; took the first listed")
    missing = [f"{describe(tune.axes, c.values)} ({_missing(c)})" for c in candidates.values() if _missing(c)]
    if missing:
        notes.append(f"missing runs at {', '.join(missing)}")
    if selected is None:
        notes.append("no candidate measured")
    design = version_label(family, version) if unit == FAMILIES[family].version_unit[version] else unit
    name = " ".join([design, *(f"{axis.split('.', 1)[-1]}={value_text(value)}" for axis, value in values.items()
                               if axis not in _DESIGN_AXES)])
    return ArmOutcome(values, family, version, unit, design, name, candidates, ranking,
                      _verdict(candidates, selected, tune.axes), edges, tuple(notes))


def _candidate(values: Values, runs: Sequence[RunConfig], score: Score, records: Mapping[str, RunRecord],
               table: pd.DataFrame, sweep_dir: Path, metric: str) -> Candidate:
    ids = [run.run_id for run in runs]
    stats = pd.Series(seed_statistics(table[table.run_id.isin(ids)]))
    unmeasured = [records[i] for i in ids if final_value(records[i].result or None, metric) is None]
    status = [record.status for record in unmeasured]
    rungs = [_rung_value(record, sweep_dir, metric) for record in unmeasured if record.status == "pruned"]
    rungs = [v for v in rungs if v is not None and math.isfinite(v)]
    return Candidate(values, score, stats, status.count("pruned"), status.count("failed"),
                     status.count("pending") + status.count("partial"), status.count("completed"),
                     statistics.fmean(rungs) if rungs else math.nan)


def _rung_value(record: RunRecord, sweep_dir: Path, metric: str) -> float | None:
    step = record.result.get("pruned_at")
    if not isinstance(step, int):
        return None
    return rung_value(RunFolder(sweep_dir / record.run_id).metrics(), step, metric)


def _missing(candidate: Candidate) -> str:
    """Runs of a candidate that have no validation value and were not pruned: '1 failed, 2 unfinished'."""
    counts = {"failed": candidate.failed, "unfinished": candidate.unfinished,
              "completed without the metric": candidate.unmeasured}
    return ", ".join(f"{n} {why}" for why, n in counts.items() if n)


def _numeric(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _edges(candidates: Sequence[Candidate], selected: Candidate | None, axes: Sequence[str]) -> list[str]:
    """Where the selected value of a numeric tuned axis is the smallest or the largest tried: the best value
    may lie beyond the range, so the choice is a bound, not an optimum."""
    if selected is None:
        return []
    found = []
    for i, axis in enumerate(axes):
        tried = {c.values[i] for c in candidates}
        value = selected.values[i]
        # Of two values every choice is an end: the flag tells something only where a value lies between.
        if len(tried) < 3 or not all(_numeric(v) for v in tried):
            continue
        end = "smallest" if value == min(tried) else "largest" if value == max(tried) else ""
        if end:
            found.append(f"at the edge of the range ({describe((axis,), (value,))} is the {end} tried): widen it")
    return found


def _tried_range(candidates: Sequence[Candidate], axes: Sequence[str]) -> str:
    """The values tried of each tuned axis: 'train.lr 0.01 to 0.4' for numbers, else them all."""
    parts = []
    for i, axis in enumerate(axes):
        tried = list(dict.fromkeys(c.values[i] for c in candidates))
        if len(tried) > 1 and all(_numeric(v) for v in tried):
            parts.append(f"{axis} {value_text(min(tried))} to {value_text(max(tried))}")
        else:
            parts.append(f"{axis} {', '.join(value_text(v) for v in tried)}")
    return ", ".join(parts)


def _verdict(candidates: Mapping[Values, Candidate], selected: Candidate | None, axes: Sequence[str]) -> str:
    """'trains' at the selected value; else the values that do train; else that none does, with the range."""
    if selected is not None and selected.trains:
        return "trains"
    others = [c for c in candidates.values() if c is not selected and c.trains]
    if others:
        return f"trains at {' or '.join(describe(axes, c.values) for c in others)} (not selected)"
    tried = list(candidates.values())
    pruned = sum(c.was_pruned for c in tried)
    waiting = sum(not c.stats.finished and not c.was_pruned for c in tried)
    if waiting == len(tried):
        return "no value trained yet"
    said = [_tried_range(tried, axes), *([f"{pruned} pruned"] if pruned else []),
            *([f"{waiting} not trained yet"] if waiting else [])]
    return f"fails at every value tried ({'; '.join(said)})"


def _order(arm: ArmOutcome, arm_axes: Sequence[str], grid: Mapping[str, list[Any]]) -> tuple:
    """Family, then V1's unit, V2's, the others, then depth, then the other arm axes, each value where the
    grid lists it."""
    rest = sorted((axis for axis in arm_axes if axis not in _DESIGN_AXES), key=lambda axis: axis != "depth")

    def position(axis: str) -> int:
        listed = grid.get(axis, [])
        return listed.index(arm.values[axis]) if arm.values[axis] in listed else len(listed)

    return (list(FAMILIES).index(arm.family), unit_order(arm.unit), *(position(axis) for axis in rest))


# ---------------------------------------------------------------------------------------------
# Pairs: V2 - V1 and each unit - V2's unit, each at its own selected value
# ---------------------------------------------------------------------------------------------


def _pairs(found: Sequence[ArmOutcome], arm_axes: Sequence[str], pair_axes: Sequence[str], table: pd.DataFrame
           ) -> tuple[list[Pair], list[str]]:
    """The arms that differ only in what their runs build, compared as the untuned report compares runs:
    V2 against V1 where each builds its version's own unit, and, where units vary, each other unit against
    the family's V2 unit (one arm per unit, the one whose version implies it first). With notes on pairs that
    could not be compared."""
    if "version" not in arm_axes and "model.unit" not in arm_axes:
        return [], [f"Note: no V1-vs-V2 comparison: the arms ({', '.join(arm_axes) or 'none'}) do not differ by "
                    "version or unit (tune.arm)."]
    grouped: dict[tuple, list[ArmOutcome]] = {}
    for arm in found:
        grouped.setdefault((arm.family, *(arm.values[axis] for axis in pair_axes)), []).append(arm)
    pairs, notes = [], []
    for (family, *key), group in grouped.items():
        own = FAMILIES[family].version_unit
        versions = {arm.version: arm for arm in group if arm.unit == own[arm.version]}
        sides = []
        if "v1" in versions and "v2" in versions:
            sides.append((versions["v2"], versions["v1"], "version"))
        by_unit: dict[str, ArmOutcome] = {}
        for arm in sorted(group, key=lambda a: a.unit != own[a.version]):  # an arm of its version's own unit first
            by_unit.setdefault(arm.unit, arm)
        reference = by_unit.get(reference_unit(family))
        # V1's unit against V2's is the version pair already, where there is one
        compared = {reference_unit(family), *([own["v1"]] if sides else [])}
        others = sorted(set(by_unit) - compared, key=unit_order)
        if reference is not None:
            sides += [(by_unit[unit], reference, "unit") for unit in others]
        for compared, against, per in sides:
            pair = _pair(tuple(key), compared, against, per, table)
            if pair is None:
                notes.append(f"Note: {compared.name} against {against.name}: nothing to compare, as one side has "
                             "no completed run at a selected value.")
            else:
                pairs.append(pair)
    return pairs, notes


def _pair(key: tuple, compared: ArmOutcome, reference: ArmOutcome, per: str, table: pd.DataFrame) -> Pair | None:
    if compared.selected is None or reference.selected is None:
        return None

    def runs(arm: ArmOutcome) -> pd.DataFrame:
        chosen = arm.ranking.arm.candidates[arm.ranking.best]
        return table[table.run_id.isin([run.run_id for run in chosen])]

    name = (lambda arm: arm.version) if per == "version" else (lambda arm: arm.unit)
    comparison = welch_comparison(key, name(compared), runs(compared), name(reference), runs(reference), per)
    return None if comparison is None else Pair(comparison, compared, reference)


def sensitivity_points(tuned: TunedSweep) -> pd.DataFrame:
    """The sensitivity figure's data: a row per (line, candidate) with the tune metric's mean and std over
    seeds against the first tuned axis; a panel is a version or unit, a line an arm of it and a value of the
    other tuned axes. Accuracies in
    percent. A pruned candidate's row holds its value at the rung where it stopped, ``pruned`` True."""
    scale = 100.0 if tuned.tune.metric.endswith("acc") else 1.0  # accuracies in percent, val_loss as it is
    rows = []
    for arm in tuned.arms:
        for values, candidate in arm.candidates.items():
            others = " ".join(f"{axis.split('.', 1)[-1]}={value_text(v)}"
                              for axis, v in zip(tuned.tune.axes[1:], values[1:], strict=True))
            # A panel per version or unit; its lines named by the rest of the arm and the other tuned values.
            line = f"{arm.name.removeprefix(arm.design).strip()} {others}".strip() or arm.name
            if candidate.score.seeds:
                rows.append({"panel": arm.design, "series": line, "x": values[0], "mean": scale * candidate.score.mean,
                             "std": scale * candidate.score.std, "n": candidate.score.seeds, "pruned": False})
            elif candidate.was_pruned and math.isfinite(candidate.rung):
                rows.append({"panel": arm.design, "series": line, "x": values[0], "mean": scale * candidate.rung,
                             "std": math.nan, "n": candidate.pruned, "pruned": True})
    return pd.DataFrame(rows, columns=["panel", "series", "x", "mean", "std", "n", "pruned"])
