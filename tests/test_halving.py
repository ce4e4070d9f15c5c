"""Successive halving: the decisions from fabricated metrics, the trainer's pause at a rung, and tuned sweeps
that must prune the same runs and learn the same numbers on every executor, after an interruption, and that
resume a pruned run once the halving keeps it."""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import depthbench.sweep
import depthbench.train
from depthbench import storage
from depthbench.cli import app
from depthbench.config import SweepConfig
from depthbench.executors import ParallelExecutor, RayExecutor, SlurmExecutor
from depthbench.executors.local import _cores
from depthbench.halving import decide
from depthbench.report import build_report
from depthbench.stopping import StopRequested
from depthbench.sweep import RunFlags, RunOutcome, SweepOutcome, execute_run, plan, run_states, run_sweep
from depthbench.train import RunPaused, checkpoint_step, train_run
from tests.conftest import LEARNED, steps, tiny_run, tiny_sweep, write_config

runner = CliRunner()
LRS = [0.01, 0.1, 0.4]


def halving_sweep(name: str = "halving", *, eta: int = 3, rungs: tuple[int, ...] = (4,), **sections: Any
                  ) -> SweepConfig:
    """2 versions (the arms) x 3 learning rates (the candidates) x 2 seeds; 8 steps, compared at step 4."""
    grid = {"version": ["v1", "v2"], "depth": [8], "train.lr": LRS, "seed": [0, 1], **sections.pop("grid", {})}
    tune = {"axes": ["train.lr"], "halving": {"rungs": list(rungs), "eta": eta}, **sections.pop("tune", {})}
    return tiny_sweep(name, dataset={"val_split": 32}, grid=grid, tune=tune, **sections)


# --- the decisions, from fabricated metrics -----------------------------------------------------------


def rows(*values: float | None, diverged_at: int | None = None) -> list[dict[str, Any]]:
    """A run's metrics rows: an evaluation every 2 steps with these val_acc values (None: not logged)."""
    out = []
    for i, value in enumerate(values):
        step = 2 * (i + 1)
        if diverged_at is not None and step >= diverged_at:
            out.append({"step": step, "train_loss": math.nan})
            break
        if value is not None:
            out.append({"step": step, "train_loss": 1.0, "val_acc": value, "val_loss": 1 - value})
    return out


def decided(sweep: SweepConfig, values: dict[tuple[str, float, int], list[dict[str, Any]]],
            finished: set[tuple[str, float, int]] = frozenset()) -> Any:
    """``decide`` on the sweep's runs, their rows and finished runs given by (version, lr, seed)."""
    runs = sweep.runs()
    key = {(r.version, r.train.lr, r.seed): r.run_id for r in runs}
    return decide(runs, sweep.tune, list(sweep.axes()), {key[k]: v for k, v in values.items()},
                  {key[k] for k in finished}), key


def pruned_candidates(halving: Any, key: dict) -> dict[tuple[str, float], int]:
    """The pruned (version, lr) pairs and their rung, checking that a candidate's seeds share the decision."""
    out: dict[tuple[str, float], int] = {}
    for (version, lr, seed), run_id in key.items():
        if run_id in halving.pruned:
            out[version, lr] = halving.pruned[run_id]
    for (version, lr, seed), run_id in key.items():
        assert halving.pruned.get(run_id) == out.get((version, lr)), "a candidate's seeds are pruned together"
    return out


def every(value: dict[float, float], versions: tuple[str, ...] = ("v1", "v2")) -> dict:
    """Rows at steps 2 and 4 for every run: val_acc at step 4 = value[lr] (+ 0.01 for seed 1)."""
    return {(v, lr, seed): rows(0.1, value[lr] + 0.01 * seed) for v in versions for lr in LRS for seed in (0, 1)}


@pytest.mark.parametrize(("eta", "kept"), [(3, [0.4]), (2, [0.4, 0.01]), (4, [0.4])])
def test_each_arm_keeps_its_best_ceil_n_over_eta_by_the_mean_over_seeds(eta: int, kept: list[float]) -> None:
    sweep = halving_sweep(eta=eta)
    halving, key = decided(sweep, every({0.01: 0.5, 0.1: 0.3, 0.4: 0.7}))
    assert sweep.tune.halving.kept(3) == len(kept)
    assert pruned_candidates(halving, key) == {(v, lr): 4 for v in ("v1", "v2") for lr in LRS if lr not in kept}
    assert set(halving.open_rung.values()) == {None}  # every rung decided


