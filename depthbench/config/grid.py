"""A sweep's grid: each axis a list of values, every combination one run. Axes are ``version``, ``depth``,
``seed`` and dotted settings of the shared sections (``model.width``, ``train.lr``)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from depthbench.config.schema import DatasetConfig, ModelConfig, TrainConfig, check_key
from depthbench.errors import did_you_mean

Grid = dict[str, list[Any]]

GRID_RUN_KEYS = ("version", "depth", "seed")
# The sections a grid axis may set.
GRID_SECTIONS = {"dataset": DatasetConfig, "model": ModelConfig, "train": TrainConfig}


def flatten_grid(grid: dict[Any, Any]) -> dict[str, Any]:
    """`grid: {model: {width: [4, 8]}}` is the same axis as `grid: {model.width: [4, 8]}`."""
    flat: dict[str, Any] = {}
    for key, value in grid.items():
        if isinstance(value, dict):
            for sub, inner in flatten_grid(value).items():
                flat[f"{key}.{sub}"] = inner
        else:
            flat[str(key)] = value
    return flat


def check_grid(grid: Grid) -> None:
    for key in grid:  # unknown keys first: a misspelt 'version' is named as such, not as missing
        check_axis(key)
    for key in ("version", "depth"):
        if key not in grid:
            raise ValueError(f"needs a '{key}' list")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise ValueError(f"'{key}' must be a list of values, e.g. [{json.dumps(values)}]")
        if not values:
            raise ValueError(f"'{key}' is an empty list: give at least one value")
        # Ints and strings count as themselves (1 and "1" stay apart): a long axis of seeds is counted fast.
        plain = all(type(v) in (int, str) for v in values)
        seen = Counter(values if plain else (json.dumps(v, sort_keys=True) for v in values))
        dupes = sorted(json.dumps(v) if plain else v for v, n in seen.items() if n > 1)
        if dupes:
            raise ValueError(f"'{key}' lists {', '.join(dupes)} more than once")


def check_axis(key: str) -> None:
    """A grid key is version, depth, seed or a setting of the shared sections, e.g. ``model.width``."""
    if key in GRID_RUN_KEYS:
        return
    section, _, field = key.partition(".")
    if section not in GRID_SECTIONS or not field:
        choices = [*GRID_RUN_KEYS, *(f"{s}.{f}" for s, m in GRID_SECTIONS.items() for f in m.model_fields)]
        hint = did_you_mean(key, choices)
        raise ValueError(f"unknown key '{key}'{hint}; use version, depth, seed or section.setting")
    check_key(GRID_SECTIONS[section], field, prefix=section)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def axis_value(run: Any, axis: str) -> Any:
    """A run's value of a grid axis: ``version``, ``depth``, ``seed`` or a dotted setting (``train.lr``)."""
    value: Any = run
    for part in axis.split("."):
        value = getattr(value, part)
    return value
