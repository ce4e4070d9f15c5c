"""The model family against what the papers print, and the forward rule of every variant."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from depthbench.config import ModelConfig
from depthbench.errors import DepthbenchError
from depthbench.models import (
    PLACEMENTS,
    SHORTCUT_GATES,
    VERSION_UNIT,
    ResidualUnit,
    ResNet,
    ZeroPadShortcut,
    build_model,
    count_params,
    forward_flops,
    model_from_config,
    resolve_block,
    valid_depths,
)


# ---------------------------------------------------------------------------------------------
# Parameter counts: exact values computed from the architecture, and the papers' rounding of them
# ([V1] He et al. 2015, arXiv:1512.03385, Table 6; [V2] He et al. 2016, arXiv:1603.05027, Table 3)
# ---------------------------------------------------------------------------------------------

PAPER_COUNTS = [
    # version, depth, classes, exact, printed in the paper (millions), digits the paper rounds to
    ("v1", 20, 10, 269_722, 0.27, 2),  # [V1] Table 6
    ("v1", 32, 10, 464_154, 0.46, 2),
    ("v1", 44, 10, 658_586, 0.66, 2),
    ("v1", 56, 10, 853_018, 0.85, 2),
    ("v1", 110, 10, 1_727_962, 1.7, 1),
    ("v1", 1202, 10, 19_421_274, 19.4, 1),
    ("v2", 164, 10, 1_703_258, 1.7, 1),  # [V2] Table 3
    ("v2", 164, 100, 1_726_388, 1.7, 1),
    # [V2] prints 10.2M for ResNet-1001, but its exact count (BN included) is 10.33M.
    ("v2", 1001, 10, 10_327_706, 10.3, 1),
    ("v2", 1001, 100, 10_350_836, 10.4, 1),
]


@pytest.mark.parametrize(("version", "depth", "classes", "exact", "printed", "digits"), PAPER_COUNTS)
def test_parameter_counts_match_the_papers(
    version: str, depth: int, classes: int, exact: int, printed: float, digits: int
) -> None:
    params = count_params(build_model(version, depth, classes))
    assert params == exact
    assert round(params / 1e6, digits) == printed


@pytest.mark.parametrize(("depth", "exact"), [(20, 269_722), (56, 853_018), (110, 1_727_962)])
def test_v2_basic_nets_have_the_v1_counts(depth: int, exact: int) -> None:
    # V2 moves BN parameters around (no stem BN, final BN on 4w channels, pre-activation BNs on the
    # input side of downsampling units) and they add up to the V1 count.
    assert count_params(build_model("v2", depth)) == exact


def test_v1_bottleneck_164_count() -> None:
    # V1 units put BN after each conv (output side) and the projections carry a BN: 896 more than V2.
    assert count_params(build_model("v1", 164)) == 1_704_154


# ---------------------------------------------------------------------------------------------
# Depth rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "expected"),
    [
        (20, ("basic", 3)),
        (56, ("basic", 9)),
        (110, ("basic", 18)),
        (164, ("bottleneck", 18)),
        (1001, ("bottleneck", 111)),
        (1202, ("basic", 200)),
        (8, ("basic", 1)),
        (29, ("bottleneck", 3)),  # below 164 but only 9n+2 fits
    ],
)
def test_auto_block_choice(depth: int, expected: tuple[str, int]) -> None:
    assert resolve_block(depth) == expected


def test_forced_block_on_a_depth_that_fits_both() -> None:
    assert resolve_block(20, "bottleneck") == ("bottleneck", 2)
    assert resolve_block(164, "basic") == ("basic", 27)


@pytest.mark.parametrize(
    ("depth", "nearest"),
    [
        (100, "nearest valid depths: 92 (bottleneck), 98 (basic), 101 (bottleneck), 104 (basic)"),
        (21, "nearest valid depths: 20 (basic, bottleneck), 26 (basic), 29 (bottleneck)"),
        (1000, "nearest valid depths: 992 (bottleneck), 998 (basic), 1001 (bottleneck), 1004 (basic)"),
        (5, "nearest valid depths: 8 (basic), 11 (bottleneck)"),
        (0, "nearest valid depths: 8 (basic), 11 (bottleneck)"),
    ],
)
def test_depth_that_fits_no_block_names_the_nearest(depth: int, nearest: str) -> None:
    with pytest.raises(DepthbenchError) as err:
        resolve_block(depth)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"depth {depth} fits no block type: depth must be 6n+2 (basic) or 9n+2 (bottleneck)")
    assert message.endswith(nearest)


@pytest.mark.parametrize(
    ("depth", "block", "message"),
    [
        (32, "bottleneck", "depth 32 does not fit the bottleneck block: depth must be 9n+2 (bottleneck) with n >= 1; "
         "nearest valid depths: 29 (bottleneck), 38 (bottleneck); it fits the basic block"),
        (29, "basic", "depth 29 does not fit the basic block: depth must be 6n+2 (basic) with n >= 1; "
         "nearest valid depths: 26 (basic), 32 (basic); it fits the bottleneck block"),
        (8, "bottleneck", "depth 8 does not fit the bottleneck block: depth must be 9n+2 (bottleneck) with n >= 1; "
         "nearest valid depths: 11 (bottleneck); it fits the basic block"),
    ],
)
def test_forced_block_that_does_not_fit(depth: int, block: str, message: str) -> None:
    with pytest.raises(DepthbenchError) as err:
        resolve_block(depth, block)
    assert str(err.value) == message


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(DepthbenchError, match="unknown block 'botleneck' \\(did you mean 'bottleneck'\\?\\)"):
        resolve_block(20, "botleneck")
    with pytest.raises(DepthbenchError, match="unknown version 'v3'"):
        build_model("v3", 20)
    with pytest.raises(DepthbenchError, match="unknown unit 'full_preactivation' \\(did you mean 'full_preact'\\?\\)"):
        build_model("v1", 20, unit="full_preactivation")
    with pytest.raises(DepthbenchError, match="unknown shortcut_gate 'gating'"):
        build_model("v1", 20, shortcut_gate="gating")


def test_valid_depths() -> None:
    assert valid_depths("basic", 60) == [8, 14, 20, 26, 32, 38, 44, 50, 56]
    assert valid_depths("bottleneck", 60) == [11, 20, 29, 38, 47, 56]
    assert valid_depths("auto", 30) == [8, 11, 14, 20, 26, 29]
    assert 1202 in valid_depths("basic", 1202) and 1001 in valid_depths("bottleneck", 1001)


# ---------------------------------------------------------------------------------------------
# Structure: stem, head, strides and shortcuts as [V1] Sec. 4.2 and [V2]'s Appendix (the 1001-layer
# bottleneck layout) describe them
# ---------------------------------------------------------------------------------------------


def _names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_children()]


@pytest.mark.parametrize(
    ("unit", "stem", "final_activation"),
    [
        ("original", ["conv", "bn", "relu"], []),
        ("bn_after_add", ["conv", "bn", "relu"], []),
        ("relu_before_add", ["conv", "bn", "relu"], []),
        ("relu_only_preact", ["conv", "bn"], ["relu"]),
        ("full_preact", ["conv"], ["bn", "relu"]),
    ],
)
def test_stem_and_head_follow_the_placement(unit: str, stem: list[str], final_activation: list[str]) -> None:
    model = build_model("v1", 8, unit=unit, width=4)
    assert _names(model.stem) == stem
    assert _names(model.head) == [*final_activation, "grad_format", "pool", "flatten"]


def test_version_implies_the_unit() -> None:
    assert VERSION_UNIT == {"v1": "original", "v2": "full_preact"}
    v1, v2 = build_model("v1", 8, width=4), build_model("v2", 8, width=4)
    assert _names(v1.units[0].branch) == ["conv1", "bn1", "relu1", "conv2", "bn2"]
    assert _names(v1.units[0].after_add) == ["relu"]
    assert _names(v2.units[0].branch) == ["bn1", "relu1", "conv1", "bn2", "relu2", "conv2"]
    assert _names(v2.units[0].after_add) == []


def test_units_are_flat_and_in_forward_order() -> None:
    model = build_model("v2", 20, width=4)
    assert len(model.units) == 9 and all(isinstance(u, ResidualUnit) for u in model.units)
    assert model.units == [*model.stages[0], *model.stages[1], *model.stages[2]]
    seen: list[nn.Module] = []
    for unit in model.units:
        unit.register_forward_hook(lambda m, i, o: seen.append(m))
    model(torch.randn(1, 3, 16, 16))
    assert seen == model.units


def test_bottleneck_v2_downsampling_unit() -> None:
    model = build_model("v2", 164, width=16)
    first, down = model.stages[0][0], model.stages[1][0]
    # stage 1 widens 16 -> 64 at stride 1, stages output 64/128/256, bottleneck widths 16/32/64
    assert [s[-1].branch.conv3.out_channels for s in model.stages] == [64, 128, 256]
    assert [s[0].branch.conv1.out_channels for s in model.stages] == [16, 32, 64]
    # the stride-2 sits on the first 1x1 conv, not on the 3x3
    assert down.branch.conv1.kernel_size == (1, 1) and down.branch.conv1.stride == (2, 2)
    assert down.branch.conv2.stride == (1, 1)
    # BN-ReLU once before the split; the projection is a plain 1x1 conv on the pre-activated tensor
    for unit in (first, down):
        assert _names(unit.preact) == ["bn1", "relu1"]
        assert _names(unit.branch)[0] == "conv1"
        assert _names(unit.join.shortcut) == ["conv"]
    # identity units keep their pre-activation inside the branch: the shortcut sees raw x
    assert _names(model.stages[1][1].preact) == [] and _names(model.stages[1][1].branch)[:2] == ["bn1", "relu1"]
    assert isinstance(model.stages[1][1].join.shortcut, nn.Identity)


def test_projection_takes_the_pre_activated_tensor() -> None:
    model = build_model("v2", 20, block="bottleneck", width=4).eval()
    unit = model.stages[1][0]
    x = torch.randn(2, 16, 8, 8)
    got: list[torch.Tensor] = []
    unit.join.shortcut.register_forward_hook(lambda m, i, o: got.append(i[0]))
    unit(x)
    assert torch.equal(got[0], torch.relu(unit.preact.bn1(x)))


def test_v1_projection_has_bn() -> None:
    unit = build_model("v1", 164).stages[1][0]
    assert _names(unit.preact) == []
    assert _names(unit.join.shortcut) == ["conv", "bn"]


def test_option_a_subsamples_and_zero_pads() -> None:
    shortcut = ZeroPadShortcut(extra_channels=3, stride=2)
    x = torch.randn(2, 4, 6, 6)
    y = shortcut(x)
    assert y.shape == (2, 7, 3, 3)
    assert torch.equal(y[:, :4], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 4:]) == 0
    # a bottleneck net with option A pads 16 -> 64 channels at stride 1 and has no projection weights
    model = build_model("v2", 11, shortcut="A")
    assert model.stages[0][0].join.shortcut.extra_channels == 48
    assert model.stages[0][0].join.shortcut.stride == 1
    assert not list(model.stages[0][0].join.parameters())


# ---------------------------------------------------------------------------------------------
# Forward and backward of every variant
# ---------------------------------------------------------------------------------------------


def _check_trains(model: ResNet, image_size: int, classes: int = 10) -> None:
    x = torch.randn(2, 3, image_size, image_size)
    out = model(x)
    assert out.shape == (2, classes)
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("image_size", [32, 16])
@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("depth", [8, 11], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("unit", list(PLACEMENTS))
def test_every_unit_and_block_trains(unit: str, depth: int, shortcut: str, image_size: int) -> None:
    torch.manual_seed(0)
    model = build_model("v1", depth, unit=unit, width=4, shortcut=shortcut)
    _check_trains(model, image_size)


@pytest.mark.parametrize("gate", list(SHORTCUT_GATES))
def test_every_shortcut_gate_trains(gate: str) -> None:
    torch.manual_seed(0)
    model = build_model("v1", 14, width=4, shortcut_gate=gate, shortcut_scale=0.5, residual_scale=0.5)
    _check_trains(model, 16)


# ---------------------------------------------------------------------------------------------
# The clean identity path of [V2] section 3, and the forward rule of every shortcut gate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [14, 20], ids=["basic", "bottleneck"])
def test_full_preact_unit_is_the_identity_when_its_last_conv_is_zero(depth: int) -> None:
    unit = build_model("v2", depth, width=4).stages[0][1]  # dims do not change: an identity shortcut
    last_conv = [m for m in unit.branch if isinstance(m, nn.Conv2d)][-1]
    nn.init.zeros_(last_conv.weight)
    x = torch.randn(4, unit.branch[0].num_features, 8, 8)
    assert (x < 0).any()
    assert torch.equal(unit(x), x)


@pytest.mark.parametrize("depth", [14, 20], ids=["basic", "bottleneck"])
def test_original_unit_gates_the_shortcut_with_relu(depth: int) -> None:
    unit = build_model("v1", depth, width=4, block="basic" if depth == 14 else "bottleneck").stages[0][1]
    last_bn = [m for m in unit.branch if isinstance(m, nn.BatchNorm2d)][-1]
    nn.init.zeros_(last_bn.weight)
    x = torch.randn(4, unit.branch.conv1.in_channels, 8, 8)
    assert not torch.equal(unit(x), x)
    assert torch.equal(unit(x), torch.relu(x))
    assert torch.equal(unit(x.abs()), x.abs())


def test_relu_only_preact_unit_is_the_identity_when_its_last_bn_is_zero() -> None:
    unit = build_model("v1", 14, width=4, unit="relu_only_preact").stages[0][1]
    nn.init.zeros_(unit.branch.bn2.weight)
    x = torch.randn(4, 4, 8, 8)
    assert torch.equal(unit(x), x)


def _identity_unit(**options: object) -> tuple[ResidualUnit, torch.Tensor]:
    """The second unit of stage 1 of a tiny net (its dims do not change), in eval mode, and a signed input."""
    torch.manual_seed(0)
    options = {"version": "v2", **options}
    unit = build_model(options.pop("version"), 14, width=4, **options).stages[0][1].eval()
    return unit, torch.randn(4, 4, 8, 8)


def test_identity_gate() -> None:
    unit, x = _identity_unit()
    assert torch.equal(unit(x), x + unit.branch(x))


def test_constant_scaling_gate() -> None:
    unit, x = _identity_unit(shortcut_gate="constant_scaling", shortcut_scale=0.5, residual_scale=0.25)
    torch.testing.assert_close(unit(x), 0.5 * x + 0.25 * unit.branch(x))
    # in a V1 unit the scaling comes before the ReLU after the addition
    unit, x = _identity_unit(version="v1", shortcut_gate="constant_scaling", shortcut_scale=0.5, residual_scale=0.5)
    torch.testing.assert_close(unit(x), torch.relu(0.5 * x + 0.5 * unit.branch(x)))


@pytest.mark.parametrize(("gate", "exclusive"), [("exclusive_gating", True), ("shortcut_only_gating", False)])
def test_gating(gate: str, exclusive: bool) -> None:
    unit, x = _identity_unit(shortcut_gate=gate, gate_bias=-2.0)
    conv = unit.join.gate
    assert conv.kernel_size == (1, 1) and conv.in_channels == conv.out_channels == 4
    assert torch.equal(conv.bias, torch.full((4,), -2.0))
    with torch.no_grad():
        conv.weight.zero_()
    g = 1 / (1 + math.exp(2.0))  # sigmoid(b_g) once the 1x1 weights are zero
    residual = unit.branch(x)
    expected = (1 - g) * x + (g * residual if exclusive else residual)
    torch.testing.assert_close(unit(x), expected)
    # a learned gate: g varies per position, computed from x by the 1x1 conv
    with torch.no_grad():
        conv.weight.normal_()
    g = torch.sigmoid(conv(x))
    expected = (1 - g) * x + (g * residual if exclusive else residual)
    torch.testing.assert_close(unit(x), expected)


def test_conv1x1_shortcut() -> None:
    unit, x = _identity_unit(shortcut_gate="conv1x1")
    conv = unit.join.shortcut
    assert conv.kernel_size == (1, 1) and conv.bias is None
    with torch.no_grad():
        conv.weight.copy_(3 * torch.eye(4).view(4, 4, 1, 1))
    torch.testing.assert_close(unit(x), 3 * x + unit.branch(x))


def test_dropout_shortcut() -> None:
    unit, _ = _identity_unit(shortcut_gate="dropout", shortcut_dropout=0.5)
    x = torch.randn(8, 4, 16, 16)
    assert torch.equal(unit(x), x + unit.branch(x))  # eval: the shortcut is the identity
    unit.train()
    shortcut = unit(x) - unit.branch(x)  # train-mode BN normalises the same batch the same way
    dropped = shortcut.abs() < 1e-6
    torch.testing.assert_close(shortcut[~dropped], 2 * x[~dropped])  # kept values scaled by 1/(1-p)
    assert 0.45 < dropped.float().mean().item() < 0.55


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def test_forward_flops_by_hand() -> None:
    model = build_model("v1", 8, width=4)
    # 8x8 image, widths 4/8/16, one unit per stage, option A shortcuts (no weights):
    stem = 8 * 8 * 4 * (3 * 9)  # 6,912 MACs
    stage1 = 2 * (8 * 8 * 4 * (4 * 9))  # 18,432
    stage2 = 4 * 4 * 8 * (4 * 9) + 4 * 4 * 8 * (8 * 9)  # 13,824
    stage3 = 2 * 2 * 16 * (8 * 9) + 2 * 2 * 16 * (16 * 9)  # 13,824
    fc = 16 * 10
    assert forward_flops(model, image_size=8) == 2 * (stem + stage1 + stage2 + stage3 + fc) == 106_304


def test_resnet20_flops_match_the_paper() -> None:
    model = build_model("v1", 20)
    flops = forward_flops(model)
    assert flops == 81_102_080  # 40.55M multiply-adds
    assert flops == pytest.approx(2 * 40.8e6, rel=0.01)  # "ResNet-20 ... ~41M" multiply-adds


def test_forward_flops_leaves_the_model_alone() -> None:
    model = build_model("v1", 8, width=4, in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert forward_flops(model, image_size=16, in_channels=1) > 0
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "depth", "segments"), [("v1", 20, 2), ("v2", 20, 1_000_000)])
def test_checkpointing_gives_the_same_step(version: str, depth: int, segments: int) -> None:
    models = []
    for checkpointing in (0, segments):
        torch.manual_seed(0)
        block = "basic" if version == "v1" else "bottleneck"
        models.append(build_model(version, depth, block=block, width=4, checkpointing=checkpointing))
    plain, ckpt = models
    bn_calls = {id(m): 0 for m in (plain, ckpt)}
    for model in models:
        first_bn = next(m for m in model.units[0].modules() if isinstance(m, nn.BatchNorm2d))
        first_bn.register_forward_hook(lambda m, i, o, key=id(model): bn_calls.__setitem__(key, bn_calls[key] + 1))
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for model in models:
        nn.functional.cross_entropy(model(x), y).backward()

    # the checkpointed BN ran again in backward, and still counted only one batch
    assert bn_calls[id(plain)] == 1 and bn_calls[id(ckpt)] == 2
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), name
    bns = [m for m in ckpt.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.num_batches_tracked.item() == 1 for m in bns)
    assert all(m.momentum == 0.1 for m in bns)  # restored after the recomputation


def test_checkpointing_is_off_in_eval_and_without_grad() -> None:
    model = build_model("v1", 14, width=4, checkpointing=2)
    calls: list[int] = []
    model.units[0].register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    model.eval()
    model(x).sum().backward()
    assert len(calls) == 2  # never recomputed


# ---------------------------------------------------------------------------------------------
# Init and config
# ---------------------------------------------------------------------------------------------


def test_he_init() -> None:
    torch.manual_seed(0)
    model = build_model("v1", 8, width=64)
    conv = model.stages[2][0].branch.conv2  # 256 -> 256, 3x3: 589,824 weights
    assert conv.weight.shape == (256, 256, 3, 3)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.01)
    assert abs(conv.weight.mean().item()) < 1e-3
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bns)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert torch.equal(model.fc.bias, torch.zeros(10))


def test_model_from_config() -> None:
    cfg = ModelConfig(unit="relu_only_preact", shortcut_gate="constant_scaling", shortcut_scale=0.5, width=4,
                      checkpointing=True)
    model = model_from_config("v2", 20, cfg, num_classes=100, in_channels=1)
    assert model.checkpointing == 1_000_000
    assert model.stem.conv.in_channels == 1 and model.fc.out_features == 100
    assert _names(model.units[1].branch) == ["relu1", "conv1", "bn1", "relu2", "conv2", "bn2"]
    assert model.units[1].join.shortcut_scale == 0.5
    assert _names(model.stem) == ["conv", "bn"]
