"""Vision Transformers on small images, v1 Post-LN and v2 Pre-LN, with DeepNorm and ReZero as further units.

The net is :mod:`depthbench.transformer`'s spec built as modules: :class:`PatchEmbedding` (the ``stem``),
``depth`` :class:`TransformerBlock` s in ``stages[0]``, an optional final LayerNorm, pooling (class token
or mean of the tokens) and a linear ``head``. The unit (:data:`depthbench.transformer.UNITS`) is data
that one block class reads, as :class:`depthbench.models.ResidualUnit` reads a placement.

The attributes the diagnostics read on a ResNet mean the same here: ``units`` (the blocks in forward
order), ``stem``, ``stages`` (one stage holding every block) and ``checkpointing``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from depthbench.architecture import choice
from depthbench.devices import attention_kernel
from depthbench.transformer import (
    UNITS,
    VIT_VERSION_UNIT,
    TransformerUnit,
    check_vit,
    deepnorm_constants,
    mlp_hidden,
    vit_tokens,
)

# The std of the standard init; truncated at two std, as the JAX ViT and BERT draw it.
INIT_STD = 0.02


class PatchEmbedding(nn.Module):
    """Image -> tokens: each ``patch`` x ``patch`` square mapped linearly to ``width`` (a conv with kernel
    = stride = patch), the class token put first when pooling by it, the learned position embedding added."""

    def __init__(self, in_channels: int, width: int, patch: int, image_size: int, pool: str) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.position = nn.Parameter(torch.zeros(1, vit_tokens(patch=patch, image_size=image_size, pool=pool), width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A channels_last map flattens to (batch, tokens, width) as a view: no copy either way.
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.class_token is not None:
            x = torch.cat([self.class_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position


class Attention(nn.Module):
    """Multi-head self-attention: one fused query/key/value projection, scaled dot-product attention
    (the kernel for the device and dtype that :func:`depthbench.devices.attention_kernel` picks), an output
    projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, width / heads)
        with attention_kernel(q):
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, width))


def _norm(unit: TransformerUnit, width: int) -> nn.Module:
    return nn.Identity() if unit.norm == "none" else nn.LayerNorm(width)


class TransformerBlock(nn.Module):
    """One block, an attention sublayer then an MLP sublayer, each joined to the residual stream as
    ``unit.norm`` says. ``alpha`` is the identity's scale (DeepNorm; 1 otherwise), ``gate`` ReZero's scalar
    (None for the other units), shared by both sublayers."""

    def __init__(self, unit: TransformerUnit, width: int, heads: int, hidden: int, alpha: float) -> None:
        super().__init__()
        self.unit = unit
        self.alpha = alpha
        self.norm1 = _norm(unit, width)
        self.attn = Attention(width, heads)
        self.norm2 = _norm(unit, width)
        self.mlp = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(width, hidden)), ("act", nn.GELU()), ("fc2", nn.Linear(hidden, width))]))
        self.gate = nn.Parameter(torch.zeros(())) if unit.gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._sublayer(x, self.norm1, self.attn)
        return self._sublayer(x, self.norm2, self.mlp)

    def _sublayer(self, x: torch.Tensor, norm: nn.Module, branch: nn.Module) -> torch.Tensor:
        if self.unit.norm == "before_branch":  # Pre-LN: the identity path is untouched
            return x + branch(norm(x))
        if self.unit.norm == "after_add":  # Post-LN, DeepNorm: the stream is renormalised
            # alpha = 1 skips the product, which would cost a pass over the map for nothing.
            shortcut = x if self.alpha == 1 else self.alpha * x
            return norm(shortcut + branch(x))
        return x + self.gate * branch(x)  # ReZero

    def extra_repr(self) -> str:
        return f"norm={self.unit.norm}, alpha={self.alpha:.4g}, gate={self.unit.gate}"


