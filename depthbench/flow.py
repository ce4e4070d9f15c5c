"""How signals and gradients flow through the residual units of a ResNet ([V2] section 3) and the
blocks of a Vision Transformer ([Xiong] section 3).

[V2] explains the depth results by the identity path: with ``x_{l+1} = x_l + F(x_l)`` the input of a
unit reaches every later unit unchanged, and the gradient ``dL/dx_L`` reaches every earlier unit
through the additive term of [V2] eq. 5. A ReLU after the addition (the original unit) or a scaled,
gated or dropped shortcut (Table 1) breaks that path. :func:`measure` makes this visible on one batch,
per residual unit ``l`` in forward order (``model.units``):

    grad_input       ||dL/dx_l||, the gradient reaching the unit's input (Frobenius norm over the batch)
    grad_params      ||dL/dW_l|| over every parameter of the unit
    input_rms        root mean square of x_l, the size of the forward signal
    cosine           mean over images of cos(x_l, x_{l+1}): how much of the input's direction survives
    norm_ratio       mean over images of ||x_{l+1}|| / ||x_l||
    relu_zeroed      fraction of the unit's outputs that a ReLU after the addition sets to zero
    shortcut_zeroed  fraction of the shortcut signal's energy sum(h(x_l)^2) that sits where they are zeroed

``cosine`` and ``norm_ratio`` are None on units whose shape changes (the first unit of a stage), where
x_l and x_{l+1} cannot be compared; the zeroed fractions are 0 for units with nothing but an identity
after the addition. The loss is the mean cross-entropy of the batch in fp32, the model in the mode it
is in (batch statistics in train mode, as while training).

A ViT block (:class:`depthbench.models.TransformerBlock`, x_l of shape (batch, tokens, width)) gets the
first five measures as above, each image's tokens taken together as one vector; its shape never
changes, so ``cosine`` and ``norm_ratio`` are always defined. ``relu_zeroed`` and ``shortcut_zeroed``
are None: no Transformer unit has a ReLU after its additions. What can break a block's identity path is
the LayerNorm after each addition (Post-LN, DeepNorm), which rescales the shortcut along with the branch;
so a block's row has one more measure:

    identity_gain    the factor the identity path multiplies x_l by on its way to x_{l+1}: per sublayer
                     alpha * gamma / sigma, sigma the standard deviation over channels of the sum
                     alpha * x + F(x) that the LayerNorm normalises and gamma its weight; the product over
                     the block's two sublayers, averaged over images, tokens and channels

It is 1 for Pre-LN and ReZero, whose shortcut is added as it is, as the identity of [V2]'s full
pre-activation unit is. Up to the token mean and the one direction that LayerNorm removes, it is also the
gain of the gradient along the shortcut, so the product of the gains of blocks l..L says how much of
dL/dx_L reaches x_l without passing through a branch ([Xiong] section 3).

:func:`record_step` appends such a row to a run's ``diagnostics.jsonl`` (the trainer calls it at
``train.diagnose_steps``); :mod:`depthbench.diagnose` trains nets for a few steps through the one
trainer and collects those rows, for the ``depthbench diagnose`` command.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from depthbench import storage
from depthbench.layout import DIAGNOSTICS, RunFolder
from depthbench.models import GatedSum, ResidualUnit, ResNet, TransformerBlock, ViT

UNIT_FIELDS = ("grad_input", "grad_params", "input_rms", "cosine", "norm_ratio", "relu_zeroed", "shortcut_zeroed")
# A Transformer block's row: the same measures (its zeroed fractions None), then the identity path's gain.
BLOCK_FIELDS = (*UNIT_FIELDS, "identity_gain")


@contextlib.contextmanager
def _untouched(model: ResNet | ViT, device: torch.device) -> Iterator[None]:
    """Run a measurement that leaves no trace: BN running statistics (every buffer), the global RNG
    state (dropout shortcuts draw from it) and the checkpointing setting are as before afterwards.
    Checkpointing is off while measuring, because its recomputation would re-run the forward hooks."""
    buffers = [b.detach().clone() for b in model.buffers()]
    checkpointing = model.checkpointing
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            model.checkpointing = 0
            yield
    finally:
        model.checkpointing = checkpointing
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)


def _has_relu_after_add(unit: nn.Module) -> bool:
    return any(isinstance(m, nn.ReLU) for m in unit.after_add)


def _norms_on_identity_path(block: TransformerBlock) -> list[nn.Module]:
    """The LayerNorms that a block's shortcut passes through: one per sublayer after its addition
    (Post-LN, DeepNorm), none where the shortcut is added as it is (Pre-LN, ReZero)."""
    return [block.norm1, block.norm2] if block.unit.norm == "after_add" else []


def measure(model: ResNet | ViT, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Gradient and signal flow of every residual unit or Transformer block on the batch ``(x, y)``:
    ``{"loss", "batch", "units"}``, one row per unit with the fields of :data:`UNIT_FIELDS` (ResNet
    units) or :data:`BLOCK_FIELDS` (ViT blocks).

    Weights, ``.grad`` fields, BN running statistics and the RNG state are left as they were: gradients
    are taken with ``torch.autograd.grad``, which accumulates into nothing.
    """
    units = model.units
    stages = [s for s, stage in enumerate(model.stages) for _ in stage]
    stats: list[dict[str, torch.Tensor]] = [{} for _ in units]
    shortcut: list[torch.Tensor | None] = [None] * len(units)
    gain: list[torch.Tensor | None] = [None] * len(units)  # a block's identity gain so far, per element

    def on_join(i: int):
        def hook(join: nn.Module, args: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor) -> None:
            x_in, residual = args
            with torch.no_grad():
                # h(x): the sum less the residual, except for exclusive gating, whose residual is scaled
                # by g too; join.forward with a zero residual gives (1 - g) * x without re-running hooks.
                gated = isinstance(join, GatedSum) and join.exclusive
                shortcut[i] = join.forward(x_in, torch.zeros_like(residual)) if gated else out - residual
        return hook

    def on_norm(i: int, alpha: float):
        def hook(norm: nn.LayerNorm, args: tuple[torch.Tensor], out: torch.Tensor) -> None:
            with torch.no_grad():
                z = args[0].float()  # alpha * x + F(x), the sum this LayerNorm normalises
                factor = alpha / (z.var(dim=-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
                if norm.weight is not None:
                    factor = factor * norm.weight.float()
                gain[i] = factor if gain[i] is None else gain[i] * factor
        return hook

    def on_unit(i: int):
        def hook(unit: nn.Module, args: tuple[torch.Tensor], out: torch.Tensor) -> None:
            x_in, s = args[0], stats[i]
            with torch.no_grad():
                a, b = x_in.float().flatten(1), out.float().flatten(1)
                s["input_rms"] = a.square().mean().sqrt()
                if x_in.shape == out.shape:
                    s["cosine"] = F.cosine_similarity(a, b, dim=1).mean()
                    s["norm_ratio"] = (b.norm(dim=1) / a.norm(dim=1).clamp_min(1e-30)).mean()
                if isinstance(unit, ResidualUnit):
                    zeroed = (out == 0) if _has_relu_after_add(unit) else torch.zeros_like(out, dtype=torch.bool)
                    energy = shortcut[i].float().square()
                    s["relu_zeroed"] = zeroed.float().mean()
                    s["shortcut_zeroed"] = (energy * zeroed).sum() / energy.sum().clamp_min(1e-30)
                    shortcut[i] = None
                else:
                    s["identity_gain"] = gain[i].mean() if gain[i] is not None else torch.ones(())
                    gain[i] = None
            if x_in.requires_grad:  # the gradient reaching the unit's input, as autograd computes it
                x_in.register_hook(lambda g: s.__setitem__("grad_input", g.detach().float().norm()))
        return hook

    handles = [u.register_forward_hook(on_unit(i)) for i, u in enumerate(units)]
    for i, u in enumerate(units):
        if isinstance(u, ResidualUnit):
            handles.append(u.join.register_forward_hook(on_join(i)))
        else:
            handles += [n.register_forward_hook(on_norm(i, u.alpha)) for n in _norms_on_identity_path(u)]
    unit_params = [list(u.parameters()) for u in units]
    # The stem's parameters are asked for too, so that the gradient runs back through the first unit's input.
    wanted = [p for ps in unit_params for p in ps] + list(model.stem.parameters())
    try:
        with _untouched(model, x.device), torch.enable_grad():
            loss = F.cross_entropy(model(x).float(), y)
            grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()

    start = 0
    for s, ps in zip(stats, unit_params, strict=True):
        unit_grads = [g.float().square().sum() for g in grads[start : start + len(ps)] if g is not None]
        s["grad_params"] = torch.stack(unit_grads).sum().sqrt() if unit_grads else torch.zeros(())
        start += len(ps)
    # One transfer to the host for every number.
    keys = [(i, k) for i, s in enumerate(stats) for k in s]
    values = torch.stack([stats[i][k].detach().float().cpu() for i, k in keys]).tolist() if keys else []
    rows = [{"unit": i, "stage": stages[i], "reshapes": "cosine" not in stats[i],
             **{k: None for k in (UNIT_FIELDS if isinstance(u, ResidualUnit) else BLOCK_FIELDS)}}
            for i, u in enumerate(units)]
    for (i, k), v in zip(keys, values, strict=True):
        rows[i][k] = v if math.isfinite(v) else None
    loss_value = loss.item()
    return {"loss": loss_value if math.isfinite(loss_value) else None, "batch": len(x), "units": rows}


def record_step(model: ResNet | ViT, xb: torch.Tensor, yb: torch.Tensor, step: int, run_dir: Path) -> dict[str, Any]:
    """Measure on a training batch and keep the row in ``run_dir/diagnostics.jsonl`` (one row per step:
    a resumed run that records a step again replaces that step's row). Training is unaffected."""
    row = {"step": step, **measure(model, xb, yb)}
    path = Path(run_dir) / DIAGNOSTICS
    rows = [r for r in storage.read_jsonl(path) if r.get("step") != step] + [row]
    storage.write_jsonl(path, sorted(rows, key=lambda r: r["step"]))
    return row


def read_diagnostics(run_dir: Path) -> list[dict[str, Any]]:
    return RunFolder(Path(run_dir)).diagnostics()


def summarize_row(row: dict[str, Any]) -> dict[str, Any]:
    """The compact view of one measurement: gradient at the first, middle and last unit's input, and
    the means of the signal measures over the units where they are defined (``mean_identity_gain`` is
    None for a ResNet, whose rows do not have it; the zeroed fractions are None for a ViT)."""
    units = row["units"]
    grad = [u["grad_input"] for u in units]
    first, middle, last = grad[0], grad[len(grad) // 2], grad[-1]
    cosines = [u["cosine"] for u in units if u["cosine"] is not None]

    def mean(values: Sequence[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return sum(kept) / len(kept) if kept else None

    return {
        "step": row["step"], "loss": row["loss"], "units": len(units),
        "grad_first": first, "grad_middle": middle, "grad_last": last,
        "grad_first_over_last": first / last if first is not None and last else None,
        "mean_cosine": mean(cosines),
        "mean_shortcut_zeroed": mean([u["shortcut_zeroed"] for u in units]),
        "mean_relu_zeroed": mean([u["relu_zeroed"] for u in units]),
        "mean_identity_gain": mean([u.get("identity_gain") for u in units]),
    }
