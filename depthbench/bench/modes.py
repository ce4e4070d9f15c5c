"""The three ways bench runs: :func:`run_bench` compares the trainer with the usual pipeline on one net,
:func:`run_scaling` measures time and memory against depth and says whether they grow linearly, and
:func:`run_concurrent` measures what several runs sharing the device train in total.

Each returns one JSON-able dict (``--json`` prints it as is); :mod:`depthbench.bench.render` draws it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from depthbench.architecture import EVERY_UNIT, resolve_block
from depthbench.bench.baseline import default_workers, measure_usual
from depthbench.bench.concurrent import share_device
from depthbench.bench.probes import device_name, load_avg, matmul_peak, process_age
from depthbench.bench.spec import BenchSpec, bench_dataset, run_config
from depthbench.bench.trainer import measure_host, measure_trainer
from depthbench.config import RunConfig, TrainConfig
from depthbench.data import TensorData, load_dataset
from depthbench.errors import DepthbenchError
from depthbench.models import count_params, forward_flops, model_from_config
from depthbench.transformer import VIT_VERSION_UNIT, vit_forward_flops, vit_param_count, vit_settings
from depthbench.devices import attention_name, resolve_compile, resolve_device, resolve_precision

# The CIFAR schedule of He et al., the config's default, for the extrapolated run time.
PAPER_STEPS: int = TrainConfig.model_fields["steps"].default
# Within these bounds, time per FLOP (against the first row) and activation memory per added unit
# (against the other increments of the same block) count as linear in depth.
LINEAR_BAND = (0.8, 1.25)
# Sharing the device pays when the runs' total images/s beats one run's by more than the timing noise
# (the spread of one run's timing windows), and never by less than this.
MIN_GAIN = 0.05


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    """Trainer vs usual pipeline on one net: speed, FLOP/s against the matmul peak, memory, overhead."""
    startup = process_age()
    (cfg,), described, data, load_s = _prepare(spec, [spec.depth])
    context = _context(spec, cfg, described, load_s, startup)
    device = resolve_device(cfg.train.device)
    block, n, params, flops = _net(cfg, data)
    workers = spec.workers if spec.workers is not None else default_workers()

    # The usual pipeline first: the trainer's setup tunes this process's allocator (keep_freed_memory),
    # which the usual script would not have had.
    usual = measure_usual(cfg, data, steps=spec.steps, warmup=spec.warmup, workers=workers)
    trainer = measure_trainer(cfg, data, steps=spec.steps, warmup=spec.warmup, evaluate_too=True)
    host = measure_host(cfg, data.num_classes)
    peak, peak_n = matmul_peak(device, resolve_precision(cfg.train.precision, device) or torch.float32)

    step_s, img_per_s = trainer.timing.step_s, trainer.timing.img_per_s
    extra_first = max(trainer.first_step_s - step_s, 0.0)
    return {
        "mode": "single", **context,
        "depth": cfg.depth, "block": block, "units_per_stage": n, "params": params,
        "checkpointing": spec.checkpointing, "checkpoint_segments": cfg.model.checkpointing, "workers": workers,
        "img_per_s": img_per_s,
        "baseline_img_per_s": usual.img_per_s,
        "speedup": img_per_s / usual.img_per_s,
        "step_s": step_s,
        "baseline_step_s": usual.step_s,
        "train_flops_per_img": flops,
        "achieved_flops": flops * img_per_s,
        "matmul_peak_flops": peak,
        "matmul_peak_size": peak_n,
        "mfu": flops * img_per_s / peak,
        "peak_mem_mb": trainer.peak_mem_mb,
        "peak_mem_total_mb": trainer.peak_total_mb,
        "activation_mb": trainer.activation_mb,
        "eval_img_per_s": trainer.eval_img_per_s,
        "cuda_graph_used": trainer.graphed,  # cuda_graph asked for it; this says whether the check let it run
        "step_notes": list(trainer.notes),
        "host_ms_per_step": host.ms_per_step,
        "host_share": host.ms_per_step / (1000 * step_s),
        "kernels_per_step": host.kernels,
        "kernels_by_phase": host.kernels_by_phase,
        "aten_calls_per_step": host.aten_calls,
        "setup_s": trainer.setup_s,
        "first_step_s": trainer.first_step_s,
        "compile_s": extra_first if context["compile"] else 0.0,
        # Paid once per run: data load, setup, and what the first step costs beyond a steady one.
        "overhead_s": load_s + trainer.setup_s + extra_first,
        "paper_run_h": PAPER_STEPS * step_s / 3600,
        "load_1m_end": load_avg(),
    }


def run_scaling(spec: BenchSpec, depths: Sequence[int]) -> dict[str, Any]:
    """Time per step and training memory against depth, without and with activation checkpointing."""
    if not depths:
        raise DepthbenchError("--depths needs at least one depth, e.g. --depths 20,56,110,164")
    if spec.checkpointing:
        raise DepthbenchError("--depths times every depth both without and with checkpointing; drop --checkpointing "
                              "(--segments sets the checkpointed column's segments)")
    startup = process_age()
    cfgs, described, data, load_s = _prepare(spec, depths, checkpointing=False)
    context = _context(spec, cfgs[0], described, load_s, startup)
    device = resolve_device(cfgs[0].train.device)
    peak, peak_n = matmul_peak(device, resolve_precision(cfgs[0].train.precision, device) or torch.float32)
    rows = []
    for cfg in cfgs:
        block, n, params, flops = _net(cfg, data)
        plain = measure_trainer(cfg, data, steps=spec.steps, warmup=spec.warmup)
        ckpt = None
        # Checkpointing does not compile (run_config says why), and a ViT never checkpoints.
        if spec.compile is not True and spec.family == "resnet":
            ckpt_cfg = run_config(spec, cfg.dataset, depth=cfg.depth, checkpointing=True)
            ckpt = measure_trainer(ckpt_cfg, data, steps=spec.steps, warmup=spec.warmup)
        host = measure_host(cfg, data.num_classes)
        rows.append({
            "family": cfg.model.family, "depth": cfg.depth, "block": block, "units_per_stage": n, "params": params,
            "train_flops_per_img": flops,
            "step_s": plain.timing.step_s, "img_per_s": plain.timing.img_per_s,
            "mfu": flops * plain.timing.img_per_s / peak,
            "peak_mem_mb": plain.peak_mem_mb, "activation_mb": plain.activation_mb,
            "host_ms_per_step": host.ms_per_step, "kernels_per_step": host.kernels,
            "step_s_ckpt": ckpt.timing.step_s if ckpt else None,
            "peak_mem_mb_ckpt": ckpt.peak_mem_mb if ckpt else None,
            "activation_mb_ckpt": ckpt.activation_mb if ckpt else None,
        })
    _add_linearity(rows)
    return {"mode": "scaling", **context, "checkpoint_segments": spec.segments or EVERY_UNIT,
            "matmul_peak_flops": peak, "matmul_peak_size": peak_n,
            "rows": rows, "notes": linearity_notes(rows), "load_1m_end": load_avg()}


def run_concurrent(spec: BenchSpec, counts: Sequence[int]) -> dict[str, Any]:
    """Images/s in total of 1 and each of ``counts`` runs of spec's net training at once on the device, each
    in its own process (see :mod:`depthbench.bench.concurrent`), and whether sharing the device pays."""
    startup = process_age()
    (cfg,), described, data, load_s = _prepare(spec, [spec.depth])  # also fills the cache the runs load from
    context = _context(spec, cfg, described, load_s, startup)
    block, n, params, _ = _net(cfg, data)
    rows: list[dict[str, Any]] = []
    for runs in sorted({1, *counts}):  # one run alone is what the others are measured against
        shared = share_device(cfg, runs, steps=spec.steps, warmup=spec.warmup)
        total = sum(run.img_per_s for run in shared)
        span = max(run.end for run in shared) - min(run.start for run in shared)
        peaks = [run.peak_mem_mb for run in shared]
        used = [run.device_used_mb for run in shared]
        rows.append({
            "runs": runs, "threads_per_run": shared[0].threads,
            "total_img_per_s": total,
            "per_run_img_per_s": total / runs,
            "slowest_run_img_per_s": min(run.img_per_s for run in shared),
            # Every image over the time from the first start to the last end: below the total when the runs
            # did not overlap well.
            "wall_img_per_s": runs * spec.steps * spec.batch_size / span,
            "speedup": total / rows[0]["total_img_per_s"] if rows else 1.0,
            "noise": max(_spread(run.window_img_per_s) for run in shared),
            "peak_mem_mb": None if None in peaks else sum(peaks),
            "device_used_mb": None if None in used else max(used),
        })
    return {"mode": "concurrent", **context, "depth": cfg.depth, "block": block, "units_per_stage": n,
            "params": params, "checkpointing": spec.checkpointing, "rows": rows, "verdict": sharing_verdict(rows),
            "load_1m_end": load_avg()}


def sharing_verdict(rows: list[dict[str, Any]]) -> str:
    """One sentence: does training several runs at once raise the device's total images/s beyond the noise?
    ``rows`` start with one run alone; ``noise`` is the relative spread of a run's timing windows."""
    alone, shared = rows[0], rows[1:]
    if not shared:
        return "one run only: nothing to compare it with; add counts, e.g. --concurrent 1,2,4"
    margin = max(alone["noise"], MIN_GAIN)
    best = max(shared, key=lambda row: row["speedup"])
    noise = f"(noise {100 * margin:.0f}%: one run's spread over its timing windows, at least {100 * MIN_GAIN:.0f}%)"
    if best["speedup"] > 1 + margin:
        return (f"sharing pays: {best['runs']} runs at once train {best['speedup']:.2f}x the images/s of one run "
                f"alone {noise}")
    if best["speedup"] < 1 - margin:
        return (f"sharing costs: any number of runs at once trains fewer images/s in total than one run alone "
                f"(at best {best['speedup']:.2f}x, {best['runs']} runs) {noise}")
    return (f"sharing does not pay beyond the noise: at best {best['runs']} runs at once train "
            f"{best['speedup']:.2f}x the images/s of one run alone {noise}")


