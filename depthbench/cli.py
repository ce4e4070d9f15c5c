"""The ``depthbench`` command: a thin layer over the library.

Every command turns a :class:`DepthbenchError` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar, get_args

import typer
from rich.console import Console
from rich.table import Table

from depthbench.config import MAX_RUNS, DatasetConfig, ModelConfig, TrainConfig
from depthbench.errors import DepthbenchError
from depthbench.families import FAMILIES

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Depth studies of residual networks (ResNet V1 vs V2, Post-LN vs Pre-LN ViTs, Fixup, SkipInit): "
         "sweep a YAML grid, then report V1-vs-V2 tables by depth.",
)
# Piped output (CI logs, files) gets wide tables rather than rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() else 200
# Messages never wrap (a command to copy stays whole); tables still fit the width.
console = Console(highlight=False, width=_WIDTH, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, width=_WIDTH, soft_wrap=True)

CommandFn = TypeVar("CommandFn", bound=Callable[..., Any])

OutOption = Annotated[Path, typer.Option("--out", help="Folder holding one folder per sweep.")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N; overrides train.device.")]


def _default(family: str, section: str, key: str) -> Any:
    """What a run of ``family`` gets for ``<section>.<key>`` when it leaves it out: the family's default,
    else the config schema's. The commands' defaults and help texts read them here."""
    schema = {"model": ModelConfig, "train": TrainConfig}[section]
    return FAMILIES[family].defaults.get(section, {}).get(key, schema.model_fields[key].default)


# The depths `models` lists when no --max-depth is given: the papers' nets, and a ViT range.
_PAPER_DEPTHS = {"basic": (20, 32, 44, 56, 110, 1202), "bottleneck": (164, 1001)}
_VIT_DEPTHS = (2, 4, 6, 8, 12, 24, 48)
_RESNET_OWN = FAMILIES["resnet"].own_settings
_DATASETS = get_args(DatasetConfig.model_fields["name"].annotation)


def command(fn: CommandFn) -> CommandFn:
    """Register a command whose user errors end as one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DepthbenchError as err:
            err_console.print(f"error: {err}", markup=False)
            raise typer.Exit(err.exit_code) from None

    app.command()(wrapper)
    return fn


