"""The sweep's own time per run (locks, results.csv, progress), apart from training, early and late in a long
sweep of tiny runs: it should not grow with the runs done. Usage: sweep_overhead.py RUNS OUT_FOLDER"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from depthbench import storage
from depthbench.config import parse_sweep
from depthbench.sweep import run_sweep


class Clock:
    """A sweep reporter that notes when each run starts and when the last one finished."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, float]] = []
        self.end = 0.0

    def plan(self, todo: list, done: int, total: int) -> None: ...
    def progress(self, cfg: object, progress: object) -> None: ...

    def run_started(self, cfg) -> None:
        self.starts.append((cfg.run_id, time.perf_counter()))

    def run_finished(self, outcome) -> None:
        self.end = time.perf_counter()


def main(runs: int, out: Path) -> None:
    torch.set_num_threads(1)
    sweep = parse_sweep({
        "name": "overhead",
        "dataset": {"name": "synthetic", "train_subset": 64, "test_subset": 32, "image_size": 8},
        "model": {"width": 4},
        "train": {"steps": 1, "batch_size": 16, "eval_every": 1, "log_every": 1, "checkpoint_every": 1,
                  "device": "cpu"},
        "grid": {"version": ["v2"], "depth": [8], "seed": list(range(runs))},
    })
    clock = Clock()
    started = time.perf_counter()
    run_sweep(sweep, out, reporter=clock, handle_signals=False)
    total = time.perf_counter() - started
    ends = [t for _, t in clock.starts[1:]] + [clock.end]
    overhead = []
    for (run_id, start), end in zip(clock.starts, ends, strict=True):
        result = storage.read_json(out / "overhead" / run_id / "result.json")
        overhead.append(end - start - result["setup_s"] - result["wall_s"])  # all but train_run's own time
    first, last = overhead[:100], overhead[-100:]
    print(f"{runs} runs in {total:.1f} s; the sweep's own time per run (median, ms): "
          f"runs 1-100 {1000 * statistics.median(first):.1f}, runs {runs - 99}-{runs} "
          f"{1000 * statistics.median(last):.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
