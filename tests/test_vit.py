"""The ViT family: exact sizes by hand, each unit's forward rule against a recomputation from its parts,
the inits the papers prescribe, one-line errors, a tiny net that learns, the CLI table and the estimate."""

from __future__ import annotations

import math
from contextlib import nullcontext
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from depthbench.bench import activation_mb
from depthbench.cli import app
from depthbench.config import DatasetConfig, ModelConfig, RunConfig
from depthbench.devices import attention_name
from depthbench.errors import DepthbenchError
from depthbench.estimate import DataShape, activation_bytes, estimate_memory, parameter_count
from depthbench.models import (
    UNITS,
    ResNet,
    ViT,
    build_vit,
    count_params,
    forward_flops,
    model_from_config,
    vit_forward_flops,
    vit_param_count,
)
from depthbench.transformer import deepnorm_constants

runner = CliRunner()

# depth 2, width 32, 2 heads, MLP 128, patch 4 on 16x16x3 images (16 patches), 10 classes.
TINY = {"width": 32, "heads": 2, "mlp_ratio": 4.0, "patch": 4, "image_size": 16, "in_channels": 3,
        "num_classes": 10}
# depth 3, width 24, 3 heads, MLP 48, patch 2 on 8x8x1 images (16 patches), 5 classes.
SMALL = {"width": 24, "heads": 3, "mlp_ratio": 2.0, "patch": 2, "image_size": 8, "in_channels": 1, "num_classes": 5}


def tiny(unit: str, depth: int = 2, pool: str = "cls", **changes: object) -> ViT:
    settings = {**TINY, **changes}
    return build_vit("v1", depth, settings.pop("num_classes"), unit=unit, pool=pool, **settings)


# ---- sizes ---------------------------------------------------------------------------------------------------

# TINY, per part:
#   patch conv 3*4*4*32 + 32 = 1,568; position 17 tokens * 32 = 544 with the class token (32), else 16 * 32 = 512
#   block: 2 LayerNorms 2*64 = 128; qkv 32*96 + 96 = 3,168; out 32*32 + 32 = 1,056;
#          MLP 32*128 + 128 + 128*32 + 32 = 8,352: 12,704 (ReZero: no LayerNorms, one gate: 12,577)
#   final LayerNorm (pre_ln) 64; head 32*10 + 10 = 330
#   post_ln cls = 1,568 + 576 + 2 * 12,704 + 330 = 27,882; pre_ln adds 64; rezero = 1,568 + 576 + 2 * 12,577 + 330
# SMALL, per part:
#   patch conv 1*2*2*24 + 24 = 120; position 17 * 24 = 408 and class token 24, else 16 * 24 = 384
#   block: LayerNorms 96; qkv 24*72 + 72 = 1,800; out 24*24 + 24 = 600; MLP 24*48 + 48 + 48*24 + 24 = 2,376:
#          4,872 (ReZero 4,777); final LayerNorm 48; head 24*5 + 5 = 125
#   post_ln cls = 120 + 432 + 3 * 4,872 + 125 = 15,293; rezero = 120 + 432 + 3 * 4,777 + 125 = 15,008
HAND_COUNTS = [
    (TINY, 2, "cls", {"post_ln": 27_882, "pre_ln": 27_946, "deepnorm": 27_882, "rezero": 27_628}),
    (TINY, 2, "mean", {"post_ln": 27_818, "pre_ln": 27_882, "deepnorm": 27_818, "rezero": 27_564}),
    (SMALL, 3, "cls", {"post_ln": 15_293, "pre_ln": 15_341, "deepnorm": 15_293, "rezero": 15_008}),
    (SMALL, 3, "mean", {"post_ln": 15_245, "pre_ln": 15_293, "deepnorm": 15_245, "rezero": 14_960}),
]


@pytest.mark.parametrize(("shape", "depth", "pool", "counts"), HAND_COUNTS)
def test_parameter_counts_by_hand(shape: dict, depth: int, pool: str, counts: dict[str, int]) -> None:
    assert set(counts) == set(UNITS)
    for unit, expected in counts.items():
        assert vit_param_count(depth, **shape, pool=pool, unit=unit) == expected, unit
        net = build_vit("v2", depth, shape["num_classes"], unit=unit, pool=pool,
                        **{k: v for k, v in shape.items() if k != "num_classes"})
        assert count_params(net) == expected, unit


