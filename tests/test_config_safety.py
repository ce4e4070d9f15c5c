"""Any config is safe to load: YAML that reads other than it looks (repeated keys, yes/no as booleans),
rules without a threshold, defaults on very short runs and settings that cannot work together are each
one ConfigError line, and the CLI prints it as `error: ...`, exits 2 and writes nothing."""

from __future__ import annotations

import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter
from typer.testing import CliRunner

from depthbench.cli import app
from depthbench.config import (
    ConfigError,
    DatasetConfig,
    ModelConfig,
    ResourcesConfig,
    RunConfig,
    SuccessConfig,
    SweepConfig,
    TrainConfig,
    WarmupConfig,
    dump_run_config,
    load_run_config,
    load_sweep,
    parse_sweep,
)
from depthbench.train import lr_at
from tests.conftest import ROOT, tiny_run

GRID = "grid: {version: [v1], depth: [8]}\n"
ONE_RUN = {"version": ["v1"], "depth": [8]}


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    message = str(info.value)
    assert "\n" not in message
    return message.removeprefix(f"{path}: ")


# --- repeated keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\ntrain: {steps: 5}\n" + GRID + "train:\n  lr: 0.1\n",
         "duplicate key 'train' at line 4 (first at line 2): a later block silently replaces an earlier one; "
         "merge them"),
        ("name: x\ntrain: {steps: 5, steps: 6}\n" + GRID,
         "duplicate key 'train.steps' at line 2, column 19 (first at line 2, column 9): a later value silently "
         "replaces an earlier one; keep one"),
        ("name: x\ngrid:\n  version: [v1]\n  depth: [8]\n  depth: [20]\n",
         "duplicate key 'grid.depth' at line 5 (first at line 4): a later value silently replaces an earlier one; "
         "keep one"),
        ("name: x\ngrid:\n  - {version: [v1], depth: [8]}\n  - version: [v2]\n    depth: [8]\n    version: [v1]\n",
         "duplicate key 'grid[1].version' at line 6 (first at line 4): a later value silently replaces an earlier "
         "one; keep one"),
    ],
    ids=["section", "same-line", "grid", "sub-grid"],
)
def test_a_repeated_key_is_one_error_with_both_lines(tmp_path: Path, text: str, expected: str) -> None:
    assert load_error(write(tmp_path, text)) == expected


def test_merge_keys_still_repeat_keys_on_purpose(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ngrid:\n  - &g {version: [v1], depth: [8], seed: [0, 1]}\n"
                           "  - {<<: *g, version: [v2], train.lr: [0.2]}\n")
    runs = load_sweep(path).runs()
    assert [(r.version, r.seed, r.train.lr) for r in runs] == [
        ("v1", 0, 0.1), ("v1", 1, 0.1), ("v2", 0, 0.2), ("v2", 1, 0.2)]


def test_a_run_config_with_a_repeated_key_is_refused_too(tmp_path: Path) -> None:
    path = write(tmp_path, dump_run_config(tiny_run()) + "depth: 20\n", "config.yaml")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(info.value).startswith(f"{path}: duplicate key 'depth' at line ")


# --- success rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("success", "expected"),
    [
        ("{metric: test_acc}", "success: give min or max, e.g. success: {metric: test_acc, min: 0.8}; without a "
                               "success section every completed run counts as a success"),
        ("{metric: train_loss, min: null}", "success: give min or max, e.g. success: {metric: train_loss, max: 0.5}; "
                                            "without a success section every completed run counts as a success"),
        ("{metric: test_acc, min: 0.9, max: 0.5}",
         "success: min (0.9) is above max (0.5), so no run can succeed; swap them or drop one"),
        ("{metric: test_acc, min: 80}",
         "success.min: test_acc is a fraction from 0 to 1, so 80 can never be met; write 0.8 for 80%"),
    ],
)
def test_a_success_rule_needs_a_threshold_that_can_be_met(tmp_path: Path, success: str, expected: str) -> None:
    assert load_error(write(tmp_path, f"name: x\nsuccess: {success}\n" + GRID)) == expected


