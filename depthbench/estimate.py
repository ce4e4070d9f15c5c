"""What a run needs before anything is built: its parameter count and its training memory on the device.

A run that cannot fit its device is refused up front, in one line that says what would fit, instead of
being built: a valid but huge depth would otherwise take minutes to build and then run out of memory.
Everything here is arithmetic on the config and the dataset's shape; no module is built and no tensor
allocated, so even absurd configs are answered at once.

Parameters are exact: the net is walked by the same rule :class:`depthbench.models.ResNet` builds it
(stem, three stages of units whose layers follow the block and the placement, the shortcut or gate,
the head), counting what each layer holds. ``tests/test_estimate.py`` checks every variant against
``count_params`` of the built net.

Training memory on the device is the sum of:

- model state: weights, gradients and SGD momentum (AdamW: two moments), 4 bytes per parameter each
  (fp32 also under bf16 autocast, which adds its bf16 copies of the weights for the forward pass: 2
  bytes per parameter);
- data: the uint8 train and test images and their int64 labels, which the trainer moves to the device
  whole (as airbench does: Jordan 2024, arXiv:2404.00498), and the epoch's permutation. On CPU the
  "device copy" is the loaded dataset itself, already resident when a run is checked, so only the
  permutation counts;
- activations: what one training forward pass saves for backward at ``train.batch_size``, traced op
  by op through the units (:class:`_Trace`); this is the quantity ``bench.activation_mb`` measures.
  Under bf16 autocast every map after the stem's input is stored in bf16. With ``model.checkpointing``
  = k segments per stage only the segments' inputs stay, and backward recomputes one segment at a time,
  whose activations come on top (``recompute_bytes``);
- transient: the batch being prepared and the gradient maps in flight in backward, or the evaluation
  pass (``train.eval_batch_size``, inference mode, no saved tensors), whichever is larger;
- an allowance for the allocator: a share of the above, plus workspaces on CUDA.

What autograd saves, per op (as PyTorch 2.x does on CPU and CUDA, in any memory format)::

    conv           its input (and under autocast, its bf16 copy of the weight)
    batch norm     its input, and four per-channel vectors (running and batch statistics)
    relu, sigmoid  its output
    scale, gate    its input (a learnable scalar times a map: the map is needed for the scalar's gradient)
    add, zero-pad shortcut, constant scaling, scalar bias, average pooling, flatten: nothing
    gated sum      (1 - g) and x; exclusive gating also g and the residual
    dropout        its mask: a float tensor on CPU, a bool tensor on CUDA (fused kernel)
    linear         its input and the (transposed view or bf16 copy of the) weight

A ViT (``model.family: vit``) is ``depth`` identical blocks, so what it saves is a formula rather than a
trace (:func:`_vit_footprint`). Per image, with T tokens, width w, MLP width h, H heads and e bytes per
activation element (4, or 2 under bf16 autocast); on CPU this is exact::

    patch embedding      the image (e per pixel; under autocast also the bf16 copy of the conv weight)
    every linear         its input (e: under autocast a bf16 copy of the fp32 stream) and its weight, as above
    attention            q, k, v and the output (4Tw, e) and the logsumexp (HT, fp32); the fused kernel
                         keeps no T x T scores (CUDA's kernels may pad the logsumexp and keep an RNG state).
                         On a CPU in bf16 the math path runs (devices.attention_kernel): it keeps q and k
                         scaled and k transposed as well (3Tw, e) and the attention weights (HT^2, fp32),
                         and no logsumexp
    GELU                 its input, the MLP's hidden map (Th)
    LayerNorm            its input (Tw, fp32: autocast runs LayerNorm in fp32, and the residual stream stays
                         fp32 from the fp32 position embedding on), its mean and 1/std (2T, fp32)
    ReZero's a * F(x)    F(x) (Tw, e), for a's gradient
    alpha * x, additions, the class token's concatenation, mean pooling: nothing
    head                 its input: without autocast and with a class token the view of all T tokens it is
                         selected from (Tw, fp32), else the w pooled values

So a block saves e(6Tw + 2Th) + 4HT bytes (e(9Tw + 2Th) + 4HT^2 on a CPU in bf16) (the qkv input, q, k, v, the attention output, the MLP's input
and its hidden map before and after the GELU), plus 2(4Tw + 8T) for its two LayerNorms (post_ln, pre_ln,
deepnorm) or 2eTw for ReZero's two gated products; pre_ln's final LayerNorm adds 4Tw + 8T. A ViT does not
checkpoint.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from depthbench.architecture import BLOCKS, PLACEMENTS, VERSION_UNIT, Block, Placement, resolve_block
from depthbench.config import DatasetConfig, ModelConfig, RunConfig
from depthbench.data import TensorData
from depthbench.devices import release_freed_memory, resolve_device, resolve_precision
from depthbench.errors import DepthbenchError
from depthbench.transformer import UNITS, VIT_VERSION_UNIT, mlp_hidden, vit_param_count, vit_settings, vit_tokens

# Bytes per input pixel of the batch being prepared: the uint8 gather, the padded crop, the float
# normalisation and its channels_last copy (train.py's TrainingSetup.batch).
BATCH_BYTES_PER_PIXEL = 24
# Maps alive at once outside the saved ones: in backward the incoming and outgoing gradient and the
# shortcut's; in inference a unit's input, its branch and their sum.
LIVE_MAPS = 3
# The allocator's share on top of the tensors (rounding, caching, fragmentation); CPU resident sets can
# run higher with glibc's malloc, so a refusal means the tensors themselves cannot fit.
ALLOCATOR_SHARE = 0.2
# cuDNN and cuBLAS workspaces (cudnn.benchmark tries algorithms that need some).
CUDA_WORKSPACES = 256 * 2**20


@dataclass(frozen=True)
class DataShape:
    """What of a dataset sizes a run: image channels and side, classes, and the split sizes (the training
    split's without the validation split held out of it)."""

    channels: int
    image_size: int
    num_classes: int
    train_size: int
    test_size: int
    val_size: int = 0

    @classmethod
    def of(cls, data: TensorData) -> DataShape:
        return cls(data.in_channels, data.image_size, data.num_classes, len(data.train_y), len(data.test_y),
                   len(data.val_y))

    @property
    def pixels(self) -> int:
        """Bytes of one uint8 image."""
        return self.channels * self.image_size**2


# Sizes of the datasets whose shape the config alone tells (data.py); imagefolder needs its files.
_KNOWN = {  # name: (channels, default side, classes or None for dataset.num_classes, train, test)
    "cifar10": (3, 32, 10, 50_000, 10_000),
    "cifar100": (3, 32, 100, 50_000, 10_000),
    "digits": (1, 32, 10, 1437, 360),
    "synthetic": (3, 32, None, 1024, 256),
}


def known_shape(dataset: DatasetConfig) -> DataShape | None:
    """The shape of ``dataset`` without loading it, or None where only its files tell (imagefolder)."""
    if dataset.name not in _KNOWN:
        return None
    channels, side, classes, train, test = _KNOWN[dataset.name]
    if dataset.name == "synthetic":
        train, test = dataset.train_subset or train, dataset.test_subset or test
    else:
        train, test = min(dataset.train_subset or train, train), min(dataset.test_subset or test, test)
    val = min(dataset.val_size(train), train)  # one too large is refused when the data is loaded
    return DataShape(channels, dataset.image_size or side, classes or dataset.num_classes, train - val, test, val)


# ---------------------------------------------------------------------------------------------
# The net, traced without building it


@dataclass(frozen=True)
class _Map:
    """A feature map of the traced forward pass: an identity, channels and (square) side, per image."""

    id: int
    channels: int
    side: int

    @property
    def elements(self) -> int:
        return self.channels * self.side**2


class _Trace:
    """A symbolic forward pass: each op makes new maps and records what autograd would save for backward.

    Saved maps are kept by identity, so a map that two ops save (a ReLU's output and the next conv's
    input) counts once, as ``bench.activation_mb`` counts a storage once.
    """

    def __init__(self, elem: int, mask_elem: int) -> None:
        self.elem = elem  # bytes per activation element: 4 (fp32) or 2 (bf16 autocast)
        self.mask_elem = mask_elem  # bytes per element of a dropout mask
        self.saved: dict[int, tuple[int, Any]] = {}  # map id -> (bytes per image, part of the net)
        self.fixed = 0  # saved bytes that do not grow with the batch
        self.params = 0
        self.largest = 0  # elements per image of the largest map
        self.part: Any = "stem"
        self._ids = itertools.count()

    def new(self, channels: int, side: int) -> _Map:
        m = _Map(next(self._ids), channels, side)
        self.largest = max(self.largest, m.elements)
        return m

    def save(self, m: _Map, elem: int | None = None, times: int = 1) -> None:
        """Record ``m`` as saved; ``times`` > 1 stands for that many distinct maps of its shape."""
        if m.id not in self.saved:
            self.saved[m.id] = (times * m.elements * (elem or self.elem), self.part)

    def conv(self, x: _Map, channels: int, kernel: int, stride: int = 1, bias: bool = False) -> _Map:
        self.save(x)
        weights = x.channels * channels * kernel * kernel
        self.params += weights + (channels if bias else 0)
        if self.elem == 2:
            self.fixed += 2 * weights  # autocast's bf16 copy of the weight, saved with the input
        return self.new(channels, _conv_side(x.side, kernel, stride))

    def bn(self, x: _Map) -> _Map:
        self.save(x)
        self.params += 2 * x.channels
        self.fixed += 4 * 4 * x.channels  # fp32 running mean and var, batch mean and inverse std
        return self.new(x.channels, x.side)

    def relu(self, x: _Map) -> _Map:
        y = self.new(x.channels, x.side)
        self.save(y)
        return y

    def bias(self, x: _Map) -> _Map:
        """x + b, b one learnable number (models.ScalarBias): the add saves nothing."""
        self.params += 1
        return self.new(x.channels, x.side)

    def scale(self, x: _Map) -> _Map:
        """a * x, a one learnable number (models.ScalarMultiplier, the scale and gate ops): x is saved for
        a's gradient (a itself is a parameter, which bench does not count). The 0-dim a keeps bf16 maps bf16."""
        self.save(x)
        self.params += 1
        return self.new(x.channels, x.side)

    def ops(self, names: Iterable[str], x: _Map) -> _Map:
        table = {"bn": self.bn, "relu": self.relu, "bias": self.bias, "scale": self.scale, "gate": self.scale}
        for name in names:
            x = table[name](x)
        return x

    def linear(self, x: _Map, features: int) -> _Map:
        self.save(x)
        self.params += x.channels * features + features
        self.fixed += x.channels * features * self.elem  # the weight's transposed view, or its bf16 copy
        return self.new(features, 1)

    def saved_bytes(self, part: Any = None) -> int:
        """Per image, of the whole net or of one part ("stem", a stage index, "head")."""
        return sum(b for b, where in self.saved.values() if part is None or where == part)


def _conv_side(side: int, kernel: int, stride: int) -> int:
    return (side + 2 * (kernel // 2) - kernel) // stride + 1


@dataclass(frozen=True)
class _Net:
    """The net a config describes, as models.build_model resolves it."""

    block: Block
    n: int
    placement: Placement
    shortcut: str
    gate: str
    dropout: float
    width: int
    num_classes: int
    in_channels: int
    side: int


def _net(version: str, depth: int, model: ModelConfig, num_classes: int, in_channels: int, side: int) -> _Net:
    block_name, n = resolve_block(depth, model.block)
    shortcut = model.shortcut if model.shortcut != "auto" else ("A" if block_name == "basic" else "B")
    return _Net(BLOCKS[block_name], n, PLACEMENTS[model.unit or VERSION_UNIT[version]], shortcut,
                model.shortcut_gate, model.shortcut_dropout, model.width, num_classes, in_channels, side)


def _unit(tr: _Trace, net: _Net, x: _Map, out: int, stride: int) -> _Map:
    """One residual unit, op for op as models.ResidualUnit builds and runs it."""
    block, placement = net.block, net.placement
    inner = out // block.expansion
    layers: list[tuple[str, int, int, int]] = []  # (op, conv channels, kernel, stride)
    for i, kernel in enumerate(block.kernels, start=1):
        is_last = i == len(block.kernels)
        before, after = placement.split(placement.last if is_last else placement.layer)
        conv = ("conv", out if is_last else inner, kernel, stride if i == 1 else 1)
        layers += [*((op, 0, 0, 0) for op in before), conv, *((op, 0, 0, 0) for op in after)]
    reshapes = stride != 1 or x.channels != out
    shared = len(placement.preact) if reshapes else 0
    x = _layers(tr, layers[:shared], x)
    residual = _layers(tr, layers[shared:], x)
    if not reshapes:
        _gate(tr, net, x, residual)
    elif net.shortcut == "A":
        pass  # subsample and zero-pad: nothing to save, no parameters
    else:
        projection = tr.conv(x, out, 1, stride)
        if not placement.preact:
            tr.bn(projection)
    return tr.ops(placement.after_add.split(), tr.new(out, residual.side))


def _layers(tr: _Trace, layers: list[tuple[str, int, int, int]], x: _Map) -> _Map:
    for op, channels, kernel, stride in layers:
        x = tr.conv(x, channels, kernel, stride) if op == "conv" else tr.ops([op], x)
    return x


def _gate(tr: _Trace, net: _Net, x: _Map, residual: _Map) -> None:
    """The shortcut of a unit whose shape stays (models.SHORTCUT_GATES)."""
    if net.gate in ("exclusive_gating", "shortcut_only_gating"):
        g = tr.relu(tr.conv(x, x.channels, 1, bias=True))  # sigmoid: saves its output, as a ReLU does
        tr.save(tr.new(x.channels, x.side))  # 1 - g, saved by its product with x
        tr.save(x)
        if net.gate == "exclusive_gating":
            tr.save(g)
            tr.save(residual)
    elif net.gate == "conv1x1":
        tr.conv(x, x.channels, 1)
    elif net.gate == "dropout" and net.dropout > 0:  # p = 0 returns its input untouched
        tr.save(tr.new(x.channels, x.side), elem=tr.mask_elem)


def _trace(net: _Net, n: int, segments: int, elem: int, mask_elem: int) -> _Trace:
    """The net with ``n`` units per stage; with ``segments`` > 0 each stage is that many checkpointed
    segments, of which autograd keeps only the inputs (their units are not traced)."""
    tr = _Trace(elem, mask_elem)
    x = tr.conv(tr.new(net.in_channels, net.side), net.width, 3)
    x = tr.ops(net.placement.after_conv, x)
    for s, out in enumerate(net.block.stage_widths(net.width)):
        tr.part = s
        stride = 2 if s > 0 else 1
        if segments:
            k = min(segments, n)
            side = _conv_side(x.side, net.block.kernels[0], stride)
            tr.save(x)  # the first segment's input: the stage's input
            if k > 1:
                tr.save(tr.new(out, side), times=k - 1)  # the inputs of the other segments
            x = tr.new(out, side)
            continue
        for i in range(n):
            x = _unit(tr, net, x, out, stride if i == 0 else 1)
    tr.part = "head"
    x = tr.ops(net.placement.preact, x)
    tr.linear(tr.new(x.channels, 1), net.num_classes)  # global average pooling saves nothing
    return tr


@dataclass(frozen=True)
class _Footprint:
    """Per-net figures that do not depend on the batch size."""

    params: int
    saved: int  # bytes per image saved for backward
    saved_fixed: int  # saved bytes independent of the batch
    recompute: int  # bytes per image of the largest checkpointed segment recomputed in backward
    largest: int  # elements per image of the largest map
    segments: int  # checkpointed segments per stage (0: off)


@functools.lru_cache(maxsize=256)
def _footprint(net: _Net, checkpointing: int, elem: int, mask_elem: int) -> _Footprint:
    """Traced on 1-3 units per stage and extrapolated: from two units on, every added unit adds the same."""
    n = net.n

    def plain(units: int) -> _Trace:
        return _trace(replace(net, n=units), units, 0, elem, mask_elem)

    traces = [plain(units) for units in range(1, min(n, 3) + 1)]

    def extrapolate(figure: Callable[[_Trace], int]) -> int:
        values = [figure(t) for t in traces]
        if n <= 3:
            return values[-1]
        return values[1] + (n - 2) * (values[2] - values[1])

    params = extrapolate(lambda t: t.params)
    if not checkpointing:
        return _Footprint(params, extrapolate(lambda t: t.saved_bytes()), extrapolate(lambda t: t.fixed), 0,
                          traces[-1].largest, 0)
    k = min(checkpointing, n)
    ckpt = _trace(net, n, k, elem, mask_elem)
    # A segment's activations, recomputed in backward: the first unit of a stage, then each further one.
    recompute = 0
    for s in range(3):
        first = traces[0].saved_bytes(s)
        per_unit = traces[-1].saved_bytes(s) - traces[-2].saved_bytes(s) if n > 1 else 0
        longest = math.ceil(n / k)
        recompute = max(recompute, first + (round(n / k) - 1) * per_unit, longest * per_unit)
    return _Footprint(params, ckpt.saved_bytes(), ckpt.fixed, recompute, traces[-1].largest, k)


def parameter_count(version: str, depth: int, model: ModelConfig | None = None, num_classes: int = 10,
                    in_channels: int = 3, image_size: int = 32) -> int:
    """Parameters of the net ``models.model_from_config`` builds for these settings, without building it.
    ``image_size`` matters to a ViT only (its position embedding has one vector per patch)."""
    model = model or ModelConfig()
    if model.family == "vit":
        return _vit_footprint(version, depth, model, num_classes, in_channels, image_size, 4).params
    net = _net(version, depth, model, num_classes, in_channels, 32)
    return _footprint(net, 0, 4, 4).params


def autocast_bf16(precision: str, device_type: str) -> bool:
    """Whether the trainer runs ``train.precision`` under bf16 autocast on a ``device_type`` device here: what
    :func:`depthbench.devices.resolve_precision` picks. A CUDA device this machine lacks (a sweep planned
    here for a GPU elsewhere) is taken to compute bf16 natively, as every recent GPU does."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return precision != "fp32"
    return resolve_precision(precision, torch.device(device_type)) is not None


def _precision_bytes(cfg: RunConfig, device_type: str, bf16: bool | None) -> int:
    if bf16 is None:
        bf16 = autocast_bf16(cfg.train.precision, device_type)
    return 2 if bf16 else 4


def activation_bytes(cfg: RunConfig, shape: DataShape, device_type: str = "cpu", bf16: bool | None = None) -> int:
    """Bytes one training forward pass of ``cfg`` saves for backward at its batch size: what
    ``bench.activation_mb`` measures (with checkpointing: the segments' inputs, not the recomputation)."""
    fp = _run_footprint(cfg, shape, device_type, bf16)
    return fp.saved * cfg.train.batch_size + fp.saved_fixed


def _run_footprint(cfg: RunConfig, shape: DataShape, device_type: str, bf16: bool | None) -> _Footprint:
    elem = _precision_bytes(cfg, device_type, bf16)
    if cfg.model.family == "vit":
        return _vit_footprint(cfg.version, cfg.depth, cfg.model, shape.num_classes, shape.channels,
                              shape.image_size, elem, math_attention=device_type == "cpu" and elem == 2)
    net = _net(cfg.version, cfg.depth, cfg.model, shape.num_classes, shape.channels, shape.image_size)
    return _footprint(net, cfg.model.checkpointing, elem, 1 if device_type == "cuda" else elem)


# ---------------------------------------------------------------------------------------------
# The ViT, by formula


def _vit_footprint(version: str, depth: int, model: ModelConfig, num_classes: int, in_channels: int, side: int,
                   elem: int, math_attention: bool = False) -> _Footprint:
    """A ViT's parameters and saved bytes, as models.ViT runs it: the formula of the module docstring."""
    settings = vit_settings(model)
    unit = settings.pop("unit") or VIT_VERSION_UNIT[version]
    params = vit_param_count(depth, **settings, unit=unit, image_size=side, in_channels=in_channels,
                             num_classes=num_classes)
    rule, w, heads = UNITS[unit], settings["width"], settings["heads"]
    hidden = mlp_hidden(w, settings["mlp_ratio"])
    t = vit_tokens(patch=settings["patch"], image_size=side, pool=settings["pool"])
    layer_norm = 4 * t * w + 2 * 4 * t  # fp32 input, mean and 1/std
    if math_attention:  # scaled q and k, the transposed k, and the fp32 T x T weights; no logsumexp
        block = elem * (9 * t * w + 2 * t * hidden) + 4 * heads * t * t
    else:
        block = elem * (6 * t * w + 2 * t * hidden) + 4 * heads * t
    block += 2 * elem * t * w if rule.gate else rule.norms_per_block * layer_norm
    head = layer_norm if rule.final_norm else 0
    # Without autocast the head's input is a view, and autograd keeps the storage it views: every token.
    head += 4 * t * w if elem == 4 and settings["pool"] == "cls" else elem * w
    saved = elem * in_channels * side**2 + depth * block + head
    weights = depth * (4 * w * w + 2 * w * hidden) + w * num_classes  # every linear's
    fixed = elem * weights + (2 * in_channels * settings["patch"] ** 2 * w if elem == 2 else 0)
    largest = max(in_channels * side**2, 3 * t * w, t * hidden)
    return _Footprint(params, saved, fixed, 0, largest, 0)


# ---------------------------------------------------------------------------------------------
# Training memory


@dataclass(frozen=True)
class Estimate:
    """A run's training memory on its device, in bytes, by what holds it."""

    params: int
    batch_size: int
    segments: int  # checkpointed segments per stage; 0 when checkpointing is off
    model_bytes: int  # weights, gradients, momentum (and bf16 weight copies)
    data_bytes: int  # the dataset's copy on the device and the epoch's permutation
    activation_bytes: int  # saved for backward by one forward pass
    recompute_bytes: int  # checkpointing: one segment's activations, recomputed in backward
    transient_bytes: int  # the batch and gradients in flight, or the evaluation pass
    overhead_bytes: int  # allocator and workspaces
    graph_bytes: int = 0  # a CUDA-graphed step's private memory pool

    @property
    def total(self) -> int:
        return (self.model_bytes + self.data_bytes + self.activation_bytes + self.recompute_bytes
                + self.transient_bytes + self.overhead_bytes + self.graph_bytes)


def estimate_memory(cfg: RunConfig, shape: DataShape, device_type: str = "cpu", bf16: bool | None = None) -> Estimate:
    """The peak memory that training ``cfg`` takes on a ``device_type`` device ("cpu" or "cuda").

    ``bf16`` is whether the step runs under bf16 autocast; None decides it from ``train.precision`` as the
    trainer does on this machine (:func:`autocast_bf16`).
    """
    fp = _run_footprint(cfg, shape, device_type, bf16)
    elem = _precision_bytes(cfg, device_type, bf16)
    tc = cfg.train
    batch, evaluated = tc.batch_size, min(tc.eval_batch_size, max(shape.test_size, shape.val_size))
    # Weights and gradients, then the optimizer's state: SGD's momentum buffer, AdamW's two moments.
    state = 8 if tc.optimizer == "adamw" else 0 if tc.momentum == 0 else 4
    model = fp.params * (8 + state + (2 if elem == 2 else 0))
    data = 8 * shape.train_size  # BatchOrder's permutation
    if device_type != "cpu":
        data += (shape.train_size + shape.val_size + shape.test_size) * (shape.pixels + 8)
    activations = fp.saved * batch + fp.saved_fixed
    recompute = fp.recompute * batch
    train_transient = batch * (shape.pixels * BATCH_BYTES_PER_PIXEL + LIVE_MAPS * fp.largest * elem)
    eval_transient = evaluated * (shape.pixels * BATCH_BYTES_PER_PIXEL + LIVE_MAPS * fp.largest * elem)
    dynamic = max(activations + recompute + train_transient, eval_transient)
    transient = dynamic - activations - recompute
    overhead = math.ceil(ALLOCATOR_SHARE * dynamic) + (CUDA_WORKSPACES if device_type == "cuda" else 0)
    # A captured step allocates from the graph's own pool, which the caching allocator never lends back: a
    # second copy of the step's activations and in-flight tensors, and the gradients the graph writes. The
    # eager steps run before capture (and the evaluation) keep theirs in the ordinary pool.
    graph = activations + recompute + train_transient + 4 * fp.params if _graphed(cfg, device_type) else 0
    return Estimate(fp.params, batch, fp.segments, model, data, activations, recompute, transient, overhead, graph)


def _graphed(cfg: RunConfig, device_type: str) -> bool:
    """Whether the run's step is captured as a CUDA graph (as :func:`depthbench.step.choose_step` decides)."""
    tc, model = cfg.train, cfg.model
    random = model.family == "resnet" and model.shortcut_gate == "dropout"  # dropout draws each step: eager
    # compile `auto` never compiles on CUDA (devices.resolve_compile): only an explicit true leaves the graph out.
    return device_type == "cuda" and tc.cuda_graph and tc.compile is not True and tc.optimizer == "sgd" and not random


def best_segments(n: int) -> int:
    """The checkpointing segments per stage that keep the least: about sqrt(n) for n units per stage.

    sqrt(n) segment inputs stay alive, and backward recomputes one segment of sqrt(n) units at a time. For
    ResNet-1001 (n = 111) that is 11, against one segment per unit (`true`), which keeps all 111 unit
    inputs.
    """
    return max(1, round(math.sqrt(n)))


def _with_memory_fix(cfg: RunConfig, batch_size: int | None = None, checkpointing: int | None = None) -> RunConfig:
    """``cfg`` with the settings a refusal may advise changed: its batch size, its checkpointing segments."""
    train = cfg.train if batch_size is None else cfg.train.model_copy(update={"batch_size": batch_size})
    model = cfg.model if checkpointing is None else cfg.model.model_copy(update={"checkpointing": checkpointing})
    return cfg.model_copy(update={"train": train, "model": model})


def _largest_batch(cfg: RunConfig, fits: Callable[[RunConfig], bool]) -> int | None:
    """The largest batch size below cfg's for which ``fits`` holds, or None when not even 1 fits."""
    low, high = 0, cfg.train.batch_size - 1  # low always fits (0 stands for "none"); search (low, high]
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(_with_memory_fix(cfg, batch_size=mid)) else (low, mid - 1)
    return low or None


# ---------------------------------------------------------------------------------------------
# What the device has, and the refusal


def device_capacity(device: torch.device) -> int:
    """Bytes a run can still use on ``device``. CUDA: the free memory plus what this process's caching
    allocator holds unused (an earlier run's). CPU: MemAvailable, bounded by the process's cgroup limit."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return host_available()


def host_available() -> int:
    """Memory this process can still take: /proc/meminfo's MemAvailable (else free pages) and its cgroup's room."""
    release_freed_memory()  # heap an earlier run freed is ours to reuse: hand it back so MemAvailable shows it
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        available = int(found.group(1)) * 1024 if found else None
    except OSError:
        available = None
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = _cgroup_room()
    return min(available, room) if room is not None else available


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, else v1), or None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root, files = Path("/sys/fs/cgroup"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            root, files = Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        for folder in (root / path.lstrip("/"), root):  # in a container its own cgroup is mounted as the root
            try:
                limit, usage = ((folder / name).read_text().strip() for name in files)
            except OSError:
                continue
            if limit.isdigit() and int(limit) < 2**60:
                return max(int(limit) - int(usage), 0)
            break
    return None


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; binary units, as bench counts them."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_fits(cfg: RunConfig, shape: DataShape, device: torch.device, free: int | None = None, share: int = 1
               ) -> Estimate:
    """``cfg``'s estimate on ``device``; a :class:`DepthbenchError` saying what would fit when it exceeds its
    part of ``free`` (default: what the device has now, :func:`device_capacity`), shared by ``share`` runs
    training on the device at once."""
    bf16 = resolve_precision(cfg.train.precision, device) is not None  # the trainer's own choice
    estimate = estimate_memory(cfg, shape, device.type, bf16)
    free = (device_capacity(device) if free is None else free) // share
    if estimate.total > free:
        raise DepthbenchError(_refusal(cfg, shape, device, bf16, estimate, free, share))
    return estimate


def _refusal(cfg: RunConfig, shape: DataShape, device: torch.device, bf16: bool, est: Estimate,
             free: int, share: int = 1) -> str:
    where = str(device)
    have = f"{format_bytes(free)} is free" + (f" for each of the {share} runs training on it at once" if share > 1 else "")
    if est.model_bytes > free:
        return (f"{cfg.run_id} cannot fit on {where}: its {est.params:,} parameters alone need "
                f"{format_bytes(est.model_bytes)} for weights, gradients and momentum, and {have}; no batch size "
                "or checkpointing helps: lower the depth or model.width")
    if est.model_bytes + est.data_bytes > free:
        return (f"{cfg.run_id} cannot fit on {where}: its weights, gradients and momentum "
                f"({format_bytes(est.model_bytes)}) and the dataset on the device ({format_bytes(est.data_bytes)}) "
                f"alone exceed the {have}; use a smaller dataset subset or another device")

    def fits(c: RunConfig) -> bool:
        return estimate_memory(c, shape, device.type, bf16).total <= free

    fixes = []
    batch = _largest_batch(cfg, fits)
    if batch:
        fixes.append(f"train.batch_size: {batch}")
    # Activation checkpointing is a ResNet setting; a ViT's only fixes are the batch and the device.
    segments = best_segments(cfg.blocks[1]) if cfg.model.family == "resnet" else 0
    if est.segments != segments:
        ckpt = _with_memory_fix(cfg, checkpointing=segments)
        if fits(ckpt):
            total = estimate_memory(ckpt, shape, device.type, bf16).total
            fixes.append(f"model.checkpointing: {segments} (about {format_bytes(total)})")
        elif (smaller := _largest_batch(ckpt, fits)) is not None:
            fixes.append(f"model.checkpointing: {segments} with train.batch_size: {smaller}")
    device_fix = f"a device with {format_bytes(est.total)} free" + (" per run, or fewer runs at once (--jobs)"
                                                                   if share > 1 else "")
    detail = f"{format_bytes(est.activation_bytes + est.recompute_bytes)} of activations at batch {est.batch_size}"
    if est.segments:
        detail += f" with {est.segments} checkpointed segments per stage"
    head = f"{cfg.run_id} needs about {format_bytes(est.total)} on {where} ({detail}) but {have}"
    if not fixes:  # not even one image per step: say what the smallest step takes, and what dominates it
        least = estimate_memory(_with_memory_fix(cfg, batch_size=1, checkpointing=segments), shape, device.type, bf16)
        evaluation = least.activation_bytes + least.recompute_bytes < least.transient_bytes
        return (f"{head}; not even train.batch_size: 1 fits ({format_bytes(least.total)}"
                + (", mostly the evaluation pass: lower train.eval_batch_size" if evaluation else "")
                + f"); use {device_fix}")
    return f"{head}; what fits: {', or '.join([*fixes, device_fix])}"


def plan_estimates(runs: list[RunConfig]) -> tuple[dict[str, Estimate | None], dict[str, int | None]]:
    """For ``sweep --dry-run``: each run's estimate by run id (None where the dataset's shape is only known
    once loaded), and what each device the runs name has free (None: not on this machine)."""
    devices: dict[str, Any] = {}
    free: dict[str, int | None] = {}
    for name in sorted({r.train.device for r in runs}):
        try:
            devices[name] = resolve_device(name)
            free[name] = device_capacity(devices[name])
        except DepthbenchError:
            devices[name], free[name] = None, None
    estimates: dict[str, Estimate | None] = {}
    for run in runs:
        shape = known_shape(run.dataset)
        device = devices[run.train.device]
        device_type = device.type if device is not None else ("cpu" if run.train.device == "cpu" else "cuda")
        estimates[run.run_id] = estimate_memory(run, shape, device_type) if shape else None
    return estimates, free


__all__ = [
    "DataShape",
    "Estimate",
    "activation_bytes",
    "autocast_bf16",
    "best_segments",
    "check_fits",
    "device_capacity",
    "estimate_memory",
    "format_bytes",
    "host_available",
    "known_shape",
    "parameter_count",
    "plan_estimates",
]