def test_docstring_table_counts_of_the_default_vit() -> None:
    """depthbench.transformer's table: width 192, 3 heads, patch 4, 32x32 CIFAR-10, class token."""
    for depth, post, pre, rezero in ((6, 2_693_194, 2_693_578, 2_688_592), (12, 5_362_378, 5_362_762, 5_353_174)):
        with torch.device("meta"):  # shapes only
            assert count_params(build_vit("v1", depth)) == post
            assert count_params(build_vit("v2", depth)) == pre
            assert count_params(build_vit("v1", depth, unit="rezero")) == rezero


def test_forward_flops_by_hand_and_against_the_measured_layers() -> None:
    # TINY, 17 tokens: patches 16 * 48 * 32 = 24,576 MACs; per block qkv 17*32*96 = 52,224, scores and sum
    # 2 * 17*17*32 = 18,496, out 17*32*32 = 17,408, MLP 2 * 17*32*128 = 139,264; head 320.
    macs = 24_576 + 2 * (52_224 + 18_496 + 17_408 + 139_264) + 320
    assert vit_forward_flops(2, **TINY, pool="cls") == 2 * macs == 959_360
    # The conv and linear layers as the ResNet count measures them with hooks, plus the attention's two
    # matrix products, which are no layer.
    net = tiny("pre_ln")
    assert forward_flops(net, 16) + 2 * 2 * (2 * 17 * 17 * 32) == 959_360


# ---- each unit's forward rule, recomputed from the block's parts ---------------------------------------------


def _tokens(seed: int = 0, tokens: int = 17, width: int = 32) -> torch.Tensor:
    return torch.randn(3, tokens, width, generator=torch.Generator().manual_seed(seed))


def test_attention_is_softmax_of_scaled_scores_times_values() -> None:
    block = tiny("pre_ln").units[0]
    x = _tokens()
    q, k, v = (t.view(3, 17, 2, 16).transpose(1, 2) for t in block.attn.qkv(x).chunk(3, dim=-1))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)
    expected = block.attn.proj((weights @ v).transpose(1, 2).reshape(3, 17, 32))
    torch.testing.assert_close(block.attn(x), expected)


def test_post_ln_normalises_after_each_addition() -> None:
    """[Xiong]: x = LN(x + F(x)), attention then MLP, and no final LayerNorm."""
    net = tiny("post_ln")
    block, x = net.units[0], _tokens()
    h = block.norm1(x + block.attn(x))
    torch.testing.assert_close(block(x), block.norm2(h + block.mlp(h)))
    assert isinstance(net.norm, nn.Identity) and block.alpha == 1


def test_pre_ln_keeps_the_identity_and_ends_with_a_layer_norm() -> None:
    """[Xiong]: x = x + F(LN(x)), and one LayerNorm before the head."""
    net = tiny("pre_ln")
    block, x = net.units[0], _tokens()
    h = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)))
    images = torch.randn(2, 3, 16, 16)
    tokens = net.stages[0](net.stem(images))
    torch.testing.assert_close(net(images), net.head(F.layer_norm(tokens, (32,), net.norm.weight, net.norm.bias)[:, 0]))


def test_deepnorm_scales_the_identity_by_alpha() -> None:
    """[DeepNet]: x = LN(alpha x + F(x)); with N = 8 blocks alpha = 16^(1/4) = 2 and beta = 64^(-1/4)."""
    alpha, beta = deepnorm_constants(8)
    assert (alpha, beta) == pytest.approx((2.0, 1 / (2 * math.sqrt(2))))
    net = tiny("deepnorm", depth=8)
    block, x = net.units[0], _tokens()
    assert [b.alpha for b in net.units] == pytest.approx([2.0] * 8)
    h = block.norm1(2.0 * x + block.attn(x))
    torch.testing.assert_close(block(x), block.norm2(2.0 * h + block.mlp(h)))
    assert isinstance(net.norm, nn.Identity)


def test_rezero_gates_both_sublayers_with_one_scalar_and_has_no_layer_norm() -> None:
    """[ReZero]: x = x + a F(x), one a per block, shared by attention and MLP."""
    net = tiny("rezero")
    assert not any(isinstance(m, nn.LayerNorm) for m in net.modules())
    assert all(block.gate.shape == () for block in net.units)
    block, x = net.units[0], _tokens()
    with torch.no_grad():
        block.gate.fill_(0.7)
    h = x + 0.7 * block.attn(x)
    torch.testing.assert_close(block(x), h + 0.7 * block.mlp(h))


def test_rezero_blocks_are_exactly_the_identity_at_init() -> None:
    net = tiny("rezero", depth=4)
    x = net.stem(torch.randn(2, 3, 16, 16))
    for block in net.units:
        assert block.gate.item() == 0
        assert torch.equal(block(x), x)


