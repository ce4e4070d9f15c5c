"""Model families in the config and the trainer: defaults per family, settings refused on the wrong
family, run ids that do not move, and the Transformer recipe (AdamW, cosine, linear warmup, clipping)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from depthbench.config import ConfigError, RunConfig, TrainConfig, dump_run_config, load_run_config, parse_sweep
from depthbench.families import version_label
from depthbench.train import lr_at, make_optimizer


def runs(grid: dict[str, Any] | None = None, **sections: Any) -> list[RunConfig]:
    return parse_sweep({"name": "x", **sections, "grid": grid or {"version": ["v1", "v2"], "depth": [8]}},
                       source="cfg").runs()


def error(**sections: Any) -> str:
    with pytest.raises(ConfigError) as info:
        runs(**sections)
    return str(info.value)


# --- defaults ---------------------------------------------------------------------------------------


def test_a_vit_takes_its_family_defaults_and_a_resnet_keeps_the_paper_recipe() -> None:
    vit = runs(model={"family": "vit"})[0]
    assert (vit.model.width, vit.model.heads, vit.model.patch, vit.model.mlp_ratio, vit.model.pool) == (192, 3, 4, 4.0, "cls")
    t = vit.train
    assert (t.optimizer, t.lr, t.weight_decay, t.decay_all, t.schedule) == ("adamw", 1e-3, 0.05, False, "cosine")
    assert (t.betas, t.eps, t.warmup.shape, t.warmup.steps) == ((0.9, 0.999), 1e-8, "linear", 0.05)
    resnet = runs()[0]
    assert (resnet.model.width, resnet.model.patch, resnet.train.optimizer, resnet.train.lr) == (16, None, "sgd", 0.1)
    assert (resnet.train.betas, resnet.train.schedule, resnet.train.warmup.shape) == (None, "multistep", "constant")


def test_what_a_sweep_writes_wins_over_the_family_default() -> None:
    run = runs(model={"family": "vit", "width": 32, "heads": 2}, train={"lr": 3e-3, "warmup": {"steps": 10}})[0]
    assert (run.model.width, run.model.heads, run.train.lr) == (32, 2, 3e-3)
    assert (run.train.warmup.steps, run.train.warmup.shape) == (10, "linear")  # the shape still from the family


def test_family_is_a_grid_axis_and_each_run_resolves_its_own() -> None:
    found = runs({"version": ["v1"], "depth": [8], "model.family": ["resnet", "vit"]}, dataset={"image_size": 16})
    assert [(r.model.family, r.train.optimizer, r.run_id.split("-")[0]) for r in found] == [
        ("resnet", "sgd", "v1"), ("vit", "adamw", "vit")]


def test_a_runs_config_yaml_holds_the_resolved_values_and_loads_to_the_same_run(tmp_path: Any) -> None:
    run = runs(model={"family": "vit", "unit": "deepnorm"})[0]
    path = tmp_path / "config.yaml"
    path.write_text(dump_run_config(run))
    text = path.read_text()
    assert "optimizer: adamw" in text and "family: vit" in text and "- 0.999" in text
    again = load_run_config(path)
    assert again == run and again.run_id == run.run_id and again.unit == "deepnorm"


def test_units_and_labels_per_family() -> None:
    v1, v2 = runs(model={"family": "vit"})
    assert (v1.unit, v2.unit) == ("post_ln", "pre_ln")
    assert [r.unit for r in runs()] == ["original", "full_preact"]
    assert (version_label("vit", "v1"), version_label("vit", "v2"), version_label("resnet", "v1")) == (
        "Post-LN", "Pre-LN", "V1")


# --- run ids --------------------------------------------------------------------------------------


def test_new_settings_at_their_old_meaning_leave_run_ids_alone() -> None:
    plain = runs()[0]
    spelled = runs(model={"family": "resnet"}, train={"optimizer": "sgd", "schedule": "multistep", "decay_all": True,
                                                      "warmup": {"shape": "constant"}})[0]
    assert spelled.run_id == plain.run_id
    changed = [runs(train={"clip_grad_norm": 1.0})[0], runs(train={"schedule": "cosine"})[0],
               runs(train={"decay_all": False})[0], runs(train={"optimizer": "adamw"})[0]]
    assert len({plain.content_hash, *(r.content_hash for r in changed)}) == 5


def test_a_vit_run_id_names_its_family() -> None:
    assert runs(model={"family": "vit"})[1].run_id.startswith("vit-v2-d8-s0-")


# --- settings of the wrong family, optimizer or schedule -------------------------------------------


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"model": {"family": "vit", "block": "basic"}},
         "model.block is a resnet setting, and this run is a vit (model.family); remove it, or set it in a "
         "sub-grid of resnet runs"),
        ({"model": {"patch": 8}},
         "model.patch is a vit setting, and this run is a resnet (model.family); remove it, or set it in a "
         "sub-grid of vit runs"),
        ({"model": {"unit": "pre_ln"}},
         "model.unit: 'pre_ln' is a vit unit, not a resnet one; resnet units: original, bn_after_add, "
         "relu_before_add, relu_only_preact, full_preact, fixup, skipinit"),
        ({"model": {"family": "vit", "unit": "fixup"}},
         "model.unit: 'fixup' is a resnet unit, not a vit one; vit units: post_ln, pre_ln, deepnorm, rezero"),
        ({"train": {"betas": [0.9, 0.98]}}, "train.betas is an adamw setting, and train.optimizer is sgd; remove it"),
        ({"train": {"optimizer": "adamw", "momentum": 0.5}},
         "train.momentum is an sgd setting, and train.optimizer is adamw; remove it (adamw's are betas and eps)"),
        ({"train": {"schedule": "cosine", "milestones": [100]}},
         "train.milestones belongs to the multistep schedule, and train.schedule is cosine; remove it"),
        ({"train": {"warmup": {"shape": "linear", "steps": 10, "lr": 0.02}}},
         "train.warmup.lr is the constant warmup's rate; a linear warmup ramps from 0 to train.lr: remove it, "
         "or set train.warmup.shape: constant"),
        ({"model": {"family": "vit", "width": 64, "heads": 5}},
         "model.heads: width 64 is not divisible by 5 heads; nearest head counts that divide it: 4 or 8"),
        ({"model": {"family": "vit", "patch": 5}},
         "model.patch: image size 32 is not divisible by the patch size 5; nearest patch sizes that divide it: "
         "4 or 8"),
        ({"train": {"warmup": {"steps": 2.5}}},
         "train.warmup.steps: must be a whole number of steps or a fraction below 1 (got 2.5)"),
        ({"train": {"optimizer": "adamw", "betas": [0.9, 1.5]}}, "train: betas: each must be in [0, 1) (got [0.9, 1.5])"),
        ({"model": {"family": "vit"}, "train": {"warmup": {"shape": "constant", "steps": 10}}},
         "train.warmup.lr (0.01) is above train.lr (0.001): a warmup runs below the rate it hands over to; "
         "lower train.warmup.lr, or set train.warmup.shape: linear"),
    ],
    ids=["resnet-on-vit", "vit-on-resnet", "vit-unit", "resnet-unit", "betas-sgd", "momentum-adamw",
         "milestones-cosine", "linear-lr", "heads", "patch", "warmup-fraction", "betas-range", "constant-above-lr"],
)
def test_a_setting_that_does_not_apply_is_one_line_naming_it(sections: dict[str, Any], expected: str) -> None:
    found = error(**sections)
    assert found.startswith("cfg: ") and expected in found, found


# --- the schedule --------------------------------------------------------------------------------


def test_linear_warmup_then_cosine_to_zero() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, schedule="cosine", warmup={"steps": 0.1, "shape": "linear"})
    assert cfg.warmup_steps == 10
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, cfg) == 1.0 and lr_at(55, cfg) == pytest.approx(0.5)
    assert lr_at(99, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert 0 < lr_at(99, cfg) < 1e-3


def test_linear_warmup_hands_over_to_multistep_and_constant_warmup_is_unchanged() -> None:
    cfg = TrainConfig(steps=100, lr=0.1, milestones=[50], warmup={"steps": 4, "shape": "linear"})
    assert [lr_at(s, cfg) for s in (0, 3, 4, 49, 50)] == pytest.approx([0.025, 0.1, 0.1, 0.1, 0.01])
    old = TrainConfig(steps=100, lr=0.1, milestones=[50], warmup={"steps": 4})
    assert [lr_at(s, old) for s in (0, 3, 4)] == [0.01, 0.01, 0.1]


def test_a_fraction_of_warmup_must_leave_steps_to_train() -> None:
    with pytest.raises(ValueError, match=r"warmup.steps \(0.96, i.e. 10 steps\) must be below steps \(10\)"):
        TrainConfig(steps=10, warmup={"steps": 0.96})


# --- the optimizer -------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 3, 4))
        self.fc = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)

    def no_weight_decay(self) -> set[str]:
        return {"pos"}


def test_decay_all_decays_every_parameter_else_only_weight_matrices() -> None:
    model = _Tiny()
    sgd = make_optimizer(model, TrainConfig(steps=10), torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups) == 1
    assert sgd.param_groups[0]["weight_decay"] == 1e-4 and sgd.param_groups[0]["foreach"]
    run = runs(model={"family": "vit"})[0]
    adamw = make_optimizer(model, run.train, torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW)
    decayed, skipped = adamw.param_groups
    assert decayed["params"] == [model.fc.weight] and decayed["weight_decay"] == 0.05
    assert skipped["params"] == [model.pos, model.fc.bias, model.norm.weight, model.norm.bias]
    assert skipped["weight_decay"] == 0.0 and decayed["betas"] == (0.9, 0.999)
    assert adamw.param_groups[0]["lr"] == pytest.approx(1e-3 / math.ceil(0.05 * run.train.steps))


def test_fixup_brings_its_scalar_rate_and_the_optimizer_groups_the_scalars() -> None:
    fixup, skipinit = runs({"version": ["v1"], "depth": [8], "model.unit": ["fixup", "skipinit"]})
    assert (fixup.train.scalar_lr, skipinit.train.scalar_lr) == (0.1, 1.0)
    assert runs({"version": ["v1"], "depth": [8], "model.unit": ["fixup"]}, train={"scalar_lr": 0.5})[0].train.scalar_lr == 0.5
    from depthbench.models import build_model

    model = build_model("v1", 8, unit="fixup", width=4)
    optimizer = make_optimizer(model, fixup.train, torch.device("cpu"))
    weights, scalars = optimizer.param_groups
    assert all(p.ndim == 0 for p in scalars["params"]) and all(p.ndim > 0 for p in weights["params"])
    assert len(scalars["params"]) == 17 and scalars["lr"] == pytest.approx(0.01) and weights["lr"] == 0.1
    assert weights["weight_decay"] == scalars["weight_decay"] == 1e-4  # decay_all: the Fixup code decays them too
    plain = make_optimizer(build_model("v1", 8, width=4), runs()[0].train, torch.device("cpu"))
    assert len(plain.param_groups) == 1 and "lr_factor" not in plain.param_groups[0]  # BN nets: as before


# --- the smoke sweep of every new unit, through the CLI ---------------------------------------------


def test_every_new_unit_trains_in_the_smoke_sweep_and_reports(tmp_path: Any) -> None:
    from pathlib import Path

    import pandas as pd
    from typer.testing import CliRunner

    from depthbench.cli import app
    from depthbench.config import load_sweep
    from depthbench.results import saved_sweep

    config = Path(__file__).resolve().parents[1] / "configs/smoke-families.yaml"
    result = CliRunner().invoke(app, ["sweep", str(config), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "smoke-families"
    table = pd.read_csv(folder / "results.csv")
    planned = load_sweep(config).runs()
    assert sorted(table.run_id) == sorted(r.run_id for r in planned)
    units = {r.run_id: r.unit for r in planned}
    assert sorted(units[i] for i in table.run_id) == sorted(
        ["fixup", "fixup", "skipinit", "skipinit", "post_ln", "pre_ln", "deepnorm", "rezero"])
    assert set(table.status) == {"completed"} and table.train_loss.map(math.isfinite).all()
    assert set(table.block) == {"basic", "bottleneck", "transformer"}
    # The saved sweep.yaml keeps what the sweep wrote, so it resolves to the same runs (a ViT's
    # AdamW and its patch come back from the family, not as a ResNet's SGD and nulls).
    again = saved_sweep(folder)
    assert again is not None and [r.run_id for r in again.runs()] == [r.run_id for r in planned]
    report = CliRunner().invoke(app, ["report", str(folder)])
    assert report.exit_code == 0, report.output
    assert "ResNet V1 vs V2, ViT Post-LN vs Pre-LN and units by depth (8/8 runs finished)" in report.output
    assert "ViT units, each against pre_ln" in report.output and "ResNet units, each against full_preact" in report.output


def test_a_config_yaml_written_before_the_families_loads_to_the_same_run(tmp_path: Any) -> None:
    import yaml

    run = runs()[0]
    data = yaml.safe_load(dump_run_config(run))
    for section, keys in {"model": ("family", "patch", "heads", "mlp_ratio", "pool"),
                          "train": ("optimizer", "betas", "eps", "decay_all", "clip_grad_norm", "scalar_lr",
                                    "schedule")}.items():
        for key in keys:
            del data[section][key]
    del data["train"]["warmup"]["shape"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_run_config(path).run_id == run.run_id


def test_a_list_where_a_family_or_unit_name_belongs_is_one_line() -> None:
    for grid in ({"model.family": [["vit"]]}, {"model.unit": [{"a": 1}]}, {"train.optimizer": [["adamw"]]}):
        found = error(grid={"version": ["v1"], "depth": [8], **grid})
        assert found.startswith("cfg: ") and "\n" not in found


def test_warmup_written_as_a_whole_float_is_the_step_count() -> None:
    assert runs(train={"warmup": {"steps": 0.0}})[0].run_id == runs()[0].run_id
    assert runs(train={"warmup": {"steps": 5.0}})[0].run_id == runs(train={"warmup": {"steps": 5}})[0].run_id
