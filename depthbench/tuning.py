"""Choosing each arm's value of the tuned axes: runs grouped into arms and candidates, candidates ranked
by the mean of the tune metric over their seeds.

An arm is one combination of the arm axes (version and depth, say); a candidate is one combination of the
tuned axes (``train.lr=0.1``), trained once per seed. Only validation metrics are read here: the test
split plays no part in any choice. Successive halving (:mod:`depthbench.halving`) ranks with the metric at
a rung's step, the tuned report with the metric at the end of the run. Torch-free.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from depthbench.config import HIGHER_IS_BETTER, RunConfig, TuneConfig
from depthbench.config.grid import axis_value

Values = tuple[Any, ...]  # a run's values of some axes, in the axes' order


@dataclass(frozen=True)
class Arm:
    """One combination of the arm axes, and the runs of each candidate (its seeds), in grid order."""

    values: Values
    candidates: dict[Values, list[RunConfig]]


@dataclass(frozen=True)
class Score:
    """A candidate's metric over its seeds: the mean and sample std of the seeds that have a value."""

    mean: float  # NaN when no seed has a value
    std: float  # NaN with fewer than two
    seeds: int  # seeds with a value
    missing: int  # seeds without one: failed, unfinished or pruned before it was measured


@dataclass(frozen=True)
class Ranking:
    """An arm's candidates, best first; those without any value come last, in grid order."""

    arm: Arm
    order: list[Values]
    scores: dict[Values, Score]

    @property
    def best(self) -> Values | None:
        """The selected candidate, or None when no candidate has a value."""
        first = self.order[0] if self.order else None
        return first if first is not None and self.scores[first].seeds else None

    @property
    def ties(self) -> list[Values]:
        """Candidates after the best whose mean equals it: the best is the first of them in grid order."""
        best = self.best
        if best is None:
            return []
        return [c for c in self.order[1:] if self.scores[c].seeds and self.scores[c].mean == self.scores[best].mean]


def arms(runs: Sequence[RunConfig], tune: TuneConfig, grid_axes: Sequence[str]) -> list[Arm]:
    """The sweep's runs grouped by arm, then by candidate, both in grid order."""
    arm_axes = tune.arm_axes(grid_axes)
    grouped: dict[Values, dict[Values, list[RunConfig]]] = {}
    for run in runs:
        arm = tuple(axis_value(run, axis) for axis in arm_axes)
        candidate = tuple(axis_value(run, axis) for axis in tune.axes)
        grouped.setdefault(arm, {}).setdefault(candidate, []).append(run)
    return [Arm(values, candidates) for values, candidates in grouped.items()]


def rank(arm: Arm, value_of: Callable[[RunConfig], float | None], higher_is_better: bool) -> Ranking:
    """``arm``'s candidates ordered by the mean of ``value_of`` over their seeds (None: no value), best first;
    equal means keep grid order, so a tie goes to the candidate the grid lists first."""
    scores = {}
    for candidate, runs in arm.candidates.items():
        values = [v for v in (value_of(run) for run in runs) if v is not None]
        mean = statistics.fmean(values) if values else math.nan
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        scores[candidate] = Score(mean, std, len(values), len(runs) - len(values))
    sign = -1.0 if higher_is_better else 1.0
    measured = [c for c in arm.candidates if scores[c].seeds]
    order = sorted(measured, key=lambda c: sign * scores[c].mean)  # stable: grid order among equals
    return Ranking(arm, order + [c for c in arm.candidates if not scores[c].seeds], scores)


def worst(metric: str) -> float:
    """The value a diverged run counts as: it learned nothing, so no candidate that trained ranks below it."""
    return 0.0 if HIGHER_IS_BETTER[metric] else math.inf


def final_value(result: Mapping[str, Any] | None, metric: str) -> float | None:
    """A finished run's tune metric from its result.json: its value when it completed, the worst when it
    diverged, None when it failed, was pruned or has not finished."""
    if result is None:
        return None
    if result.get("status") == "diverged":
        return worst(metric)
    value = result.get(metric) if result.get("status") == "completed" else None
    return float(value) if _finite(value) else None


def rung_value(rows: Sequence[Mapping[str, Any]], step: int, metric: str) -> float | None:
    """A run's tune metric at ``step`` from its metrics.jsonl rows: the evaluation at that step (for
    ``best_val_acc`` the best evaluation up to it); the worst once its loss was not finite; None when the
    run has not evaluated at that step yet."""
    evaluated = [row for row in rows if row.get("step", 0) <= step and "val_acc" in row]
    if any(not _finite(row.get("train_loss", 0.0)) for row in rows if row.get("step", 0) <= step):
        return worst(metric)
    at_step = next((row for row in evaluated if row["step"] == step), None)
    if at_step is None:
        return None
    if metric == "best_val_acc":
        return max(float(row["val_acc"]) for row in evaluated)
    return float(at_step[metric])


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def describe(axes: Sequence[str], values: Values) -> str:
    """``train.lr=0.1, train.warmup.steps=500``."""
    return ", ".join(f"{axis}={value_text(value)}" for axis, value in zip(axes, values, strict=True))


def value_text(value: Any) -> str:
    """A value of an axis as a report writes it: a float in its short general form (``0.1``, ``1e-05``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)
