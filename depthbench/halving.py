"""Successive halving across each arm's candidates, decided from the run folders (Li et al., 2018,
arXiv:1603.06560, synchronous version).

At each rung (a step count of ``tune.halving.rungs``) every candidate of an arm still in the race is
compared by the mean over its seeds of the tune metric evaluated at exactly that step; the best
``ceil(n / eta)`` of the ``n`` still in go on, the others stop there as ``pruned``. A rung is decided
for an arm once every run of its remaining candidates has been evaluated there or has finished
(diverged, failed). Equal means keep grid order, a diverged run counts as the worst value, a failed
one has none (its candidate ranks on its other seeds, last without any).

Every decision is a function of the metrics rows at the rung steps and of which runs are finished, both
read from the run folders, so the same sweep prunes the same runs wherever its runs trained and however
often it was interrupted. A ``pruned`` result.json records the decision; the decisions are made again
from the metrics at every start of the sweep, so a sweep whose halving now keeps a pruned run (eta
raised, halving removed) resumes it from its checkpoint. Torch-free.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depthbench.config import HalvingConfig, RunConfig, TuneConfig
from depthbench.layout import RunFolder
from depthbench.tuning import Arm, Values, arms, rank, rung_value

Rows = Sequence[Mapping[str, Any]]  # a run's metrics.jsonl rows


@dataclass(frozen=True)
class Halving:
    """Where successive halving stands: the runs pruned, at which rung, and each run's next rung to decide;
    with the metrics rows it was decided from."""

    pruned: dict[str, int]  # run id -> the rung step at which its candidate was dropped
    open_rung: dict[str, int | None]  # run id -> its arm's first rung not decided yet; None once all are
    rows: Mapping[str, Rows]


@dataclass(frozen=True)
class ArmDecision:
    pruned: dict[Values, int]  # candidate -> the rung step that dropped it
    open_rung: int | None


def reached(rows: Rows, step: int) -> bool:
    """Whether a run has logged ``step`` or later, so its evaluation there (if any) is in its rows."""
    return any(row.get("step", 0) >= step for row in rows)


def decide_arm(arm: Arm, rows: Mapping[str, Rows], finished: Collection[str], halving: HalvingConfig,
               tune: TuneConfig) -> ArmDecision:
    """One arm's rungs, in order, until one cannot be decided yet: a run of a remaining candidate has neither
    reached it nor finished (``finished``: run ids that will not train further in this sweep)."""
    alive = dict(arm.candidates)
    pruned: dict[Values, int] = {}
    for rung in halving.rungs:
        runs = [run for candidates in alive.values() for run in candidates]
        if any(not reached(rows.get(run.run_id, ()), rung) and run.run_id not in finished for run in runs):
            return ArmDecision(pruned, rung)
        ranking = rank(Arm(arm.values, alive), lambda run: rung_value(rows.get(run.run_id, ()), rung, tune.metric),
                       tune.higher_is_better)
        kept = set(ranking.order[:halving.kept(len(alive))])
        pruned.update((candidate, rung) for candidate in alive if candidate not in kept)
        alive = {candidate: runs for candidate, runs in alive.items() if candidate in kept}
    return ArmDecision(pruned, None)


def decide(runs: Sequence[RunConfig], tune: TuneConfig, grid_axes: Sequence[str], rows: Mapping[str, Rows],
           finished: Collection[str]) -> Halving:
    """Every arm's decisions so far (see :func:`decide_arm`), by run id; without ``tune.halving`` none is pruned."""
    pruned: dict[str, int] = {}
    open_rung: dict[str, int | None] = {run.run_id: None for run in runs}
    if tune.halving is None:
        return Halving(pruned, open_rung, rows)
    for arm in arms(runs, tune, grid_axes):
        decision = decide_arm(arm, rows, finished, tune.halving, tune)
        for candidate, candidate_runs in arm.candidates.items():
            for run in candidate_runs:
                open_rung[run.run_id] = decision.open_rung
                if candidate in decision.pruned:
                    pruned[run.run_id] = decision.pruned[candidate]
    return Halving(pruned, open_rung, rows)


def read_rows(sweep_dir: Path, runs: Sequence[RunConfig]) -> dict[str, list[dict[str, Any]]]:
    """Each run's metrics rows, by run id (none for a run not started)."""
    return {run.run_id: RunFolder(sweep_dir / run.run_id).metrics() for run in runs}


def pruned_result(cfg: RunConfig, rows: Rows, rung: int, metric: str) -> dict[str, Any]:
    """The result.json of a run pruned at ``rung``: the tune metric and the validation metrics there, and the
    time it trained (which the duration estimate is compared with)."""
    at_rung = next((row for row in rows if row.get("step") == rung), {})
    return {"run_id": cfg.run_id, "status": "pruned", "pruned_at": rung, "steps": rung,
            metric: rung_value(rows, rung, metric), "val_acc": at_rung.get("val_acc"),
            "val_loss": at_rung.get("val_loss"), "wall_s": at_rung.get("elapsed_s")}


def expected_share(runs: Sequence[RunConfig], tune: TuneConfig, grid_axes: Sequence[str]) -> dict[str, float]:
    """Each run's expected share of its steps under halving: which candidates go on past a rung is not known
    before they train, but how many is (``kept`` of those left), and so is an arm's total. Every run of an arm
    gets the arm's share: at rung k of K, with ``a_k`` of its ``n`` candidates training the ``s_k`` steps up to
    it, the share is sum(a_k * s_k) / (n * steps)."""
    if tune.halving is None:
        return {run.run_id: 1.0 for run in runs}
    share: dict[str, float] = {}
    for arm in arms(runs, tune, grid_axes):
        n = len(arm.candidates)
        for candidate_runs in arm.candidates.values():
            for run in candidate_runs:
                ends = [r for r in tune.halving.rungs if r < run.train.steps] + [run.train.steps]
                alive, start, trained = n, 0, 0.0
                for end in ends:
                    trained += alive * (end - start)
                    alive, start = tune.halving.kept(alive), end
                share[run.run_id] = trained / (n * run.train.steps)
    return share
