"""Shared fixtures: tiny real configs, and the shared CIFAR-10 tarball when this machine has it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from depthbench import storage
from depthbench.config import RunConfig, SweepConfig, parse_sweep
from depthbench.sweep import sweep_yaml

ROOT = Path(__file__).parents[1]
CIFAR_JPEG = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def tiny_sweep(name: str = "tiny", **sections: dict) -> SweepConfig:
    """A synthetic-data sweep that trains in about a second per run on one core."""
    data = {
        "name": name,
        "dataset": {"name": "synthetic", "train_subset": 128, "test_subset": 64, "image_size": 8},
        "model": {"width": 4},
        "train": {"steps": 8, "batch_size": 16, "lr": 0.05, "eval_every": 4, "log_every": 2,
                  "checkpoint_every": 4, "device": "cpu"},
        "success": {"metric": "test_acc", "min": 0.0},
        "grid": {"version": ["v1", "v2"], "depth": [8], "seed": [0]},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return parse_sweep(data)


def tiny_run(**sections: dict) -> RunConfig:
    return tiny_sweep(**sections).runs()[-1]


# What a run learned: the columns of results.csv that two trainings of the same run share wherever they
# ran (wall time and speed differ between any two).
LEARNED = ["run_id", "version", "depth", "seed", "block", "params", "status", "success", "steps",
           "train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc"]


def learned(sweep_dir: Path) -> pd.DataFrame:
    return pd.read_csv(sweep_dir / "results.csv")[LEARNED]


def steps(run_dir: Path) -> list[int]:
    """The steps of a run's metrics log, in order: a resumed run repeats none and loses none."""
    return [row["step"] for row in storage.read_jsonl(run_dir / "metrics.jsonl")]


def write_config(path: Path, cfg: SweepConfig) -> Path:
    path.write_text(sweep_yaml(cfg))
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    # The test nets are tiny: a second intra-op thread only adds sync overhead, and on a busy 2-core
    # machine its spin-waits make them an order of magnitude slower. (Subprocess tests set
    # OMP_NUM_THREADS=1 for the same reason.)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep every test's dataset cache out of the user's home and out of the repo.
    monkeypatch.setenv("DEPTHBENCH_DATA", str(tmp_path_factory.getbasetemp() / "data-cache"))


requires_cifar = pytest.mark.skipif(not CIFAR_JPEG.exists(), reason=f"{CIFAR_JPEG} is not on this machine")
