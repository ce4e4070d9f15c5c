"""The results of :mod:`depthbench.bench.modes` for the terminal: a few lines and a rich table each."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table

from depthbench.architecture import EVERY_UNIT
from depthbench.bench.modes import PAPER_STEPS
from depthbench.bench.spec import HOST_BATCH, HOST_IMAGE_SIZE, HOST_STEPS


def render_bench(result: dict[str, Any]) -> Group:
    """The single-net measurement as a few lines and a table, for the terminal."""
    r = result
    header = (f"{_net_title(r)}, {r['params']:,} params), "
              f"batch {r['batch_size']}, {r['steps']} timed steps after {r['warmup']}"
              + (f", checkpointing ({_segments(r['checkpoint_segments'])})" if r["checkpointing"] else "")
              + (", compiled" if r["compile"] else "") + _graph(r))
    table = Table()
    for column in ("", "depthbench trainer", f"usual pipeline ({r['workers']} workers)"):
        table.add_column(column, justify="right")
    table.add_row("images/s", f"{r['img_per_s']:.1f}", f"{r['baseline_img_per_s']:.1f}")
    table.add_row("ms per step", f"{1000 * r['step_s']:.1f}", f"{1000 * r['baseline_step_s']:.1f}")
    table.add_row("speedup", f"{r['speedup']:.2f}x", "1.00x")
    lines = [
        f"training FLOPs per image {_si(r['train_flops_per_img'], 'FLOP')} (3x forward); achieved "
        f"{_si(r['achieved_flops'], 'FLOP/s')} of a {_si(r['matmul_peak_flops'], 'FLOP/s')} matmul peak "
        f"({r['precision']} torch.mm, n={r['matmul_peak_size']}): MFU {100 * r['mfu']:.1f}%",
        f"training memory {_mb(r['peak_mem_mb'])} above data and weights (peak {_mb(r['peak_mem_total_mb'])} in all), "
        f"of which activations saved for backward {_mb(r['activation_mb'])}",
        f"evaluation {r['eval_img_per_s']:.0f} images/s (inference mode, batches of 1000)",
        f"host cost of a step {r['host_ms_per_step']:.2f} ms ({100 * r['host_share']:.0f}% of a full step): the median "
        f"of {HOST_STEPS} steps on batches of {HOST_BATCH} {HOST_IMAGE_SIZE}x{HOST_IMAGE_SIZE} images; "
        f"{r['kernels_per_step']} kernels per step ({_phases(r['kernels_by_phase'])}), "
        f"{1000 * r['host_ms_per_step'] / r['kernels_per_step']:.0f} µs each",
        f"per-run overhead {r['overhead_s']:.2f} s: data load {r['data_load_s']:.2f} s, setup {r['setup_s']:.2f} s, "
        f"first step {1000 * r['first_step_s']:.0f} ms vs {1000 * r['step_s']:.0f} ms steady"
        + (f" (compile {r['compile_s']:.1f} s)" if r["compile"] else "")
        + f"; process start to bench {r['startup_s']} s; "
        f"a {PAPER_STEPS:,}-step run would train {r['paper_run_h']:.1f} h",
    ]
    return Group(header, _where(r), table, *lines, *(f"note: {note}" for note in r.get("step_notes", ())))


def render_scaling(result: dict[str, Any]) -> Group:
    """The scaling table, one row per depth, then the notes on linearity."""
    r = result
    header = (f"{r['version']} time per step and training memory against depth, batch {r['batch_size']}, "
              f"{r['steps']} timed steps after {r['warmup']}; "
              f"ckpt = checkpointing ({_segments(r['checkpoint_segments'])}); "
              f"matmul peak {_si(r['matmul_peak_flops'], 'FLOP/s')}")
    table = Table()
    for column in ("depth", "block (n)", "params", "train GFLOP/img", "ms/step", "img/s", "MFU", "time vs FLOPs",
                   "host ms", "kernels", "memory", "activations", "ms/step ckpt", "memory ckpt", "activations ckpt"):
        table.add_column(column, justify="right")
    for row in r["rows"]:
        ckpt_ms = "n/a" if row["step_s_ckpt"] is None else f"{1000 * row['step_s_ckpt']:.0f}"
        table.add_row(
            str(row["depth"]), f"{row['block']} ({row['units_per_stage']})", f"{row['params']:,}",
            f"{row['train_flops_per_img'] / 1e9:.3f}", f"{1000 * row['step_s']:.0f}", f"{row['img_per_s']:.1f}",
            f"{100 * row['mfu']:.1f}%", f"{row['time_vs_flops']:.2f}x", f"{row['host_ms_per_step']:.1f}",
            str(row["kernels_per_step"]), _mb(row["peak_mem_mb"]),
            _mb(row["activation_mb"]), ckpt_ms, _mb(row["peak_mem_mb_ckpt"]), _mb(row["activation_mb_ckpt"]),
        )
    legend = (f"host ms: a step on batches of {HOST_BATCH} {HOST_IMAGE_SIZE}x{HOST_IMAGE_SIZE} images, where "
              "launching its kernels is all it costs; kernels: the aten calls of one step that reach a kernel; "
              "memory: peak above data and weights (CPU: resident set; CUDA: allocator); activations: tensors the "
              "forward pass saves for backward; ckpt: the same with activation checkpointing")
    return Group(header, _where(r), table, legend, *(f"note: {note}" for note in r["notes"]))


def render_concurrent(result: dict[str, Any]) -> Group:
    """Total and per-run images/s of 1, 2, ... runs sharing the device, then whether sharing pays."""
    r = result
    header = (f"{_net_title(r)}, {r['params']:,} params), "
              f"batch {r['batch_size']}, {r['steps']} timed steps after {r['warmup']}, "
              "each run in its own process, timed together" + _graph(r))
    table = Table()
    for column in ("runs at once", "threads each", "total img/s", "per run img/s", "slowest run img/s",
                   "wall img/s", "vs one run", "noise", "memory", "GPU memory in use"):
        table.add_column(column, justify="right")
    for row in r["rows"]:
        table.add_row(
            str(row["runs"]), str(row["threads_per_run"]), f"{row['total_img_per_s']:.1f}",
            f"{row['per_run_img_per_s']:.1f}", f"{row['slowest_run_img_per_s']:.1f}", f"{row['wall_img_per_s']:.1f}",
            f"{row['speedup']:.2f}x", f"{100 * row['noise']:.0f}%", _mb(row["peak_mem_mb"]),
            _mb(row["device_used_mb"]),
        )
    legend = ("wall img/s: every image over the time from the first run's start to the last run's end; noise: "
              "the spread of a run's timing windows; memory: the runs' peaks added up (CPU: resident sets, data "
              "and interpreter included; CUDA: allocator peaks); GPU memory in use: the device's, contexts included")
    return Group(header, _where(r), table, legend, r["verdict"])


def _si(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MB"


def _phases(by_phase: dict[str, int]) -> str:
    return ", ".join(f"{count} {phase}" for phase, count in by_phase.items())


def _graph(result: dict[str, Any]) -> str:
    if not result["device"].startswith("cuda"):
        return ""
    if result["cuda_graph"] and result.get("cuda_graph_used") is False:  # asked for, refused by its self-check
        return ", CUDA graph refused, eager"
    return ", CUDA graph" if result["cuda_graph"] else ", no CUDA graph"


def _segments(segments: int) -> str:
    return "one segment per unit" if segments >= EVERY_UNIT else f"{segments} segments per stage"


def _where(result: dict[str, Any]) -> str:
    load = f", 1-min load {result['load_1m']} -> {result['load_1m_end']}" if result.get("load_1m") is not None else ""
    return (f"{result['device']} ({result['device_name']}, {result['cpu_capability']}, {result['threads']} threads), "
            f"{result['precision']}{load}; data: {result['data']}")


def _net_title(r: dict[str, Any]) -> str:
    """``v2 ResNet-56 (basic, n=9`` or ``v2 ViT-24 (pre_ln, 24 blocks``, closed by the caller."""
    if r.get("family") == "vit":
        return f"{r['version']} ViT-{r['depth']} ({r['block']}, {r['depth']} blocks"
    return f"{r['version']} ResNet-{r['depth']} ({r['block']}, n={r['units_per_stage']}"
