"""Settings that nothing the run builds would read are refused when set to anything but their default:
they would change the run id and nothing else. The tables the rules read agree with the nets built."""

from __future__ import annotations

import pytest
import torch

from depthbench.architecture import PLACEMENTS, SHORTCUT_GATE_SETTINGS
from depthbench.config import (
    ConfigError, ModelConfig, RunConfig, ShortcutGate, dump_run_config, load_run_config, parse_sweep,
)
from depthbench.config.rules import unread_setting
from depthbench.families import family_of_unit
from depthbench.models import SHORTCUT_GATES, build_model, model_from_config
from depthbench.transformer import UNITS as VIT_UNITS

ONE_RUN = {"version": ["v1"], "depth": [8]}
IN_RUN = " (in grid run version=v1, depth=8, seed=0)"


def error_of(**sections: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_sweep({"name": "x", "grid": ONE_RUN, **sections}, source="cfg")
    return str(info.value)


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"model": {"gate_bias": -6}},
         "model.gate_bias is a setting of the exclusive_gating and shortcut_only_gating shortcut gates, and "
         "model.shortcut_gate is identity; remove it"),
        ({"model": {"shortcut_gate": "conv1x1", "shortcut_scale": 0.5}},
         "model.shortcut_scale is a setting of the constant_scaling shortcut gate, and model.shortcut_gate is "
         "conv1x1; remove it"),
        ({"model": {"shortcut_gate": "exclusive_gating", "residual_scale": 2}},
         "model.residual_scale is a setting of the constant_scaling shortcut gate, and model.shortcut_gate is "
         "exclusive_gating; remove it"),
        ({"model": {"shortcut_gate": "constant_scaling", "shortcut_dropout": 0.2}},
         "model.shortcut_dropout is a setting of the dropout shortcut gate, and model.shortcut_gate is "
         "constant_scaling; remove it"),
        ({"train": {"nesterov": True, "momentum": 0}},
         "train.nesterov changes how momentum is applied, and train.momentum is 0; remove it, or set train.momentum"),
        ({"train": {"scalar_lr": 0.1}},
         "train.scalar_lr scales the rate of the units' scalar parameters, and the run's unit (original) has none; "
         "remove it, or use a unit that has them: fixup, skipinit"),
        ({"model": {"family": "vit", "width": 8, "heads": 2}, "train": {"scalar_lr": 0.5}},
         "train.scalar_lr scales the rate of the units' scalar parameters, and the run's unit (post_ln) has none; "
         "remove it, or use a unit that has them: rezero"),
        ({"dataset": {"augment": False, "flip": False}},
         "dataset.flip is part of the augmentation, and dataset.augment is false; remove it"),
    ],
    ids=["gate_bias", "shortcut_scale", "residual_scale", "shortcut_dropout", "nesterov", "scalar_lr", "scalar_lr-vit",
         "flip"],
)
def test_a_setting_nothing_reads_is_one_line_naming_what_would(sections: dict, expected: str) -> None:
    assert error_of(**sections) == f"cfg: {expected}{IN_RUN}"


@pytest.mark.parametrize(
    "sections",
    [
        {"model": {"shortcut_gate": "exclusive_gating", "gate_bias": -6}},
        {"model": {"shortcut_gate": "constant_scaling", "shortcut_scale": 0.5, "residual_scale": 0.5}},
        {"model": {"shortcut_gate": "dropout", "shortcut_dropout": 0.2}},
        {"model": {"gate_bias": 0, "shortcut_scale": 1, "shortcut_dropout": 0.5}},  # the defaults, written out
        {"train": {"nesterov": True}},
        {"train": {"nesterov": False, "momentum": 0}},
        {"model": {"unit": "skipinit"}, "train": {"scalar_lr": 0.1}},
        {"model": {"family": "vit", "unit": "rezero", "width": 8, "heads": 2}, "train": {"scalar_lr": 0.5}},
        {"dataset": {"flip": False}},
        {"dataset": {"augment": False, "flip": True}},
    ],
)
def test_the_same_settings_load_where_something_reads_them(sections: dict) -> None:
    assert len(parse_sweep({"name": "x", **sections, "grid": ONE_RUN}).runs()) == 1


