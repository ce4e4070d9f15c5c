"""The CIFAR ResNet family as data: block shapes, the depth rule, unit placements, what a version means.

Torch-free, so a sweep config validates its depths (and ``depthbench.estimate`` sizes a net) without
importing torch; :mod:`depthbench.models.resnet` builds the modules from these same tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from depthbench.errors import DepthbenchError, did_you_mean

VERSION_UNIT: dict[str, str] = {"v1": "original", "v2": "full_preact"}


# ---------------------------------------------------------------------------------------------
# The variants, as data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """The weight layers of one residual unit: their kernel sizes, and how much wider the unit's output
    is than its inner layers. The stride of a downsampling unit sits on the first layer."""

    kernels: tuple[int, ...]
    expansion: int

    @property
    def layers_per_n(self) -> int:
        """Weight layers that one more unit per stage adds: 6 (basic) or 9 (bottleneck)."""
        return 3 * len(self.kernels)

    def depth(self, n: int) -> int:
        """Weight layers of a net with ``n`` units per stage: 3 stages of units, plus the stem and the FC."""
        return self.layers_per_n * n + 2

    def units_per_stage(self, depth: int) -> int | None:
        """``n`` for ``depth``, or None when the depth does not fit this block."""
        n, rest = divmod(depth - 2, self.layers_per_n)
        return n if rest == 0 and n >= 1 else None

    def stage_widths(self, width: int) -> tuple[int, int, int]:
        return (width * self.expansion, 2 * width * self.expansion, 4 * width * self.expansion)


BLOCKS: dict[str, Block] = {
    "basic": Block(kernels=(3, 3), expansion=1),  # [V1] section 4.2: 6n+2
    "bottleneck": Block(kernels=(1, 3, 1), expansion=4),  # [V2] section 4 / resnet-1k-layers: 9n+2
}

# From this depth up the papers use bottleneck units ([V2] ResNet-164 and -1001); below it basic units
# ([V1] ResNet-20 ... -110). ResNet-1202 fits only the basic rule, so it stays basic.
_BOTTLENECK_FROM_DEPTH = 164


# The ops a placement may put around a weight layer or after the addition. bn and relu as in [V1]/[V2];
# the scalar ops hold one learnable number each, for the normalisation-free units ([Fixup] Zhang, Dauphin,
# Ma 2019, arXiv:1901.09321; [SkipInit] De and Smith 2020, arXiv:2002.10444):
#   bias   x + b, b starting at 0    [Fixup]'s scalar bias; in skipinit the shift that BN's beta gave
#   scale  a * x, a starting at 1    [Fixup]'s multiplier at the end of a branch
#   gate   a * x, a starting at 0    [SkipInit]'s alpha: the branch starts switched off
SCALAR_OPS = ("bias", "scale", "gate")
OPS = ("bn", "relu", *SCALAR_OPS)


@dataclass(frozen=True)
class Placement:
    """Where BN, ReLU and the scalar ops sit around the weight layers of a unit ([V2] Fig. 4, Table 2).

    ``layer`` is the op order around every weight layer but the last, ``last`` around the last one,
    ``after_add`` what follows the addition of shortcut and residual. The ops before ``conv`` in
    ``layer`` are the unit's pre-activation: they are also the net's final activation before pooling
    (the "next unit's pre-activation" that never comes), while the ops after ``conv`` follow the stem.
    So post-activation nets have a BN-ReLU stem and no final activation, and full pre-activation nets
    a bare conv stem and a final BN-ReLU, as in [V2] section 4.1.

    ``init`` is how the weights start: ``he`` for every conv ([V1] section 3.4), or ``fixup``, which
    rescales the branches after it ([Fixup] section 3; models.resnet's ``_fixup_init``).
    """

    layer: str
    last: str
    after_add: str
    init: Literal["he", "fixup"] = "he"

    def __post_init__(self) -> None:
        # The unit names its modules by op and layer (bn1, relu1; bias1a before a conv and bias1b after
        # it when both sides have one), so an op repeated on one side would silently replace its twin.
        for pattern in (self.layer, self.last):
            if pattern.split().count("conv") != 1:
                raise ValueError(f"placement pattern '{pattern}' must hold exactly one conv")
        for ops in (*self.split(self.layer), *self.split(self.last), self.after_add.split()):
            if unknown := [op for op in ops if op not in OPS]:
                raise ValueError(f"unknown placement ops {unknown}; one of {', '.join(OPS)}")
            if len(set(ops)) != len(ops):
                raise ValueError(f"placement ops {ops} repeat an op on one side of a conv")

    def split(self, pattern: str) -> tuple[list[str], list[str]]:
        """The ops before and after the conv of a layer pattern."""
        ops = pattern.split()
        i = ops.index("conv")
        return ops[:i], ops[i + 1 :]

    @property
    def preact(self) -> list[str]:
        return self.split(self.layer)[0]

    @property
    def after_conv(self) -> list[str]:
        return self.split(self.layer)[1]

    @property
    def has_scalars(self) -> bool:
        """Whether the unit holds learnable scalars (its ``SCALAR_OPS``), which ``train.scalar_lr`` scales."""
        return any(op in SCALAR_OPS for op in f"{self.layer} {self.last} {self.after_add}".split())


PLACEMENTS: dict[str, Placement] = {
    # [V2] Fig. 4(a), the [V1] unit: y = ReLU(x + BN(conv(ReLU(BN(conv(x))))))
    "original": Placement(layer="conv bn relu", last="conv bn", after_add="relu"),
    # Fig. 4(b): y = ReLU(BN(x + conv(ReLU(BN(conv(x))))))
    "bn_after_add": Placement(layer="conv bn relu", last="conv", after_add="bn relu"),
    # Fig. 4(c): y = x + ReLU(BN(conv(ReLU(BN(conv(x))))))
    "relu_before_add": Placement(layer="conv bn relu", last="conv bn relu", after_add=""),
    # Fig. 4(d): y = x + BN(conv(ReLU(BN(conv(ReLU(x))))))
    "relu_only_preact": Placement(layer="relu conv bn", last="relu conv bn", after_add=""),
    # Fig. 4(e), the [V2] unit: y = x + conv(ReLU(BN(conv(ReLU(BN(x))))))
    "full_preact": Placement(layer="bn relu conv", last="bn relu conv", after_add=""),
    # [Fixup], no normalisation, the [V1] unit with a scalar bias before every conv and activation and
    # a scalar multiplier ending the branch: y = ReLU(x + s * conv(ReLU(conv(x + a1) + b1) + a2) + b2),
    # with the last conv and the classifier at 0 and the other branch convs scaled down (init="fixup").
    "fixup": Placement(layer="bias conv bias relu", last="bias conv scale bias", after_add="relu", init="fixup"),
    # [SkipInit], no normalisation: the [V2] unit with BN dropped and a gate alpha (0 at init) ending the
    # branch, y = x + alpha * f(x), each unit starting as the identity. The paper specifies only alpha; the
    # scalar bias after each conv is our stand-in for the shift (BN's beta) that dropping BN removes.
    "skipinit": Placement(layer="relu conv bias", last="relu conv bias gate", after_add=""),
}
# What the net's ends get, by the rule in Placement's docstring:
#   original, bn_after_add, relu_before_add: stem conv-BN-ReLU, no final activation. For
#     relu_before_add every unit adds a ReLU output to an input that is itself a sum of ReLU outputs
#     and the ReLU'd stem, so a final ReLU would be a no-op (with option A shortcuts).
#   relu_only_preact: stem conv-BN (BN follows every conv in this unit), final ReLU.
#   full_preact: bare stem conv, final BN-ReLU.
#   fixup: stem conv-bias-ReLU and a final scalar bias before pooling, which equals [Fixup]'s bias
#     before the classifier (pooling is linear). In units whose shape changes the first bias is the
#     shared pre-activation, so the shortcut (option A or a projection, no BN) takes x + a1, as the
#     Fixup code's downsample does; identity units' shortcut takes the untouched x.
#   skipinit: stem conv-bias, final ReLU; the shortcut of a unit whose shape changes takes ReLU(x).

# The settings each shortcut gate of same-shape units reads ([V2] section 3.1, Fig. 2; models.resnet's
# SHORTCUT_GATES builds them): a value for one that the run's gate does not read is refused.
SHORTCUT_GATE_SETTINGS: dict[str, tuple[str, ...]] = {
    "identity": (),
    "constant_scaling": ("shortcut_scale", "residual_scale"),
    "exclusive_gating": ("gate_bias",),
    "shortcut_only_gating": ("gate_bias",),
    "conv1x1": (),
    "dropout": ("shortcut_dropout",),
}

# `model.checkpointing: true`: one activation-checkpoint segment per residual unit (a stage runs as
# min(k, n) segments, so any k above the deepest stage means one per unit). Run ids hash this number.
EVERY_UNIT = 1_000_000


# ---------------------------------------------------------------------------------------------
# Depth rule
# ---------------------------------------------------------------------------------------------


def _fitting(depth: int, names: Sequence[str]) -> list[tuple[str, int]]:
    return [(name, n) for name in names if (n := BLOCKS[name].units_per_stage(depth)) is not None]


def _nearest(depth: int, names: Sequence[str]) -> str:
    """The nearest valid depth below and above ``depth`` for each block, e.g. '98 (basic), 101 (bottleneck)'."""
    found: dict[int, list[str]] = {}
    for name in names:
        block = BLOCKS[name]
        n_below = (depth - 2) // block.layers_per_n
        for n in sorted({max(n_below, 1), max(n_below + 1, 1)}):
            if block.depth(n) != depth:
                found.setdefault(block.depth(n), []).append(name)
    return ", ".join(f"{d} ({', '.join(found[d])})" for d in sorted(found))


def _rule(names: Sequence[str]) -> str:
    return " or ".join(f"{BLOCKS[name].layers_per_n}n+2 ({name})" for name in names)


def resolve_block(depth: int, block: str = "auto") -> tuple[str, int]:
    """The block type and units per stage ``n`` for a depth: basic is 6n+2, bottleneck 9n+2, n >= 1.

    ``auto`` follows the papers: basic units below depth 164 ([V1] ResNet-20 ... -110), bottleneck
    units from 164 up ([V2] ResNet-164, -1001), each falling back to the other block when only that
    one fits (ResNet-1202 stays basic; depth 29 becomes a bottleneck net). 20, 56, 110 and 164 fit both.
    """
    if choice("block", block, ("auto", *BLOCKS)) == "auto":
        names = ["bottleneck", "basic"] if depth >= _BOTTLENECK_FROM_DEPTH else ["basic", "bottleneck"]
    else:
        names = [block]
    fits = _fitting(depth, names)
    if fits:
        return fits[0]
    names = sorted(names)
    if block == "auto":
        problem = f"depth {depth} fits no block type"
        hint = ""
    else:
        problem = f"depth {depth} does not fit the {block} block"
        other = [name for name, _ in _fitting(depth, [b for b in BLOCKS if b != block])]
        hint = f"; it fits the {other[0]} block" if other else ""
    raise DepthbenchError(
        f"{problem}: depth must be {_rule(names)} with n >= 1; nearest valid depths: {_nearest(depth, names)}{hint}"
    )


def valid_depths(block: str, max_depth: int) -> list[int]:
    """Every valid depth up to ``max_depth`` for a block (``auto``: for either block), ascending."""
    names = list(BLOCKS) if choice("block", block, ("auto", *BLOCKS)) == "auto" else [block]
    blocks = [BLOCKS[name] for name in names]
    return sorted({d for b in blocks for d in range(b.depth(1), max_depth + 1, b.layers_per_n)})


def choice(kind: str, value: str | None, choices: Sequence[str] | dict[str, Any]) -> str:
    if value not in choices:
        raise DepthbenchError(
            f"unknown {kind} '{value}'{did_you_mean(str(value), choices)}; one of {', '.join(choices)}"
        )
    return value