def test_without_a_success_section_a_completed_run_succeeds_and_saved_files_load(tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, "name: x\n" + GRID))
    assert sweep.success.describe() == "completed" and sweep.success({"test_acc": 0.01})
    # what run_sweep saves (sweep.yaml) and what a run saves (config.yaml) spell the rule as min/max: null
    saved = write(tmp_path, yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False), "sweep.yaml")
    assert "min: null" in saved.read_text() and load_sweep(saved) == sweep
    run = sweep.runs()[0]
    config = write(tmp_path, dump_run_config(run), "config.yaml")
    assert load_run_config(config).run_id == run.run_id


# --- booleans where numbers are expected -----------------------------------------------------------


def _takes_number(annotation: object) -> bool:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    arms = typing.get_args(annotation) if union else (annotation,)
    return any(arm in (int, float) for arm in arms)


def _numeric_fields() -> list[tuple[str, str]]:
    """(dotted key, YAML value) for every int and float setting of every section, read off the schemas."""
    sections = {"dataset": DatasetConfig, "model": ModelConfig, "train": TrainConfig, "train.warmup": WarmupConfig,
                "success": SuccessConfig, "resources": ResourcesConfig}
    fields = []
    for section, model in sections.items():
        for name, field in model.model_fields.items():
            origin, args = typing.get_origin(field.annotation), typing.get_args(field.annotation)
            if origin is tuple and args[0] in (int, float):
                fields.append((f"{section}.{name}", "[yes]"))
            elif _takes_number(field.annotation) and (section, name) != ("model", "checkpointing"):
                fields.append((f"{section}.{name}", "yes"))
    return fields


def test_every_numeric_setting_is_found() -> None:
    keys = {key for key, _ in _numeric_fields()}
    assert len(keys) == 37
    assert {"train.lr", "train.warmup.lr", "train.milestones", "model.width", "dataset.train_subset", "success.min",
            "resources.time_min", "model.patch", "model.heads", "model.mlp_ratio", "train.eps",
            "train.clip_grad_norm", "train.scalar_lr", "dataset.val_split"} <= keys


@pytest.mark.parametrize(("key", "value"), _numeric_fields(), ids=lambda v: v)
def test_a_boolean_for_a_number_quotes_what_was_written(tmp_path: Path, key: str, value: str) -> None:
    *sections, field = key.split(".")
    text = f"{field}: {value}"
    for section in reversed(sections):
        text = f"{section}: {{{text}}}"
    found = load_error(write(tmp_path, f"name: x\n{text}\n" + GRID))
    at = "[0]" if value.startswith("[") else ""
    assert found == f"{key}{at}: expected a number, got 'yes' (YAML reads it as a boolean)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train: {lr: 'on'}\n" + GRID, "train.lr: input should be a valid number, unable to parse string as a number "
                                       "(got 'on')"),
        ("grid: {version: [v1], depth: [8], train.lr: [0.1, yes]}\n",
         "grid.train.lr[1]: expected a number, got 'yes' (YAML reads it as a boolean)"),
        ("grid: {version: [v1], depth: [8], seed: [0, On]}\n",
         "grid.seed[1]: expected a number, got 'On' (YAML reads it as a boolean)"),
        ("grid:\n  - {version: [v1], depth: [8]}\n  - {version: [v1], depth: [8], model: {width: [4, No]}}\n",
         "grid[1].model.width[1]: expected a number, got 'No' (YAML reads it as a boolean)"),
        ("resources: {slurm_extra: {exclusive: yes}}\n" + GRID,
         "resources.slurm_extra.exclusive: expected text or a number, got 'yes' (YAML reads it as a boolean); "
         "quote it to mean the text"),
        ("train: {precision: no}\n" + GRID,
         "train.precision: 'no' (YAML reads it as a boolean) is not allowed; input should be 'auto', 'fp32' or 'bf16'"),
    ],
    ids=["quoted", "grid", "grid-seed", "sub-grid", "text-or-number", "choice"],
)
def test_booleans_elsewhere_are_named_where_they_stand(tmp_path: Path, text: str, expected: str) -> None:
    assert load_error(write(tmp_path, "name: x\n" + text)) == expected


