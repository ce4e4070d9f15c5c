"""The runs/ folder: the names of a sweep's and a run's files, and a run's state read from them.

Everything that reads or writes a run folder takes its file names from here, so the trainer, the
sweep, the executors, the results table and the report agree on them without importing each other.
No torch, no pandas: reading where a sweep stands is fast.

    runs/<sweep name>/
        sweep.yaml            the sweep as last run (its runs not started yet are "pending")
        results.csv           one row per run, rebuilt from the run folders at any time
        estimate.json         each run's estimated duration, as the sweep's last start estimated it
        <run id>/
            config.yaml       the run's resolved config (written first)
            metrics.jsonl     a row per log point
            checkpoint.pt     the latest checkpoint while the run is unfinished
            result.json       written last: its presence marks the run as done (or pruned)
            final.pt          the final weights (train.keep_checkpoint: weights)
            error.log         the traceback of a failed run
            diagnostics.jsonl per-unit gradient and signal flow (train.diagnose_steps)
            .lock             the claim of the process training the run
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from depthbench import storage
from depthbench.config import RunConfig, load_run_config
from depthbench.errors import ConfigError

SWEEP_FILE = "sweep.yaml"
RESULTS_CSV = "results.csv"
ESTIMATE = "estimate.json"  # the duration estimated when the sweep last started training
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
FINAL_WEIGHTS = "final.pt"
ERROR_LOG = "error.log"
DIAGNOSTICS = "diagnostics.jsonl"
LOCK = ".lock"
DIAGNOSE_JSON = "diagnose.json"  # marks the output folder of `depthbench diagnose`, which is not a sweep

RunState = Literal["completed", "diverged", "failed", "pruned", "partial", "pending"]
# "pruned": stopped at a rung by successive halving (depthbench.halving), its checkpoint kept. Finished for the
# sweep that pruned it; a sweep whose halving keeps it resumes it.
FINISHED: tuple[RunState, ...] = ("completed", "diverged", "failed", "pruned")


@dataclass(frozen=True)
class RunFolder:
    """One run's folder, read on demand: its config, result, state and metrics rows. Sweep, results and
    report read run folders through this one reader."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    def result(self) -> dict[str, Any] | None:
        """result.json, or None while the run is unfinished (or when the file does not parse)."""
        result = storage.read_json(self.path / RESULT)
        return result if isinstance(result, dict) and result.get("status") in FINISHED else None

    def state(self) -> RunState:
        """'completed', 'diverged', 'failed' or 'pruned' from result.json; 'partial' with only a checkpoint;
        else 'pending'."""
        result = self.result()
        if result is not None:
            return result["status"]
        return "partial" if (self.path / CHECKPOINT).exists() else "pending"

    def metrics(self) -> list[dict[str, Any]]:
        return storage.read_jsonl(self.path / METRICS)

    def diagnostics(self) -> list[dict[str, Any]]:
        return storage.read_jsonl(self.path / DIAGNOSTICS)

    def has_config(self) -> bool:
        return (self.path / CONFIG).is_file()

    def config(self) -> RunConfig | None:
        """config.yaml as the run's RunConfig, or None when it is missing or damaged (that run is then unknown)."""
        try:
            return load_run_config(self.path / CONFIG)
        except (ConfigError, OSError):
            return None


def run_state(run_dir: Path) -> RunState:
    """The state of the run in ``run_dir`` (see :meth:`RunFolder.state`)."""
    return RunFolder(run_dir).state()