def test_patch_embedding_is_a_linear_map_of_each_patch() -> None:
    net = tiny("pre_ln")
    with torch.no_grad():  # the class token starts at 0: give it something to find
        net.stem.class_token.normal_()
    images = torch.randn(2, 3, 16, 16)
    patches = F.unfold(images, kernel_size=4, stride=4).transpose(1, 2)  # (2, 16, 48), row-major over the grid
    embedded = patches @ net.stem.proj.weight.flatten(1).T + net.stem.proj.bias
    expected = torch.cat([net.stem.class_token.expand(2, 1, 32), embedded], dim=1) + net.stem.position
    torch.testing.assert_close(net.stem(images), expected)


def test_mean_pooling_averages_the_patch_tokens() -> None:
    net = tiny("post_ln", pool="mean")
    assert net.stem.class_token is None and net.stem.position.shape == (1, 16, 32)
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net(images), net.head(net.stages[0](net.stem(images)).mean(dim=1)))


# ---- initialisation --------------------------------------------------------------------------------------------


def test_standard_init() -> None:
    """Truncated normal (std 0.02, cut at 2 std) for linear weights and the position embedding; zero biases
    and class token; LayerNorm 1 and 0."""
    torch.manual_seed(0)
    net = tiny("pre_ln", width=64)
    cut_std = 0.02 * math.sqrt(1 - 2 * 2 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(math.sqrt(2)))
    weights = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))])
    assert weights.abs().max() <= 0.04 and weights.std().item() == pytest.approx(cut_std, rel=0.02)
    assert net.stem.position.abs().max() <= 0.04 and net.stem.position.std().item() > 0.01
    assert all(torch.all(m.bias == 0) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert torch.all(net.stem.class_token == 0)
    norms = [m for m in net.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)


def test_deepnorm_init_scales_value_output_and_mlp_by_beta() -> None:
    """[DeepNet]: Xavier normal with gain beta for v, the output projection and the MLP; gain 1 for q and k.
    Width 64, MLP 256, 8 blocks: beta = 64^(-1/4)."""
    torch.manual_seed(0)
    net = tiny("deepnorm", depth=8, width=64, heads=4)
    beta = deepnorm_constants(8)[1]

    def xavier(fan_out: int, fan_in: int, gain: float) -> float:
        return gain * math.sqrt(2 / (fan_in + fan_out))

    for block in net.units:
        q, k, v = block.attn.qkv.weight.detach().chunk(3, dim=0)
        expected = {"q": (q, xavier(64, 64, 1)), "k": (k, xavier(64, 64, 1)), "v": (v, xavier(64, 64, beta)),
                    "out": (block.attn.proj.weight, xavier(64, 64, beta)),
                    "fc1": (block.mlp.fc1.weight, xavier(256, 64, beta)),
                    "fc2": (block.mlp.fc2.weight, xavier(64, 256, beta))}
        for name, (weight, std) in expected.items():
            assert weight.std().item() == pytest.approx(std, rel=0.06), name
        assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.mlp.fc2.bias == 0)
    # Outside the blocks the standard init stays.
    assert net.head.weight.abs().max() <= 0.04


# ---- errors: one line, naming the numbers and what would fit ------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"patch": 5, "image_size": 32},
     "image size 32 is not divisible by the patch size 5; nearest patch sizes that divide it: 4 or 8"),
    ({"patch": 12, "image_size": 8},
     "image size 8 is not divisible by the patch size 12; nearest patch sizes that divide it: 8"),
    ({"width": 100, "heads": 3}, "width 100 is not divisible by 3 heads; nearest head counts that divide it: 2 or 4"),
    ({"depth": 0}, "ViT depth 0 is not valid: the depth is the number of transformer blocks, at least 1"),
    ({"unit": "pre-ln"}, "unknown unit 'pre-ln' (did you mean 'pre_ln'?); one of post_ln, pre_ln, deepnorm, rezero"),
    ({"unit": "full_preact"}, "unknown unit 'full_preact'; one of post_ln, pre_ln, deepnorm, rezero"),
    ({"pool": "max"}, "unknown pool 'max'; one of cls, mean"),
])
def test_impossible_shapes_are_one_line_errors(changes: dict, message: str) -> None:
    settings = {"depth": 2, "unit": None, **TINY, **changes}
    depth, classes = settings.pop("depth"), settings.pop("num_classes")
    with pytest.raises(DepthbenchError) as err:
        build_vit("v1", depth, classes, **settings)
    assert str(err.value) == message


# ---- the net as the trainer and the diagnostics use it ---------------------------------------------------------