def test_pydantic_alone_would_read_true_as_one() -> None:
    # why the check exists; parse_sweep on Python data names the key without YAML text to quote
    assert TypeAdapter(int).validate_python(True) == 1 and TypeAdapter(float).validate_python(True) == 1.0
    with pytest.raises(ConfigError, match=r"^cfg: train.steps: expected a number, got a boolean$"):
        parse_sweep({"name": "x", "train": {"steps": True}, "grid": ONE_RUN}, source="cfg")


def test_booleans_keep_their_meaning_where_they_have_one(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nmodel: {checkpointing: yes}\ntrain: {nesterov: on}\ndataset: {augment: no}\n"
                           "grid: {version: [v1], depth: [8], model.checkpointing: [true, false]}\n")
    runs = load_sweep(path).runs()
    assert [r.model.checkpointing for r in runs] == [1_000_000, 0]
    assert runs[0].train.nesterov and not runs[0].dataset.augment


def test_a_run_config_quotes_its_booleans_too(tmp_path: Path) -> None:
    text = dump_run_config(tiny_run()).replace("lr: 0.05", "lr: yes")
    path = write(tmp_path, text, "config.yaml")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(info.value) == f"{path}: train.lr: expected a number, got 'yes' (YAML reads it as a boolean)"


# --- infinite and NaN numbers ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train: {{lr: {}}}", "train.lr"),
        ("train: {{weight_decay: {}}}", "train.weight_decay"),
        ("train: {{warmup: {{steps: 5, lr: {}}}}}", "train.warmup.lr"),
        ("train: {{clip_grad_norm: {}}}", "train.clip_grad_norm"),
        ("train: {{milestones: [0.5, {}]}}", "train.milestones[1]"),
        ("success: {{metric: test_acc, max: {}}}", "success.max"),
        ("model: {{gate_bias: {}}}", "model.gate_bias"),
        ("resources: {{slurm_extra: {{mem: {}}}}}", "resources.slurm_extra.mem"),
    ],
)
def test_an_infinite_or_nan_number_is_refused_by_its_key(tmp_path: Path, text: str, key: str, value: str) -> None:
    assert load_error(write(tmp_path, f"name: x\n{text.format(value)}\n" + GRID)) == (
        f"{key}: expected a finite number, got {value}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("grid: {version: [v1], depth: [8], train.lr: [0.1, .inf]}\n", "grid.train.lr[1]: expected a finite number, "
                                                                       "got .inf"),
        ("grid: {version: [v1], depth: [8], train: {weight_decay: [-.inf]}}\n",
         "grid.train.weight_decay[0]: expected a finite number, got -.inf"),
        ("grid:\n  - {version: [v1], depth: [8]}\n  - {version: [v1], depth: [8], model.width: [4, -.inf]}\n",
         "grid[1].model.width[1]: expected a finite number, got -.inf"),
        # text that pydantic alone would read as a number
        ("train: {lr: inf}\n" + GRID, "train.lr: expected a finite number, got 'inf'"),
        ("train: {warmup: {steps: '.inf'}}\n" + GRID,
         "train.warmup.steps: input should be a valid integer, unable to parse string as an integer (got '.inf')"),
    ],
    ids=["grid", "nested-grid", "sub-grid", "text", "text-union"],
)
def test_an_infinite_number_in_a_grid_or_as_text_is_refused_too(tmp_path: Path, text: str, expected: str) -> None:
    assert load_error(write(tmp_path, "name: x\n" + text)) == expected


def test_a_run_config_refuses_an_infinite_number_too(tmp_path: Path) -> None:
    path = write(tmp_path, dump_run_config(tiny_run()).replace("lr: 0.05", "lr: .inf"), "config.yaml")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(info.value) == f"{path}: train.lr: expected a finite number, got .inf"


