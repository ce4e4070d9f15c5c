"""CIFAR ResNets of He et al., V1 (post-activation) and V2 (pre-activation), built from one rule.

[V1] He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", 2015, arXiv:1512.03385, Sec. 4.2.
[V2] He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", 2016, arXiv:1603.05027, Sec. 4 and
Appendix. A net is a 3x3 stem conv, three stages of ``n`` residual units and a pooled linear classifier.
Two unit shapes, one depth rule ``depth = 3 * layers_per_unit * n + 2``::

    block       weight layers of one unit           depth   stage outputs   paper nets
    basic       3x3 (out) -> 3x3 (out)              6n+2    w, 2w, 4w       20, 32, 44, 56, 110, 1202
    bottleneck  1x1 (out/4) -> 3x3 (out/4) -> 1x1   9n+2    4w, 8w, 16w     164, 1001

``w`` is the base width, 16 in both papers. The first unit of stages 2 and 3 downsamples with stride 2
on its first weight layer (the first 1x1 of a bottleneck, as in [V2]'s Appendix and its code,
resnet-1k-layers).

Parameters with a CIFAR-10 head, counted from the architecture (every conv, BN and FC parameter), beside
the papers' rounded values ([V1] Table 6, [V2] Table 3), and forward FLOPs of one 32x32 image
(:func:`forward_flops`)::

    net               block, shortcut   params        printed           FLOPs
    ResNet-20         basic, A             269,722    0.27M [V1] T6     81.1M
    ResNet-32         basic, A             464,154    0.46M            137.7M
    ResNet-44         basic, A             658,586    0.66M            194.3M
    ResNet-56         basic, A             853,018    0.85M            251.0M
    ResNet-110        basic, A           1,727,962    1.7M             505.8M
    ResNet-1202       basic, A          19,421,274    19.4M              5.66G
    ResNet-164 (v2)   bottleneck, B      1,703,258    1.7M [V2] T3     489.0M
    ResNet-1001 (v2)  bottleneck, B     10,327,706    10.2M [V2] T3      2.98G

V2 basic nets with option A have exactly the V1 counts: V1's BNs after the stem conv and the first conv
of the two downsampling units (16, 32 and 64 channels) become V2's BNs before those two convs (16 and 32)
and the final BN-ReLU (64).

Where BatchNorm and ReLU sit around the weight layers is data (:data:`PLACEMENTS`, [V2] Fig. 4 and
Table 2); so is what the shortcut does on units whose dimensions do not change (:data:`SHORTCUT_GATES`,
[V2] Fig. 2 and Table 1). Both basic and bottleneck units are the one :class:`ResidualUnit` class.

Two placements have no normalisation at all, for basic and bottleneck units:

- ``fixup`` ([Fixup] Zhang, Dauphin, Ma, "Fixup Initialization", 2019, arXiv:1901.09321, Sec. 3): the
  original unit with a learnable scalar bias before every conv and activation and a scalar multiplier
  ending each branch, ``y = ReLU(x + s * conv(ReLU(conv(x + a1) + b1) + a2) + b2)``; at init the last
  conv of every branch and the classifier are 0 and the other branch convs are He-initialised and scaled
  by L^(-1/(2m-2)) (L units of m weight layers), see :func:`_fixup_init`.
- ``skipinit`` ([SkipInit] De and Smith, "Batch Normalization Biases Residual Blocks Towards the Identity
  Function in Deep Networks", 2020, arXiv:2002.10444): the pre-activation unit without BN, a scalar bias
  after each conv, and a scalar gate alpha, 0 at init, ending each branch: ``y = x + alpha * f(x)``, so
  every unit whose shape stays starts as the identity.

Each scalar is one parameter, and BN's parameters go: a unit holds 5 scalars in fixup (7 in a
bottleneck) and 3 in skipinit (4), plus one after the stem conv and, in fixup, one before pooling.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from depthbench.architecture import BLOCKS, PLACEMENTS, VERSION_UNIT, Block, Placement, choice, resolve_block
from depthbench.families import FAMILIES


@dataclass(frozen=True)
class ShortcutGate:
    """What the shortcut h(x) does on units whose dimensions do not change ([V2] section 3.1, Fig. 2).

    ``shortcut_scale``/``residual_scale`` are the lambdas of constant scaling, ``bias`` the initial
    b_g of the gates' 1x1 conv, ``dropout`` the drop rate on the shortcut.
    """

    kind: str
    shortcut_scale: float = 1.0
    residual_scale: float = 1.0
    bias: float = 0.0
    dropout: float = 0.5

    def join(self, channels: int) -> nn.Module:
        return SHORTCUT_GATES[self.kind](channels, self)




# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class _GradInInputFormat(torch.autograd.Function):
    """Identity whose backward hands the gradient back in the input's memory format (channels_last).

    Some backward ops return a plain NCHW gradient for a channels_last input: strided slicing (option A's
    subsampling) and adaptive average pooling. Where that gradient meets channels_last ones (the sum at a
    shortcut's input, the ReLU before pooling), the elementwise CPU kernels fall off their fast path, many
    times slower than on aligned inputs. One copy here keeps every gradient channels_last. Values are
    untouched, so results are identical.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last) if ctx.channels_last else grad


