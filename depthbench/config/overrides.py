"""``--set KEY=VALUE``: a setting of a sweep file replaced from the command line. The value is YAML, merged
into the file's data before validation, so it is checked exactly as if the file said it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from depthbench.config.grid import check_axis, flatten_grid
from depthbench.config.schema import check_key
from depthbench.config.sweep import SweepConfig
from depthbench.config.yamlfile import parse_yaml
from depthbench.errors import ConfigError


def apply_overrides(data: Any, booleans: dict[str, str], overrides: Sequence[str],
                    ) -> tuple[Any, dict[str, str]]:
    """The file's ``data`` with each ``KEY=VALUE`` of ``overrides`` set, later ones winning, and the
    booleans' text by dotted key (:func:`depthbench.config.read_yaml`) to match. The file's data is not
    changed. A ``grid.`` key sets that axis in every sub-grid, whether the file wrote it nested or dotted."""
    if not isinstance(data, dict):
        return data, booleans  # an empty or malformed file: parse_sweep says what is wrong with it
    data, booleans = dict(data), dict(booleans)
    for text in overrides:
        key, value, written = _parse(text)
        section, _, axis = key.partition(".")
        if section == "grid" and axis:
            grid = data.get("grid")
            if grid is None:
                grid = {}
            subs = grid if isinstance(grid, list) else [grid]
            if not all(isinstance(sub, dict) for sub in subs):
                raise ConfigError(f"--set {text}: the file's grid is not a mapping of setting: [values]")
            merged = [{**flatten_grid(sub), axis: value} for sub in subs]
            data["grid"] = merged if isinstance(grid, list) else merged[0]
            places = [f"grid[{i}]" for i in range(len(subs))] if isinstance(grid, list) else ["grid"]
        else:
            # The grid's value would win over the shared one in every run, and the override would do nothing.
            grid = data.get("grid")
            subs = grid if isinstance(grid, list) else [grid]
            if any(isinstance(sub, dict) and key in flatten_grid(sub) for sub in subs):
                raise ConfigError(f"--set {text}: {key} is an axis of the file's grid; "
                                  f"set the axis instead, e.g. --set grid.{key}=[{text.partition('=')[2].strip()}]")
            _set(data, key, value, text)
            places = [section]
        for place in places:
            at = place + key[len(section):]
            booleans = {k: v for k, v in booleans.items() if not (k == at or k.startswith((f"{at}.", f"{at}[")))}
            booleans |= {place + k[len(section):]: v for k, v in written.items()}
    return data, booleans


def _parse(text: str) -> tuple[str, Any, dict[str, str]]:
    """``KEY=VALUE`` as the key (checked against the sweep's settings), the value as YAML, and its booleans."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set '{text}' must be KEY=VALUE, e.g. --set train.steps=2000 or --set grid.seed=[0,1]")
    section, _, axis = key.partition(".")
    try:
        if section == "grid" and axis:
            check_axis(axis)
        else:
            check_key(SweepConfig, key)
    except ValueError as err:
        raise ConfigError(f"--set {text}: {'grid: ' * (section == 'grid')}{err}") from None
    parsed, written = parse_yaml(value, f"--set {text}", key)
    return key, parsed, written


def _set(data: dict[str, Any], key: str, value: Any, text: str) -> None:
    """Set a dotted key, copying each mapping on the way (YAML aliases may share one with other keys)."""
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is not None and not isinstance(child, dict):
            raise ConfigError(f"--set {text}: {'.'.join(parents[: i + 1])} is not a mapping in the file")
        node[part] = child = dict(child or {})
        node = child
    node[last] = value