# --- defaults on very short runs -------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "milestones"), [(1, (0, 1)), (2, (1, 2)), (3, (2, 2)), (4, (2, 3))])
def test_default_milestones_never_refuse_a_short_run(steps: int, milestones: tuple[int, ...]) -> None:
    run = parse_sweep({"name": "x", "train": {"steps": steps}, "grid": ONE_RUN}).runs()[0]
    assert run.train.milestone_steps == milestones  # resolved as always: run ids and schedules stay
    assert RunConfig.model_validate(yaml.safe_load(dump_run_config(run))) == run  # config.yaml loads back


def test_coinciding_default_milestones_drop_twice_and_the_run_trains(tmp_path: Path) -> None:
    from depthbench.train import train_run

    run = tiny_run(train={"steps": 3})
    assert [lr_at(step, run.train) for step in range(3)] == pytest.approx([0.05, 0.05, 0.05 * 0.1 ** 2])
    result = train_run(run, tmp_path / run.run_id)
    assert result["status"] == "completed" and result["steps"] == 3
    assert load_run_config(tmp_path / run.run_id / "config.yaml") == run


def test_milestones_one_writes_must_each_get_a_step() -> None:
    with pytest.raises(ConfigError) as info:
        parse_sweep({"name": "x", "train": {"steps": 3, "milestones": [0.5, 0.7]}, "grid": ONE_RUN}, source="cfg")
    assert str(info.value) == (
        "cfg: train: milestones: must be strictly increasing once resolved to steps (got [2, 2]); "
        "give each drop a step of its own")


PINNED = {  # run ids computed before this module's checks existed; a check must never change them
    "smoke.yaml": ["v1-d8-s0-cbb445c5", "v1-d8-s1-cbb445c5", "v1-d11-s0-cbb445c5", "v1-d11-s1-cbb445c5",
                   "v2-d8-s0-cbb445c5", "v2-d8-s1-cbb445c5", "v2-d11-s0-cbb445c5", "v2-d11-s1-cbb445c5"],
    # the 20/56/110 digits demo, trained without flips
    "demo-110.yaml": [f"{v}-d{d}-s{s}-6620af25" for v in ("v1", "v2") for d in (20, 56, 110) for s in (0, 1)],
    "cifar10.yaml": [f"{v}-d{d}-s{s}-ac64f344" for v in ("v1", "v2") for d in (110, 164, 1001) for s in range(5)],
}


@pytest.mark.parametrize("name", PINNED)
def test_run_ids_are_unchanged(name: str) -> None:
    assert [r.run_id for r in load_sweep(ROOT / "configs" / name).runs()] == PINNED[name]


CONTENT_HASHES = {  # the same, for every shipped config
    "bf16-vs-fp32-cpu.yaml": ["6190970c", "7227103c"],
    "cifar10-cpu.yaml": ["91ab9f6e"], "cifar10-jpeg-cpu.yaml": ["ce0edd6a"], "cifar10.yaml": ["ac64f344"],
    "cifar100.yaml": ["3c7afa38"], "challenge.yaml": ["b5152a17"], "demo-110.yaml": ["6620af25"],
    "smoke.yaml": ["cbb445c5"],
    "study-digits.yaml": ["fb39d6d7"], "table3-cifar10.yaml": ["ac64f344"], "table3-cifar100.yaml": ["3c7afa38"],
    # configs of the model families; their ids were new with them
    "smoke-families.yaml": ["309e4e20", "5f8df478", "a6a6c550", "d3ebc28d", "f0273f0e"],
    "study-normfree-digits.yaml": ["629834e2", "6584b90f", "7924473d", "be658981"],
    "study-vit-digits.yaml": ["034303ba", "74e80415", "7d7043f7", "8e36c985", "992def65", "c6bec9f3"],
    "table1.yaml": ["2354931a", "2793cebd", "49a9aba3", "6b34c9a5", "709ceca0", "79b7b405", "86d9244d", "ac64f344",
                    "b61d6160", "b9faa25f", "d29eed55"],
    "table2.yaml": ["00a07337", "899f3eea", "90a7c532", "dde5996f", "fe6b441d"],
    "tuned-cifar10-jpeg-cpu.yaml": ["60be40d7", "94175c1e", "a39a4dd6", "c0f08e82", "df042962"],
    "tuned-cifar10.yaml": ["02bb7bec", "488c150d", "7d9533db", "af6d50c9", "e4c4d4bd"],
    "tuned-vit-digits.yaml": ["022ec841", "10fe1bc5", "1cdb0a08", "2d9afa22", "4c7d3ff0", "55b80fd9", "56b55043",
                              "607a3bd0", "632878d7", "b05f509d", "b3875aa4", "ba45cbc8", "caf8e620", "efd59d80",
                              "f73cb89d", "f7d63e07"],
}


