"""Sweep and run configs from YAML and back: every problem one ConfigError line naming the dotted key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from depthbench.config.grid import set_dotted
from depthbench.config.messages import boolean_error, first_error
from depthbench.config.overrides import apply_overrides
from depthbench.config.reference import check_reference
from depthbench.config.run import RunConfig
from depthbench.config.sweep import SweepConfig
from depthbench.config.tune import check_tune
from depthbench.config.yamlfile import read_yaml
from depthbench.errors import ConfigError


# The most runs a grid may have unless the caller raises it: beyond it a slip (an axis of a million seeds)
# is far likelier than a plan.
MAX_RUNS = 100_000


def load_sweep(path: str | Path, overrides: Sequence[str] = (), *, max_runs: int | None = MAX_RUNS) -> SweepConfig:
    """Read and validate a sweep YAML, with ``KEY=VALUE`` overrides (``--set``) applied to its data first;
    every problem is one ConfigError line. A grid of more than ``max_runs`` runs (None: no limit) is refused."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a folder)" if path.is_dir() else ""
        raise ConfigError(f"config file '{path}' does not exist{hint}; see configs/ for examples")
    data, booleans = read_yaml(path)
    data, booleans = apply_overrides(data, booleans, overrides)
    # a wrong value may come from the command line rather than the file: the message says both may hold it
    source = f"{path} with --set" if overrides else str(path)
    return parse_sweep(data, source=source, booleans=booleans, max_runs=max_runs)


def parse_sweep(data: Any, source: str = "config", booleans: Mapping[str, str] | None = None, *,
                max_runs: int | None = MAX_RUNS) -> SweepConfig:
    """Validate an already-parsed YAML mapping and resolve every run (so grid errors surface now).

    ``booleans`` is the source text of the YAML's booleans by dotted key (from :func:`read_yaml`), so an
    error can quote ``yes`` as it was written. A grid of more than ``max_runs`` runs is refused before
    it is expanded.
    """
    booleans = booleans or {}
    if data is None:
        raise ConfigError(f"{source} is empty: it needs at least 'name' and a 'grid' with version and depth lists")
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of settings, not a {type(data).__name__}")
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {first_error(err, SweepConfig, booleans)}") from None
    if max_runs is not None and (size := sweep.size()) > max_runs:
        raise ConfigError(f"{source}: grid: {size:,} runs, more than the limit of {max_runs:,}; check its axes, "
                          f"or raise the limit with --max-runs {size}")
    try:
        _check_grid_booleans(sweep, booleans)
        check_reference(sweep.reference, sweep.runs())
        if sweep.tune is not None:
            check_tune(sweep.tune, list(sweep.axes()), sweep.runs())
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return sweep


def _check_grid_booleans(sweep: SweepConfig, booleans: Mapping[str, str]) -> None:
    """A YAML boolean among a grid's numbers, named by its place in the grid (``grid.train.lr[1]``).

    Each value goes through the field's own validators, so one that gives booleans a meaning
    (``model.checkpointing: [true]``) still can.
    """
    grids = sweep.grid if isinstance(sweep.grid, list) else [sweep.grid]
    for i, grid in enumerate(grids):
        where = f"grid[{i}]" if isinstance(sweep.grid, list) else "grid"
        for key, values in grid.items():
            for j, value in enumerate(values):
                if not _holds_boolean(value):
                    continue
                data: dict[str, Any] = {}
                set_dotted(data, key, value)
                try:
                    RunConfig.model_validate(data)
                except ValidationError as err:
                    for error in err.errors(include_url=False):
                        if error["type"] == "boolean_number":
                            raise ConfigError(boolean_error(f"{where}.{key}[{j}]", error, booleans)) from None


def _holds_boolean(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_holds_boolean(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_boolean(item) for item in value)
    return isinstance(value, bool)


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run's resolved ``config.yaml`` back; every problem is one ConfigError line."""
    data, booleans = read_yaml(Path(path))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {first_error(err, RunConfig, booleans)}") from None


def dump_run_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