def _print_version(asked: bool) -> None:
    if asked:
        from depthbench import __version__

        typer.echo(f"depthbench {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass


@command
def sweep(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="Sweep YAML, e.g. configs/cifar10.yaml.")],
    out: OutOption = Path("runs"),
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Set a key of the file as if written there, e.g. train.steps=2000 or grid.seed=[0,1] (VALUE is YAML; "
             "a grid key sets the axis in every sub-grid); repeat for more. The sweep folder's sweep.yaml keeps the "
             "result.")] = None,
    device: DeviceOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and their state; train nothing.")] = False,
    show_all: Annotated[bool, typer.Option(
        "--all", help="--dry-run: list every run, however many; by default a long list is summarised.")] = False,
    max_runs: Annotated[int, typer.Option(
        "--max-runs", min=1, help="Refuse a grid of more runs than this, most likely a slip in an axis.")] = MAX_RUNS,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Re-run runs that failed before.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed run.")] = False,
    tensorboard: Annotated[bool, typer.Option(
        "--tensorboard", help="Also write TensorBoard event files into each run folder (needs tensorboard).")] = False,
    allow_device_change: Annotated[bool, typer.Option(
        "--allow-device-change", help="Resume checkpoints made on another device type or in another precision "
                                      "(refused by default: the run's numbers would change mid-run).")] = False,
    executor: Annotated[str, typer.Option(
        "--executor", help="Where runs train: local (this machine), ray (a Ray cluster) or slurm (SLURM jobs); "
                           "see docs/cluster.md.")] = "local",
    jobs: Annotated[int, typer.Option(
        "--jobs", min=1, help="local: runs at once, each in its own process and, with several GPUs, on its own GPU.")
    ] = 1,
    address: Annotated[str | None, typer.Option(
        "--address", help="ray: the cluster's address, or 'auto' for the one on this machine; "
                          "default: start a private Ray instance here.")] = None,
    max_restarts: Annotated[int | None, typer.Option(
        "--max-restarts", min=0, help="ray, slurm: restarts of a run whose worker dies or job times out "
                                      "(default: resources.max_restarts).")] = None,
    partition: Annotated[str | None, typer.Option(
        "--partition", help="slurm: the partition (default: resources.partition).")] = None,
    time_min: Annotated[int | None, typer.Option(
        "--time-min", min=1, help="slurm: time limit per job in minutes; longer runs are checkpointed and "
                                  "requeued (default: resources.time_min).")] = None,
    array_parallelism: Annotated[int | None, typer.Option(
        "--array-parallelism", min=1, help="slurm: most jobs running at once (default: resources.array_parallelism).")
    ] = None,
    slurm_local: Annotated[bool, typer.Option(
        "--slurm-local", help="slurm: run the jobs with submitit's local executor on this machine, to try a sweep "
                              "before submitting it.")] = False,
    no_estimate: Annotated[bool, typer.Option(
        "--no-estimate", help="Skip timing a few steps of each distinct net to estimate the sweep's duration "
                              "(local runs only; trials are cached).")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="ray, slurm: also show the engine's own messages, which otherwise go to the sweep's "
                          "sweep.log.")] = False,
) -> None:
    """Train every run of a sweep that is not finished yet; write runs/<name>/results.csv."""
    from depthbench.config import load_sweep
    from depthbench.stopping import StopRequested
    from depthbench.sweep import RunFlags, run_sweep, sweep_dir_for

    cfg = load_sweep(config, overrides or (), max_runs=max_runs)
    if device:
        from depthbench.train import resolve_device

        resolve_device(device, "--device")
    if dry_run:
        _show_plan(cfg, out, device, retry_failed, show_all, estimate_jobs=None if no_estimate else jobs)
        return
    if tensorboard:
        from depthbench.tracking import require_tensorboard

        require_tensorboard()  # fail before training anything
    from depthbench.executors import ExecutorOptions, make_executor

    where = ExecutorOptions(executor, jobs=jobs, address=address, slurm_local=slurm_local, max_restarts=max_restarts,
                            partition=partition, time_min=time_min, array_parallelism=array_parallelism,
                            verbose=verbose)
    runner = make_executor(where, cfg.resources, log=lambda line: console.print(line, markup=False, highlight=False))

    from depthbench.progress import RichReporter

    def again_with(options: Any) -> str:
        """The command that resumes this sweep where it ran, with the options that say where runs train."""
        return "depthbench " + shlex.join([
            "sweep", str(config), *(["--out", str(out)] if out != Path("runs") else []),
            *(arg for setting in overrides or () for arg in ("--set", setting)),
            *(["--device", device] if device is not None else []), *options.flags(),
            *(["--max-runs", str(max_runs)] if max_runs != MAX_RUNS else []),
            *(["--tensorboard"] if tensorboard else []), *(["--allow-device-change"] if allow_device_change else []),
        ])

    again = again_with(where)
    estimate = None

    def say_estimate(todo: list[Any]) -> None:
        # Called by run_sweep once its checks have passed (their errors come first), under its stop signals.
        nonlocal estimate, started
        from depthbench.duration import estimate_line, estimate_sweep, save_estimate

        estimate = estimate_sweep(todo, sweep_dir_for(cfg, out), jobs, share=_halving_share(cfg))
        console.print(estimate_line(estimate, halved=_halving(cfg)), markup=False, highlight=False)
        with contextlib.suppress(OSError):  # the report's comparison is a nicety; a full disk is the sweep's to meet
            save_estimate(sweep_dir_for(cfg, out), estimate)
        started = time.perf_counter()  # what is compared with the estimate is the training, not the trial

    timed = not no_estimate and executor == "local"  # elsewhere the runs train on machines this one cannot time
    started = time.perf_counter()
    try:
        with RichReporter(console) as reporter:
            flags = RunFlags(retry_failed=retry_failed, tensorboard=tensorboard,
                             allow_device_change=allow_device_change)
            outcome = run_sweep(cfg, out, device=device, flags=flags, fail_fast=fail_fast,
                                reporter=reporter, executor=runner, before_training=say_estimate if timed else None)
    except StopRequested:  # a first Ctrl-C or SIGTERM outside the step loops (decoding, building, starting up)
        _interrupted(cfg, out, device, again)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without waiting for checkpoints
        err_console.print(f"aborted: runs in progress keep their last checkpoint; run `{again}` again to resume")
        raise typer.Exit(130) from None
    folder = sweep_dir_for(cfg, out)
    failed, busy = len(outcome.failed), outcome.count("busy")
    console.print(f"results: {folder / 'results.csv'}")
    if outcome.pruned:
        console.print(f"{len(outcome.pruned)} run(s) pruned by successive halving (tune.halving), each with its "
                      "checkpoint kept")
    if estimate is not None and estimate.run_s:
        from depthbench.duration import compare_line

        console.print(compare_line(estimate, time.perf_counter() - started), markup=False, highlight=False)
    if busy:
        console.print(f"{busy} run(s) are being trained by another process; re-run later to pick up what is left")
    if outcome.fault is not None:
        from depthbench.faults import EXIT_CODE

        stopped = outcome.count("interrupted")
        err_console.print(f"stopped: {outcome.fault}; {stopped} run(s) interrupted, each keeps its last checkpoint; "
                          f"{outcome.fault.fix}, then run `{again}` to resume", markup=False)
        raise typer.Exit(EXIT_CODE)
    if outcome.interrupted:
        _interrupted(cfg, out, device, again)
    if failed:
        # Runs that ran out of SLURM restarts: the line resumes them with enough restarts (and time).
        advised = getattr(runner, "resume_options", None)
        if advised:
            again = again_with(dataclasses.replace(where, **advised))
        err_console.print(f"{failed} run(s) failed; see error.log in their folders, "
                          f"then `{again} --retry-failed`")
        raise typer.Exit(1)
    console.print(f"next: depthbench report {folder}")