def test_equal_means_keep_grid_order() -> None:
    halving, key = decided(halving_sweep(), every({0.01: 0.5, 0.1: 0.6, 0.4: 0.6}))
    assert pruned_candidates(halving, key) == {(v, lr): 4 for v in ("v1", "v2") for lr in (0.01, 0.4)}
    halving, key = decided(halving_sweep(), every({0.01: 0.6, 0.1: 0.6, 0.4: 0.6}))
    assert pruned_candidates(halving, key) == {(v, lr): 4 for v in ("v1", "v2") for lr in (0.1, 0.4)}


def test_a_diverged_run_counts_worst_and_a_failed_one_has_no_value() -> None:
    values = every({0.01: 0.5, 0.1: 0.3, 0.4: 0.7})
    # v1's best candidate diverges with one seed before the rung: its mean becomes (0 + 0.71) / 2, below 0.505.
    values["v1", 0.4, 0] = rows(0.1, 0.9, diverged_at=4)
    # v2's best fails with one seed before the rung (finished, no value there): it ranks on its other seed.
    values["v2", 0.4, 0] = rows(0.1)
    halving, key = decided(halving_sweep(), values, finished={("v1", 0.4, 0), ("v2", 0.4, 0)})
    assert pruned_candidates(halving, key) == {("v1", 0.1): 4, ("v1", 0.4): 4, ("v2", 0.01): 4, ("v2", 0.1): 4}
    # Every seed of v2's 0.01 and 0.4 failed: 0.1, the only candidate with a value, goes on.
    for lr in (0.01, 0.4):
        values["v2", lr, 0] = values["v2", lr, 1] = rows(0.1)
    failed = {("v2", lr, seed) for lr in (0.01, 0.4) for seed in (0, 1)}
    halving, key = decided(halving_sweep(), values, finished=failed | {("v1", 0.4, 0)})
    assert {lr for (v, lr) in pruned_candidates(halving, key) if v == "v2"} == {0.01, 0.4}


def test_arms_are_decided_apart_and_each_waits_for_its_own_runs() -> None:
    values = every({0.01: 0.5, 0.1: 0.3, 0.4: 0.7})
    values["v2", 0.1, 1] = rows(0.1)  # still at step 2: v2's rung cannot be decided yet
    halving, key = decided(halving_sweep(), values)
    assert pruned_candidates(halving, key) == {("v1", 0.01): 4, ("v1", 0.1): 4}
    assert {v: halving.open_rung[key[v, 0.1, 0]] for v in ("v1", "v2")} == {"v1": None, "v2": 4}
    values["v1", 0.01, 0] = rows(0.1, 0.99)  # another arm's numbers change nothing in v2 ...
    again, _ = decided(halving_sweep(), values)
    assert {r: s for r, s in again.pruned.items() if r.startswith("v2")} == {}
    assert pruned_candidates(again, key)[("v1", 0.4)] == 4  # ... and v1 now keeps 0.01 (mean 0.75 > 0.705)


def test_rungs_are_decided_in_turn_among_the_candidates_left() -> None:
    sweep = halving_sweep(eta=2, rungs=(2, 4), grid={"train.lr": [0.01, 0.1, 0.4, 0.8]})
    runs = sweep.runs()
    key = {(r.version, r.train.lr, r.seed): r.run_id for r in runs}
    at_2 = {0.01: 0.2, 0.1: 0.5, 0.4: 0.4, 0.8: 0.1}  # keeps 0.1 and 0.4
    at_4 = {0.01: 0.9, 0.1: 0.5, 0.4: 0.6, 0.8: 0.9}  # among those, keeps 0.4: the others' 0.9 came too late
    values = {(v, lr, s): rows(at_2[lr], at_4[lr]) for v in ("v1", "v2") for lr in at_2 for s in (0, 1)}
    halving = decide(runs, sweep.tune, list(sweep.axes()), {key[k]: v for k, v in values.items()}, set())
    assert pruned_candidates(halving, key) == {(v, lr): rung for v in ("v1", "v2")
                                               for lr, rung in ((0.01, 2), (0.8, 2), (0.1, 4))}
    # Before step 4 is logged, rung 2 is decided and rung 4 waits; the runs pruned at 2 are not waited for.
    early = {k: (v if k[1] in (0.01, 0.8) else v[:1]) for k, v in values.items()}
    halving = decide(runs, sweep.tune, list(sweep.axes()), {key[k]: v for k, v in early.items()}, set())
    assert set(halving.pruned.values()) == {2} and set(halving.open_rung.values()) == {4}


