"""Gradient and signal flow: the numbers are the gradients autograd computes, measuring changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from depthbench.cli import app
from depthbench.config import DatasetConfig, ModelConfig
from depthbench.diagnose import (
    DIAGNOSTICS,
    Diagnosis,
    build_configs,
    diagnosis_config,
    measure,
    measure_at_init,
    read_diagnostics,
    record_step,
    summarize_row,
)
from depthbench.flow import BLOCK_FIELDS, UNIT_FIELDS
from depthbench.models import build_model, build_vit
from depthbench.train import train_run
from tests.conftest import tiny_run

SYNTHETIC = DatasetConfig(name="synthetic", train_subset=64, test_subset=32, image_size=8)


def _net(version: str = "v1", depth: int = 8, **model: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(version, depth, width=4, **model).train()


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_numbers_are_autograds_gradients_and_the_units_inputs_and_outputs() -> None:
    model = _net("v1", 20)  # basic, 9 units; units 3 and 6 change shape (option A)
    x, y = _batch()
    row = measure(model, x, y)

    # The same quantities the long way: keep every unit's input and output, differentiate directly.
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [u.register_forward_hook(lambda m, a, o: seen.append((a[0], o))) for u in model.units]
    loss = F.cross_entropy(model(x), y)
    for h in hooks:
        h.remove()
    inputs = [a for a, _ in seen]
    grads = torch.autograd.grad(loss, inputs + [p for u in model.units for p in u.parameters()])
    units = row["units"]
    assert len(units) == 9 and row["batch"] == 8 and row["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert [u["stage"] for u in units] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [u["reshapes"] for u in units] == [False, False, False, True, False, False, True, False, False]
    for i, u in enumerate(units):
        assert u["grad_input"] == pytest.approx(grads[i].norm().item(), rel=1e-5)
        a, b = seen[i][0].flatten(1), seen[i][1].flatten(1)
        if u["reshapes"]:
            assert u["cosine"] is None and u["norm_ratio"] is None
        else:
            assert u["cosine"] == pytest.approx(F.cosine_similarity(a, b).mean().item(), rel=1e-5)
            assert u["norm_ratio"] == pytest.approx((b.norm(dim=1) / a.norm(dim=1)).mean().item(), rel=1e-5)
        # V1: y = ReLU(x + F(x)); the zeroed outputs are where the sum is <= 0
        assert u["relu_zeroed"] == pytest.approx((seen[i][1] == 0).float().mean().item())
    param_norms = []
    start = 9
    for unit in model.units:
        n = len(list(unit.parameters()))
        param_norms.append(torch.sqrt(sum(g.square().sum() for g in grads[start : start + n])).item())
        start += n
    assert [u["grad_params"] for u in units] == pytest.approx(param_norms, rel=1e-5)


def test_shortcut_zeroed_is_the_share_of_shortcut_energy_under_the_relu() -> None:
    model = _net("v1", 20)
    x, y = _batch()
    unit = model.units[1]  # same shape, identity shortcut
    kept: dict[str, torch.Tensor] = {}
    hook = unit.register_forward_hook(lambda m, a, o: kept.update(x=a[0].detach(), y=o.detach()))
    row = measure(model, x, y)
    hook.remove()
    energy = kept["x"].square()
    expected = (energy * (kept["y"] == 0)).sum() / energy.sum()
    assert 0 < expected < 1
    assert row["units"][1]["shortcut_zeroed"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("unit", ["relu_before_add", "relu_only_preact", "full_preact"])
def test_units_without_relu_after_the_addition_zero_nothing(unit: str) -> None:
    row = measure(_net("v1", 8, unit=unit), *_batch())
    assert {u["relu_zeroed"] for u in row["units"]} == {0.0} and {u["shortcut_zeroed"] for u in row["units"]} == {0.0}


def test_v1_relu_after_addition_zeroes_part_of_the_shortcut() -> None:
    summary = summarize_row({"step": 0, **measure(_net("v1", 8), *_batch())})
    assert 0 < summary["mean_shortcut_zeroed"] < 0.5 and 0 < summary["mean_relu_zeroed"] < 1


@pytest.mark.parametrize("gate", ["identity", "dropout", "exclusive_gating"])
def test_measuring_changes_no_weight_grad_buffer_or_random_state(gate: str) -> None:
    model = _net("v1", 8, shortcut_gate=gate)
    x, y = _batch()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # weights, BN running stats, batch counts
    torch.manual_seed(123)
    expected_draw = torch.rand(4)
    torch.manual_seed(123)
    measure(model, x, y)
    assert torch.equal(torch.rand(4), expected_draw)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert model.training


def test_checkpointed_model_measures_the_same_and_keeps_its_setting() -> None:
    plain = measure(_net("v2", 20), *_batch())
    model = _net("v2", 20, checkpointing=1)
    row = measure(model, *_batch())
    assert model.checkpointing == 1
    assert [u["grad_input"] for u in row["units"]] == pytest.approx([u["grad_input"] for u in plain["units"]], rel=1e-5)


def test_training_is_bit_identical_with_and_without_diagnostics(tmp_path: Path) -> None:
    # dropout on the shortcut draws random masks: the measurement must not shift the RNG stream
    plain = tiny_run(model={"width": 4, "shortcut_gate": "dropout"})
    watched = plain.model_copy(update={"train": plain.train.model_copy(update={"diagnose_steps": (0, 3, 5)})})
    assert watched.run_id == plain.run_id  # diagnostics do not change what is trained
    a, b = train_run(plain, tmp_path / "plain"), train_run(watched, tmp_path / "watched")
    assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]
    wa = torch.load(tmp_path / "plain/final.pt")["model"]
    wb = torch.load(tmp_path / "watched/final.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["step"] for r in read_diagnostics(tmp_path / "watched")] == [0, 3, 5]
    assert not (tmp_path / "plain" / DIAGNOSTICS).exists()


def test_record_step_replaces_a_step_it_has_already_recorded(tmp_path: Path) -> None:
    model, (x, y) = _net("v2", 8), _batch()
    record_step(model, x, y, 0, tmp_path)
    record_step(model, x, y, 4, tmp_path)
    again = record_step(model, x[:4], y[:4], 0, tmp_path)  # a resumed run recording step 0 again
    rows = read_diagnostics(tmp_path)
    assert [r["step"] for r in rows] == [0, 4]
    assert rows[0] == json.loads(json.dumps(again)) and rows[0]["batch"] == 4


def test_measure_at_init_is_what_the_trainer_records_at_step_0(tmp_path: Path) -> None:
    model_cfg = ModelConfig(width=4, shortcut_gate="dropout")
    trained = diagnosis_config("v1", 8, dataset=SYNTHETIC, model=model_cfg, batch_size=16, steps=2, device="cpu")
    at_init = diagnosis_config("v1", 8, dataset=SYNTHETIC, model=model_cfg, batch_size=16, steps=0, device="cpu")
    assert trained.train.steps == 3 and trained.train.diagnose_steps == (0, 2)
    train_run(trained, tmp_path / "trained")
    direct = measure_at_init(at_init, tmp_path / "direct")
    via_trainer = read_diagnostics(tmp_path / "trained")[0]
    assert via_trainer["step"] == 0 and via_trainer["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    for a, b in zip(via_trainer["units"], direct["units"], strict=True):
        assert a["grad_input"] == pytest.approx(b["grad_input"], rel=1e-5)
        assert a["shortcut_zeroed"] == pytest.approx(b["shortcut_zeroed"], rel=1e-5, abs=1e-9)


def test_diagnose_command_prints_the_table_and_writes_json_csv_png(tmp_path: Path) -> None:
    out = tmp_path / "diag"
    args = ["diagnose", "--depth", "8", "--depth", "11", "--width", "4", "--dataset", "synthetic",
            "--image-size", "8", "--batch-size", "8", "--steps", "2", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "||g|| first" in result.output and "first/last" in result.output
    records = json.loads((out / "diagnose.json").read_text())
    assert [(r["net"], r["depth"], r["step"]) for r in records] == [
        ("v1", 8, 0), ("v1", 8, 2), ("v2", 8, 0), ("v2", 8, 2), ("v1", 11, 0), ("v1", 11, 2), ("v2", 11, 0), ("v2", 11, 2),
    ]
    assert {r["units"] for r in records} == {3}  # n = 1 unit per stage for both the basic 8 and bottleneck 11
    v1, v2 = records[0], records[2]
    assert v1["mean_shortcut_zeroed"] > 0 and v2["mean_shortcut_zeroed"] == 0
    assert v1["grad_first_over_last"] == pytest.approx(v1["grad_first"] / v1["grad_last"])
    csv = (out / "diagnose.csv").read_text().splitlines()
    assert csv[0].startswith("net,version,depth,step,loss,unit,stage,reshapes,grad_input") and len(csv) == 1 + 8 * 3
    assert (out / "diagnose.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--depth", "21"], "error: depth 21 fits no block type"),
        (["--unit", "preact"], "error: model.unit: input should be 'original'"),
        (["--dataset", "mnist"], "error: dataset.name: input should be 'cifar10'"),
        (["--steps", "-1"], "error: --steps must be 0 or more"),
        (["--family", "vit", "--unit", "original"], "error: model.unit: 'original' is a resnet unit, not a vit one"),
        (["--heads", "2"], "error: model.heads is a vit setting, and this run is a resnet"),
        (["--family", "vit", "--width", "16", "--heads", "3"], "error: model.heads: width 16 is not divisible by 3 heads; nearest head counts that divide it: 2 or 4"),
        (["--family", "transformer"], "error: model.family: input should be 'resnet' or 'vit'"),
    ],
)
def test_diagnose_user_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["diagnose", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Vision Transformer blocks, and the normalisation-free ResNet units
# ---------------------------------------------------------------------------------------------


def _vit(unit: str, depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("v1", depth, unit=unit, width=16, heads=2, patch=4, image_size=8).train()


def test_vit_rows_are_autograds_gradients_and_the_blocks_inputs_and_outputs() -> None:
    model, (x, y) = _vit("post_ln"), _batch()
    row = measure(model, x, y)

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append((a[0], o))) for b in model.units]
    loss = F.cross_entropy(model(x), y)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, [a for a, _ in seen])
    units = row["units"]
    assert len(units) == 3 and row["batch"] == 8 and row["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert [(u["unit"], u["stage"], u["reshapes"]) for u in units] == [(0, 0, False), (1, 0, False), (2, 0, False)]
    for i, u in enumerate(units):
        assert list(u)[3:] == list(BLOCK_FIELDS)
        # a Transformer block has no ReLU after its additions: the zeroed fractions do not apply
        assert u["relu_zeroed"] is None and u["shortcut_zeroed"] is None
        a, b = seen[i][0].flatten(1), seen[i][1].flatten(1)  # (batch, tokens * width)
        assert u["grad_input"] == pytest.approx(grads[i].norm().item(), rel=1e-5)
        assert u["input_rms"] == pytest.approx(a.square().mean().sqrt().item(), rel=1e-5)
        assert u["cosine"] == pytest.approx(F.cosine_similarity(a, b).mean().item(), rel=1e-5)
        assert u["norm_ratio"] == pytest.approx((b.norm(dim=1) / a.norm(dim=1)).mean().item(), rel=1e-5)
        assert u["grad_params"] > 0
    assert summarize_row({"step": 0, **row})["mean_shortcut_zeroed"] is None


@pytest.mark.parametrize("unit", ["post_ln", "deepnorm"])
def test_identity_gain_is_the_factor_the_layernorms_after_the_addition_put_on_the_shortcut(unit: str) -> None:
    model, (x, y) = _vit(unit), _batch()
    sums: list[torch.Tensor] = []  # alpha * x + F(x), the input of each LayerNorm after an addition
    hooks = [n.register_forward_hook(lambda m, a, o: sums.append(a[0].detach()))
             for b in model.units for n in (b.norm1, b.norm2)]
    row = measure(model, x, y)
    for h in hooks:
        h.remove()
    alpha = model.units[0].alpha
    assert alpha == (1.0 if unit == "post_ln" else pytest.approx(6 ** 0.25))  # DeepNorm: (2N)^(1/4), N = 3
    for i, u in enumerate(row["units"]):
        first, second = sums[2 * i], sums[2 * i + 1]
        gain = (alpha / (first.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
                * alpha / (second.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt())
        assert u["identity_gain"] == pytest.approx(gain.mean().item(), rel=1e-5)
    # The patch embedding is small (std 0.02 weights), so the first LayerNorm scales the identity path up.
    assert row["units"][0]["identity_gain"] > 5


def test_rezero_blocks_are_the_identity_at_initialisation() -> None:
    row = measure(_vit("rezero", depth=4), *_batch())
    units = row["units"]
    assert [u["cosine"] for u in units] == pytest.approx([1.0] * 4, abs=1e-6)
    assert [u["norm_ratio"] for u in units] == pytest.approx([1.0] * 4, abs=1e-6)
    assert [u["identity_gain"] for u in units] == [1.0] * 4
    # x_L = x_0: the gradient reaches every block unchanged, and only the gates (a = 0) get one
    assert [u["grad_input"] for u in units] == pytest.approx([units[0]["grad_input"]] * 4, rel=1e-6)
    assert 0 < units[0]["grad_input"]


def test_pre_ln_keeps_the_identity_path_and_post_ln_rescales_it() -> None:
    pre = measure(_vit("pre_ln"), *_batch())["units"]
    post = measure(_vit("post_ln"), *_batch())["units"]
    assert [u["identity_gain"] for u in pre] == [1.0, 1.0, 1.0]
    assert all(u["identity_gain"] != pytest.approx(1.0, abs=1e-6) for u in post)


def test_fixup_relu_after_the_addition_is_measured_and_cuts_nothing_at_initialisation() -> None:
    model, (x, y) = _net("v1", 20, unit="fixup"), _batch()
    outputs: list[torch.Tensor] = []
    hooks = [u.register_forward_hook(lambda m, a, o: outputs.append(o.detach())) for u in model.units]
    row = measure(model, x, y)
    for h in hooks:
        h.remove()
    units = row["units"]
    assert [list(u)[3:] for u in units] == [list(UNIT_FIELDS)] * 9
    assert [u["relu_zeroed"] for u in units] == pytest.approx([(o == 0).float().mean().item() for o in outputs])
    assert all(u["relu_zeroed"] > 0 for u in units)
    # Each branch ends in a zero conv, so a unit passes on its non-negative input: the ReLU zeroes only
    # what was zero already, and no shortcut energy.
    assert [u["shortcut_zeroed"] for u in units] == [0.0] * 9
    for unit in model.units:
        torch.nn.init.normal_(unit.branch.conv2.weight, std=0.5)
    cut = measure(model, x, y)["units"]
    assert max(u["shortcut_zeroed"] for u in cut) > 0.01


def test_skipinit_passes_the_gradient_to_every_unit_unchanged_at_initialisation() -> None:
    # alpha = 0 ends every branch: x_L is x_l (zero-padded where the shape changes), so dL/dx_l is dL/dx_L
    units = measure(_net("v1", 20, unit="skipinit"), *_batch())["units"]
    assert [u["shortcut_zeroed"] for u in units] == [0.0] * 9
    assert [u["grad_input"] for u in units] == pytest.approx([units[0]["grad_input"]] * 9, rel=1e-5)


def test_a_vit_diagnosis_trains_with_the_family_optimizer_at_a_constant_rate() -> None:
    vit = ModelConfig(family="vit", width=16, heads=2, patch=4)
    cfg = diagnosis_config("v1", 2, dataset=SYNTHETIC, model=vit, batch_size=8, steps=4, device="cpu")
    train = cfg.train
    assert (cfg.model.mlp_ratio, cfg.model.pool) == (4.0, "cls")  # the family's defaults fill what is not given
    assert (train.optimizer, train.lr, train.weight_decay, train.decay_all) == ("adamw", 1e-3, 0.05, False)
    assert (train.schedule, train.milestones, train.warmup_steps) == ("multistep", (), 0)  # constant
    assert diagnosis_config("v1", 2, dataset=SYNTHETIC, model=vit, batch_size=8, steps=4, lr=3e-4).train.lr == 3e-4
    resnet = diagnosis_config("v1", 8, dataset=SYNTHETIC, model=ModelConfig(width=4), batch_size=8, steps=4)
    assert (resnet.train.optimizer, resnet.train.lr) == ("sgd", 0.1)


@pytest.mark.parametrize(
    ("family", "version", "unit", "label"),
    [
        ("vit", "v1", None, "Post-LN"), ("vit", "v2", None, "Pre-LN"), ("vit", "v1", "pre_ln", "Post-LN pre_ln"),
        ("vit", "v2", "rezero", "Pre-LN rezero"), ("resnet", "v1", "original", "v1"),
        ("resnet", "v2", "fixup", "v2 fixup"),
    ],
)
def test_labels_name_the_version_and_a_unit_that_is_not_the_versions(
    family: str, version: str, unit: str | None, label: str,
) -> None:
    model = {"family": family, "width": 16, "heads": 2, "patch": 4} if family == "vit" else {"width": 4}
    [cfg] = build_configs(versions=[version], depths=[8], units=[unit], model=model,
                          dataset={"name": "synthetic", "image_size": 8}, batch_size=8, steps=0)
    assert Diagnosis(cfg, Path(), [], 0.0).label == label


def test_diagnose_command_on_vits_writes_post_ln_and_pre_ln_rows(tmp_path: Path) -> None:
    out = tmp_path / "diag"
    args = ["diagnose", "--family", "vit", "--depth", "2", "--width", "16", "--heads", "2", "--dataset", "synthetic",
            "--image-size", "8", "--patch", "4", "--batch-size", "8", "--steps", "1", "--device", "cpu",
            "--out", str(out)]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "id gain" in result.output and "zeroed" not in result.output
    records = json.loads((out / "diagnose.json").read_text())
    assert [(r["net"], r["family"], r["depth"], r["step"], r["units"]) for r in records] == [
        ("Post-LN", "vit", 2, 0, 2), ("Post-LN", "vit", 2, 1, 2), ("Pre-LN", "vit", 2, 0, 2), ("Pre-LN", "vit", 2, 1, 2),
    ]
    assert all(r["run_id"].startswith(f"vit-{r['version']}-d2-") for r in records)
    post, pre = records[0], records[2]
    assert pre["mean_identity_gain"] == 1.0 and post["mean_identity_gain"] != pytest.approx(1.0)
    assert all(r["mean_shortcut_zeroed"] is None and r["loss"] > 0 for r in records)
    for r in records:
        assert all(u[k] is not None for u in r["per_unit"] for k in BLOCK_FIELDS if not k.endswith("_zeroed"))
    # the trainer ran the family's optimizer: the measured step-1 weights differ from step 0's
    assert records[1]["grad_first"] != records[0]["grad_first"]
    saved = (out / records[0]["run_id"] / "config.yaml").read_text()
    assert "optimizer: adamw" in saved and "lr: 0.001" in saved
    csv = (out / "diagnose.csv").read_text().splitlines()
    assert csv[0].endswith("shortcut_zeroed,identity_gain") and len(csv) == 1 + 4 * 2
