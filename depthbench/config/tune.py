"""A tuned sweep: which grid axes are tried per arm (``train.lr``), the validation metric that picks a
value, what an arm is, and successive halving across each arm's candidates.

Tuning never changes what a run trains, so it stays out of every run id: a sweep gains a ``tune`` section
and keeps its runs. Choices are made on the validation split (``dataset.val_split``), never on the test
split, as AlgoPerf does (Dahl et al., 2023, arXiv:2306.07179); the budget goes to the best candidates by
successive halving (Li et al., 2018, arXiv:1603.06560).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from depthbench.config.grid import GRID_RUN_KEYS, check_axis
from depthbench.config.schema import Section
from depthbench.errors import ConfigError

TuneMetric = Literal["val_acc", "best_val_acc", "val_loss"]
# Each metric's direction: the selected value has the highest accuracy, the lowest loss.
HIGHER_IS_BETTER: dict[str, bool] = {"val_acc": True, "best_val_acc": True, "val_loss": False}


class HalvingConfig(Section):
    """Successive halving: at each rung (a step count) every arm keeps its best ``1/eta`` candidates by the
    tune metric at that step, at least one; the others stop there as ``pruned``."""

    eta: int = Field(3, ge=2, description="keep the best 1/eta of an arm's candidates at each rung")
    rungs: tuple[int, ...] = Field(description="steps at which candidates are compared, increasing, below train.steps")

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, rungs: tuple[int, ...]) -> tuple[int, ...]:
        if not rungs:
            raise ValueError("give at least one step, e.g. [500, 1500]")
        if any(r <= 0 for r in rungs) or list(rungs) != sorted(set(rungs)):
            raise ValueError(f"must be positive step counts in increasing order (got {list(rungs)})")
        return rungs

    def kept(self, candidates: int) -> int:
        """How many of ``candidates`` go on past a rung: the best 1/eta, rounded up, at least one."""
        return max(1, -(-candidates // self.eta))


class TuneConfig(Section):
    axes: tuple[str, ...] = Field(description="grid axes whose values are tried per arm, e.g. [train.lr]")
    metric: TuneMetric = Field("val_acc", description="val_acc at the last step, best_val_acc over the run, "
                                                      "or val_loss at the last step (lowest wins)")
    arm: tuple[str, ...] | None = Field(None, description="the grid axes that make an arm; default: every grid "
                                                          "axis neither tuned nor seed")
    halving: HalvingConfig | None = None

    @field_validator("axes")
    @classmethod
    def _axes(cls, axes: tuple[str, ...]) -> tuple[str, ...]:
        if not axes:
            raise ValueError("name at least one grid axis to tune, e.g. [train.lr]")
        for axis in axes:
            check_axis(axis)
            if axis == "seed":
                raise ValueError("seed cannot be tuned: selection averages over seeds")
        if len(set(axes)) < len(axes):
            raise ValueError(f"names an axis more than once ({list(axes)})")
        return axes

    @field_validator("arm")
    @classmethod
    def _arm(cls, arm: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for axis in arm or ():
            check_axis(axis)
        return arm

    def arm_axes(self, grid_axes: Sequence[str]) -> tuple[str, ...]:
        """The axes that make an arm: as written, else every grid axis neither tuned nor ``seed``."""
        if self.arm is not None:
            return self.arm
        return tuple(axis for axis in grid_axes if axis not in self.axes and axis != "seed")

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.metric]


def check_tune(tune: TuneConfig, grid_axes: Sequence[str], runs: Sequence[Any]) -> None:
    """The tune section against the sweep: tuned and arm axes are grid axes, apart from each other and from
    ``seed``; every run holds out a validation split; every rung comes before the run's last step."""
    for axis in tune.axes:
        if axis not in grid_axes:
            raise ConfigError(f"tune.axes: '{axis}' is not a grid axis; tuning tries the values the grid lists "
                              f"(grid axes: {', '.join(grid_axes)})")
    for axis in tune.arm or ():
        if axis not in grid_axes:
            raise ConfigError(f"tune.arm: '{axis}' is not a grid axis (grid axes: {', '.join(grid_axes)})")
        if axis in tune.axes or axis == "seed":
            what = "tuned" if axis in tune.axes else "the seed, over which selection averages"
            raise ConfigError(f"tune.arm: '{axis}' is {what}; an arm is what is compared, not what is tried")
    for axis in (a for a in GRID_RUN_KEYS if a in tune.axes):
        # Tuning version or depth would pick a winner across what the study compares.
        raise ConfigError(f"tune.axes: '{axis}' is what the study compares; tune a setting such as train.lr")
    for run in runs:
        if run.dataset.val_split is None:
            raise ConfigError(f"tune: run {run.run_id} has no validation split, and values are chosen on one; "
                              "set dataset.val_split (a count, or a fraction such as 0.1 of the training split)")
        if tune.halving and tune.halving.rungs[-1] >= run.train.steps:
            raise ConfigError(f"tune.halving.rungs: step {tune.halving.rungs[-1]} is not before the last step of "
                              f"run {run.run_id} (train.steps {run.train.steps}); rungs compare runs on the way")