def test_a_grid_that_sets_a_gate_setting_under_another_gate_names_the_run() -> None:
    message = error_of(grid={**ONE_RUN, "model.shortcut_gate": ["identity"], "model.gate_bias": [0, -6]})
    assert message.endswith(
        "model.shortcut_gate is identity; remove it (in grid run version=v1, depth=8, seed=0, "
        "model.shortcut_gate=identity, model.gate_bias=-6)")


# --- the tables the rules read, against the nets ----------------------------------------------------


def test_every_shortcut_gate_has_its_settings_listed() -> None:
    assert list(SHORTCUT_GATE_SETTINGS) == list(SHORTCUT_GATES) == list(ShortcutGate.__args__)


SETTINGS = [("shortcut_scale", 0.5), ("residual_scale", 0.5), ("gate_bias", -6.0), ("shortcut_dropout", 0.2)]


@pytest.mark.parametrize(("key", "value"), SETTINGS)
@pytest.mark.parametrize("gate", list(SHORTCUT_GATE_SETTINGS))
def test_a_gate_setting_is_refused_exactly_where_the_net_ignores_it(gate: str, key: str, value: float) -> None:
    nets = []
    for settings in ({}, {key: value}):
        torch.manual_seed(0)
        nets.append(build_model("v2", 8, width=4, shortcut_gate=gate, **settings))
    plain, changed = (net.state_dict() for net in nets)
    differs = repr(nets[0]) != repr(nets[1]) or any(not torch.equal(plain[k], changed[k]) for k in plain)
    run = RunConfig(name="x", version="v2", depth=8, seed=0, model=ModelConfig(shortcut_gate=gate, **{key: value}))
    assert (unread_setting(run) is None) == differs


@pytest.mark.parametrize("unit", [*PLACEMENTS, *VIT_UNITS])
def test_scalar_lr_is_refused_exactly_on_units_without_scalar_parameters(unit: str) -> None:
    family = family_of_unit(unit)
    model = {"family": family, "unit": unit, "width": 8, **({"heads": 2} if family == "vit" else {})}
    run = RunConfig.model_validate({"name": "x", "version": "v1", "depth": 8, "seed": 0, "model": model})
    with torch.device("meta"):
        net = model_from_config(run.version, run.depth, run.model, 10)
    has_scalars = any(p.ndim == 0 for p in net.parameters())
    scaled = RunConfig.model_validate({"name": "x", "version": "v1", "depth": 8, "seed": 0, "model": model,
                                       "train": {"scalar_lr": 0.5}})
    assert (unread_setting(scaled) is None) == has_scalars
    assert has_scalars == (unit in ("fixup", "skipinit", "rezero"))


def test_a_run_folder_saved_before_a_rule_existed_still_loads(tmp_path) -> None:
    # Runs trained with a setting that a later rule refuses keep their folders readable: only sweeps are checked.
    saved = RunConfig(name="x", version="v2", depth=8, seed=0, model=ModelConfig(shortcut_scale=0.5))
    assert unread_setting(saved) is not None
    path = tmp_path / "config.yaml"
    path.write_text(dump_run_config(saved))
    assert load_run_config(path).run_id == saved.run_id


def test_diagnose_refuses_a_setting_its_nets_would_not_read() -> None:
    from depthbench.diagnose import build_configs

    with pytest.raises(ConfigError) as info:
        build_configs(versions=["v2"], depths=[8], units=[None], model={"family": "resnet", "gate_bias": -3.0},
                      dataset={"name": "synthetic"}, batch_size=8, steps=1)
    assert str(info.value).startswith("model.gate_bias is a setting of the exclusive_gating and shortcut_only_gating")
