"""The tune section and the ranking that chooses each arm's value: grouping, means over seeds, ties, missing
and diverged runs, and the metric read at a rung's step."""

from __future__ import annotations

import math

import pytest

from depthbench.config import ConfigError, TuneConfig, parse_sweep
from depthbench.tuning import arms, describe, final_value, rank, rung_value


def tuned(**tune) -> dict:
    return {
        "name": "tuned",
        "dataset": {"name": "synthetic", "train_subset": 128, "test_subset": 64, "image_size": 8, "val_split": 32},
        "model": {"width": 4},
        "train": {"steps": 8, "batch_size": 16, "eval_every": 4, "device": "cpu"},
        "grid": {"version": ["v1", "v2"], "depth": [8, 14], "train.lr": [0.01, 0.1, 0.4], "seed": [0, 1]},
        "tune": {"axes": ["train.lr"], **tune},
    }


def test_arms_default_to_every_axis_neither_tuned_nor_seed() -> None:
    sweep = parse_sweep(tuned())
    grouped = arms(sweep.runs(), sweep.tune, list(sweep.axes()))
    assert [arm.values for arm in grouped] == [("v1", 8), ("v1", 14), ("v2", 8), ("v2", 14)]
    assert list(grouped[0].candidates) == [(0.01,), (0.1,), (0.4,)]
    assert [run.seed for run in grouped[0].candidates[(0.1,)]] == [0, 1]
    by_version = arms(sweep.runs(), sweep.tune.model_copy(update={"arm": ("version",)}), list(sweep.axes()))
    assert [arm.values for arm in by_version] == [("v1",), ("v2",)]
    assert [run.depth for run in by_version[0].candidates[(0.1,)]] == [8, 8, 14, 14]


def test_tuning_leaves_run_ids_alone() -> None:
    untuned = {k: v for k, v in tuned().items() if k != "tune"}
    assert [r.run_id for r in parse_sweep(tuned()).runs()] == [r.run_id for r in parse_sweep(untuned).runs()]


@pytest.mark.parametrize(("change", "message"), [
    ({"tune": {"axes": ["train.momentum"]}}, "tune.axes: 'train.momentum' is not a grid axis"),
    ({"tune": {"axes": ["train.lr"], "arm": ["seed"]}}, "tune.arm: 'seed' is the seed"),
    ({"tune": {"axes": ["train.lr"], "arm": ["train.lr"]}}, "tune.arm: 'train.lr' is tuned"),
    ({"tune": {"axes": ["depth"]}}, "tune.axes: 'depth' is what the study compares"),
    ({"tune": {"axes": ["seed"]}}, "seed cannot be tuned"),
    ({"tune": {"axes": ["train.lrr"]}}, "did you mean 'train.lr'"),
    ({"tune": {"axes": ["train.lr"], "metric": "test_acc"}}, "tune.metric: 'test_acc' is not allowed"),
    ({"tune": {"axes": ["train.lr"], "halving": {"rungs": [8]}}}, "tune.halving.rungs: step 8 is not before"),
    ({"tune": {"axes": ["train.lr"], "halving": {"rungs": [4, 2]}}}, "increasing order (got [4, 2])"),
    ({"tune": {"axes": ["train.lr"], "halving": {"rungs": [2], "eta": 1}}}, "tune.halving.eta"),
])
def test_bad_tune_sections_are_one_line(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        parse_sweep({**tuned(), **change})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_tuning_needs_a_validation_split() -> None:
    data = tuned()
    del data["dataset"]["val_split"]
    with pytest.raises(ConfigError, match="has no validation split.*set dataset.val_split"):
        parse_sweep(data)


def test_rank_takes_the_best_mean_over_seeds_and_says_ties_and_gaps() -> None:
    sweep = parse_sweep(tuned())
    arm = arms(sweep.runs(), sweep.tune, list(sweep.axes()))[0]
    runs = {(r.train.lr, r.seed): r.run_id for runs in arm.candidates.values() for r in runs}
    val = {runs[0.01, 0]: 0.5, runs[0.01, 1]: 0.7, runs[0.1, 0]: 0.6, runs[0.1, 1]: 0.6, runs[0.4, 0]: 0.9}
    ranking = rank(arm, lambda run: val.get(run.run_id), higher_is_better=True)
    # 0.4 has one seed of two (0.9): the best mean of the seeds it has; 0.01 and 0.1 tie at 0.6, grid order.
    assert ranking.order == [(0.4,), (0.01,), (0.1,)]
    assert ranking.best == (0.4,)
    assert ranking.scores[(0.4,)].missing == 1 and ranking.scores[(0.4,)].seeds == 1
    assert ranking.scores[(0.01,)].mean == pytest.approx(0.6)
    assert ranking.scores[(0.01,)].std == pytest.approx(math.sqrt(0.02))
    val[runs[0.4, 0]] = 0.6
    tied = rank(arm, lambda run: val.get(run.run_id), higher_is_better=True)
    assert tied.best == (0.01,) and tied.ties == [(0.1,), (0.4,)]
    lowest = rank(arm, lambda run: val.get(run.run_id), higher_is_better=False)
    assert lowest.best == (0.01,)
    assert rank(arm, lambda run: None, higher_is_better=True).best is None


def test_final_and_rung_values_read_validation_metrics_only() -> None:
    result = {"status": "completed", "val_acc": 0.8, "best_val_acc": 0.85, "val_loss": 0.4, "test_acc": 0.1}
    assert final_value(result, "val_acc") == 0.8 and final_value(result, "val_loss") == 0.4
    assert final_value({"status": "diverged", "val_acc": None}, "val_acc") == 0.0
    assert final_value({"status": "diverged"}, "val_loss") == math.inf
    assert final_value({"status": "failed"}, "val_acc") is None
    assert final_value({"status": "pruned", "val_acc": 0.9}, "val_acc") is None
    assert final_value(None, "val_acc") is None
    rows = [{"step": 2, "train_loss": 2.0}, {"step": 4, "train_loss": 1.5, "val_acc": 0.6, "val_loss": 1.2},
            {"step": 6, "train_loss": 1.4}, {"step": 8, "train_loss": 1.3, "val_acc": 0.5, "val_loss": 1.1}]
    assert rung_value(rows, 4, "val_acc") == 0.6
    assert rung_value(rows, 8, "best_val_acc") == 0.6
    assert rung_value(rows, 8, "val_loss") == 1.1
    assert rung_value(rows, 6, "val_acc") is None  # no evaluation at that step
    assert rung_value(rows[:1], 4, "val_acc") is None  # not there yet
    diverged = [*rows[:2], {"step": 6, "train_loss": math.nan}]
    assert rung_value(diverged, 8, "val_acc") == 0.0


def test_describe_names_each_value() -> None:
    assert describe(("train.lr", "train.warmup.steps"), (0.1, 500)) == "train.lr=0.1, train.warmup.steps=500"
    assert TuneConfig(axes=("train.lr",)).arm_axes(["version", "depth", "seed", "train.lr"]) == ("version", "depth")