def _spread(rates: Sequence[float]) -> float:
    """(max - min) / median: how far apart a run's timing windows are, relative to their middle."""
    return (max(rates) - min(rates)) / statistics.median(rates)


# ---------------------------------------------------------------------------------------------
# What the modes share


def _prepare(spec: BenchSpec, depths: Sequence[int], checkpointing: bool | None = None,
             ) -> tuple[list[RunConfig], str, TensorData, float]:
    """Validate every configuration first (a bad depth fails fast), then load the data once."""
    dataset, described = bench_dataset(spec.data, spec.train_subset)
    cfgs = [run_config(spec, dataset, depth=d, checkpointing=checkpointing) for d in depths]
    t0 = time.perf_counter()
    data = load_dataset(dataset)
    return cfgs, described, data, time.perf_counter() - t0


def _net(cfg: RunConfig, data: TensorData) -> tuple[str, int, int, int]:
    """Block, units per stage, parameters and training FLOPs per image (3x forward) of cfg's net; a ViT's
    block is its unit, its one stage holds every block, and its FLOPs count attention's matmuls too."""
    if cfg.model.family == "vit":
        settings = vit_settings(cfg.model)
        unit = settings.pop("unit") or VIT_VERSION_UNIT[cfg.version]
        params = vit_param_count(cfg.depth, unit=unit, image_size=data.image_size, in_channels=data.in_channels,
                                 num_classes=data.num_classes, **settings)
        flops = vit_forward_flops(cfg.depth, image_size=data.image_size, in_channels=data.in_channels,
                                  num_classes=data.num_classes, **settings)
        return unit, cfg.depth, params, 3 * flops
    block, n = resolve_block(cfg.depth, cfg.model.block)
    with torch.device("meta"):  # shapes only: no memory or init cost, even for ResNet-1001
        net = model_from_config(cfg.version, cfg.depth, cfg.model, data.num_classes, data.in_channels, data.image_size)
    return block, n, count_params(net), 3 * forward_flops(net, data.image_size, data.in_channels)


