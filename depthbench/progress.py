"""Live sweep progress in the terminal: runs done and left, the current run's step, loss, accuracy, speed."""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column

from depthbench.config import RunConfig
from depthbench.sweep import RunOutcome
from depthbench.train import TrainingProgress

_MARK = {"completed": "[green]✓[/]", "diverged": "[yellow]≈[/]", "failed": "[red]✗[/]", "pruned": "[dim]✂[/]",
         "paused": "[cyan]|[/]", "interrupted": "[yellow]‖[/]", "busy": "[blue]…[/]", "skipped": "[dim]-[/]"}


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


class RichReporter:
    """Implements :class:`depthbench.sweep.Reporter` with a rich live display and one line per finished run."""

    def __init__(self, console: Console) -> None:
        self.console = console
        # On a narrow terminal the run's stats are cut at their end and the bar shrinks; the run id,
        # the step count and the ETA keep their width.
        self.live = Progress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=21)),
            BarColumn(bar_width=16, table_column=Column(no_wrap=True, min_width=8)),
            MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=7)),
            TextColumn("eta", table_column=Column(no_wrap=True, min_width=3)),
            TimeRemainingColumn(table_column=Column(no_wrap=True, min_width=7)),
            TextColumn("{task.fields[stats]}", table_column=Column(no_wrap=True, overflow="ellipsis", min_width=0)),
            console=console, transient=True,
        )
        self.sweep_task = self.live.add_task("runs", total=0, stats="")
        self.run_task = self.live.add_task("", total=1, stats="", visible=False)

    def __enter__(self) -> RichReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live.live.is_started:  # stopping an unstarted display would still print a blank line
            self.live.stop()

    def plan(self, todo: list[RunConfig], done: int, total: int) -> None:
        # The live display starts only once the sweep is valid, so an error stays a clean single line,
        # and only on a terminal: written to a file or pipe it would only add a blank line at the end.
        if self.console.is_terminal:
            self.live.start()
        self.live.update(self.sweep_task, total=total, completed=done)
        skipped = f", {done} already done (skipped)" if done else ""
        self.console.print(f"{total} runs in the sweep{skipped}, {len(todo)} to do")

    def run_started(self, cfg: RunConfig) -> None:
        self.live.reset(self.run_task, total=cfg.train.steps, description=cfg.run_id, stats="", visible=True)

    def progress(self, cfg: RunConfig, progress: TrainingProgress) -> None:
        if progress.row is None:
            self.live.update(self.run_task, completed=progress.step)
            return
        row = progress.row
        stats = f"loss {row['train_loss']:.3f} acc {_pct(row['train_acc'])}"
        if "test_acc" in row:
            stats += f" test {_pct(row['test_acc'])}"
        if "val_acc" in row:
            stats += f" val {_pct(row['val_acc'])}"
        stats += f" {row['img_per_s']:.0f} img/s"
        self.live.update(self.run_task, completed=progress.step, stats=stats)

    def run_finished(self, outcome: RunOutcome) -> None:
        self.live.update(self.run_task, visible=False)
        if outcome.status not in ("busy", "interrupted", "paused"):  # none of these runs is done
            self.live.advance(self.sweep_task)
        for note in outcome.notes:
            self.console.print(f"[yellow]note:[/] {note}")
        run_id, result = outcome.cfg.run_id, outcome.result or {}
        if outcome.status in ("completed", "diverged"):
            detail = (f"test acc {_pct(result.get('test_acc'))}, train loss {result.get('train_loss') or math.nan:.3f}, "
                      f"{result.get('wall_s', 0):.1f} s")
            if outcome.status == "diverged":
                detail = f"diverged (non-finite loss) at step {result.get('steps')}"
        elif outcome.status in ("paused", "pruned") and result.get("steps", result.get("step")):
            # At a rung of successive halving, with the validation accuracy the sweep compares there.
            step = result.get("steps", result.get("step"))
            detail = f"{outcome.status} at step {step}" + (f", val acc {_pct(result['val_acc'])}"
                                                           if result.get("val_acc") is not None else "")
        else:
            detail = outcome.message or outcome.status
        self.console.print(f"{_MARK.get(outcome.status, '?')} {run_id}  {detail}", highlight=False)
