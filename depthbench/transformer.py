"""The Vision Transformer family as data: where LayerNorm sits in a block, what a version means, sizes.

A ViT (Dosovitskiy et al. 2020, arXiv 2010.11929) on the same small images as the ResNets: the image is
cut into non-overlapping ``patch`` x ``patch`` squares, each embedded by one linear map (a conv with
kernel = stride = patch), a learned position embedding is added to every token (and to the class token
when ``pool == "cls"``), ``depth`` transformer blocks follow, then the class token or the mean of the
tokens goes to a linear head. Each block is two residual sublayers, attention then MLP
(width -> ``int(width * mlp_ratio)`` -> width, GELU), and the unit says how each sublayer joins its input::

    unit      sublayer F (attention, then MLP)       final LN   paper
    post_ln   x = LN(x + F(x))                       no         [Xiong] the original Transformer   (v1)
    pre_ln    x = x + F(LN(x))                       yes        [Xiong]                            (v2)
    deepnorm  x = LN(alpha * x + F(x))               no         [DeepNet], alpha = (2N)^(1/4)
    rezero    x = x + a * F(x), a init 0, no LN      no         [ReZero], one a per block

so the depth question of the ResNet papers becomes: does the identity path survive (pre_ln, rezero) or is
it renormalised at every sublayer (post_ln, deepnorm)? ``N`` is the number of blocks ``depth``. Post-LN
blocks end normalised, so no final LN is needed; Pre-LN's residual stream is never normalised, so a final
LN precedes the head ([Xiong]). ReZero's one scalar per block gates both of its sublayers, so a
block starts as the identity ([ReZero]).

Initialisation: truncated normal (std 0.02, cut at two std) for the linear weights, the patch embedding's
included, and the position embedding; zero biases, LayerNorm weight 1 and bias 0, a zero class token
and zero ReZero gates. DeepNorm replaces it on the blocks' weights with Xavier normal init of gain
beta = (8N)^(-1/4) for the MLP and the attention's value and output projections, gain 1 for query and
key ([DeepNet], encoder-only constants).

Parameters (CIFAR-10 head, 32x32 input, width 192, 3 heads, patch 4, MLP ratio 4, class token) and forward
FLOPs of one image (:func:`vit_forward_flops`); post_ln and deepnorm count the same::

    depth   post_ln      pre_ln       rezero       GFLOPs
    6        2,693,194    2,693,578    2,688,592    0.366
    12       5,362,378    5,362,762    5,353,174    0.730
    48      21,377,482   21,377,866   21,340,666    2.917

References: [Xiong] Xiong et al., "On Layer Normalization in the Transformer Architecture", 2020,
arXiv:2002.04745; [DeepNet] Wang et al., "DeepNet: Scaling Transformers to 1,000 Layers", 2022,
arXiv:2203.00555; [ReZero] Bachlechner et al., "ReZero is All You Need", 2020, arXiv:2003.04887.

Torch-free, like :mod:`depthbench.architecture`, so configs validate and :mod:`depthbench.estimate` sizes a
ViT without torch; :mod:`depthbench.models.vit` builds from these tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from depthbench.architecture import choice
from depthbench.errors import DepthbenchError

VIT_VERSION_UNIT: dict[str, str] = {"v1": "post_ln", "v2": "pre_ln"}
POOLS = ("cls", "mean")


# ---------------------------------------------------------------------------------------------
# The units, as data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerUnit:
    """How a block's two sublayers join the residual stream, and how the block starts.

    ``norm`` is where each sublayer's LayerNorm sits: ``after_add`` (x = LN(alpha * x + F(x))),
    ``before_branch`` (x = x + F(LN(x))) or ``none``. ``final_norm``: a LayerNorm on the tokens before
    pooling. ``identity_scale`` is alpha: ``one``, or ``deepnorm``'s (2N)^(1/4). ``init`` is the weight
    rule of the blocks: ``trunc_normal`` (std 0.02) or ``deepnorm`` (Xavier, gain beta on the value,
    output and MLP weights). ``gate``: one scalar per block, initialised to 0, multiplying both
    sublayers' outputs (ReZero).
    """

    norm: Literal["after_add", "before_branch", "none"]
    final_norm: bool
    identity_scale: Literal["one", "deepnorm"]
    init: Literal["trunc_normal", "deepnorm"]
    gate: bool

    def alpha(self, blocks: int) -> float:
        """The identity's scale in a net of ``blocks`` blocks."""
        return deepnorm_constants(blocks)[0] if self.identity_scale == "deepnorm" else 1.0

    @property
    def norms_per_block(self) -> int:
        return 0 if self.norm == "none" else 2


