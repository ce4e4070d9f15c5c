"""Config loading: every key validated, one clear ConfigError line for each kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from depthbench.config import ConfigError, RunConfig, TrainConfig, load_sweep, parse_sweep

CONFIGS = Path(__file__).parents[1] / "configs"

BASE = {"name": "t", "dataset": {"name": "synthetic"}, "grid": {"version": ["v1", "v2"], "depth": [20]}}


def with_(**changes: object) -> dict:
    """BASE with dotted keys replaced, e.g. with_(**{"train.lr": 0})."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def error_of(data: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_sweep(data, source="cfg.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("**/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep.runs()


def test_paper_config_is_the_paper_study() -> None:
    sweep = load_sweep(CONFIGS / "cifar10.yaml")
    runs = sweep.runs()
    assert len(runs) == 2 * 3 * 5
    assert {(r.version, r.depth) for r in runs} == {(v, d) for v in ("v1", "v2") for d in (110, 164, 1001)}
    train = runs[0].train
    assert (train.steps, train.batch_size, train.lr, train.momentum, train.weight_decay) == (64000, 128, 0.1, 0.9, 1e-4)
    assert train.milestone_steps == (32000, 48000)
    assert (train.warmup.steps, train.warmup.lr) == (400, 0.01)


def test_defaults_are_the_paper_recipe() -> None:
    train = TrainConfig()
    assert train.milestone_steps == (32000, 48000) and train.steps == 64000 and train.gamma == 0.1


def test_milestones_fractions_scale_with_steps_and_step_numbers_stay() -> None:
    assert TrainConfig(steps=1000).milestone_steps == (500, 750)
    assert TrainConfig(steps=1000, milestones=[300, 0.9]).milestone_steps == (300, 900)


def test_grid_expands_in_order_with_dotted_axes() -> None:
    sweep = parse_sweep(with_(**{"grid.seed": [0, 1], "grid.model.width": [4, 8]}))
    runs = sweep.runs()
    assert len(runs) == 2 * 1 * 2 * 2
    assert [(r.version, r.seed, r.model.width) for r in runs[:4]] == [("v1", 0, 4), ("v1", 0, 8), ("v1", 1, 4), ("v1", 1, 8)]


def test_run_id_names_content_and_ignores_execution_settings() -> None:
    runs = parse_sweep(with_(**{"grid.seed": [3]})).runs()
    assert runs[0].run_id.startswith("v1-d20-s3-") and len(runs[0].run_id.split("-")[-1]) == 8
    # v1 and v2 share the rest of the config, so they share the hash
    assert runs[0].content_hash == runs[1].content_hash
    moved = runs[0].model_copy(update={"train": runs[0].train.model_copy(update={"device": "cuda", "log_every": 7})})
    assert moved.run_id == runs[0].run_id
    wider = parse_sweep(with_(**{"model.width": 8})).runs()[0]
    assert wider.run_id != runs[0].run_id.replace("s3", "s0")


def test_run_config_round_trips_through_yaml() -> None:
    from depthbench.config import dump_run_config

    run = parse_sweep(with_(**{"train.milestones": [0.4, 0.8]})).runs()[1]
    again = RunConfig.model_validate(yaml.safe_load(dump_run_config(run)))
    assert again == run and again.run_id == run.run_id


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, "cfg.yaml is empty"),
        ([1, 2], "must be a YAML mapping"),
        (with_(**{"trian": {}}), "unknown key 'trian' (did you mean 'train'?)"),
        (with_(**{"train.lerning_rate": 0.1}), "unknown key 'train.lerning_rate'"),
        (with_(**{"train.bach_size": 3}), "unknown key 'train.bach_size' (did you mean 'batch_size'?)"),
        (with_(**{"model.widht": 3}), "(did you mean 'width'?)"),
        (with_(**{"train.warmup.step": 3}), "unknown key 'train.warmup.step' (did you mean 'steps'?)"),
        ({"dataset": {}, "grid": {"version": ["v1"], "depth": [20]}}, "missing required key 'name'"),
        ({"name": "x"}, "missing required key 'grid'"),
        (with_(**{"train.lr": 0}), "train.lr: input should be greater than 0"),
        (with_(**{"train.lr": -0.1}), "train.lr: input should be greater than 0"),
        (with_(**{"train.steps": 0}), "train.steps: input should be greater than 0"),
        (with_(**{"train.batch_size": -4}), "train.batch_size: input should be greater than 0"),
        (with_(**{"train.steps": "many"}), "train.steps: input should be a valid integer"),
        (with_(**{"train.steps": 100, "train.milestones": [50, 200]}), "step 200 is beyond steps (100)"),
        (with_(**{"train.milestones": [0.75, 0.5]}), "milestones: must be strictly increasing"),
        (with_(**{"train.device": "gpu"}), "train.device: must be auto, cpu, cuda or cuda:N"),
        (with_(**{"dataset.name": "mnist"}), "dataset.name: 'mnist' is not allowed"),
        (with_(**{"grid.version": ["v1", "v3"]}), "version: 'v3' is not allowed"),
        (with_(**{"grid.depth": [20, 21]}), "nearest"),
        (with_(**{"grid.depth": []}), "'depth' is an empty list"),
        (with_(**{"grid.seed": [0, 1, 0]}), "'seed' lists 0 more than once"),
        (with_(**{"grid.train.lrr": [0.1]}), "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        (with_(**{"grid.model.widht": [4]}), "unknown key 'model.widht' (did you mean 'model.width'?)"),
        (with_(**{"grid.widht": [4]}), "unknown key 'widht'"),
        ({"name": "x", "grid": {"depth": [20]}}, "grid: needs a 'version' list"),
        ({"name": "x", "grid": {"versoin": ["v1"], "depth": [20]}}, "unknown key 'versoin' (did you mean 'version'?)"),
        (with_(**{"success.metric": "accuracy"}), "'accuracy' is not recorded"),
        (with_(**{"success.metric": "test_ac"}), "(did you mean 'test_acc'?)"),
        (with_(**{"name": "a/b"}), "name: must be a folder name"),
    ],
)
def test_bad_configs_give_one_clear_line(data: object, expected: str) -> None:
    assert expected in error_of(data)


def test_grid_errors_name_the_run() -> None:
    message = error_of(with_(**{"grid.depth": [20, 100]}))
    assert "depth 100" in message and "98" in message and "101" in message and "in grid run" in message


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_sweep(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ngrid:\n  version: [v1, v2\n  depth: [20]\n")
    with pytest.raises(ConfigError, match=r"YAML does not parse at line \d+"):
        load_sweep(broken)


def test_success_rule() -> None:
    from depthbench.config import SuccessConfig

    rule = SuccessConfig(metric="test_acc", min=0.5)
    assert rule({"test_acc": 0.5}) and not rule({"test_acc": 0.49}) and not rule({"test_acc": float("nan")})
    assert SuccessConfig(metric="train_loss", max=1.0)({"train_loss": 0.9})
    assert rule.describe() == "test_acc >= 0.5"
