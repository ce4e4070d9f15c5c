"""The validation split (dataset.val_split): held out of the training split, class-balanced, the same for
every run of a sweep; evaluated beside the test split; and absent, byte for byte, from runs without one."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from depthbench import data, duration, storage
from depthbench.cli import app
from depthbench.config import ConfigError, DatasetConfig, RunConfig, load_sweep, parse_sweep
from depthbench.data import TensorData, load_dataset
from depthbench.errors import DepthbenchError
from depthbench.estimate import DataShape, known_shape
from depthbench.results import COLUMNS
from depthbench.sweep import preflight
from depthbench.train import RunInterrupted, TrainingSetup, evaluate, train_run
from tests.conftest import ROOT, tiny_run, tiny_sweep, write_config
from tests.test_data import direct_stats, folder_cfg, write_tree

TIMING = ("img_per_s", "elapsed_s")
EVAL_ROW = ["step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "img_per_s", "elapsed_s"]
RESULT = ["run_id", "status", "version", "depth", "seed", "block", "units_per_stage", "params", "steps", "train_loss",
          "train_acc", "test_loss", "test_acc", "best_test_acc", "img_per_s", "compile_s", "wall_s", "setup_s",
          "device", "precision", "compiled", "cuda_graph", "success"]


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    data._MEMO.clear()


def synthetic(**options: object) -> DatasetConfig:
    """7 classes, so that a split's remainder shows where it goes; 100 training images (15, 15, 14, ..., 14)."""
    return DatasetConfig(name="synthetic", train_subset=100, test_subset=21, image_size=8, num_classes=7, **options)


def rows_of(x: torch.Tensor, y: torch.Tensor) -> list[tuple[int, bytes]]:
    """Each image with its label, sorted: a multiset that two splits can be compared by."""
    return sorted((int(label), image.numpy().tobytes()) for image, label in zip(x, y, strict=True))