UNITS: dict[str, TransformerUnit] = {
    "post_ln": TransformerUnit(norm="after_add", final_norm=False, identity_scale="one", init="trunc_normal",
                               gate=False),
    "pre_ln": TransformerUnit(norm="before_branch", final_norm=True, identity_scale="one", init="trunc_normal",
                              gate=False),
    "deepnorm": TransformerUnit(norm="after_add", final_norm=False, identity_scale="deepnorm", init="deepnorm",
                                gate=False),
    "rezero": TransformerUnit(norm="none", final_norm=False, identity_scale="one", init="trunc_normal", gate=True),
}


def deepnorm_constants(blocks: int) -> tuple[float, float]:
    """DeepNorm's (alpha, beta) for an encoder-only stack of ``blocks`` blocks: ((2N)^(1/4), (8N)^(-1/4))
    ([DeepNet]; decoders and encoder-decoders have other constants)."""
    check_depth(blocks)
    return (2 * blocks) ** 0.25, (8 * blocks) ** -0.25


# ---------------------------------------------------------------------------------------------
# Validation: one line, naming the numbers and what would fit
# ---------------------------------------------------------------------------------------------


def _nearest_divisors(n: int, near: int) -> list[int]:
    """The divisors of ``n`` just below and just above ``near`` (one of them when ``near`` is outside)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = [d for d in divisors if d < near]
    above = [d for d in divisors if d > near]
    return [*below[-1:], *above[:1]]


def check_depth(depth: int) -> None:
    if depth < 1:
        raise DepthbenchError(f"ViT depth {depth} is not valid: the depth is the number of transformer blocks, "
                              "at least 1")


def check_patch(image_size: int, patch: int) -> None:
    if patch < 1:
        raise DepthbenchError(f"ViT patch size {patch} is not valid: it must be at least 1")
    if image_size % patch:
        nearest = " or ".join(map(str, _nearest_divisors(image_size, patch)))
        raise DepthbenchError(f"image size {image_size} is not divisible by the patch size {patch}; "
                              f"nearest patch sizes that divide it: {nearest}")


def check_heads(width: int, heads: int) -> None:
    if heads < 1 or width < 1:
        raise DepthbenchError(f"ViT width {width} and heads {heads} are not valid: both must be at least 1")
    if width % heads:
        nearest = " or ".join(map(str, _nearest_divisors(width, heads)))
        raise DepthbenchError(f"width {width} is not divisible by {heads} heads; "
                              f"nearest head counts that divide it: {nearest}")


def mlp_hidden(width: int, mlp_ratio: float) -> int:
    """The MLP's inner width, ``int(width * mlp_ratio)`` as timm rounds it; at least 1."""
    hidden = int(width * mlp_ratio)
    if hidden < 1:
        raise DepthbenchError(f"mlp_ratio {mlp_ratio} at width {width} gives an MLP of {hidden} units; "
                              f"use at least {1 / width:.3g}")
    return hidden


def check_vit(depth: int, *, width: int, heads: int, mlp_ratio: float, patch: int, image_size: int,
              pool: str) -> None:
    """Every shape rule of a ViT, each a :class:`DepthbenchError` in one line."""
    check_depth(depth)
    check_patch(image_size, patch)
    check_heads(width, heads)
    mlp_hidden(width, mlp_ratio)
    choice("pool", pool, POOLS)


