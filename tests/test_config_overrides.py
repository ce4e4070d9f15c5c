"""``--set KEY=VALUE`` as a library call: the value is YAML, set into the file's data before validation, so
a sweep with an override is the sweep whose file says it, and every mistake is the file's error line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from depthbench.config import ConfigError, apply_overrides, load_sweep
from tests.conftest import ROOT

SMOKE = ROOT / "configs" / "smoke.yaml"


def edited(tmp_path: Path, change: dict) -> Path:
    """smoke.yaml with ``change`` (section: {key: value}) written into the file itself."""
    data = yaml.safe_load(SMOKE.read_text())
    for section, values in change.items():
        data[section] = {**data[section], **values}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_sweep(path, overrides)
    return str(info.value)


def test_an_override_is_the_sweep_whose_file_says_it(tmp_path: Path) -> None:
    overridden = load_sweep(SMOKE, ["train.steps=2000", "dataset.image_size=8"])
    assert overridden == load_sweep(edited(tmp_path, {"train": {"steps": 2000}, "dataset": {"image_size": 8}}))
    ids = [run.run_id for run in overridden.runs()]
    assert ids[:2] == ["v1-d8-s0-f78c5d8c", "v1-d8-s1-f78c5d8c"] and len(ids) == 8
    assert [run.run_id for run in load_sweep(SMOKE).runs()][:1] == ["v1-d8-s0-cbb445c5"]  # the file's own


def test_grid_axes_are_replaced_or_added_and_values_are_yaml() -> None:
    sweep = load_sweep(SMOKE, ["grid.seed=[0]", "grid.model.width=[4, 8]", "train.nesterov=true", "train.lr=1e-2"])
    runs = sweep.runs()
    assert [(r.version, r.depth, r.seed, r.model.width) for r in runs[:3]] == [("v1", 8, 0, 4), ("v1", 8, 0, 8),
                                                                               ("v1", 11, 0, 4)]
    assert len(runs) == 8 and runs[0].train.nesterov and runs[0].train.lr == 0.01
    assert len(load_sweep(SMOKE, ["grid.seed=[0]"]).runs()) == 4


def test_a_grid_axis_is_one_axis_however_the_file_spells_it(tmp_path: Path) -> None:
    for grid in ("{version: [v1], depth: [8], model: {width: [4]}}", "{version: [v1], depth: [8], model.width: [4]}"):
        path = tmp_path / "x.yaml"
        path.write_text(f"name: x\ngrid: {grid}\n")
        assert [r.model.width for r in load_sweep(path, ["grid.model.width=[4, 8]"]).runs()] == [4, 8]


def test_a_grid_key_sets_the_axis_in_every_sub_grid(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("name: x\ngrid:\n  - {version: [v1], depth: [8], seed: [0, 1, 2]}\n"
                    "  - {version: [v2], depth: [14], model.width: [4]}\n")
    runs = load_sweep(path, ["grid.seed=[3, 4]"]).runs()
    assert [(r.version, r.depth, r.seed) for r in runs] == [("v1", 8, 3), ("v1", 8, 4), ("v2", 14, 3), ("v2", 14, 4)]


def test_the_last_override_wins_and_the_files_data_is_left_alone() -> None:
    data = yaml.safe_load(SMOKE.read_text())
    merged, _ = apply_overrides(data, {}, ["train.steps=5", "train.steps=6", "grid.seed=[0]"])
    assert merged["train"]["steps"] == 6 and merged["grid"]["seed"] == [0]
    assert data == yaml.safe_load(SMOKE.read_text())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.stpes=5"], "--set train.stpes=5: unknown key 'train.stpes' (did you mean 'train.steps'?)"),
        (["trian.steps=5"], "--set trian.steps=5: unknown key 'trian.steps' (did you mean 'train.steps'?)"),
        (["grid.model.widht=[4]"],
         "--set grid.model.widht=[4]: grid: unknown key 'model.widht' (did you mean 'model.width'?)"),
        (["train.steps"], "--set 'train.steps' must be KEY=VALUE, e.g. --set train.steps=2000 or --set grid.seed=[0,1]"),
        (["grid.seed=[0, 1"], "--set grid.seed=[0, 1: YAML does not parse at line 1, column 6: expected ',' or ']', "
                              "but got '<stream end>'"),
        # the value is checked as the file's would be, in the file's words, the message naming both
        (["train.steps=0"], f"{SMOKE} with --set: train.steps: input should be greater than 0"),
        (["train.lr=yes"], f"{SMOKE} with --set: train.lr: expected a number, got 'yes' (YAML reads it as a boolean)"),
        (["grid.train.lr=[0.1, off]"],
         f"{SMOKE} with --set: grid.train.lr[1]: expected a number, got 'off' (YAML reads it as a boolean)"),
        (["train.lr=.inf"], f"{SMOKE} with --set: train.lr: expected a finite number, got .inf"),
        (["grid.seed=[]"], f"{SMOKE} with --set: grid: 'seed' is an empty list: give at least one value"),
    ],
    ids=["typo", "section-typo", "grid-typo", "no-equals", "yaml", "value", "boolean", "grid-boolean", "inf", "empty"],
)
def test_each_mistake_is_one_line(overrides: list[str], expected: str) -> None:
    assert error_of(SMOKE, *overrides) == expected


def test_a_key_below_a_setting_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("name: x\ntrain: 5\ngrid: {version: [v1], depth: [8]}\n")
    assert error_of(path, "train.steps=3") == "--set train.steps=3: train is not a mapping in the file"


def test_a_setting_that_is_a_grid_axis_is_set_as_the_axis(tmp_path: Path) -> None:
    # the grid's values win in every run, so a shared override of that key would be silently ignored
    path = tmp_path / "two.yaml"
    path.write_text("name: two\ngrid:\n  - {version: [v2], depth: [8], model.width: [4, 8]}\n"
                    "  - {version: [v1], depth: [8]}\n")
    assert error_of(path, "model.width=16") == (
        "--set model.width=16: model.width is an axis of the file's grid; set the axis instead, "
        "e.g. --set grid.model.width=[16]")
    assert {r.model.width for r in load_sweep(path, ["grid.model.width=[16]"]).runs()} == {16}


def test_the_keys_of_an_optional_section_can_be_set(tmp_path: Path) -> None:
    data = yaml.safe_load(SMOKE.read_text())
    data["dataset"]["val_split"] = 32
    data["grid"]["train.lr"] = [0.05, 0.1]
    data["tune"] = {"axes": ["train.lr"], "halving": {"rungs": [2]}}
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert load_sweep(path, ["tune.halving.eta=2"]).tune.halving.eta == 2
    assert error_of(path, "tune.halving.etta=2") == ("--set tune.halving.etta=2: unknown key 'tune.halving.etta' "
                                                     "(did you mean 'tune.halving.eta'?)")