def learned(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


# --- the setting ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("written", "expected"), [
    (0, "must be a count of images (1 or more) or a fraction of the training split between 0 and 1 (got 0)"),
    (-5, "must be a count of images (1 or more) or a fraction of the training split between 0 and 1 (got -5)"),
    (-0.5, "must be a count of images (1 or more) or a fraction of the training split between 0 and 1 (got -0.5)"),
    (1.5, "must be a count of images (1 or more) or a fraction of the training split between 0 and 1 (got 1.5)"),
    (True, "expected a number, got a boolean"),
])
def test_a_split_that_is_neither_a_count_nor_a_fraction_is_refused(written: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sweep({"name": "x", "dataset": {"val_split": written}, "grid": {"version": ["v1"], "depth": [8]}},
                    source="cfg")
    assert str(info.value) == f"cfg: dataset.val_split: {expected}"


def test_a_whole_float_is_a_count_and_fractions_and_counts_resolve_to_images() -> None:
    assert DatasetConfig(val_split=500.0).val_split == 500 and isinstance(DatasetConfig(val_split=500.0).val_split, int)
    assert tiny_run(dataset={"val_split": 32.0}).run_id == tiny_run(dataset={"val_split": 32}).run_id
    assert [DatasetConfig(val_split=v).val_size(1437) for v in (None, 1, 100, 0.1, 0.25)] == [0, 1, 100, 144, 359]


def test_runs_without_a_split_keep_their_ids_and_a_split_makes_a_new_one() -> None:
    # The shipped demos' ids, pinned before validation splits existed (tests/test_config_safety.py pins them all).
    for name, digest in (("challenge.yaml", "b5152a17"), ("demo-110.yaml", "6620af25")):
        runs = load_sweep(ROOT / "configs" / name).runs()
        assert {r.content_hash for r in runs} == {digest}
        split = runs[0].model_copy(update={"dataset": runs[0].dataset.model_copy(update={"val_split": 0.1})})
        assert split.content_hash != digest
    plain = tiny_run()
    assert tiny_run(dataset={"val_split": None}).run_id == plain.run_id
    assert len({plain.run_id, tiny_run(dataset={"val_split": 16}).run_id,
                tiny_run(dataset={"val_split": 0.125}).run_id}) == 3


def test_a_validation_metric_needs_a_validation_split() -> None:
    with pytest.raises(ConfigError) as info:
        tiny_sweep(success={"metric": "val_acc", "min": 0.5}).runs()
    assert str(info.value) == (
        "config: success.metric val_acc is measured on the validation split, and dataset.val_split is not set; "
        "set it (a count of images, or a fraction such as 0.1), or use a test metric (in grid run version=v1, "
        "depth=8, seed=0)")
    assert tiny_sweep(success={"metric": "best_val_acc", "min": 0.5}, dataset={"val_split": 16}).runs()


# --- the split --------------------------------------------------------------------------------------------


def test_the_split_is_class_balanced_disjoint_and_the_rest_trains() -> None:
    base = load_dataset(synthetic())
    split = load_dataset(synthetic(val_split=10))
    assert repr(split) == "TensorData(90 train, 10 val, 21 test, 3x8x8, 7 classes)"
    # 10 over 7 classes: one each, the remainder of 3 to the first classes.
    assert split.val_y.bincount().tolist() == [2, 2, 2, 1, 1, 1, 1]
    assert base.train_y.bincount().tolist() == [15, 15, 14, 14, 14, 14, 14]
    assert split.train_y.bincount().tolist() == [13, 13, 12, 13, 13, 13, 13]
    # The synthetic images are all distinct: the two splits partition the training images exactly.
    held, kept = rows_of(split.val_x, split.val_y), rows_of(split.train_x, split.train_y)
    assert not set(held) & set(kept)
    assert sorted(held + kept) == rows_of(base.train_x, base.train_y)
    assert torch.equal(split.test_x, base.test_x) and torch.equal(split.test_y, base.test_y)
    # Normalised by the images left to train on.
    mean, std = direct_stats(split.train_x)
    assert split.mean == pytest.approx(mean, abs=1e-9) and split.std == pytest.approx(std, abs=1e-9)
    assert split.mean != base.mean
    assert split.val_x.dtype == torch.uint8 and split.val_y.dtype == torch.int64 and split.val_x.is_contiguous()


def test_without_a_split_the_validation_tensors_are_empty_of_the_images_shape() -> None:
    base = load_dataset(synthetic())
    assert base.val_x.shape == (0, 3, 8, 8) and base.val_x.dtype == torch.uint8
    assert base.val_y.shape == (0,) and base.val_y.dtype == torch.int64
    assert repr(base) == "TensorData(100 train, 21 test, 3x8x8, 7 classes)"
    built = TensorData(base.train_x, base.train_y, base.test_x, base.test_y, base.classes, base.mean, base.std)
    assert built.val_x.shape == (0, 3, 8, 8) and built.val_y.shape == (0,)


def test_a_fraction_is_of_the_training_subset_and_a_smaller_split_is_in_a_larger_one() -> None:
    split = load_dataset(synthetic(val_split=0.25))  # 25 of the 100 images of train_subset
    assert split.val_y.bincount().tolist() == [4, 4, 4, 4, 3, 3, 3] and len(split.train_y) == 75
    count = load_dataset(synthetic(val_split=25))
    assert torch.equal(split.val_x, count.val_x) and torch.equal(split.val_y, count.val_y)
    smaller = load_dataset(synthetic(val_split=0.1))
    assert set(rows_of(smaller.val_x, smaller.val_y)) < set(rows_of(split.val_x, split.val_y))


def test_every_run_of_a_sweep_sees_the_same_split_whatever_its_seed() -> None:
    sweep = tiny_sweep(dataset={"val_split": 32}, grid={"version": ["v1"], "depth": [8], "seed": [0, 1, 7]})
    splits = []
    for run in sweep.runs():
        data._MEMO.clear()  # drawn again for each run, not read back from the memo
        d = load_dataset(run.dataset)
        splits.append((d.val_x, d.val_y, d.train_x))
    for val_x, val_y, train_x in splits[1:]:
        assert torch.equal(val_x, splits[0][0]) and torch.equal(val_y, splits[0][1])
        assert torch.equal(train_x, splits[0][2])
    assert splits[0][1].bincount().tolist() == [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]


def test_the_split_is_not_the_images_every_subset_starts_with() -> None:
    # Drawn with a generator of its own: with the subsets', a split of the digits would be train_subset=144.
    split = load_dataset(DatasetConfig(name="digits", val_split=144))
    subset = load_dataset(DatasetConfig(name="digits", train_subset=144))
    assert data._VAL_SPLIT_SEED != data._SUBSET_SEED
    assert rows_of(split.val_x, split.val_y) != rows_of(subset.train_x, subset.train_y)


def test_the_split_is_memoised_beside_the_dataset_it_was_cut_from() -> None:
    first = load_dataset(synthetic(val_split=10))
    assert load_dataset(synthetic(val_split=10)) is first
    assert len(data._MEMO) == 2  # the dataset as before, and its split
    assert load_dataset(synthetic()).val_x.shape[0] == 0


def test_digits_split() -> None:
    d = load_dataset(DatasetConfig(name="digits", val_split=0.1))  # round(0.1 * 1437) = 144
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (1293, 144, 360)
    assert d.val_y.bincount().tolist() == [15, 15, 15, 15, 14, 14, 14, 14, 14, 14]
    base = load_dataset(DatasetConfig(name="digits"))
    assert (base.train_y.bincount() - d.val_y.bincount()).tolist() == d.train_y.bincount().tolist()
    assert d.val_x.shape == (144, 1, 32, 32)


def test_image_folder_and_its_archive_split_alike_and_the_disk_cache_is_the_datasets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = write_tree(tmp_path / "tree", {"train": {"a": 3, "b": 4}, "test": {"a": 1, "b": 1}})
    d = load_dataset(folder_cfg(tmp_path / "tree", val_split=2))
    assert d.train_y.tolist() == [0, 0, 1, 1, 1] and d.val_y.tolist() == [0, 1]
    path_of = {pixels.tobytes(): path for path, pixels in images.items() if path.startswith("train/")}
    held = [path_of[image.permute(1, 2, 0).numpy().tobytes()] for image in d.val_x]
    kept = [path_of[image.permute(1, 2, 0).numpy().tobytes()] for image in d.train_x]
    assert [path.split("/")[1] for path in held] == ["a", "b"]
    assert sorted(held + kept) == sorted(path_of.values())

    # The disk cache holds the dataset before its split: another split decodes nothing.
    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "_decode_files", no_decoding)
    data._MEMO.clear()
    assert load_dataset(folder_cfg(tmp_path / "tree", val_split=4)).val_y.tolist() == [0, 0, 1, 1]
    monkeypatch.undo()

    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
    from_archive = load_dataset(folder_cfg(archive, val_split=2))
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(from_archive, name), getattr(d, name)), name
    assert from_archive.mean == d.mean