def _halving(cfg: Any) -> bool:
    """Whether the sweep prunes runs on the way (successive halving)."""
    return cfg.tune is not None and cfg.tune.halving is not None


def _halving_share(cfg: Any) -> dict[str, float] | None:
    """Under successive halving, each run's expected share of its steps, for the duration estimate."""
    if not _halving(cfg):
        return None
    from depthbench.halving import expected_share

    return expected_share(cfg.runs(), cfg.tune, list(cfg.axes()))


def _interrupted(cfg: Any, out: Path, device: str | None, again: str) -> NoReturn:
    from depthbench.sweep import plan

    left = len(plan(cfg, out, device=device)[1])
    err_console.print(f"interrupted: {left} run(s) left, progress is checkpointed; run `{again}` again to resume")
    raise typer.Exit(130)


def _estimate(cfg: Any, out: Path, device: str | None, retry_failed: bool, jobs: int) -> Any:
    """The sweep's estimated duration (depthbench.duration) for the runs left to do."""
    from depthbench.duration import estimate_sweep
    from depthbench.sweep import plan, sweep_dir_for

    todo = plan(cfg, out, device=device, retry_failed=retry_failed)[1]
    return estimate_sweep(todo, sweep_dir_for(cfg, out), jobs, share=_halving_share(cfg))


# A --dry-run table longer than this shows its first and last rows and counts the rest (--all: every row).
_PLAN_ROWS = 40


