"""ResNets without normalisation: the fixup (Zhang, Dauphin, Ma 2019, arXiv:1901.09321) and skipinit (De
and Smith 2020, arXiv:2002.10444) units against their papers' rules: the forward rule recomputed from the
units' own weights, Fixup's initialisation, SkipInit's identity at init, hand-counted parameters, and a
few steps of training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depthbench.architecture import Placement
from depthbench.config import ModelConfig
from depthbench.estimate import parameter_count
from depthbench.flow import measure
from depthbench.models import ResidualUnit, ResNet, build_model, count_params
from depthbench.models.resnet import ScalarBias, ScalarMultiplier

UNITS = ("fixup", "skipinit")
# A basic net (6n+2, option A shortcuts) and a bottleneck net (9n+2, option B projections), 2 units per stage.
NETS = {"basic": 14, "bottleneck": 20}


def _net(unit: str, block: str, **options: object) -> ResNet:
    torch.manual_seed(0)
    return build_model("v1", NETS[block], unit=unit, block=block, width=4, **options)


def _names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_children()]


def _conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(conv, nn.Conv2d) and conv.bias is None
    return F.conv2d(x, conv.weight, stride=conv.stride, padding=conv.padding)


def _scalars_off_init(unit: ResidualUnit) -> None:
    """Random weights where init puts zeros or ones (Fixup's last conv, every scalar), so that each term of
    the forward rule shows in the result."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in unit.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_(0.3 * torch.randn(module.weight.shape, generator=generator))
            elif isinstance(module, (ScalarBias, ScalarMultiplier)):
                for p in module.parameters():
                    p.copy_(torch.randn((), generator=generator))


def _shortcut(unit: ResidualUnit, x: torch.Tensor) -> torch.Tensor:
    """h(x) by hand: the identity, option A (subsample, zero channels) or a plain 1x1 projection."""
    shortcut = unit.join.shortcut
    if isinstance(shortcut, nn.Identity):
        return x
    if isinstance(shortcut, nn.Sequential):
        assert _names(shortcut) == ["conv"]  # no BN on the projection of a normalisation-free unit
        return _conv(shortcut.conv, x)
    return F.pad(x[:, :, :: shortcut.stride, :: shortcut.stride], (0, 0, 0, 0, 0, shortcut.extra_channels))


def _fixup_rule(unit: ResidualUnit, x: torch.Tensor, m: int) -> torch.Tensor:
    """[Fixup]'s unit (the Fixup code's BasicBlock and Bottleneck): a scalar bias before every conv and
    ReLU, a multiplier and a bias ending the branch, a ReLU after the addition; the shortcut of a unit
    whose shape changes takes x + a1, the identity takes x."""
    layers = {**dict(unit.preact.named_children()), **dict(unit.branch.named_children())}
    h = x + layers["bias1a"].bias
    out = h
    for i in range(1, m + 1):
        if i > 1:
            out = out + layers[f"bias{i}a"].bias
        out = _conv(layers[f"conv{i}"], out)
        if i < m:
            out = torch.relu(out + layers[f"bias{i}b"].bias)
    out = out * layers[f"scale{m}"].weight + layers[f"bias{m}b"].bias
    return torch.relu(_shortcut(unit, h if len(unit.preact) else x) + out)


def _skipinit_rule(unit: ResidualUnit, x: torch.Tensor, m: int) -> torch.Tensor:
    """[SkipInit] on the pre-activation unit without BN: x_{l+1} = h(x_l) + alpha * f(x_l), where f is
    ReLU-conv-bias per layer; the shortcut of a unit whose shape changes takes ReLU(x), the identity x."""
    layers = {**dict(unit.preact.named_children()), **dict(unit.branch.named_children())}
    out = x
    for i in range(1, m + 1):
        out = _conv(layers[f"conv{i}"], torch.relu(out)) + layers[f"bias{i}"].bias
    out = layers[f"gate{m}"].weight * out
    return _shortcut(unit, torch.relu(x) if len(unit.preact) else x) + out


# ---- structure: no BN anywhere, the scalars where the placement puts them --------------------------------

@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("block", list(NETS))
@pytest.mark.parametrize("unit", UNITS)
def test_no_batchnorm_anywhere(unit: str, block: str, shortcut: str) -> None:
    model = _net(unit, block, shortcut=shortcut)
    assert not [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert not list(model.buffers())  # nor any running statistics


def test_fixup_layout() -> None:
    model = _net("fixup", "basic")
    assert _names(model.stem) == ["conv", "bias", "relu"]
    assert _names(model.head) == ["bias", "grad_format", "pool", "flatten"]  # Fixup's bias before the FC
    same, down = model.stages[0][1], model.stages[1][0]
    assert _names(same.preact) == []
    assert _names(same.branch) == ["bias1a", "conv1", "bias1b", "relu1", "bias2a", "conv2", "scale2", "bias2b"]
    assert _names(down.preact) == ["bias1a"] and _names(down.branch)[0] == "conv1"
    assert _names(same.after_add) == ["relu"]
    bottleneck = _net("fixup", "bottleneck").stages[1][0]
    assert _names(bottleneck.branch)[-4:] == ["bias3a", "conv3", "scale3", "bias3b"]
    assert _names(bottleneck.join.shortcut) == ["conv"]


def test_skipinit_layout() -> None:
    model = _net("skipinit", "basic")
    assert _names(model.stem) == ["conv", "bias"]
    assert _names(model.head) == ["relu", "grad_format", "pool", "flatten"]
    same, down = model.stages[0][1], model.stages[1][0]
    assert _names(same.branch) == ["relu1", "conv1", "bias1", "relu2", "conv2", "bias2", "gate2"]
    assert _names(down.preact) == ["relu1"]
    assert _names(same.after_add) == []


def test_a_placement_cannot_repeat_an_op_on_one_side_of_a_conv() -> None:
    with pytest.raises(ValueError, match="repeat an op"):
        Placement(layer="bias bias conv", last="conv", after_add="")
    with pytest.raises(ValueError, match="unknown placement ops \\['ln'\\]"):
        Placement(layer="conv", last="conv ln", after_add="")


# ---- the forward rule, recomputed by hand --------------------------------------------------------------

@pytest.mark.parametrize("where", ["identity", "downsampling"])
@pytest.mark.parametrize("block", list(NETS))
@pytest.mark.parametrize("unit", UNITS)
def test_forward_rule_by_hand(unit: str, block: str, where: str) -> None:
    model = _net(unit, block)
    m = 2 if block == "basic" else 3
    layer = model.stages[0][1] if where == "identity" else model.stages[1][0]
    _scalars_off_init(layer)
    x = torch.randn(2, layer.branch.conv1.in_channels, 8, 8)
    assert (x < 0).any()  # signed, so every ReLU matters
    rule = _fixup_rule if unit == "fixup" else _skipinit_rule
    expected = rule(layer, x, m)
    assert expected.shape == (2, getattr(layer.branch, f"conv{m}").out_channels, *((8, 8) if where == "identity" else (4, 4)))
    torch.testing.assert_close(layer(x), expected)


# ---- Fixup's initialisation ----------------------------------------------------------------------------

@pytest.mark.parametrize(("depth", "block", "m"), [(20, "basic", 2), (29, "bottleneck", 3)])
def test_fixup_init(depth: int, block: str, m: int) -> None:
    """Last conv of every branch and the classifier at 0; the other branch convs He-initialised and
    scaled by L^(-1/(2m-2)), L = 9 units: 9^(-1/2) = 1/3 for basic units, 9^(-1/4) for bottlenecks."""
    torch.manual_seed(0)
    he = build_model("v1", depth, block=block, width=16)
    torch.manual_seed(0)
    fixup = build_model("v1", depth, block=block, width=16, unit="fixup")
    units = len(fixup.units)
    assert units == 9
    factor = units ** (-1 / (2 * m - 2))

    assert torch.count_nonzero(fixup.fc.weight) == 0 and torch.count_nonzero(fixup.fc.bias) == 0
    normalised = []
    for unit, he_unit in zip(fixup.units, he.units, strict=True):
        convs = [c for c in unit.branch.modules() if isinstance(c, nn.Conv2d)]
        he_convs = [c for c in he_unit.branch.modules() if isinstance(c, nn.Conv2d)]
        assert len(convs) == m
        assert torch.count_nonzero(convs[-1].weight) == 0
        for conv, he_conv in zip(convs[:-1], he_convs[:-1], strict=True):
            assert torch.equal(conv.weight, he_conv.weight * factor)  # the same He draw, scaled
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            normalised.append(conv.weight.flatten() / math.sqrt(2 / fan_out))
    # the std against the formula, over 100k+ weights: within 2%
    pooled = torch.cat(normalised)
    assert pooled.numel() > 100_000
    assert pooled.std().item() == pytest.approx(factor, rel=0.02)
    # outside the branches (stem, projections) the plain He init, as in the Fixup code
    assert torch.equal(fixup.stem.conv.weight, he.stem.conv.weight)
    for unit, he_unit in zip(fixup.units, he.units, strict=True):
        if isinstance(unit.join.shortcut, nn.Sequential):
            assert torch.equal(unit.join.shortcut.conv.weight, he_unit.join.shortcut.conv.weight)
    scalars = [m for m in fixup.modules() if isinstance(m, (ScalarBias, ScalarMultiplier))]
    assert len(scalars) == 1 + 9 * (2 * m + 1) + 1  # stem, a/b per layer and a scale per unit, head
    assert all(torch.equal(s.bias, torch.tensor(0.0)) for s in scalars if isinstance(s, ScalarBias))
    assert all(torch.equal(s.weight, torch.tensor(1.0)) for s in scalars if isinstance(s, ScalarMultiplier))


@pytest.mark.parametrize("block", list(NETS))
def test_fixup_unit_at_init_is_relu_of_its_input(block: str) -> None:
    """The zero last conv makes the branch exactly b2 = 0, so an identity unit computes ReLU(x)."""
    unit = _net("fixup", block).stages[0][1]
    x = torch.randn(4, unit.branch.conv1.in_channels, 8, 8)
    assert torch.equal(unit(x), torch.relu(x))


def test_fixup_net_starts_at_uniform_predictions() -> None:
    model = _net("fixup", "basic")
    assert torch.equal(model(torch.randn(3, 3, 8, 8)), torch.zeros(3, 10))


# ---- SkipInit at init ----------------------------------------------------------------------------------

@pytest.mark.parametrize("block", list(NETS))
def test_skipinit_units_start_as_the_identity(block: str) -> None:
    model = _net("skipinit", block)
    gates = [m for m in model.modules() if isinstance(m, ScalarMultiplier)]
    assert len(gates) == len(model.units) == 6 and all(torch.equal(g.weight, torch.tensor(0.0)) for g in gates)
    x = torch.randn(4, 3, 8, 8)
    h = model.stem(x)
    for unit in model.units:
        if not len(unit.preact):  # the shape stays: exactly x
            assert torch.equal(unit(h), h)
        else:  # the shape changes: exactly the shortcut of ReLU(x)
            assert torch.equal(unit(h), _shortcut(unit, torch.relu(h)))
        h = unit(h)


def test_skipinit_keeps_the_he_init_of_the_bn_nets() -> None:
    torch.manual_seed(0)
    he = build_model("v2", 14, width=4)
    torch.manual_seed(0)
    skipinit = build_model("v2", 14, width=4, unit="skipinit")
    he_convs = [m.weight for m in he.modules() if isinstance(m, nn.Conv2d)]
    convs = [m.weight for m in skipinit.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(he_convs) and all(torch.equal(a, b) for a, b in zip(convs, he_convs, strict=True))
    assert torch.equal(skipinit.fc.weight, he.fc.weight)


# ---- parameters, by hand -------------------------------------------------------------------------------

def test_parameter_counts_by_hand() -> None:
    """Depth 8 (one basic unit per stage), width 4: stages 4/8/16 channels, option A shortcuts, 10 classes.

    Convs, the same for both units: stem 3*4*9 = 108; stage 1: 4*4*9 + 4*4*9 = 288; stage 2:
    4*8*9 + 8*8*9 = 288 + 576 = 864; stage 3: 8*16*9 + 16*16*9 = 1,152 + 2,304 = 3,456; in all 4,716.
    FC: 16*10 + 10 = 170.
    fixup scalars: 1 after the stem conv, 5 per unit (bias1a, bias1b, bias2a, scale2, bias2b) x 3 units,
    1 before pooling: 17. 4,716 + 170 + 17 = 4,903.
    skipinit scalars: 1 after the stem conv, 3 per unit (bias1, bias2, gate2) x 3 units: 10.
    4,716 + 170 + 10 = 4,896.
    """
    for unit, expected in (("fixup", 4_903), ("skipinit", 4_896)):
        assert count_params(build_model("v1", 8, unit=unit, width=4)) == expected
        assert parameter_count("v1", 8, ModelConfig(unit=unit, width=4)) == expected


# ---- training and measurement --------------------------------------------------------------------------

@pytest.mark.parametrize("block", list(NETS))
@pytest.mark.parametrize("unit", UNITS)
def test_tiny_net_trains(unit: str, block: str) -> None:
    """30 SGD steps on one fixed synthetic batch whose label is the image's brightest channel (a width-4
    net without BN memorises random labels only slowly): the loss falls far below where it started."""
    torch.manual_seed(0)
    model = build_model("v1", {"basic": 8, "bottleneck": 11}[block], unit=unit, block=block, width=4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=generator)
    y = x.mean(dim=(2, 3)).argmax(dim=1)
    x = x + 0.5 * F.one_hot(y, 3).float()[:, :, None, None]  # a margin between the classes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    if unit == "fixup":
        assert losses[0] == pytest.approx(math.log(10))  # the zero classifier predicts uniformly
    assert losses[-1] < 0.3 * losses[0]


def test_flow_measures_the_normalisation_free_units() -> None:
    """flow.measure on both units at init. skipinit: no ReLU after the addition, and every identity unit
    passes its input on unchanged (cosine 1, norm ratio 1). fixup: its ReLU after the addition zeroes
    outputs, and the zero classifier stops every gradient below it until the first step moves it."""
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    rows = measure(_net("skipinit", "basic"), x, y)["units"]
    assert all(r["relu_zeroed"] == 0 and r["grad_input"] > 0 and r["grad_params"] > 0 for r in rows)
    same = [r for r in rows if not r["reshapes"]]
    assert same and all(r["cosine"] == pytest.approx(1) and r["norm_ratio"] == pytest.approx(1) for r in same)

    model = _net("fixup", "basic")
    rows = measure(model, x, y)["units"]
    assert all(r["relu_zeroed"] > 0 and r["grad_input"] == 0 and r["grad_params"] == 0 for r in rows)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    rows = measure(model, x, y)["units"]
    assert all(r["grad_input"] > 0 and r["grad_params"] > 0 for r in rows)