@pytest.mark.parametrize(("cfg", "expected"), [
    (synthetic(val_split=98),
     ("dataset.val_split=98 holds out every training image of class 'class2' (14 of the training split's 100); "
      "lower it to at most 93 images, so that every class keeps one to train on")),
    (synthetic(val_split=101),
     ("dataset.val_split=101 is more than the training split's 100 images; lower it to at most 93 images, so "
      "that every class keeps one to train on")),
    (synthetic(val_split=0.99),
     ("dataset.val_split=0.99 (99 images) holds out every training image of class 'class0' (15 of the training "
      "split's 100); lower it to at most 93 images, so that every class keeps one to train on")),
    (synthetic(val_split=0.004),
     ("dataset.val_split=0.004 (0 images) holds out nothing of the training split's 100 images; raise it, or give "
      "a count of images")),
    (DatasetConfig(name="digits", train_subset=20, val_split=15),
     ("dataset.val_split=15 holds out every training image of class '0' (2 of the training split's 20); lower it "
      "to at most 10 images, so that every class keeps one to train on")),
])
def test_a_split_too_large_or_too_small_says_what_fits(cfg: DatasetConfig, expected: str) -> None:
    with pytest.raises(DepthbenchError) as info:
        load_dataset(cfg)
    assert str(info.value) == expected


