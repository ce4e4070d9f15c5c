"""Published results that a sweep reports beside its own: one :class:`ReferenceRow` per row of a paper's
table, picking the runs it describes by their settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from depthbench.config.grid import check_axis, flatten_grid
from depthbench.config.run import RunConfig
from depthbench.config.schema import Section, same_value
from depthbench.errors import ConfigError


class ReferenceRow(Section):
    """One row of a published table: the settings that pick its runs, and the test error printed for them.

    ``match`` holds ``version``, ``depth`` and dotted settings (``model.gate_bias: -6``); a run matches
    when each equals the run's resolved value, ``model.unit`` counting the unit the version implies.
    """

    match: dict[str, Any] = Field(description="version, depth and dotted settings that pick the runs")
    error: float | Literal["fail"] = Field(description="published test error in %, or 'fail' (above 20%)")
    label: str = Field("", description="the row's name in the published table")

    @field_validator("match", mode="before")
    @classmethod
    def _keys(cls, match: Any) -> Any:
        if not isinstance(match, dict) or not match:
            raise ValueError("must be a non-empty mapping of setting: value, e.g. {version: v1, depth: 110}")
        match = flatten_grid(match)
        for key, value in match.items():
            check_axis(key)
            if isinstance(value, dict | list):
                raise ValueError(f"'{key}' must be a single value, not {type(value).__name__}")
        return match

    @field_validator("error", mode="before")
    @classmethod
    def _percent(cls, value: Any) -> Any:
        if value == "fail" or (isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100):
            return value
        raise ValueError(f"must be a test error in percent (0 to 100) or 'fail' (got {value!r})")

    def matches(self, run: RunConfig) -> bool:
        values = run.model_dump(mode="json")
        for key, want in self.match.items():
            have: Any = values
            for part in key.split("."):
                have = have.get(part) if isinstance(have, dict) else None
            if key == "model.unit" and have is None:
                have = run.unit
            if not same_value(have, want):
                return False
        return True

    def describe(self) -> str:
        return self.label or ", ".join(f"{k}={v}" for k, v in self.match.items())


def check_reference(reference: tuple[ReferenceRow, ...], runs: list[RunConfig]) -> None:
    """Every reference row picks some run, and no run is picked by two rows."""
    picked: dict[str, int] = {}
    for i, row in enumerate(reference):
        hits = [run for run in runs if row.matches(run)]
        if not hits:
            raise ConfigError(f"reference[{i}] ({row.describe()}) matches no run of the grid")
        for run in hits:
            if run.run_id in picked:
                other = reference[picked[run.run_id]].describe()
                raise ConfigError(f"reference[{i}] ({row.describe()}) and reference[{picked[run.run_id]}] ({other}) "
                                  f"both match run {run.run_id}; give them distinct settings")
            picked[run.run_id] = i