def test_the_diagnostics_interface() -> None:
    net = tiny("post_ln", depth=3)
    assert net.units == list(net.stages[0]) and len(net.units) == 3 and net.checkpointing == 0
    assert [s for s, stage in enumerate(net.stages) for _ in stage] == [0, 0, 0]
    assert net.no_weight_decay() == {"stem.position", "stem.class_token"}
    assert net.no_weight_decay() <= set(net.state_dict())
    assert tiny("post_ln", pool="mean").no_weight_decay() == {"stem.position"}
    loss = net(torch.randn(2, 3, 16, 16)).square().sum()
    grads = torch.autograd.grad(loss, list(net.stem.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_channels_last_and_bf16_autocast_give_the_same_logits() -> None:
    torch.manual_seed(0)
    net = tiny("pre_ln").to(memory_format=torch.channels_last)
    images = torch.randn(4, 3, 16, 16)
    plain = net(images)
    assert plain.shape == (4, 10)
    torch.testing.assert_close(net(images.contiguous(memory_format=torch.channels_last)), plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(images.contiguous(memory_format=torch.channels_last))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), plain, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("unit", list(UNITS))
def test_a_tiny_vit_learns_a_fixed_batch(unit: str) -> None:
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
    torch.manual_seed(0)
    net = tiny(unit, num_classes=4)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(4), rel=0.1)
    assert losses[-1] < 0.5 * losses[0], losses


def test_model_from_config_builds_each_family() -> None:
    vit = RunConfig(name="t", version="v2", depth=2, seed=0,
                    model={"family": "vit", "width": 32, "heads": 2, "patch": 4, "pool": "mean"})
    net = model_from_config("v2", 2, vit.model, 10, 3, 16)
    assert isinstance(net, ViT) and net.unit == UNITS["pre_ln"] and net.stem.position.shape == (1, 16, 32)
    assert count_params(net) == 27_882  # TINY, mean pooling, pre_ln
    assert isinstance(model_from_config("v1", 8, ModelConfig(width=4), 10), ResNet)
    # A config object from before families existed, and only the ResNet fields it has.
    old = SimpleNamespace(block="basic", shortcut="A", width=4, unit=None)
    assert count_params(model_from_config("v1", 8, old, 10, 3)) == count_params(
        model_from_config("v1", 8, ModelConfig(width=4, block="basic"), 10))
    with pytest.raises(DepthbenchError, match=r"^model.heads, model.mlp_ratio, model.patch, model.pool not set on"):
        model_from_config("v1", 2, ModelConfig(family="vit"), 10)


# ---- the estimate: exact parameters, activations as bench measures them -------------------------------------


def _vit_run(unit: str, pool: str, precision: str, **model: object) -> RunConfig:
    return RunConfig(name="t", version="v1", depth=3, seed=0, dataset=DatasetConfig(),
                     model={"family": "vit", "width": 32, "heads": 2, "patch": 4, "mlp_ratio": 3.0, "pool": pool,
                            "unit": unit, **model},
                     train={"batch_size": 4, "precision": precision})


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("unit", list(UNITS))
def test_estimate_parameters_are_the_built_nets(unit: str, pool: str) -> None:
    cfg = _vit_run(unit, pool, "fp32")
    for side, classes, channels in ((16, 10, 3), (12, 100, 1)):
        built = model_from_config("v1", 3, cfg.model, classes, channels, side)
        assert parameter_count("v1", 3, cfg.model, classes, channels, image_size=side) == count_params(built)


@pytest.mark.parametrize(("unit", "pool", "precision", "side"), [
    ("post_ln", "cls", "fp32", 16), ("pre_ln", "cls", "fp32", 12), ("deepnorm", "mean", "fp32", 16),
    ("rezero", "cls", "fp32", 16), ("post_ln", "mean", "bf16", 12), ("pre_ln", "cls", "bf16", 16),
    ("rezero", "mean", "bf16", 16),
])
def test_activation_estimate_matches_bench_activation_mb(unit: str, pool: str, precision: str, side: int) -> None:
    """As for the ResNets (tests/test_estimate.py, 2%): the formula against the exact count of a real
    channels_last forward pass."""
    cfg = _vit_run(unit, pool, precision)
    torch.manual_seed(0)
    net = model_from_config("v1", 3, cfg.model, 10, 3, side).to(memory_format=torch.channels_last).train()
    images = torch.randn(4, 3, side, side).contiguous(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    measured = activation_mb(net, images, autocast) * 2**20
    assert activation_bytes(cfg, DataShape(3, side, 10, 100, 10)) == pytest.approx(measured, rel=0.02)


def test_memory_estimate_of_a_vit_grows_with_depth_by_one_block() -> None:
    shape = DataShape(3, 32, 10, 50_000, 10_000)
    runs = [RunConfig(name="t", version="v2", depth=depth, seed=0, model={"family": "vit"},
                      train={"precision": "fp32"}) for depth in (6, 12)]
    small, large = (estimate_memory(run, shape) for run in runs)
    assert (small.params, large.params) == (2_693_578, 5_362_762)  # width 192, 3 heads, patch 4
    assert small.segments == 0 and small.recompute_bytes == 0
    # Per image, a pre_ln block of 65 tokens saves 4(6 * 65 * 192 + 2 * 65 * 768) + 4 * 3 * 65 bytes, and its
    # two LayerNorms 2(4 * 65 * 192 + 8 * 65); its weights are counted once (4 bytes each).
    block = 4 * (6 * 65 * 192 + 2 * 65 * 768) + 4 * 3 * 65 + 2 * (4 * 65 * 192 + 8 * 65)
    weights = 4 * (4 * 192 * 192 + 2 * 192 * 768)
    assert large.activation_bytes - small.activation_bytes == 6 * (128 * block + weights)


# ---- the CLI ---------------------------------------------------------------------------------------------------


def test_models_lists_vit_depths_with_every_unit() -> None:
    result = runner.invoke(app, ["models", "--family", "vit", "--width", "32", "--heads", "2", "--patch", "4",
                                 "--image-size", "16", "--max-depth", "2"])
    assert result.exit_code == 0, result.output
    assert "post_ln params" in result.output and "rezero params" in result.output
    row = next(line for line in result.output.splitlines() if "27,946" in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")] == ["2", "27,882", "27,946", "27,882", "27,628",
                                                                      "0.001"]
    assert any(line.strip("│ ").startswith("1 ") for line in result.output.splitlines())


def test_models_default_vit_table_has_the_documented_depths() -> None:
    result = runner.invoke(app, ["models", "--family", "vit"])
    assert result.exit_code == 0, result.output
    assert "width 192, 3 heads, patch 4" in result.output
    for count in ("2,693,194", "5,362,762", "21,340,666"):  # d6 post_ln, d12 pre_ln, d48 rezero
        assert count in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--family", "vit", "--patch", "5"],
     "error: image size 32 is not divisible by the patch size 5; nearest patch sizes that divide it: 4 or 8\n"),
    (["--family", "vit", "--width", "100"],
     "error: width 100 is not divisible by 3 heads; nearest head counts that divide it: 2 or 4\n"),
    (["--heads", "2", "--pool", "mean"], "error: --heads, --pool are ViT options; add --family vit\n"),
    (["--family", "vitt"], "error: unknown family 'vitt' (did you mean 'vit'?); one of resnet, vit\n"),
])
def test_models_errors_are_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["models", *args])
    assert result.exit_code == 2
    assert result.output == message