def test_a_class_too_small_to_spare_an_image_is_named(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree", {"train": {"a": 1, "b": 3}, "test": {"a": 1, "b": 1}})
    with pytest.raises(DepthbenchError) as info:
        load_dataset(folder_cfg(tmp_path / "tree", val_split=2))
    assert str(info.value) == (
        "dataset.val_split=2 holds out every training image of class 'a' (1 of the training split's 4); none fits, "
        "as class 'a' has only one training image and must keep it: leave dataset.val_split out")
    with pytest.raises(DepthbenchError) as info:
        load_dataset(folder_cfg(tmp_path / "tree", val_split=4))
    assert str(info.value).startswith(
        "dataset.val_split=4 needs 2 images of class 'a', which has 1 in the training split of 4; none fits")
    with pytest.raises(DepthbenchError) as info:
        load_dataset(DatasetConfig(name="digits", train_subset=5, val_split=0.2))  # one image of each of 5 classes
    assert str(info.value) == (
        "dataset.val_split=0.2 (1 image) holds out every training image of class '0' (1 of the training split's "
        "5); none fits, as class '0' has only one training image and must keep it: leave dataset.val_split out, "
        "or raise dataset.train_subset")


def test_the_largest_split_named_is_the_largest_that_loads() -> None:
    assert load_dataset(synthetic(val_split=93)).train_y.bincount().tolist() == [1] * 7
    with pytest.raises(DepthbenchError, match="at most 93 images"):
        load_dataset(synthetic(val_split=94))


# --- shapes, checks and estimates ------------------------------------------------------------------------


def test_the_batch_is_checked_against_what_the_split_leaves_to_train_on() -> None:
    run = tiny_run(dataset={"val_split": 115})
    with pytest.raises(DepthbenchError) as info:
        preflight([run], devices=False)
    assert str(info.value) == (f"{run.run_id}: train.batch_size (16) is larger than the training set (13 images "
                               "once dataset.val_split holds 115 out); lower it")
    preflight([tiny_run(dataset={"val_split": 112})], devices=False)  # 16 left: one batch


def test_shapes_count_the_split_apart_from_training() -> None:
    assert known_shape(DatasetConfig(name="cifar10", val_split=0.1)) == DataShape(3, 32, 10, 45_000, 10_000, 5_000)
    assert known_shape(DatasetConfig(name="cifar10")) == DataShape(3, 32, 10, 50_000, 10_000)
    assert DataShape.of(load_dataset(synthetic(val_split=10))) == DataShape(3, 8, 7, 90, 21, 10)


def test_a_cifar_trial_times_a_validation_split_of_the_runs_size() -> None:
    run = tiny_run(dataset={"name": "cifar100", "train_subset": None, "test_subset": 100, "image_size": None,
                            "val_split": 5000})
    trial = duration._trial_dataset(run, known_shape(run.dataset))
    # Every class keeps an image to train on: 100 classes, more than the 96 images of the trial's 6 batches.
    assert (trial.name, trial.train_subset, trial.val_split, trial.test_subset) == ("synthetic", 5100, 5000, 100)
    assert DataShape.of(load_dataset(trial)) == DataShape(3, 32, 100, 100, 100, 5000)
    key = duration.shape_key(run, torch.device("cpu"), 1)
    assert key["dataset"]["val_split"] == 5000
    assert "val_split" not in duration.shape_key(tiny_run(), torch.device("cpu"), 1)["dataset"]


# --- training ---------------------------------------------------------------------------------------------


def test_a_run_with_a_split_logs_and_reports_validation_metrics(tmp_path: Path) -> None:
    cfg = tiny_run(dataset={"val_split": 32})
    result = train_run(cfg, tmp_path)
    rows = storage.read_jsonl(tmp_path / "metrics.jsonl")
    assert [list(r) for r in rows if "test_acc" in r] == [EVAL_ROW[:6] + ["val_loss", "val_acc"] + EVAL_ROW[6:]] * 2
    assert not any("val_acc" in r for r in rows if "test_acc" not in r)
    on_disk = json.loads((tmp_path / "result.json").read_text())
    at = RESULT.index("best_test_acc") + 1
    assert list(on_disk) == [*RESULT[:at], "val_loss", "val_acc", "best_val_acc", *RESULT[at:]]
    assert on_disk["val_acc"] == rows[-1]["val_acc"] and on_disk["val_loss"] == rows[-1]["val_loss"]
    assert on_disk["best_val_acc"] == max(rows[1]["val_acc"], rows[3]["val_acc"])
    assert result["val_acc"] == on_disk["val_acc"]

    # The logged figures are those of the final weights on the 32 held-out images.
    d = load_dataset(cfg.dataset)
    setup = TrainingSetup.create(cfg, d)
    setup.model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True)["model"])
    loss, acc = evaluate(setup.model, d.val_x, d.val_y, setup.mean, setup.std, cfg.train.eval_batch_size,
                         setup.autocast, cfg.train.channels_last)
    assert (loss, acc) == (on_disk["val_loss"], on_disk["val_acc"])
    assert acc * 32 == round(acc * 32)


def test_a_run_without_a_split_writes_what_it_always_wrote(tmp_path: Path) -> None:
    train_run(tiny_run(), tmp_path)
    rows = storage.read_jsonl(tmp_path / "metrics.jsonl")
    assert [list(r) for r in rows if "test_acc" in r] == [EVAL_ROW] * 2
    assert list(json.loads((tmp_path / "result.json").read_text())) == RESULT