class GradInInputFormat(nn.Module):
    """:class:`_GradInInputFormat` as a layer; no parameters, nothing saved for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GradInInputFormat.apply(x)


class ZeroPadShortcut(nn.Module):
    """[V1] option A: subsample by the stride and append zero channels; no parameters."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _GradInInputFormat.apply(x)[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"


class ScalarBias(nn.Module):
    """y = x + b with one learnable number b, 0 at init: the ``bias`` op of a placement ([Fixup]).

    b is a 0-dim tensor, not a 1-element one: under bf16 autocast a 0-dim fp32 operand leaves a bf16 map
    bf16, where a 1-element tensor would promote the whole map to fp32. The add saves nothing for backward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class ScalarMultiplier(nn.Module):
    """y = a * x with one learnable number a (0-dim, as :class:`ScalarBias`'s), ``init`` at init: the
    ``scale`` op (1, [Fixup]) and the ``gate`` op (0, [SkipInit]). The product saves x for a's gradient."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.init = init
        self.weight = nn.Parameter(torch.full((), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    def extra_repr(self) -> str:
        return f"init={self.init}"


class Sum(nn.Module):
    """y = h(x) + F(x), with ``shortcut`` as h: identity, projection, 1x1 conv or dropout."""

    def __init__(self, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + residual


class ScaledSum(nn.Module):
    """Constant scaling, [V2] Fig. 2(b): y = lambda_s * x + lambda_r * F(x)."""

    def __init__(self, shortcut_scale: float, residual_scale: float) -> None:
        super().__init__()
        self.shortcut_scale = shortcut_scale
        self.residual_scale = residual_scale

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.shortcut_scale * x + self.residual_scale * residual

    def extra_repr(self) -> str:
        return f"shortcut_scale={self.shortcut_scale}, residual_scale={self.residual_scale}"


class GatedSum(nn.Module):
    """Gating, [V2] Fig. 2(c, d): g = sigmoid(conv1x1(x) + b_g); y = (1 - g) * x + g * F(x) when
    ``exclusive``, else y = (1 - g) * x + F(x) (shortcut-only gating). ``bias_init`` is b_g at init."""

    def __init__(self, channels: int, bias_init: float, exclusive: bool) -> None:
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, 1, bias=True)
        self.bias_init = bias_init
        self.exclusive = exclusive

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(x))
        return (1 - g) * x + (g * residual if self.exclusive else residual)

    def extra_repr(self) -> str:
        return f"bias_init={self.bias_init}, exclusive={self.exclusive}"


SHORTCUT_GATES: dict[str, Callable[[int, ShortcutGate], nn.Module]] = {
    "identity": lambda c, g: Sum(),
    "constant_scaling": lambda c, g: ScaledSum(g.shortcut_scale, g.residual_scale),
    "exclusive_gating": lambda c, g: GatedSum(c, g.bias, exclusive=True),
    "shortcut_only_gating": lambda c, g: GatedSum(c, g.bias, exclusive=False),
    # [V2] Fig. 2(e): a learned 1x1 conv replaces the identity (no BN, as drawn there).
    "conv1x1": lambda c, g: Sum(nn.Conv2d(c, c, 1, bias=False)),
    # [V2] Fig. 2(f); nn.Dropout rescales kept values by 1/(1-p) in training, like Torch7's.
    "dropout": lambda c, g: Sum(nn.Dropout(g.dropout)),
}


def _activation(ops: Sequence[str], channels: int, suffix: str = "") -> list[tuple[str, nn.Module]]:
    """Named modules for a list of op names (:data:`depthbench.architecture.OPS`)."""
    make: dict[str, Callable[[], nn.Module]] = {
        "bn": lambda: nn.BatchNorm2d(channels),
        "relu": lambda: nn.ReLU(),
        "bias": ScalarBias,
        "scale": lambda: ScalarMultiplier(1.0),
        "gate": lambda: ScalarMultiplier(0.0),
    }
    return [(f"{op}{suffix}", make[op]()) for op in ops]


def _layer(before: Sequence[str], conv: nn.Conv2d, after: Sequence[str], c_in: int, c_out: int,
           i: int) -> list[tuple[str, nn.Module]]:
    """Weight layer ``i``: its ops before the conv, ``conv{i}``, its ops after. Modules are named by op
    and layer (bn1, relu1); an op on both sides of the conv takes the Fixup code's a/b (bias1a, bias1b)."""
    twins = set(before) & set(after)

    def named(ops: Sequence[str], channels: int, side: str) -> list[tuple[str, nn.Module]]:
        return [(name + side if op in twins else name, module)
                for op, (name, module) in zip(ops, _activation(ops, channels, str(i)), strict=True)]

    return [*named(before, c_in, "a"), (f"conv{i}", conv), *named(after, c_out, "b")]


class ResidualUnit(nn.Module):
    """One residual unit, y = after_add(join(x, F(x))), for any block shape and placement.

    - ``branch`` is the residual function F: the weight layers of ``block`` with BN/ReLU (or the scalar
      ops of the normalisation-free units) placed as ``placement`` says; layer modules are named
      ``conv1, bn1, relu1, conv2, ...``, and ``bias1a, conv1, bias1b`` where an op sits on both sides.
    - ``join`` adds the shortcut: a :class:`ShortcutGate` on units whose dimensions stay, else a
      projection: option A (:class:`ZeroPadShortcut`) or B (1x1 conv, with BN in post-activation units,
      without in pre-activation units and in fixup, whose shared scalar bias pre-activates it).
    - ``preact`` is empty except in pre-activation units whose dimensions change: there the
      pre-activation is computed once and both the branch and the projection take it ("projection
      shortcuts are also with pre-activation", [V2] appendix; resnet-1k-layers). Elsewhere the
      shortcut sees the untouched x, keeping the clean identity path of [V2] section 3. Fixup's first
      scalar bias counts as a pre-activation, so its shortcut takes x + a1 there, as the Fixup code's does.
    - ReLUs are not in-place: the relu_only_preact and skipinit branches start with a ReLU on x, which
      the shortcut still needs.
    """

    def __init__(
        self,
        block: Block,
        placement: Placement,
        in_channels: int,
        out_channels: int,
        stride: int,
        shortcut: str,
        gate: ShortcutGate,
    ) -> None:
        super().__init__()
        inner = out_channels // block.expansion
        layers: list[tuple[str, nn.Module]] = []
        c_in = in_channels
        for i, kernel in enumerate(block.kernels, start=1):
            is_last = i == len(block.kernels)
            c_out = out_channels if is_last else inner
            before, after = placement.split(placement.last if is_last else placement.layer)
            conv = nn.Conv2d(c_in, c_out, kernel, stride=stride if i == 1 else 1, padding=kernel // 2, bias=False)
            layers += _layer(before, conv, after, c_in, c_out, i)
            c_in = c_out

        reshapes = stride != 1 or in_channels != out_channels
        shared = len(placement.preact) if reshapes else 0
        self.preact = nn.Sequential(OrderedDict(layers[:shared]))
        self.branch = nn.Sequential(OrderedDict(layers[shared:]))
        if not reshapes:
            self.join = gate.join(out_channels)
        elif shortcut == "A":
            self.join = Sum(ZeroPadShortcut(out_channels - in_channels, stride))
        else:
            projection = [("conv", nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))]
            if not placement.preact:
                projection.append(("bn", nn.BatchNorm2d(out_channels)))
            self.join = Sum(nn.Sequential(OrderedDict(projection)))
        self.after_add = nn.Sequential(OrderedDict(_activation(placement.after_add.split(), out_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preact(x)
        return self.after_add(self.join(x, self.branch(x)))


class ResNet(nn.Module):
    """stem -> ``stages`` (3 x ``n`` :class:`ResidualUnit`) -> ``head`` (final activation, pooling) -> ``fc``.

    ``units`` lists every residual unit in forward order. With ``checkpointing = k > 0`` each stage
    runs as ``min(k, n)`` activation-checkpointed segments when training with grad enabled.
    """

    def __init__(
        self,
        block: Block,
        n: int,
        placement: Placement,
        *,
        shortcut: str,
        gate: ShortcutGate,
        width: int,
        num_classes: int,
        in_channels: int,
        checkpointing: int,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self._segments_built: tuple[int, list[tuple[nn.Sequential, Callable[[], tuple[Any, Any]]]]] | None = None
        stem_conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem = nn.Sequential(OrderedDict([("conv", stem_conv), *_activation(placement.after_conv, width)]))
        stages = []
        c_in = width
        for s, c_out in enumerate(block.stage_widths(width)):
            units = []
            for i in range(n):
                stride = 2 if s > 0 and i == 0 else 1
                units.append(ResidualUnit(block, placement, c_in, c_out, stride, shortcut, gate))
                c_in = c_out
            stages.append(nn.Sequential(*units))
        self.stages = nn.ModuleList(stages)
        pool = [("grad_format", GradInInputFormat()), ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
        self.head = nn.Sequential(OrderedDict([*_activation(placement.preact, c_in), *pool]))
        self.fc = nn.Linear(c_in, num_classes)
        self.apply(_init_weights)
        if placement.init == "fixup":
            _fixup_init(self)

    @property
    def units(self) -> list[ResidualUnit]:
        return [unit for stage in self.stages for unit in stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        checkpointed = self.checkpointing > 0 and self.training and torch.is_grad_enabled()
        if not checkpointed:
            for stage in self.stages:
                x = stage(x)
            return self.fc(self.head(x))
        for segment, context_fn in self._segment_plan():
            x = checkpoint(segment, x, use_reentrant=False, context_fn=context_fn)
        return self.fc(self.head(x))

    def _segment_plan(self) -> list[tuple[nn.Sequential, Callable[[], tuple[Any, Any]]]]:
        """Every checkpointed segment in forward order with its recomputation context, built once per
        ``checkpointing`` value rather than on every forward (slicing a stage makes a new Sequential).
        A tuple is not a submodule, so the segments' units are not listed twice in ``state_dict``; they are
        the stages' own units, so ``.to()`` and loading reach them.
        """
        if self._segments_built is None or self._segments_built[0] != self.checkpointing:
            segments = [seg for stage in self.stages for seg in _segments(stage, self.checkpointing)]
            self._segments_built = (self.checkpointing, [(seg, _bn_stats_frozen_on_recompute(seg)) for seg in segments])
        return self._segments_built[1]


def _segments(stage: nn.Sequential, k: int) -> Iterator[nn.Sequential]:
    """``min(k, len(stage))`` contiguous runs of units, as even as possible."""
    k = min(k, len(stage))
    bounds = [round(i * len(stage) / k) for i in range(k + 1)]
    for start, stop in zip(bounds, bounds[1:]):
        yield stage[start:stop]


def _bn_stats_frozen_on_recompute(segment: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """A ``context_fn`` for checkpoint: the forward runs as usual, the recomputation in backward leaves
    the BN running statistics and ``num_batches_tracked`` as the forward left them, so they are updated
    once per step (PyTorch issue #96136). The recomputation still normalises with batch statistics, as
    the forward did. Momentum 0 makes the running update ``1 * running + 0 * batch``, exactly a no-op;
    switching ``track_running_stats`` off instead would save fewer tensors than the forward did, which
    checkpoint rejects. Not usable under torch.compile, which only accepts TorchDispatchMode contexts here.
    """

    bns = [m for m in segment.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]

    @contextlib.contextmanager
    def frozen() -> Iterator[None]:
        saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in bns]
        for bn in bns:
            bn.momentum = 0.0
        try:
            yield
        finally:
            for bn, (momentum, batches) in zip(bns, saved):
                bn.momentum = momentum
                bn.num_batches_tracked.copy_(batches)

    return lambda: (contextlib.nullcontext(), frozen())


def _init_weights(module: nn.Module) -> None:
    """He init ([V1] section 3.4; He et al. 2015 "Delving deep into rectifiers"): normal with
    std sqrt(2 / fan_out) for convs, as resnet-1k-layers and fb.resnet.torch do; BN gamma 1, beta 0;
    the FC keeps PyTorch's default weights with a zero bias (fb.resnet.torch). ``nn.Module.apply``
    visits children first, so a gate's b_g overrides the zero bias its conv got."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)
    elif isinstance(module, GatedSum):
        nn.init.constant_(module.gate.bias, module.bias_init)
    elif isinstance(module, ScalarBias):
        nn.init.zeros_(module.bias)
    elif isinstance(module, ScalarMultiplier):
        nn.init.constant_(module.weight, module.init)


def _fixup_init(model: ResNet) -> None:
    """[Fixup] section 3, after the He init of :func:`_init_weights`: with L residual branches of m weight
    layers each, the last conv of every branch and the classifier (weight and bias) start at 0, the other
    branch convs at He init scaled by L^(-1/(2m-2)): L^(-1/2) for basic units, L^(-1/4) for bottlenecks.

    Scaling the He-drawn weights in place is the same distribution as drawing them with the scaled std,
    and draws nothing more from the RNG. As in the Fixup code, the stem and projection shortcuts keep the
    plain He init: they are not in a branch. The scalar biases (0) and multipliers (1) are already set.
    """
    units = model.units
    for unit in units:
        convs = [m for m in unit.branch.modules() if isinstance(m, nn.Conv2d)]
        factor = len(units) ** (-1 / (2 * len(convs) - 2))
        with torch.no_grad():
            for conv in convs[:-1]:
                conv.weight.mul_(factor)
        nn.init.zeros_(convs[-1].weight)
    nn.init.zeros_(model.fc.weight)
    nn.init.zeros_(model.fc.bias)


def build_model(
    version: str,
    depth: int,
    num_classes: int = 10,
    *,
    block: str = "auto",
    shortcut: str = "auto",
    width: int = 16,
    unit: str | None = None,
    shortcut_gate: str = "identity",
    shortcut_scale: float = 1.0,
    residual_scale: float = 1.0,
    gate_bias: float = 0.0,
    shortcut_dropout: float = 0.5,
    checkpointing: int = 0,
    in_channels: int = 3,
) -> ResNet:
    """A CIFAR ResNet of ``version`` v1 ([V1], original units) or v2 ([V2], full pre-activation units).

    ``unit`` overrides the placement that the version implies (a key of :data:`PLACEMENTS`).
    ``shortcut`` is the shortcut where dimensions change: A (zero-pad) or B (1x1 projection);
    ``auto`` is A for basic nets ([V1] CIFAR) and B for bottleneck nets ([V2], resnet-1k-layers).
    ``shortcut_gate`` and its settings change the shortcut of the other units (:data:`SHORTCUT_GATES`).
    """
    choice("version", version, VERSION_UNIT)
    placement = PLACEMENTS[choice("unit", unit or VERSION_UNIT[version], PLACEMENTS)]
    choice("shortcut", shortcut, ("auto", "A", "B"))
    gate_kind = choice("shortcut_gate", shortcut_gate, SHORTCUT_GATES)
    gate = ShortcutGate(gate_kind, shortcut_scale, residual_scale, gate_bias, shortcut_dropout)
    block_name, n = resolve_block(depth, block)
    if shortcut == "auto":
        shortcut = "A" if block_name == "basic" else "B"
    return ResNet(
        BLOCKS[block_name],
        n,
        placement,
        shortcut=shortcut,
        gate=gate,
        width=width,
        num_classes=num_classes,
        in_channels=in_channels,
        checkpointing=checkpointing,
    )


# The fields of a ModelConfig that a ResNet reads: those every family reads, and the ResNet's own.
_RESNET_FIELDS = ("width", "unit", *FAMILIES["resnet"].own_settings)


def model_from_config(version: str, depth: int, model_cfg: Any, num_classes: int, in_channels: int = 3) -> ResNet:
    """``build_model`` with the ResNet fields of a :class:`depthbench.config.ModelConfig`; a field the
    config lacks keeps ``build_model``'s default."""
    settings = {name: getattr(model_cfg, name) for name in _RESNET_FIELDS if hasattr(model_cfg, name)}
    return build_model(version, depth, num_classes, in_channels=in_channels, **settings)


def count_params(model: nn.Module) -> int:
    """All parameters, BN's gamma and beta included (as the papers count them)."""
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, image_size: int = 32, in_channels: int = 3) -> int:
    """FLOPs of one forward pass of one image: 2 x the multiply-accumulates of every conv and linear
    layer, measured with forward hooks on a dummy input. BN, ReLU, additions, gates' sigmoids, pooling
    and biases are not counted. ResNet-20 comes to 2 x 40.55M multiply-accumulates; [V1] Sec. 4.2 quotes ~41M.
    The model is run in eval mode under no_grad, so its BN statistics and train/eval modes are untouched.
    """
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs += output.numel() * per_output
        else:
            macs += output.numel() * module.in_features

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = [m.register_forward_hook(count) for m in layers]
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes.items():
            m.training = training
    return 2 * macs
