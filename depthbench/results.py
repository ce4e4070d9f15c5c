"""The results table: one row per run, rebuilt from the run folders at any time.

Nothing here is a source of truth: ``results.csv`` is derived from each run's ``config.yaml`` and
``result.json``, so it can be deleted, or lost in a crash, and rebuilt by ``depthbench report``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from depthbench import storage
from depthbench.config import EXECUTION_KEYS, RunConfig, SweepConfig, load_sweep
from depthbench.errors import ConfigError
from depthbench.architecture import resolve_block
from depthbench.sweep import SWEEP_FILE
from depthbench.train import CONFIG, RESULT

RESULTS_CSV = "results.csv"
# The columns every results.csv starts with, in this order; settings that vary between runs follow.
COLUMNS = [
    "run_id", "version", "depth", "seed", "block", "params", "status", "success", "steps",
    "train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc", "wall_s", "img_per_s",
]
_IDENTITY = {"name", "version", "depth", "seed"}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = tuple(value) if isinstance(value, list) else value
    return flat


def saved_sweep(sweep_dir: Path) -> SweepConfig | None:
    """The sweep's config as ``run_sweep`` saved it, or None when it is missing or no longer valid."""
    try:
        return load_sweep(sweep_dir / SWEEP_FILE)
    except ConfigError:
        return None


def collect(sweep_dir: Path) -> pd.DataFrame:
    """A row per run of a sweep, finished or not, with the settings that differ between runs.

    The runs are those with a folder, and those the sweep's latest config plans that have not started
    yet (status ``pending``), so an interrupted sweep's table shows what is left as well as what is done.
    """
    sweep = saved_sweep(sweep_dir)
    rule = sweep.success if sweep else None
    runs: list[tuple[str, RunConfig, dict[str, Any], str]] = []  # run id, config, result, status
    for run_dir in sorted(p for p in sweep_dir.iterdir() if (p / CONFIG).is_file()):
        try:
            cfg = RunConfig.model_validate(yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")))
        except Exception:  # noqa: BLE001 - a damaged config.yaml only hides that run from the table
            continue
        result = storage.read_json(run_dir / RESULT)
        result = result if isinstance(result, dict) and "status" in result else {}
        status = result.get("status") or ("partial" if (run_dir / "checkpoint.pt").exists() else "pending")
        runs.append((run_dir.name, cfg, result, status))
    started = {run_id for run_id, *_ in runs}
    runs += [(cfg.run_id, cfg, {}, "pending") for cfg in (sweep.runs() if sweep else []) if cfg.run_id not in started]
    rows, settings = [], []
    for run_id, cfg, result, status in runs:
        row = {"run_id": run_id, "version": cfg.version, "depth": cfg.depth, "seed": cfg.seed}
        row.update({k: result.get(k) for k in COLUMNS if k not in row})
        row["block"] = row["block"] or resolve_block(cfg.depth, cfg.model.block)[0]
        row["status"] = status
        metrics = {k: (v if v is not None else math.nan) for k, v in result.items() if isinstance(v, float | int | None)}
        row["success"] = status == "completed" and (rule or cfg.success)(metrics)
        row["error"] = result.get("error", "")
        rows.append(row)
        settings.append(_flatten(cfg.model_dump(mode="json", exclude=_IDENTITY | {"success"})))
    table = pd.DataFrame(rows, columns=[*COLUMNS, "error"])
    # Counts stay integers in a table whose unfinished runs have none yet.
    table[["params", "steps"]] = table[["params", "steps"]].astype("Int64")
    if not rows:
        return table
    flat = pd.DataFrame(settings)
    execution = {f"train.{key}" for key in EXECUTION_KEYS}  # where a run ran is not what it studied
    varying = [c for c in flat.columns if c not in execution and flat[c].astype(str).nunique() > 1]
    for column in varying:
        table[column] = flat[column].map(lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else v)
    return table.sort_values(["version", "depth", *varying, "seed"], kind="stable").reset_index(drop=True)


def setting_columns(table: pd.DataFrame) -> list[str]:
    """The varying-setting columns of a results table (``model.width``, ``train.lr``, ...)."""
    return [c for c in table.columns if "." in c]


def write_results(sweep_dir: Path) -> pd.DataFrame:
    table = collect(sweep_dir)
    storage.write_text(sweep_dir / RESULTS_CSV, table.to_csv(index=False))
    return table