class _AtenOps(TorchDispatchMode):
    """The aten ops a block of code runs, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _attention_ops(amp: bool) -> set[str]:
    torch.manual_seed(0)
    net = tiny("pre_ln")
    with _AtenOps() as ops, torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext():
        net(torch.randn(4, 3, 16, 16)).float().sum().backward()
    return ops.names


def test_cpu_bf16_attention_takes_the_math_path_and_fp32_the_fused_kernel() -> None:
    # The fused CPU kernel's bf16 backward is slower than the math path's matmuls (BENCHMARKS.md).
    fused = "_scaled_dot_product_flash_attention_for_cpu"
    assert fused in _attention_ops(amp=False)
    bf16 = _attention_ops(amp=True)
    assert fused not in bf16 and f"{fused}_backward" not in bf16 and "_safe_softmax" in bf16
    assert attention_name(torch.device("cpu"), torch.bfloat16) == "math"
    assert attention_name(torch.device("cpu"), None) == attention_name(torch.device("cuda"), torch.bfloat16) == "default"


def test_math_and_fused_attention_agree_in_bf16() -> None:
    torch.manual_seed(0)
    net = tiny("post_ln")
    images = torch.randn(8, 3, 16, 16)
    results = []
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        net.zero_grad()
        with patch("depthbench.models.vit.attention_kernel", lambda q, b=backend: sdpa_kernel(b)), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(images).float(), torch.arange(8) % 10)
        loss.backward()
        results.append((loss.detach(), net.stages[0][0].attn.qkv.weight.grad.clone()))
    (loss_math, grad_math), (loss_fused, grad_fused) = results
    torch.testing.assert_close(loss_math, loss_fused, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grad_math, grad_fused, atol=2e-3, rtol=0.1)
