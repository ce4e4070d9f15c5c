"""The shared trainer: schedule, determinism, divergence, files written, learning on real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from depthbench import storage
from depthbench.config import TrainConfig
from depthbench.train import BatchOrder, RunInterrupted, lr_at, train_run
from tests.conftest import CIFAR_JPEG, requires_cifar, tiny_run

TIMING = ("img_per_s", "elapsed_s")


def learned(rows: list[dict]) -> list[dict]:
    """Metrics rows without their timing columns, which differ between two identical runs."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_schedule_warmup_hands_back_to_the_main_schedule() -> None:
    cfg = TrainConfig(steps=1000, warmup={"steps": 10, "lr": 0.01})
    assert [lr_at(s, cfg) for s in (0, 9)] == [0.01, 0.01]
    assert lr_at(10, cfg) == 0.1 and lr_at(499, cfg) == 0.1
    assert lr_at(500, cfg) == pytest.approx(0.01) and lr_at(749, cfg) == pytest.approx(0.01)
    assert lr_at(750, cfg) == pytest.approx(0.001) and lr_at(999, cfg) == pytest.approx(0.001)


def test_paper_schedule_steps() -> None:
    cfg = TrainConfig()
    assert lr_at(31_999, cfg) == 0.1 and lr_at(32_000, cfg) == pytest.approx(0.01)
    assert lr_at(48_000, cfg) == pytest.approx(0.001)


def test_batch_order_is_a_permutation_per_epoch_and_a_function_of_step() -> None:
    order = BatchOrder(100, 10, seed=3, device=torch.device("cpu"))
    epoch = torch.cat([order(s) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))
    assert not torch.equal(torch.cat([order(s) for s in range(10, 20)]), epoch)
    fresh = BatchOrder(100, 10, seed=3, device=torch.device("cpu"))
    assert torch.equal(fresh(15), order(15))
    assert not torch.equal(BatchOrder(100, 10, seed=4, device=torch.device("cpu"))(0), order(0))


def test_run_writes_its_files(tmp_path: Path) -> None:
    cfg = tiny_run()
    result = train_run(cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "final.pt", "metrics.jsonl", "result.json"]
    rows = storage.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert [("test_acc" in r) for r in rows] == [False, True, False, True]
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["steps"] == 8 and on_disk["run_id"] == cfg.run_id
    assert on_disk["test_acc"] == rows[-1]["test_acc"] and on_disk["train_loss"] == rows[-1]["train_loss"]
    assert on_disk["best_test_acc"] == max(rows[1]["test_acc"], rows[3]["test_acc"])
    assert on_disk["params"] == result["params"] > 0 and on_disk["block"] == "basic"
    weights = torch.load(tmp_path / "final.pt", weights_only=True)
    assert set(weights) == {"model", "config"}


def test_same_seed_same_result_other_seed_differs(tmp_path: Path) -> None:
    cfg = tiny_run()
    a = train_run(cfg, tmp_path / "a")
    b = train_run(cfg, tmp_path / "b")
    assert learned(storage.read_jsonl(tmp_path / "a/metrics.jsonl")) == learned(storage.read_jsonl(tmp_path / "b/metrics.jsonl"))
    assert a["train_loss"] == b["train_loss"]
    other = train_run(cfg.model_copy(update={"seed": 1}), tmp_path / "c")
    assert other["train_loss"] != a["train_loss"]


def test_divergence_is_a_result_not_a_crash(tmp_path: Path) -> None:
    cfg = tiny_run(train={"lr": 1e6, "steps": 20, "milestones": [0.9]})
    result = train_run(cfg, tmp_path)
    assert result["status"] == "diverged" and result["success"] is False
    assert json.loads((tmp_path / "result.json").read_text())["test_acc"] is None


def test_stop_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = tiny_run(train={"steps": 12, "checkpoint_every": 100})
    whole = train_run(cfg, tmp_path / "whole")
    calls = {"n": 0}

    def stop_after_seven() -> bool:
        calls["n"] += 1
        return calls["n"] > 7

    with pytest.raises(RunInterrupted):
        train_run(cfg, tmp_path / "split", should_stop=stop_after_seven)
    assert torch.load(tmp_path / "split/checkpoint.pt", weights_only=True)["step"] == 7
    resumed = train_run(cfg, tmp_path / "split")
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc"):
        assert resumed[key] == whole[key], key
    assert learned(storage.read_jsonl(tmp_path / "split/metrics.jsonl")) == learned(
        storage.read_jsonl(tmp_path / "whole/metrics.jsonl"))
    assert not (tmp_path / "split/checkpoint.pt").exists()


def test_synthetic_data_is_learned(tmp_path: Path) -> None:
    cfg = tiny_run(dataset={"image_size": 16, "augment": False}, model={"width": 8},
                   train={"steps": 60, "eval_every": 60, "log_every": 20, "lr": 0.1})
    result = train_run(cfg, tmp_path)
    assert result["test_acc"] > 0.5  # 10 classes: chance is 0.1


@requires_cifar
def test_real_cifar10_subset_learns_well_above_chance(tmp_path: Path) -> None:
    cfg = tiny_run(
        dataset={"name": "imagefolder", "root": str(CIFAR_JPEG), "train_subset": 2000, "test_subset": 500,
                 "image_size": None},
        model={"width": 8},
        train={"steps": 150, "batch_size": 64, "lr": 0.1, "eval_every": 150, "log_every": 50, "milestones": [0.8]},
    )
    result = train_run(cfg, tmp_path)
    assert result["test_acc"] > 0.25, result  # chance is 0.10


def test_without_flips_batches_keep_their_shifts_and_are_never_mirrored() -> None:
    from depthbench.data import load_dataset
    from depthbench.train import TrainingSetup

    flips, plain = tiny_run(), tiny_run(dataset={"flip": False})
    assert tiny_run(dataset={"flip": True}).run_id == flips.run_id  # the default keeps the ids made before it
    assert plain.run_id != flips.run_id
    with_flips = TrainingSetup.create(flips, load_dataset(flips.dataset))
    without = TrainingSetup.create(plain, load_dataset(plain.dataset))
    mirrored = 0
    for step in range(8):
        idx, shift, flipped = with_flips.draws(step)
        same_idx, same_shift, none = without.draws(step)
        assert none is None and torch.equal(same_idx, idx) and torch.equal(same_shift, shift)
        # the batch is the flip run's with every flip undone
        assert torch.equal(without.batch(step)[0], with_flips.assemble(idx, shift, torch.zeros_like(flipped))[0])
        mirrored += int(flipped.sum())
    assert mirrored == 73  # of 8 batches of 16: the flip run does mirror
