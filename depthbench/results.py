"""The results table: one row per run, rebuilt from the run folders at any time.

Nothing here is a source of truth: ``results.csv`` is derived from each run's ``config.yaml`` and
``result.json``, so it can be deleted, or lost in a crash, and rebuilt by ``depthbench report``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from depthbench import storage
from depthbench.config import EXECUTION_KEYS, RunConfig, SuccessConfig, SweepConfig, load_sweep
from depthbench.errors import ConfigError
from depthbench.layout import RESULTS_CSV, SWEEP_FILE, RunFolder

# The columns every results.csv starts with, in this order; settings that vary between runs follow.
COLUMNS = [
    "run_id", "version", "depth", "seed", "block", "params", "status", "success", "steps",
    "train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc", "wall_s", "img_per_s",
]
# After best_test_acc, in a table where some run holds out a validation split (dataset.val_split).
VAL_COLUMNS = ["val_loss", "val_acc", "best_val_acc"]
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
        return load_sweep(sweep_dir / SWEEP_FILE, max_runs=None)  # its size was accepted when it ran
    except ConfigError:
        return None


@dataclass(frozen=True)
class RunRecord:
    """What the table knows of one run: its config, its result.json (empty until finished) and its state."""

    run_id: str
    cfg: RunConfig
    result: dict[str, Any]
    status: str
    started: bool = True  # False for a planned run without a folder yet


def read_runs(sweep_dir: Path, planned: Sequence[RunConfig] = ()) -> list[RunRecord]:
    """Every run with a folder under ``sweep_dir``, then the ``planned`` runs not started yet (``pending``).

    A planned run's config is the one planned (its folder's config.yaml names the same content); only the
    folders of runs outside the plan are read for theirs."""
    known = {cfg.run_id: cfg for cfg in planned}
    records = []
    for path in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        folder = RunFolder(path)
        cfg = (known.get(folder.run_id) or folder.config()) if folder.has_config() else None
        if cfg is None:  # no config.yaml (not a run), or a damaged one: that run is hidden from the table
            continue
        records.append(RunRecord(folder.run_id, cfg, folder.result() or {}, folder.state()))
    started = {r.run_id for r in records}
    return records + [RunRecord(c.run_id, c, {}, "pending", started=False) for c in planned if c.run_id not in started]


def table_of(records: Sequence[RunRecord], rule: SuccessConfig | None = None) -> pd.DataFrame:
    """A row per run with the settings that differ between runs; success judged by ``rule`` (the sweep's
    latest), else by each run's own."""
    columns = COLUMNS
    if any(record.cfg.dataset.val_split is not None for record in records):
        at = COLUMNS.index("best_test_acc") + 1
        columns = [*COLUMNS[:at], *VAL_COLUMNS, *COLUMNS[at:]]
    rows, settings = [], []
    for record in records:
        cfg, result, status = record.cfg, record.result, record.status
        row = {"run_id": record.run_id, "version": cfg.version, "depth": cfg.depth, "seed": cfg.seed}
        row.update({k: result.get(k) for k in columns if k not in row})
        row["block"] = row["block"] or cfg.blocks[0]
        row["status"] = status
        metrics = {k: (v if v is not None else math.nan) for k, v in result.items() if isinstance(v, float | int | None)}
        row["success"] = status == "completed" and (rule or cfg.success)(metrics)
        row["error"] = result.get("error", "")
        rows.append(row)
        settings.append(_flatten(cfg.model_dump(mode="json", exclude=_IDENTITY | {"success"})))
    table = pd.DataFrame(rows, columns=[*columns, "error"])
    # Counts stay integers in a table whose unfinished runs have none yet.
    table[["params", "steps"]] = table[["params", "steps"]].astype("Int64")
    if not rows:
        return table
    flat = pd.DataFrame(settings)
    execution = {f"train.{key}" for key in EXECUTION_KEYS}  # where a run ran is not what it studied
    # repr: None and NaN count as values, so a setting left unset by some runs and set by others varies
    varying = [c for c in flat.columns if c not in execution and flat[c].map(repr).nunique() > 1]
    for column in varying:
        table[column] = flat[column].map(lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else v)
    return table.sort_values(["version", "depth", *varying, "seed"], kind="stable").reset_index(drop=True)


def collect(sweep_dir: Path, sweep: SweepConfig | None = None, planned: Sequence[RunConfig] | None = None
            ) -> pd.DataFrame:
    """A row per run of a sweep, finished or not: the runs with a folder, and those the sweep plans that
    have not started yet (status ``pending``), so an interrupted sweep's table shows what is left as well
    as what is done. ``sweep`` is the sweep being run and ``planned`` its runs, as ``run_sweep`` has them;
    without them, the sweep saved in the folder."""
    sweep = sweep or saved_sweep(sweep_dir)
    if planned is None:
        planned = sweep.runs() if sweep else ()
    return table_of(read_runs(sweep_dir, planned), sweep.success if sweep else None)


class LiveResults:
    """``results.csv`` kept current while a sweep runs, at a cost per run that does not grow with the runs done.

    The run folders are read once; then each finished run's folder alone. The file is rebuilt from the records
    in memory, at most once every ``every_s`` seconds and never more than a tenth of the time, as rebuilding it
    takes longer the more runs the sweep has. :meth:`write` with ``now`` (at the sweep's end) reads every folder
    again, so that what another sweep on the same folder did meanwhile is in the table too.
    """

    def __init__(self, sweep_dir: Path, sweep: SweepConfig, planned: Sequence[RunConfig], every_s: float = 2.0) -> None:
        self.sweep_dir, self.rule, self.every_s = sweep_dir, sweep.success, every_s
        self.planned = list(planned)
        self.records = self._read_all()
        self._written_at, self._took_s = -math.inf, 0.0

    def update(self, cfg: RunConfig) -> None:
        """Read one run's folder again (it finished, failed or stopped)."""
        folder = RunFolder(self.sweep_dir / cfg.run_id)
        started = folder.has_config()
        self.records[cfg.run_id] = RunRecord(cfg.run_id, cfg, (folder.result() or {}) if started else {},
                                             folder.state() if started else "pending", started=started)

    def write(self, *, now: bool = False) -> bool:
        """Rebuild results.csv when due (or ``now``); whether it was. An OSError leaves the old file whole."""
        started = time.monotonic()
        if not now and started - self._written_at < max(self.every_s, 10 * self._took_s):
            return False
        if now:
            self.records = self._read_all()
        table = table_of(list(self.records.values()), self.rule)
        storage.write_text(self.sweep_dir / RESULTS_CSV, table.to_csv(index=False))
        self._written_at, self._took_s = time.monotonic(), time.monotonic() - started
        return True

    def _read_all(self) -> dict[str, RunRecord]:
        return {record.run_id: record for record in read_runs(self.sweep_dir, self.planned)}


def setting_columns(table: pd.DataFrame) -> list[str]:
    """The varying-setting columns of a results table (``model.width``, ``train.lr``, ...)."""
    return [c for c in table.columns if "." in c]


def write_results(sweep_dir: Path, sweep: SweepConfig | None = None, planned: Sequence[RunConfig] | None = None
                  ) -> pd.DataFrame:
    """Rebuild ``results.csv`` (see :func:`collect`) and return its table."""
    table = collect(sweep_dir, sweep, planned)
    storage.write_text(sweep_dir / RESULTS_CSV, table.to_csv(index=False))
    return table
