"""Optional TensorBoard event files for a run, written inside the run folder.

:class:`TensorBoardLogger` is a progress callback (``depthbench.train.ProgressFn``): it logs every
metrics row the trainer reports (losses, accuracies, learning rate, speed) as scalars at the row's
step, and passes every call on to the callback it wraps. ``tensorboard --logdir runs/<sweep>`` then
shows all runs of a sweep side by side, each named by its run id.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from depthbench.errors import DepthbenchError
from depthbench.train import ProgressFn, TrainingProgress

EVENTS_DIR = "tensorboard"


def require_tensorboard() -> type[Any]:
    """torch's SummaryWriter, or one clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DepthbenchError(
            "--tensorboard needs the tensorboard package: pip install 'depthbench[tensorboard]'"
        ) from None
    return SummaryWriter


class TensorBoardLogger:
    """Write each reported metrics row to ``run_dir/tensorboard/`` and forward every call to ``forward``.

    The writer opens at the first call, with ``purge_step`` at that step: a run resumed from a checkpoint
    re-reports the steps after it, and the events the interrupted attempt wrote for them are dropped
    rather than shown twice.
    """

    def __init__(self, run_dir: Path, forward: ProgressFn | None = None) -> None:
        self._writer_class = require_tensorboard()
        self.log_dir = Path(run_dir) / EVENTS_DIR
        self.forward = forward
        self._writer: Any = None

    def __call__(self, progress: TrainingProgress) -> None:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=progress.step)
        if progress.row is not None:
            step = int(progress.row["step"])
            for key, value in progress.row.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(key, value, global_step=step)
        if self.forward is not None:
            self.forward(progress)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


__all__ = ["EVENTS_DIR", "TensorBoardLogger", "require_tensorboard"]