def test_content_hashes_of_every_shipped_config_are_unchanged() -> None:
    hashes = {path.name: sorted({r.content_hash for r in load_sweep(path).runs()})
              for path in sorted((ROOT / "configs").glob("**/*.yaml"))}
    assert hashes == CONTENT_HASHES


# --- settings that cannot work together ------------------------------------------------------------

CANNOT = ("model.checkpointing and train.compile cannot be used together: torch.compile cannot trace the "
          "checkpoint's guard that updates BatchNorm statistics once per step; turn one off")


def test_checkpointing_with_compile_is_refused_at_load(tmp_path: Path) -> None:
    assert load_error(write(tmp_path, "name: x\nmodel: {checkpointing: 2}\ntrain: {compile: true}\n" + GRID)) == CANNOT
    grid = "name: x\nmodel: {checkpointing: true}\ngrid: {version: [v1], depth: [8], train.compile: [false, true]}\n"
    in_run = " (in grid run version=v1, depth=8, seed=0, train.compile=True)"
    assert load_error(write(tmp_path, grid)) == CANNOT + in_run
    assert SweepConfig.model_validate({"name": "x", "model": {"checkpointing": 2}, "grid": ONE_RUN}).runs()


# --- the CLI ---------------------------------------------------------------------------------------


SMOKE = (ROOT / "configs/smoke.yaml").read_text()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t + "train:\n  lr: 0.1\n",
         f"duplicate key 'train' at line {len(SMOKE.splitlines()) + 1} "
         f"(first at line {SMOKE.splitlines().index('train:') + 1}): a later block silently replaces an earlier one; "
         "merge them"),
        (lambda t: t.replace("lr: 0.05", "lr: yes"),
         "train.lr: expected a number, got 'yes' (YAML reads it as a boolean)"),
        (lambda t: t.replace("  min: 0.2\n", ""),
         "success: give min or max, e.g. success: {metric: test_acc, min: 0.8}; without a success section every "
         "completed run counts as a success"),
        (lambda t: t.replace("model:\n", "model:\n  checkpointing: true\n")
                    .replace("train:\n", "train:\n  compile: on\n"), CANNOT),
    ],
    ids=["duplicate", "boolean", "success", "checkpointing-compile"],
)
def test_cli_prints_one_line_exits_2_and_writes_nothing(tmp_path: Path, change: typing.Callable[[str], str],
                                                        expected: str) -> None:
    config = write(tmp_path, change(SMOKE), "smoke.yaml")
    result = CliRunner().invoke(app, ["sweep", str(config), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {config}: {expected}"]
    assert not (tmp_path / "runs").exists()



def test_a_class_count_on_a_real_dataset_is_refused(tmp_path: Path) -> None:
    # dataset.num_classes sizes synthetic data only; it stays in every run id, so it is refused, not dropped
    with pytest.raises(ConfigError, match=r"dataset: num_classes: only synthetic data takes a class count "
                                          r"\(digits has its own\); remove it"):
        parse_sweep({"name": "x", "dataset": {"name": "digits", "num_classes": 5},
                     "grid": {"version": ["v1"], "depth": [8]}})
    assert parse_sweep({"name": "x", "dataset": {"name": "synthetic", "num_classes": 5},
                        "grid": {"version": ["v1"], "depth": [8]}}).runs()[0].dataset.num_classes == 5


def test_a_sweep_config_loads_without_importing_torch() -> None:
    code = ("import sys; from depthbench.config import load_sweep; "
            "runs = load_sweep('configs/cifar10.yaml').runs(); "
            "print(len(runs), sorted(m for m in ('torch', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout == "30 []\n", done.stderr