def vit_settings(model_cfg: Any) -> dict[str, Any]:
    """The ViT keywords of a :class:`depthbench.config.ModelConfig` (unit, width, heads, mlp_ratio, patch,
    pool), as :func:`depthbench.models.build_vit` and :func:`vit_param_count` take them.

    A RunConfig fills the ViT fields from the family's defaults; a ModelConfig built on its own has them
    None unless given, which is refused here rather than replaced by defaults the config never showed.
    """
    settings = {name: getattr(model_cfg, name, None) for name in ("width", "heads", "mlp_ratio", "patch", "pool")}
    unset = [f"model.{name}" for name, value in settings.items() if value is None]
    if unset:
        raise DepthbenchError(f"{', '.join(unset)} not set on a vit model config; give them, or build the config "
                              "as a RunConfig, which fills in the family's defaults")
    return {"unit": model_cfg.unit, **settings}


# ---------------------------------------------------------------------------------------------
# Sizes, by formula
# ---------------------------------------------------------------------------------------------


def vit_tokens(*, patch: int, image_size: int, pool: str) -> int:
    """Tokens the blocks see: one per patch, plus the class token when pooling by it."""
    return (image_size // patch) ** 2 + (pool == "cls")


def vit_param_count(depth: int, *, width: int, heads: int, mlp_ratio: float, patch: int, image_size: int,
                    in_channels: int, num_classes: int, pool: str, unit: str) -> int:
    """Every parameter of the ViT that :func:`depthbench.models.build_vit` builds, counted by formula."""
    check_vit(depth, width=width, heads=heads, mlp_ratio=mlp_ratio, patch=patch, image_size=image_size, pool=pool)
    rule = UNITS[choice("unit", unit, UNITS)]
    hidden = mlp_hidden(width, mlp_ratio)
    stem = (in_channels * patch * patch * width + width  # patch embedding, a conv with bias
            + vit_tokens(patch=patch, image_size=image_size, pool=pool) * width  # position embedding
            + (width if pool == "cls" else 0))  # class token
    block = (rule.norms_per_block * 2 * width  # LayerNorm weight and bias
             + width * 3 * width + 3 * width  # fused query, key, value
             + width * width + width  # output projection
             + width * hidden + hidden + hidden * width + width  # MLP
             + rule.gate)  # ReZero's scalar
    head = (2 * width if rule.final_norm else 0) + width * num_classes + num_classes
    return stem + depth * block + head


def vit_forward_flops(depth: int, *, width: int, heads: int, mlp_ratio: float, patch: int, image_size: int,
                      in_channels: int, num_classes: int, pool: str) -> int:
    """FLOPs of one forward pass of one image: 2 x the multiply-accumulates of the patch embedding, and per
    block of the query/key/value and output projections, the attention scores QK^T and their weighted sum
    of V, and the MLP; then the head. As :func:`depthbench.models.forward_flops` counts a ResNet,
    LayerNorms, softmax, GELU, additions, the gates, pooling and biases are not counted. The number of
    heads does not change the count (they split the width). The unit does not change it either.
    """
    check_vit(depth, width=width, heads=heads, mlp_ratio=mlp_ratio, patch=patch, image_size=image_size, pool=pool)
    hidden = mlp_hidden(width, mlp_ratio)
    patches = (image_size // patch) ** 2
    tokens = vit_tokens(patch=patch, image_size=image_size, pool=pool)
    embed = patches * in_channels * patch * patch * width
    block = (tokens * width * 3 * width  # query, key, value
             + 2 * tokens * tokens * width  # scores and weighted sum, over all heads
             + tokens * width * width  # output projection
             + 2 * tokens * width * hidden)  # MLP
    return 2 * (embed + depth * block + width * num_classes)