def test_run_ids_do_not_depend_on_tuning_or_halving() -> None:
    tuned = halving_sweep()
    untuned = tiny_sweep("halving", dataset={"val_split": 32},
                         grid={"version": ["v1", "v2"], "depth": [8], "train.lr": LRS, "seed": [0, 1]})
    assert [r.run_id for r in tuned.runs()] == [r.run_id for r in untuned.runs()]
    assert [r.run_id for r in halving_sweep(eta=2, rungs=(2, 6)).runs()] == [r.run_id for r in tuned.runs()]


# --- the trainer's pause -------------------------------------------------------------------------------


def test_a_run_pauses_at_its_rung_evaluated_and_checkpointed_and_resumes_without_repeating(tmp_path: Path) -> None:
    run = tiny_run(dataset={"val_split": 32})
    run_dir = tmp_path / run.run_id
    with pytest.raises(RunPaused) as paused:
        train_run(run, run_dir, pause_at=3, eval_at=(3,))
    assert paused.value.step == 3 and paused.value.row["step"] == 3
    assert {"val_acc", "val_loss", "test_acc"} <= paused.value.row.keys()  # at step 3, off eval_every's 4 and 8
    assert not (run_dir / "result.json").exists() and checkpoint_step(run_dir) == 3
    assert steps(run_dir) == [2, 3]
    with pytest.raises(RunPaused) as again:  # already there: nothing is trained
        train_run(run, run_dir, pause_at=3, eval_at=(3,))
    assert again.value.row is None and steps(run_dir) == [2, 3]
    outcome = execute_run(run, tmp_path, RunFlags(pause_at=3, eval_at=(3,)))
    assert (outcome.status, outcome.message) == ("paused", "paused at step 3, checkpoint kept")
    result = train_run(run, run_dir, eval_at=(3,))  # passes its rung: still evaluated there
    assert result["status"] == "completed" and steps(run_dir) == [2, 3, 4, 6, 8]
    fresh = tmp_path / "fresh"
    train_run(run, fresh, eval_at=(3,))
    same = ["step", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"]
    assert ([{k: r.get(k) for k in same} for r in storage.read_jsonl(run_dir / "metrics.jsonl")]
            == [{k: r.get(k) for k in same} for r in storage.read_jsonl(fresh / "metrics.jsonl")])


# --- tuned sweeps --------------------------------------------------------------------------------------


def expected_pruned(sweep_dir: Path, sweep: SweepConfig) -> set[str]:
    """The runs eta=3 halving at step 4 prunes, worked out from the rows: per version, every learning rate but
    the one with the best mean val_acc at step 4 over its seeds (the first in grid order on a tie)."""
    table = pd.DataFrame([{"run_id": run.run_id, "version": run.version, "lr": run.train.lr,
                           "val_acc": next(r["val_acc"] for r in storage.read_jsonl(sweep_dir / run.run_id /
                                                                                    "metrics.jsonl") if r["step"] == 4)}
                          for run in sweep.runs()])
    means = table.groupby(["version", "lr"], sort=False).val_acc.mean().reset_index()
    best = {version: group.loc[group.val_acc.idxmax(), "lr"] for version, group in means.groupby("version")}
    return set(table[table.lr != table.version.map(best)].run_id)


def learned_tuned(sweep_dir: Path) -> pd.DataFrame:
    """What the runs learned, the validation metrics the halving compares (a pruned run's at its rung) included."""
    return pd.read_csv(sweep_dir / "results.csv")[[*LEARNED, "val_loss", "val_acc", "best_val_acc"]]


def pruned_runs(sweep_dir: Path) -> set[str]:
    table = pd.read_csv(sweep_dir / "results.csv")
    return set(table[table.status == "pruned"].run_id)


def test_a_tuned_sweep_prunes_each_arm_at_its_rung_and_finishes_the_rest(tmp_path: Path) -> None:
    cfg = halving_sweep()
    config = write_config(tmp_path / "halving.yaml", cfg)
    result = runner.invoke(app, ["sweep", str(config), "--out", str(tmp_path), "--no-estimate"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "halving"
    pruned = expected_pruned(folder, cfg)
    assert len(pruned) == 8 and pruned_runs(folder) == pruned
    assert "8 run(s) pruned by successive halving (tune.halving), each with its checkpoint kept" in result.output
    assert "failed" not in result.output and "next: depthbench report" in result.output
    table = pd.read_csv(folder / "results.csv").set_index("run_id")
    assert set(table.loc[list(pruned), "steps"]) == {4} and not table.loc[list(pruned), "success"].any()
    kept = set(table.index) - pruned
    assert set(table.loc[list(kept), "status"]) == {"completed"} and set(table.loc[list(kept), "steps"]) == {8}
    for run_id in pruned:
        saved = storage.read_json(folder / run_id / "result.json")
        row = next(r for r in storage.read_jsonl(folder / run_id / "metrics.jsonl") if r["step"] == 4)
        assert saved == {"run_id": run_id, "status": "pruned", "pruned_at": 4, "steps": 4,
                         "val_acc": row["val_acc"], "val_loss": row["val_loss"], "wall_s": row["elapsed_s"]}
        assert checkpoint_step(folder / run_id) == 4 and steps(folder / run_id) == [2, 4]
    for run_id in kept:
        assert steps(folder / run_id) == [2, 4, 6, 8]  # paused at 4 and resumed: nothing repeated
    # A plain re-run has nothing to do; the report leaves pruned runs out of its numbers, and says so.
    assert plan(cfg, tmp_path)[1] == []
    report = build_report(folder, plots=False)
    assert report.pruned == 8 and len(report.table) == 4 and set(report.table.status) == {"completed"}
    assert "4 of 4 runs finished (4 completed, 0 diverged, 0 failed)" in report.markdown
    assert "8 run(s) pruned by successive halving (tune.halving) are left out of these counts" in report.markdown


def test_a_failed_run_counts_as_failed_and_its_candidate_ranks_on_its_other_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = depthbench.sweep.train_run

    def flaky(cfg: Any, run_dir: Path, **kwargs: Any) -> Any:
        if (cfg.version, cfg.train.lr, cfg.seed) == ("v1", 0.1, 0):
            raise RuntimeError("boom in the data pipeline")
        return real(cfg, run_dir, **kwargs)

    monkeypatch.setattr(depthbench.sweep, "train_run", flaky)
    cfg = halving_sweep()
    outcome = run_sweep(cfg, tmp_path, handle_signals=False)
    folder = tmp_path / "halving"
    broken = next(run.run_id for run in cfg.runs() if (run.version, run.train.lr, run.seed) == ("v1", 0.1, 0))
    assert outcome.failed == [broken] and broken not in outcome.pruned
    table = pd.read_csv(folder / "results.csv")
    at_4 = {run.run_id: next((r["val_acc"] for r in storage.read_jsonl(folder / run.run_id / "metrics.jsonl")
                              if r["step"] == 4), None) for run in cfg.runs()}
    v1 = table[(table.version == "v1") & (table.run_id != broken)].assign(val_acc=lambda t: t.run_id.map(at_4))
    means = v1.groupby("train.lr", sort=False).val_acc.mean()  # 0.1 on its seed 1 alone
    assert set(v1[v1.status == "completed"]["train.lr"]) == {means.idxmax()}
    assert set(v1[v1.status != "completed"].status) == {"pruned"}
    assert (table[table.version == "v2"].status == "completed").sum() == 2


SHARE = max(1, _cores() // 2)  # the torch threads of each of 2 workers


def reference_sweep(out: Path, cfg: SweepConfig, threads: int) -> SweepOutcome:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run_sweep(cfg, out, handle_signals=False)
    finally:
        torch.set_num_threads(before)


def test_jobs_prune_the_same_runs_and_learn_the_same_numbers(tmp_path: Path) -> None:
    cfg = halving_sweep()
    reference_sweep(tmp_path / "serial", cfg, SHARE)
    outcome = run_sweep(cfg, tmp_path / "jobs", executor=ParallelExecutor(2), handle_signals=False)
    assert outcome.failed == [] and len(outcome.pruned) == 8 and outcome.count("paused") == 12
    assert pruned_runs(tmp_path / "jobs" / "halving") == pruned_runs(tmp_path / "serial" / "halving")
    pd.testing.assert_frame_equal(learned_tuned(tmp_path / "jobs" / "halving"),
                                  learned_tuned(tmp_path / "serial" / "halving"))


def test_slurm_jobs_prune_the_same_runs_and_learn_the_same_numbers(tmp_path: Path) -> None:
    # submitit's local stand-in for SLURM: one job per run and rung, whose outcome the driver reads from the folder.
    cfg = halving_sweep("slurm", grid={"version": ["v2"], "seed": [0]})
    reference_sweep(tmp_path / "serial", cfg, 1)
    outcome = run_sweep(cfg, tmp_path / "slurm", executor=SlurmExecutor(cfg.resources, local=True),
                        handle_signals=False)
    assert [o.status for o in outcome.outcomes].count("paused") == 3 and outcome.failed == []
    assert len(outcome.pruned) == 2
    assert pruned_runs(tmp_path / "slurm" / "slurm") == pruned_runs(tmp_path / "serial" / "slurm")
    pd.testing.assert_frame_equal(learned_tuned(tmp_path / "slurm" / "slurm"),
                                  learned_tuned(tmp_path / "serial" / "slurm"))


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A private Ray instance on loopback with 2 CPUs, as test_executors.py starts one."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        # Ray binds to loopback only when it believes multi-node clusters are off (read at import).
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr("ray._private.ray_constants.ENABLE_RAY_CLUSTER", False)
        mp.setenv("DEPTHBENCH_DATA", str(tmp_path_factory.mktemp("ray-data")))
        ray.init(address="local", num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
        try:
            yield
        finally:
            ray.shutdown()


def test_ray_tasks_prune_the_same_runs_and_learn_the_same_numbers(ray_instance: None, tmp_path: Path) -> None:
    cfg = halving_sweep("ray", grid={"version": ["v2"], "seed": [0]})
    reference_sweep(tmp_path / "serial", cfg, 1)
    outcome = run_sweep(cfg, tmp_path / "ray", executor=RayExecutor(cfg.resources), handle_signals=False)
    assert [o.status for o in outcome.outcomes].count("paused") == 3 and len(outcome.pruned) == 2
    assert pruned_runs(tmp_path / "ray" / "ray") == pruned_runs(tmp_path / "serial" / "ray")
    pd.testing.assert_frame_equal(learned_tuned(tmp_path / "ray" / "ray"), learned_tuned(tmp_path / "serial" / "ray"))


class StopAfter:
    """A reporter that sends this process a Ctrl-C once ``count`` outcomes of ``status`` were shown."""

    def __init__(self, status: str, count: int) -> None:
        self.status, self.count, self.seen = status, count, 0

    def plan(self, todo: list, done: int, total: int) -> None: ...
    def run_started(self, cfg: Any) -> None: ...
    def progress(self, cfg: Any, progress: Any) -> None: ...

    def run_finished(self, outcome: RunOutcome) -> None:
        self.seen += outcome.status == self.status
        if self.seen == self.count:
            signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize(("status", "count"), [("paused", 5), ("pruned", 3)], ids=["mid_rung", "mid_pruning"])
def test_an_interrupted_sweep_run_again_prunes_the_same_runs(status: str, count: int, tmp_path: Path) -> None:
    cfg = halving_sweep()
    reference_sweep(tmp_path / "whole", cfg, 1)
    with pytest.raises(StopRequested):
        run_sweep(cfg, tmp_path / "stopped", reporter=StopAfter(status, count))
    folder = tmp_path / "stopped" / "halving"
    states = Counter(run_states(folder, cfg.runs()).values())
    assert states["completed"] == 0 and states["pruned"] == (count if status == "pruned" else 0)
    again = run_sweep(cfg, tmp_path / "stopped", handle_signals=False)
    assert again.failed == [] and len(again.pruned) == 8
    assert pruned_runs(folder) == pruned_runs(tmp_path / "whole" / "halving")
    pd.testing.assert_frame_equal(learned_tuned(folder), learned_tuned(tmp_path / "whole" / "halving"))
    for run in cfg.runs():
        assert steps(folder / run.run_id) == steps(tmp_path / "whole" / "halving" / run.run_id)


def test_a_pruned_run_the_halving_now_keeps_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    strict, lenient = halving_sweep(eta=3), halving_sweep(eta=2)
    run_sweep(strict, tmp_path / "changed", handle_signals=False)
    folder = tmp_path / "changed" / "halving"
    first = pruned_runs(folder)
    revived = plan(lenient, tmp_path / "changed")[1]
    assert len(revived) == 4 and {run.run_id for run in revived} < first  # one candidate of 3 more, per arm
    outcome = run_sweep(lenient, tmp_path / "changed", handle_signals=False)
    assert sorted(o.cfg.run_id for o in outcome.outcomes if o.status == "completed") == sorted(
        run.run_id for run in revived)
    for run in revived:
        notes = next(o.notes for o in outcome.outcomes if o.cfg.run_id == run.run_id)
        assert f"{run.run_id}: resumed from its checkpoint at step 4" in notes
        assert steps(folder / run.run_id) == [2, 4, 6, 8]
    # As if the sweep had kept 2 of 3 from the start.
    run_sweep(lenient, tmp_path / "fresh", handle_signals=False)
    assert pruned_runs(folder) == pruned_runs(tmp_path / "fresh" / "halving")
    pd.testing.assert_frame_equal(learned_tuned(folder), learned_tuned(tmp_path / "fresh" / "halving"))
    # Without halving every pruned run finishes.
    untuned = strict.model_copy(update={"tune": strict.tune.model_copy(update={"halving": None})})
    assert len(plan(untuned, tmp_path / "changed")[1]) == 4
    done = run_sweep(untuned, tmp_path / "changed", handle_signals=False)
    assert done.pruned == [] and set(pd.read_csv(folder / "results.csv").status) == {"completed"}


def test_the_estimate_expects_each_arms_share_of_steps() -> None:
    from depthbench.config import parse_sweep
    from depthbench.halving import expected_share

    data = {"name": "share", "dataset": {"name": "synthetic", "val_split": 32},
            "train": {"steps": 64000, "device": "cpu"},
            "grid": {"version": ["v1", "v2"], "depth": [8], "train.lr": [0.025, 0.05, 0.1, 0.2, 0.4], "seed": [0, 1]},
            "tune": {"axes": ["train.lr"], "halving": {"eta": 3, "rungs": [8000, 24000]}}}
    sweep = parse_sweep(data)
    share = expected_share(sweep.runs(), sweep.tune, list(sweep.axes()))
    # 5 candidates to 8k, 2 of them to 24k, 1 to the end: 112k of 5 x 64k steps.
    assert len(share) == 20 and all(value == pytest.approx(112_000 / 320_000) for value in share.values())
    untuned = parse_sweep({**data, "tune": {"axes": ["train.lr"]}})
    assert set(expected_share(untuned.runs(), untuned.tune, list(untuned.axes())).values()) == {1.0}


def test_permuted_test_labels_change_no_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same tuned sweep trained twice, the second time on test labels shuffled: what it prunes at the rung
    # and what each arm selects at the end come from the validation split alone, so neither moves, while the
    # test accuracies do.
    sweep = halving_sweep("blind")
    first = run_sweep(sweep, tmp_path / "a", handle_signals=False)
    load = depthbench.train.load_dataset

    def shuffled_test(cfg: Any) -> Any:
        data = load(cfg)
        order = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(7))
        return dataclasses.replace(data, test_y=data.test_y[order])

    monkeypatch.setattr(depthbench.train, "load_dataset", shuffled_test)
    second = run_sweep(sweep, tmp_path / "b", handle_signals=False)
    assert first.pruned and sorted(first.pruned) == sorted(second.pruned)
    a, b = build_report(first.sweep_dir), build_report(second.sweep_dir)
    arms = [(arm.ranking.best, arm.ranking.scores) for arm in a.tuned.outcome.arms]
    assert arms == [(arm.ranking.best, arm.ranking.scores) for arm in b.tuned.outcome.arms]
    tests = [pd.read_csv(folder / "results.csv").set_index("run_id") for folder in (first.sweep_dir, second.sweep_dir)]
    completed = tests[0].status == "completed"
    assert not tests[0].loc[completed, "test_acc"].equals(tests[1].loc[completed, "test_acc"])
    assert tests[0].loc[completed, "val_acc"].equals(tests[1].loc[completed, "val_acc"])