def _show_plan(cfg: Any, out: Path, device: str | None, retry_failed: bool, show_all: bool = False,
               estimate_jobs: int | None = None) -> None:
    from depthbench.estimate import format_bytes, plan_estimates
    from depthbench.sweep import plan, run_states, sweep_dir_for

    runs, todo = plan(cfg, out, device=device, retry_failed=retry_failed)
    folder = sweep_dir_for(cfg, out)
    states = run_states(folder, runs)
    pending = {r.run_id for r in todo}
    shown = runs if show_all or len(runs) <= _PLAN_ROWS else [*runs[:_PLAN_ROWS // 2], *runs[-_PLAN_ROWS // 2:]]
    estimates, free = plan_estimates(shown)
    rooms = ", ".join(f"{name} {'not on this machine' if b is None else format_bytes(b)}" for name, b in free.items())
    table = Table(title=f"{cfg.name}: {len(todo)} of {len(runs)} runs to do ({folder})",
                  caption=f"memory: estimated training peak on the run's device; free now: {rooms}")
    timing = _estimate(cfg, out, device, retry_failed, estimate_jobs) if estimate_jobs else None
    for column in ("run id", "version", "depth", "block", "seed", "steps", "params", "memory", "state",
                   *(("step", "time") if timing else ())):
        table.add_column(column)
    for i, run in enumerate(shown):
        if len(shown) < len(runs) and i == len(shown) // 2:
            table.add_row(f"... {len(runs) - len(shown):,} more runs")
        block, n = run.blocks
        state = states[run.run_id]
        est, room = estimates[run.run_id], free[run.train.device]
        memory = "n/a" if est is None else format_bytes(est.total) + (" (too big)" if room and est.total > room else "")
        table.add_row(run.run_id, run.version, str(run.depth), f"{block} (n={n})", str(run.seed),
                      str(run.train.steps), "n/a" if est is None else f"{est.params:,}", memory,
                      f"{state} -> to do" if run.run_id in pending else state,
                      *(_run_timing(timing, run.run_id) if timing else ()))
    console.print(table)
    if timing:
        from depthbench.duration import estimate_line

        console.print(estimate_line(timing, halved=_halving(cfg)), markup=False, highlight=False)
    if len(shown) < len(runs):
        from depthbench.sweep import plan_summary

        for line in plan_summary(runs, states, pending, list(cfg.axes())):
            console.print(line)
        return
    console.print("grid: " + "; ".join(f"{key}: {', '.join(map(str, values))}" for key, values in cfg.axes().items()))


def _run_timing(timing: Any, run_id: str) -> tuple[str, str]:
    """A run's estimated step time and remaining duration, as the --dry-run table shows them."""
    from depthbench.duration import format_duration

    if run_id not in timing.run_s:
        return "", ""
    return format_duration(timing.step_s[run_id]), format_duration(timing.run_s[run_id])


@command
def report(
    sweep_dir: Annotated[Path | None, typer.Argument(
        metavar="SWEEP_DIR", help="A sweep folder; default: every sweep under --out.")] = None,
    out: OutOption = Path("runs"),
    group_by: Annotated[list[str] | None, typer.Option(
        "--group-by", help="Grid axis that makes a table row, e.g. model.unit; repeat for more "
                           "(default: depth and every varying setting). Runs differing in other axes are pooled.")] = None,
    sort: Annotated[list[str] | None, typer.Option(
        "--sort", help="Order rows by a row axis, e.g. depth or model.unit:desc; repeat for ties.")] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Draw the PNG figures into the sweep folder.")] = True,
) -> None:
    """Rebuild results.csv; write summary.csv, report.md and plots: V1 vs V2 side by side per depth."""
    from depthbench.report import build_report, family_title, find_sweeps

    root = sweep_dir or out
    if not root.is_dir():
        raise DepthbenchError(f"'{root}' is not a folder; run `depthbench sweep CONFIG` first or name a sweep folder")
    sweeps = find_sweeps(root)
    if not sweeps:
        raise DepthbenchError(f"no sweep results under '{root}'; run `depthbench sweep CONFIG` first")
    for folder in sweeps:
        rep = build_report(folder, group_by=group_by, sort=sort or (), plots=plots)
        if rep.table.empty:
            console.print(f"{folder.name}: no runs yet")
            continue
        done = int(rep.table.status.isin(("completed", "diverged", "failed")).sum())
        pruned = f"; {rep.pruned} pruned by successive halving, left out" if rep.pruned else ""
        console.print(f"{rep.title} ({done}/{len(rep.table)} runs finished{pruned})")
        for section in rep.sections:
            named = f"{family_title(section.family)} " if len(rep.sections) > 1 else ""
            names = section.names
            if section.versions.cells:
                _print_table(f"{named}{names['v1']} vs {names['v2']}", section.versions)
            if section.units is not None:
                reference = FAMILIES[section.family].version_unit["v2"]
                _print_table(f"{named}units, each against {reference}", section.units)
        if rep.tuned is not None:
            axes = ", ".join(rep.tuned.outcome.tune.axes)
            _print_table(f"tuned: each arm at its selected {axes} (chosen on {rep.tuned.outcome.tune.metric})",
                         rep.tuned.arms, caption="acc = final test accuracy % at the selected value, mean ± std")
            if rep.tuned.pairs.cells:
                _print_table("tuned: compared at each arm's own selected value", rep.tuned.pairs,
                             caption="difference of mean test accuracy, points")
        if rep.reference:
            ref = Table(title=f"{folder.name}: paper vs measured (test error %, fail = above 20%)")
            for column in rep.reference[0]:
                ref.add_column(column, justify="right")
            for row in rep.reference[1]:
                ref.add_row(*row)
            console.print(ref)
        written = [folder / "report.md", folder / "summary.csv", folder / "results.csv", *rep.plots.values()]
        console.print(f"wrote {', '.join(str(p) for p in written)}")


def _print_table(title: str, table: Any, caption: str = "acc = final test accuracy %, mean ± std over seeds") -> None:
    """One of report.md's tables on the terminal, with the columns a reader compares at a glance (report.md
    keeps the best values and the 95% intervals), then its notes."""
    shown = [i for i, name in enumerate(table.header) if not name.endswith(("best", "95% CI"))]
    out = Table(title=title, caption=caption)
    for i in shown:  # the row keys stay whole; statistics wrap if space is short
        out.add_column(table.header[i], justify="right", no_wrap=i < len(table.keys))
    for row in table.cells:
        out.add_row(*(row[i] for i in shown))
    console.print(out)
    for note in table.notes:
        console.print(note.replace("Warning:", "warning:", 1).replace("Note:", "note:", 1))


@command
def models(
    family: Annotated[str, typer.Option(help=f"{' or '.join(FAMILIES)}.")] = "resnet",
    max_depth: Annotated[int, typer.Option(help="List every valid depth up to this one (default: the papers' depths; "
                                                f"for vit {', '.join(map(str, _VIT_DEPTHS))}).")] = 0,
    image_size: Annotated[int, typer.Option(help="Input size for the FLOP count (and a ViT's patch count).")] = 32,
    num_classes: Annotated[int, typer.Option(help="Classes of the head.")] = 10,
    width: Annotated[int | None, typer.Option(
        min=1, help=f"Base width; default {_default('resnet', 'model', 'width')} (resnet), "
                    f"{_default('vit', 'model', 'width')} (vit).")] = None,
    heads: Annotated[int | None, typer.Option(
        min=1, help=f"vit: attention heads; default {_default('vit', 'model', 'heads')}.")] = None,
    patch: Annotated[int | None, typer.Option(
        min=1, help=f"vit: patch side; default {_default('vit', 'model', 'patch')}.")] = None,
    mlp_ratio: Annotated[float | None, typer.Option(
        help=f"vit: MLP width over width; default {_default('vit', 'model', 'mlp_ratio')}.")] = None,
    pool: Annotated[str | None, typer.Option(
        help=f"vit: cls (class token) or mean; default {_default('vit', 'model', 'pool')}.")] = None,
) -> None:
    """Valid depths of each version and block (or ViT unit), with parameters and forward FLOPs per image."""
    from depthbench.architecture import choice

    vit = {"heads": heads, "patch": patch, "mlp_ratio": mlp_ratio, "pool": pool}
    width = width or _default(choice("family", family, FAMILIES), "model", "width")
    if family == "vit":
        settings = {key: _default("vit", "model", key) if value is None else value for key, value in vit.items()}
        console.print(_vit_table(max_depth, image_size, num_classes, width, **settings))
        return
    given = [f"--{key.replace('_', '-')}" for key, value in vit.items() if value is not None]
    if given:
        options = f"{given[0]} is a ViT option" if len(given) == 1 else f"{', '.join(given)} are ViT options"
        raise DepthbenchError(f"{options}; add --family vit")
    console.print(_resnet_table(max_depth, image_size, num_classes, width))


def _resnet_table(max_depth: int, image_size: int, num_classes: int, width: int) -> Table:
    import torch

    from depthbench.models import BLOCKS, build_model, count_params, forward_flops, valid_depths

    widened = "" if width == _default("resnet", "model", "width") else f", width {width}"
    table = Table(title=f"ResNet depths ({num_classes} classes, {image_size}x{image_size} input{widened}, "
                        "FLOPs = 2 x MACs)")
    for column in ("block", "depth", "n", "v1 params", "v2 params", "forward GFLOPs"):
        table.add_column(column, justify="right")
    for block in BLOCKS:
        depths = valid_depths(block, max_depth) if max_depth else _PAPER_DEPTHS[block]
        for depth in depths:
            with torch.device("meta"):  # shapes only: no memory, no init cost, even for ResNet-1202
                nets = {v: build_model(v, depth, num_classes, block=block, width=width) for v in ("v1", "v2")}
                flops = forward_flops(nets["v2"], image_size)
            table.add_row(block, str(depth), str(BLOCKS[block].units_per_stage(depth)), f"{count_params(nets['v1']):,}",
                          f"{count_params(nets['v2']):,}", f"{flops / 1e9:.3f}")
    return table


def _vit_table(max_depth: int, image_size: int, num_classes: int, width: int, *, heads: int, patch: int,
               mlp_ratio: float, pool: str) -> Table:
    # Counted by formula (depthbench.transformer): nothing is built, and a shape that cannot be is one error.
    from depthbench.transformer import UNITS, vit_forward_flops, vit_param_count

    shape = {"width": width, "heads": heads, "mlp_ratio": mlp_ratio, "patch": patch, "image_size": image_size,
             "in_channels": 3, "num_classes": num_classes, "pool": pool}
    table = Table(title=f"ViT depths ({num_classes} classes, {image_size}x{image_size} input, width {width}, "
                        f"{heads} heads, patch {patch}, MLP ratio {mlp_ratio:g}, {pool} pooling; "
                        "v1 = post_ln, v2 = pre_ln; FLOPs = 2 x MACs)")
    for column in ("depth", *(f"{unit} params" for unit in UNITS), "forward GFLOPs"):
        table.add_column(column, justify="right")
    for depth in range(1, max_depth + 1) if max_depth else _VIT_DEPTHS:
        counts = [f"{vit_param_count(depth, unit=unit, **shape):,}" for unit in UNITS]
        table.add_row(str(depth), *counts, f"{vit_forward_flops(depth, **shape) / 1e9:.3f}")
    return table


@command
def bench(
    version: Annotated[str, typer.Option(help="v1 or v2.")] = "v2",
    depth: Annotated[int, typer.Option(help="Depth of the net to time (a ViT's: its blocks).")] = 56,
    family: Annotated[str, typer.Option(help=f"{' or '.join(FAMILIES)}.")] = "resnet",
    unit: Annotated[str | None, typer.Option(help="Unit overriding the version's; " + "; ".join(
        f"{name}: {', '.join(f.units)}" for name, f in FAMILIES.items()) + ".")] = None,
    width: Annotated[int | None, typer.Option(
        min=1, help="Base width of a ResNet, embedding width of a ViT (default: the family's).")] = None,
    heads: Annotated[int | None, typer.Option(min=1, help="vit: attention heads (default: the family's).")] = None,
    patch: Annotated[int | None, typer.Option(min=1, help="vit: patch side (default: the family's).")] = None,
    mlp_ratio: Annotated[float | None, typer.Option(
        help="vit: MLP hidden width over width (default: the family's).")] = None,
    depths: Annotated[str | None, typer.Option(
        help="Comma-separated depths, e.g. 20,56,110,164: a table of time and memory against depth, "
             "with and without checkpointing, instead of the comparison.")] = None,
    concurrent: Annotated[str | None, typer.Option(
        help="Comma-separated counts of runs at once, e.g. 1,2,4: the total images/s of that many runs of the "
             "net sharing the device, each in its own process (CPU: cores/N threads each; CUDA: the same GPU), "
             "against one run alone (always measured), instead of the comparison.")] = None,
    batch_size: Annotated[int, typer.Option(
        min=1, help="Images per step.")] = _default("resnet", "train", "batch_size"),
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per measurement, after the warmup.")] = 20,
    warmup: Annotated[int, typer.Option(min=1, help="Untimed steps first (the first one is reported apart).")] = 3,
    device: DeviceOption = None,
    precision: Annotated[str, typer.Option(
        help="auto (bf16 on CUDA and on CPUs with native bf16, i.e. oneDNN sees AMX or AVX512-BF16; fp32 "
             "elsewhere), fp32 or bf16.")] = "auto",
    checkpointing: Annotated[bool, typer.Option(
        "--checkpointing", help="Activation checkpointing (model.checkpointing).")] = False,
    segments: Annotated[int, typer.Option(
        min=0, help="Checkpointed segments per stage; 0: one per residual unit.")] = 0,
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the trainer's model, or not; by default as a 64,000-step run "
                                       "would (train.compile auto: compiled on CPUs with AMX in bf16). Compile time "
                                       "is reported apart.")] = None,
    cuda_graph: Annotated[bool, typer.Option(
        "--cuda-graph/--no-cuda-graph", help="On CUDA, capture the trainer's step once as a CUDA graph and "
                                             "replay it (train.cuda_graph); no effect on a CPU.")] = True,
    data: Annotated[str, typer.Option(
        help="auto (the shared CIFAR-10 tarball if present, else synthetic), synthetic, digits (scikit-learn's "
             "8x8 digits), or an image folder / .tar.gz.")] = "auto",
    train_subset: Annotated[int, typer.Option(min=1, help="Training images to load.")] = 5000,
    workers: Annotated[int | None, typer.Option(
        min=0, help="DataLoader workers of the usual pipeline; default min(4, cores).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Time the trainer against the usual torchvision + DataLoader script: images/s, speedup, MFU, memory,
    and the host's cost of a step (ms on tiny batches, kernels dispatched).

    --depths: time and memory against depth instead. --concurrent: several runs sharing the device instead.
    """
    from depthbench.bench import (
        BenchSpec, parse_counts, parse_depths, render_bench, render_concurrent, render_scaling, run_bench,
        run_concurrent, run_scaling,
    )

    if depths and concurrent:
        raise DepthbenchError("--depths and --concurrent are two separate measurements; give one of them")
    spec = BenchSpec(version=version, depth=depth, family=family, unit=unit, width=width, heads=heads, patch=patch,
                     mlp_ratio=mlp_ratio, batch_size=batch_size, steps=steps, warmup=warmup,
                     device=device or "auto", precision=precision, checkpointing=checkpointing, segments=segments,
                     compile="auto" if compile is None else compile, cuda_graph=cuda_graph, data=data,
                     train_subset=train_subset, workers=workers)
    if depths:
        result, render = run_scaling(spec, parse_depths(depths)), render_scaling
    elif concurrent:
        result, render = run_concurrent(spec, parse_counts(concurrent)), render_concurrent
    else:
        result, render = run_bench(spec), render_bench
    if json_output:
        typer.echo(json.dumps(result))
    else:
        console.print(render(result))


@command
def diagnose(
    family: Annotated[str, typer.Option(
        "--family", help="resnet, or vit (a Vision Transformer; its v1 is "
                         f"{FAMILIES['vit'].version_labels['v1']}, its v2 {FAMILIES['vit'].version_labels['v2']}).")
    ] = "resnet",
    version: Annotated[list[str] | None, typer.Option("--version", help="v1 or v2; repeat to compare (default: both).")] = None,
    depth: Annotated[list[int] | None, typer.Option(
        "--depth", help="Depth (a ViT's: its blocks); repeat for several (default: "
                        f"{', '.join(f'{f.default_depth} for {name}' for name, f in FAMILIES.items())}).")] = None,
    unit: Annotated[list[str] | None, typer.Option(
        "--unit", help="Unit overriding the version's; repeat for several. "
                       + "; ".join(f"{name}: {', '.join(f.units)}" for name, f in FAMILIES.items()) + ".")] = None,
    shortcut_gate: Annotated[str, typer.Option(
        "--shortcut-gate", help="resnet: shortcut of same-shape units.")] = _RESNET_OWN["shortcut_gate"],
    gate_bias: Annotated[float, typer.Option(
        "--gate-bias", help="resnet: initial b_g of gating shortcuts.")] = _RESNET_OWN["gate_bias"],
    width: Annotated[int | None, typer.Option(
        help="Base width of a ResNet, embedding width of a ViT (default: the family's, "
             f"{_default('resnet', 'model', 'width')} and {_default('vit', 'model', 'width')}).")] = None,
    heads: Annotated[int | None, typer.Option(
        help=f"vit: attention heads (default {_default('vit', 'model', 'heads')}).")] = None,
    patch: Annotated[int | None, typer.Option(
        help=f"vit: side of the square patches (default {_default('vit', 'model', 'patch')}).")] = None,
    mlp_ratio: Annotated[float | None, typer.Option(
        help=f"vit: MLP hidden width over width (default {_default('vit', 'model', 'mlp_ratio'):g}).")] = None,
    pool: Annotated[str | None, typer.Option(
        help=f"vit: cls (class token) or mean of the tokens (default {_default('vit', 'model', 'pool')}).")] = None,
    dataset: Annotated[str, typer.Option(
        help=", ".join(_DATASETS[:-1]) + f" or {_DATASETS[-1]}.")] = DatasetConfig.model_fields["name"].default,
    data_root: Annotated[Path | None, typer.Option(help="Data folder or archive (imagefolder: required).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Resize images to this size.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images in the measured batch.")] = 16,
    steps: Annotated[int, typer.Option(
        help="Also measure after this many optimizer steps (the family's: SGD, AdamW; 0: initialisation only).")] = 0,
    lr: Annotated[float | None, typer.Option(
        help="Constant learning rate of those steps (default: the family's, "
             f"{_default('resnet', 'train', 'lr'):g} and {_default('vit', 'train', 'lr'):g}).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the batch.")] = 0,
    device: DeviceOption = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the run folders, diagnose.json/.csv/.png.")] = Path(
        "runs/diagnose"),
) -> None:
    """Gradient and signal flow per residual unit or Transformer block at initialisation (and after --steps):
    V1 vs V2, Post-LN vs Pre-LN."""
    from depthbench.diagnose import build_configs, summarize_row, write_outputs
    from depthbench.diagnose import diagnose as run_diagnose

    if steps < 0:
        raise DepthbenchError(f"--steps must be 0 or more (got {steps})")
    # Settings not given stay out, so that the family's defaults fill them.
    model = {"family": family, "shortcut_gate": shortcut_gate, "gate_bias": gate_bias, "width": width,
             "heads": heads, "patch": patch, "mlp_ratio": mlp_ratio, "pool": pool}
    configs = build_configs(
        versions=version or ["v1", "v2"], depths=depth, units=unit or [None],
        model={k: v for k, v in model.items() if v is not None},
        dataset={"name": dataset, "root": str(data_root) if data_root else None, "image_size": image_size},
        batch_size=batch_size, steps=steps, seed=seed, lr=lr, device=device or "auto",
    )
    diagnoses = run_diagnose(configs, out)
    # The last column is what can cut the identity path: a ReLU after the addition in a ResNet, the
    # LayerNorm after it in a ViT.
    if family == "vit":
        last, last_key, last_spec = "id gain", "mean_identity_gain", ".3g"
        caption = ("||g|| = norm of dL/dx at a block's input; cos = mean cos(x_l, x_l+1); "
                   "id gain = mean factor the identity path multiplies x_l by (1: untouched)")
    else:
        last, last_key, last_spec = "zeroed", "mean_shortcut_zeroed", ".2%"
        caption = ("||g|| = norm of dL/dx at a unit's input; cos = mean cos(x_l, x_l+1); "
                   "zeroed = share of shortcut energy a ReLU after the addition zeroes")
    table = Table(title=f"Gradient and signal flow (batch of {batch_size} images, seed {seed})", caption=caption)
    for column in ("net", "depth", "units", "step", "loss", "||g|| first", "||g|| middle", "||g|| last",
                   "first/last", "mean cos", last, "seconds"):
        table.add_column(column, justify="right")
    for d in diagnoses:
        for row in d.rows:
            sm = summarize_row(row)
            table.add_row(d.label, str(d.cfg.depth), str(sm["units"]), str(sm["step"]), _num(sm["loss"], ".3f"),
                          _num(sm["grad_first"], ".3g"), _num(sm["grad_middle"], ".3g"), _num(sm["grad_last"], ".3g"),
                          _num(sm["grad_first_over_last"], ".3g"), _num(sm["mean_cosine"], ".3f"),
                          _num(sm[last_key], last_spec), f"{d.seconds:.1f}")
    console.print(table)
    files = write_outputs(diagnoses, out)
    console.print(f"wrote {', '.join(str(p) for p in files.values())}")

def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    # Library warnings (scipy's on tied seeds, torch's deprecations) are not the user's to act on, so the
    # command keeps them off the terminal; the environment variable also quiets --jobs workers, local Ray
    # workers and SLURM jobs, which inherit it. Setting PYTHONWARNINGS (or -W) shows them again.
    if not sys.warnoptions and "PYTHONWARNINGS" not in os.environ:
        os.environ["PYTHONWARNINGS"] = "ignore"
        warnings.simplefilter("ignore")
    app()


if __name__ == "__main__":
    main()
