"""A sweep: the shared sections, the grid whose every combination is one run, and published results to
report beside them. :meth:`SweepConfig.runs` resolves and validates every run up front."""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from depthbench.config.grid import GRID_RUN_KEYS, Grid, check_grid, flatten_grid, set_dotted
from depthbench.config.messages import first_error
from depthbench.config.reference import ReferenceRow
from depthbench.config.rules import conflict, unmeasured_metric, unread_setting
from depthbench.config.run import RunConfig
from depthbench.config.tune import TuneConfig
from depthbench.config.schema import (
    DatasetConfig, ModelConfig, ResourcesConfig, Section, SuccessConfig, TrainConfig,
)
from depthbench.errors import ConfigError


class SweepConfig(Section):
    name: str
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    success: SuccessConfig = SuccessConfig()
    resources: ResourcesConfig = ResourcesConfig()
    # One grid mapping, or a list of them (sub-grids) whose runs are concatenated: a paper table whose
    # rows are not one cartesian product is a list of products. Runs shared by sub-grids train once.
    grid: Grid | list[Grid]
    reference: tuple[ReferenceRow, ...] = Field((), description="published results to report beside ours")
    tune: TuneConfig | None = Field(None, description="grid axes tried per arm, chosen on the validation split")
    # runs() as last expanded, with the fields it was expanded from (a copy with another grid expands again).
    _expanded: tuple[tuple[Any, ...], list[RunConfig]] | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("must be a folder name: letters, digits, '.', '_' and '-'")
        return value

    @model_validator(mode="after")
    def _checks_across_sections(self) -> SweepConfig:
        rule = self.success
        # Both written as null is how a saved sweep.yaml spells "no threshold"; leaving both out is a slip.
        if rule.min is None and rule.max is None and not {"min", "max"} <= rule.model_fields_set \
                and "success" in self.model_fields_set:
            example = "max: 0.5" if rule.metric.endswith("_loss") else "min: 0.8"
            raise ValueError(f"success: give min or max, e.g. success: {{metric: {rule.metric}, {example}}}; "
                             "without a success section every completed run counts as a success")
        if rule.min is not None and rule.max is not None and rule.min > rule.max:
            raise ValueError(f"success: min ({rule.min:g}) is above max ({rule.max:g}), so no run can succeed; "
                             "swap them or drop one")
        if rule.metric.endswith("_acc") and rule.min is not None and rule.min > 1:
            raise ValueError(f"success.min: {rule.metric} is a fraction from 0 to 1, so {rule.min:g} can never "
                             f"be met; write {rule.min / 100:g} for {rule.min:g}%")
        if problem := conflict(self.model, self.train):
            raise ValueError(problem)
        return self

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, grid: Any) -> Any:
        if isinstance(grid, dict):
            grid = flatten_grid(grid)
            check_grid(grid)
            return grid
        if not isinstance(grid, list) or not grid:
            raise ValueError("must be a mapping of setting: [values], or a non-empty list of such mappings")
        flat = []
        for i, sub in enumerate(grid):
            where = f"sub-grid {i + 1} of {len(grid)}"
            if not isinstance(sub, dict):
                raise ValueError(f"{where} must be a mapping of setting: [values]")
            try:
                check_grid(sub := flatten_grid(sub))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            flat.append(sub)
        return flat

    def grids(self) -> list[Grid]:
        """Each (sub-)grid with a default seed axis, in a stable order: version, depth, seed, then the rest."""
        ordered = []
        for grid in self.grid if isinstance(self.grid, list) else [self.grid]:
            grid = {"seed": [0], **grid}
            order = [k for k in GRID_RUN_KEYS if k in grid] + [k for k in grid if k not in GRID_RUN_KEYS]
            ordered.append({k: grid[k] for k in order})
        return ordered

    def axes(self) -> Grid:
        """Every axis of the grid with the values any sub-grid gives it, in first-seen order (``--dry-run``)."""
        axes: dict[str, dict[str, Any]] = {}  # values by their JSON text, which is hashable where they may not be
        for grid in self.grids():
            for key, values in grid.items():
                known = axes.setdefault(key, {})
                for value in values:
                    known.setdefault(json.dumps(value, sort_keys=True), value)
        return {key: list(values.values()) for key, values in axes.items()}

    def size(self) -> int:
        """How many combinations the grid has (runs shared by sub-grids counted in each), known without
        expanding it."""
        return sum(math.prod(len(values) for values in grid.values()) for grid in self.grids())

    def runs(self) -> list[RunConfig]:
        """Every grid combination as a validated RunConfig, in grid order (sub-grid by sub-grid).

        Expanded once per sweep. A seed changes nothing else of a run, so a combination that differs from
        one already validated only by its seed is that run with another seed, and its sections (and hash)
        are shared.
        """
        source = (self.name, self.dataset, self.model, self.train, self.success, self.grid)
        if self._expanded is not None and all(a is b for a, b in zip(self._expanded[0], source, strict=True)):
            return list(self._expanded[1])
        # Only what the sweep wrote: what it left out is each run's to resolve (a ViT's defaults differ).
        base = self.model_dump(exclude={"grid", "resources", "reference", "tune"}, exclude_unset=True)
        grids = self.grids()
        runs: dict[str, RunConfig] = {}
        for i, axes in enumerate(grids):
            where = f"sub-grid {i + 1}, " if len(grids) > 1 else ""
            seed_at = list(axes).index("seed")
            plain_seeds = all(type(seed) is int and seed >= 0 for seed in axes["seed"])
            validated: dict[str, RunConfig] = {}  # by the combination's other values
            for combo in itertools.product(*axes.values()):
                others = json.dumps(combo[:seed_at] + combo[seed_at + 1:]) if plain_seeds else ""
                if plain_seeds and others in validated:
                    run = validated[others].model_copy(update={"seed": combo[seed_at]})
                else:
                    run = self._validated(base, axes, combo, where)
                    if plain_seeds:
                        validated[others] = run
                runs.setdefault(run.run_id, run)
        self._expanded = (source, list(runs.values()))
        return list(runs.values())

    @staticmethod
    def _validated(base: dict[str, Any], axes: Grid, combo: tuple[Any, ...], where: str) -> RunConfig:
        data = json.loads(json.dumps(base))
        for key, value in zip(axes, combo, strict=True):
            set_dotted(data, key, value)
        setting = ", ".join(f"{k}={v}" for k, v in zip(axes, combo, strict=True))
        try:
            run = RunConfig.model_validate(data)
        except ValidationError as err:
            raise ConfigError(f"{first_error(err, RunConfig)} (in grid run {where}{setting})") from None
        # Checked on the sweep's runs, not in RunConfig itself: a run folder saved before a rule existed must
        # still load, or its results would drop out of every report. Per run, as the grid may set what they read.
        if problem := conflict(run.model, run.train) or unread_setting(run) or unmeasured_metric(run):
            raise ConfigError(f"{problem} (in grid run {where}{setting})")
        return run