class ViT(nn.Module):
    """``stem`` (:class:`PatchEmbedding`) -> ``stages[0]`` (``depth`` blocks) -> ``norm`` (final LayerNorm
    for pre_ln, else identity) -> class token or token mean -> ``head``."""

    def __init__(
        self,
        unit: TransformerUnit,
        depth: int,
        *,
        width: int,
        heads: int,
        hidden: int,
        patch: int,
        image_size: int,
        in_channels: int,
        num_classes: int,
        pool: str,
    ) -> None:
        super().__init__()
        self.unit = unit
        self.pool = pool
        # The diagnostics switch checkpointing off while they measure; a ViT never checkpoints.
        self.checkpointing = 0
        self.stem = PatchEmbedding(in_channels, width, patch, image_size, pool)
        alpha = unit.alpha(depth)
        blocks = [TransformerBlock(unit, width, heads, hidden, alpha) for _ in range(depth)]
        self.stages = nn.ModuleList([nn.Sequential(*blocks)])
        self.norm = nn.LayerNorm(width) if unit.final_norm else nn.Identity()
        self.head = nn.Linear(width, num_classes)
        _init_weights(self, depth)

    @property
    def units(self) -> list[TransformerBlock]:
        return list(self.stages[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages[0](self.stem(x))
        x = self.norm(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.head(x)

    def no_weight_decay(self) -> set[str]:
        """State-dict names to keep out of weight decay besides norms and biases: the position embedding
        and the class token, which are not weights of a map (timm's ``no_weight_decay``)."""
        return {f"stem.{name}" for name in ("position", "class_token") if getattr(self.stem, name) is not None}


def _init_weights(model: ViT, depth: int) -> None:
    """The standard init, then DeepNorm's on the blocks' weights where the unit says so.

    Standard: truncated normal (std 0.02) for every linear weight, the patch embedding's too (it is a
    linear map of each patch), and for the position embedding; zero biases, LayerNorm 1 and 0, a zero
    class token, ReZero gates 0. DeepNorm ([DeepNet]): Xavier normal with gain beta for the
    MLP and the value and output projections, gain 1 for query and key; each of the fused q, k and v is
    a width x width map of its own, so each gets Xavier's std for that shape.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.trunc_normal_(model.stem.position, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
    if model.stem.class_token is not None:
        nn.init.zeros_(model.stem.class_token)
    for block in model.units:
        if block.gate is not None:
            nn.init.zeros_(block.gate)
    if model.unit.init != "deepnorm":
        return
    _, beta = deepnorm_constants(depth)
    for block in model.units:
        q, k, v = block.attn.qkv.weight.chunk(3, dim=0)  # views: initialised in place
        for weight, gain in ((q, 1.0), (k, 1.0), (v, beta), (block.attn.proj.weight, beta),
                             (block.mlp.fc1.weight, beta), (block.mlp.fc2.weight, beta)):
            nn.init.xavier_normal_(weight, gain=gain)


def build_vit(
    version: str,
    depth: int,
    num_classes: int = 10,
    *,
    unit: str | None = None,
    width: int = 192,
    heads: int = 3,
    mlp_ratio: float = 4.0,
    patch: int = 4,
    pool: str = "cls",
    image_size: int = 32,
    in_channels: int = 3,
) -> ViT:
    """A ViT of ``version`` v1 (Post-LN) or v2 (Pre-LN) with ``depth`` blocks ([Xiong] arXiv 2002.04745).

    ``unit`` overrides the version's unit (a key of :data:`depthbench.transformer.UNITS`: post_ln, pre_ln,
    deepnorm, rezero). ``pool`` is ``cls`` (a class token) or ``mean`` (the mean of the patch tokens).
    """
    choice("version", version, VIT_VERSION_UNIT)
    rule = UNITS[choice("unit", unit or VIT_VERSION_UNIT[version], UNITS)]
    check_vit(depth, width=width, heads=heads, mlp_ratio=mlp_ratio, patch=patch, image_size=image_size, pool=pool)
    return ViT(rule, depth, width=width, heads=heads, hidden=mlp_hidden(width, mlp_ratio), patch=patch,
               image_size=image_size, in_channels=in_channels, num_classes=num_classes, pool=pool)