def _context(spec: BenchSpec, cfg: RunConfig, described: str, load_s: float, startup: float | None) -> dict[str, Any]:
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    return {
        "family": cfg.model.family, "version": cfg.version, "batch_size": spec.batch_size, "steps": spec.steps, "warmup": spec.warmup,
        "compile": resolve_compile(cfg, device, amp_dtype), "cuda_graph": cfg.train.cuda_graph,
        "channels_last": cfg.train.channels_last,
        "data": described,
        "device": str(device), "device_name": device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "precision": str(amp_dtype or torch.float32).removeprefix("torch."),
        **({"attention": attention_name(device, amp_dtype)} if cfg.model.family == "vit" else {}),
        "load_1m": load_avg(), "startup_s": startup, "data_load_s": load_s,
    }


# ---------------------------------------------------------------------------------------------
# Linearity in depth


def _add_linearity(rows: list[dict[str, Any]]) -> None:
    """``time_vs_flops``: step time per training FLOP relative to the first row (1.0 = time grows exactly
    as the FLOPs, which grow linearly with depth within a block type). ``activation_mb_per_unit``: the
    activation memory that each residual unit added since the previous, shallower row of the same block
    (None for the shallowest); constant when memory grows linearly with depth."""
    first = rows[0]
    for row in rows:
        row["time_vs_flops"] = (row["step_s"] / row["train_flops_per_img"]) / (
            first["step_s"] / first["train_flops_per_img"])
        row["activation_mb_per_unit"] = None
    for block in {r["block"] for r in rows}:
        same = sorted((r for r in rows if r["block"] == block), key=lambda r: r["units_per_stage"])
        for prev, row in zip(same, same[1:]):
            stages = 1 if row.get("family") == "vit" else 3  # a ViT's blocks are one stage
            added = stages * (row["units_per_stage"] - prev["units_per_stage"])
            if added > 0:
                row["activation_mb_per_unit"] = (row["activation_mb"] - prev["activation_mb"]) / added