def test_evaluating_the_split_leaves_training_as_it_was(tmp_path: Path) -> None:
    # The same training data with and without validation images beside it: every figure but val_* is the same.
    cfg = tiny_run(dataset={"val_split": 32})
    split = load_dataset(cfg.dataset)
    unsplit = TensorData(split.train_x, split.train_y, split.test_x, split.test_y, split.classes, split.mean,
                         split.std)
    train_run(cfg, tmp_path / "with", data=split)
    train_run(cfg, tmp_path / "without", data=unsplit)
    with_val = learned(storage.read_jsonl(tmp_path / "with/metrics.jsonl"))
    without = learned(storage.read_jsonl(tmp_path / "without/metrics.jsonl"))
    assert [{k: v for k, v in row.items() if not k.startswith("val_")} for row in with_val] == without
    a, b = (torch.load(tmp_path / f"{name}/final.pt", weights_only=True)["model"] for name in ("with", "without"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seeds_train_differently_on_the_same_split(tmp_path: Path) -> None:
    sweep = tiny_sweep(dataset={"val_split": 32}, grid={"version": ["v2"], "depth": [8], "seed": [0, 1]})
    results = [train_run(run, tmp_path / run.run_id) for run in sweep.runs()]
    assert results[0]["train_loss"] != results[1]["train_loss"]
    for run in sweep.runs():
        rows = storage.read_jsonl(tmp_path / run.run_id / "metrics.jsonl")
        assert [r["step"] for r in rows if "val_acc" in r] == [4, 8]
        assert all(0 <= r["val_acc"] <= 1 and r["val_loss"] > 0 for r in rows if "val_acc" in r)


def test_a_diverged_run_has_no_final_validation_figures(tmp_path: Path) -> None:
    cfg = tiny_run(dataset={"val_split": 32}, train={"lr": 1e6, "steps": 20, "milestones": [0.9]})
    assert train_run(cfg, tmp_path)["status"] == "diverged"
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk["val_acc"] is None and on_disk["val_loss"] is None and "best_val_acc" in on_disk


@pytest.mark.parametrize("val_split", [None, 32])
def test_a_checkpoint_without_best_val_acc_resumes(tmp_path: Path, val_split: int | None) -> None:
    cfg = tiny_run(dataset={"val_split": val_split}, train={"steps": 12, "checkpoint_every": 100})
    whole = train_run(cfg, tmp_path / "whole")
    calls = {"n": 0}

    def stop_after_five() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(RunInterrupted):
        train_run(cfg, tmp_path / "split", should_stop=stop_after_five)
    path = tmp_path / "split/checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 5
    if val_split is None:  # as a checkpoint written before validation splits were
        del saved["best_val_acc"]
        torch.save(saved, path)
    resumed = train_run(cfg, tmp_path / "split")
    assert {k: v for k, v in resumed.items() if k not in ("wall_s", "setup_s", "img_per_s", "compile_s")} == \
        {k: v for k, v in whole.items() if k not in ("wall_s", "setup_s", "img_per_s", "compile_s")}
    assert ("best_val_acc" in resumed) == (val_split is not None)


# --- the results table -------------------------------------------------------------------------------------


def test_results_csv_has_validation_columns_only_where_a_run_has_a_split(tmp_path: Path) -> None:
    runner = CliRunner()
    sweep = tiny_sweep("split", dataset={"val_split": 32}, grid={"version": ["v1"], "depth": [8], "seed": [0]})
    swept = runner.invoke(app, ["sweep", str(write_config(tmp_path / "split.yaml", sweep)), "--out",
                                str(tmp_path), "--no-estimate"], catch_exceptions=False)
    assert swept.exit_code == 0, swept.output
    table = pd.read_csv(tmp_path / "split" / "results.csv")
    at = COLUMNS.index("best_test_acc") + 1
    assert list(table.columns) == [*COLUMNS[:at], "val_loss", "val_acc", "best_val_acc", *COLUMNS[at:], "error"]
    result = json.loads((tmp_path / "split" / sweep.runs()[0].run_id / "result.json").read_text())
    assert table.loc[0, ["val_loss", "val_acc", "best_val_acc"]].tolist() == pytest.approx(
        [result["val_loss"], result["val_acc"], result["best_val_acc"]], rel=1e-12)

    plain = tiny_sweep("plain", grid={"version": ["v1"], "depth": [8], "seed": [0]})
    swept = runner.invoke(app, ["sweep", str(write_config(tmp_path / "plain.yaml", plain)), "--out",
                                str(tmp_path), "--no-estimate"], catch_exceptions=False)
    assert swept.exit_code == 0, swept.output
    assert list(pd.read_csv(tmp_path / "plain" / "results.csv").columns) == [*COLUMNS, "error"]


def test_a_validation_metric_judges_success(tmp_path: Path) -> None:
    cfg = tiny_run(dataset={"val_split": 32}, success={"metric": "val_acc", "min": 0.0})
    assert train_run(cfg, tmp_path / "met")["success"] is True
    strict = RunConfig.model_validate({**cfg.model_dump(), "success": {"metric": "val_acc", "min": 1.01}})
    assert train_run(strict, tmp_path / "unmet")["success"] is False