def linearity_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Plain sentences on whether time and memory grow linearly with depth, and where they do not."""
    low, high = LINEAR_BAND
    notes = []
    off = [r for r in rows if not low <= r["time_vs_flops"] <= high]
    if off:
        notes += [f"depth {r['depth']} ({r['block']}): a step takes {r['time_vs_flops']:.2f}x the time its FLOPs "
                  f"predict from depth {rows[0]['depth']}" for r in off]
    elif len(rows) > 1:
        notes.append(f"time per step grows with the FLOPs (within {low:g}-{high:g}x of depth {rows[0]['depth']}'s "
                     "rate), and the FLOPs grow linearly with depth for each block type")
    for block in sorted({r["block"] for r in rows}):
        steps = [r for r in sorted(rows, key=lambda r: r["depth"])
                 if r["block"] == block and r["activation_mb_per_unit"] is not None]
        if not steps:
            continue
        listing = ", ".join(f"{r['activation_mb_per_unit']:.1f} MB up to depth {r['depth']}" for r in steps)
        per_unit = [r["activation_mb_per_unit"] for r in steps]
        if len(per_unit) < 2:
            verdict = "(two depths: too few to test linearity)"
        elif max(per_unit) <= high * min(per_unit):
            verdict = "linear in depth"
        else:
            verdict = f"not linear in depth ({max(per_unit) / min(per_unit):.2f}x spread)"
        notes.append(f"{block} units: each added unit keeps {listing} of activations: {verdict}")
    return notes
