"""The study's figures, as PNG files: error against depth, training curves, gradient flow per unit, and a
tuned sweep's validation metric against the tuned value.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
state), so plotting works on headless machines and from worker threads. Each function takes tidy
data, writes one PNG and returns its path, or None when there is nothing to draw.

A *series* is one line: what the report names it (a version, ``V1`` or ``Post-LN``, or a unit, ``fixup``)
with the settings that set it apart (``V2 width=16``). Colours follow the series, line styles the training
step, so a series reads the same in every figure.
"""

from __future__ import annotations

import io
import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from PIL import Image

_STYLES = ("-", "--", ":", "-.")
_DPI = 100


def _colours(labels: Sequence[str]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)] + ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79"]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


_MAX_TICKS = 12  # beyond this many the labels of close values (a ViT's depths 2, 3, 4, ...) run together


def _depth_axis(ax: Axes, depths: Sequence[int], label: str = "depth (weight layers)") -> None:
    """Depth on a log axis when it spans a decade (a ResNet's 20 ... 1001, a ViT's 2 ... 48), labelled with
    the depths themselves: every one, or an even spread with both ends when there are many."""
    depths = sorted(set(depths))
    if depths[0] > 0 and depths[-1] / depths[0] >= 10:
        ax.set_xscale("log")
        ax.minorticks_off()
    ticks = depths[:: math.ceil(len(depths) / _MAX_TICKS)]
    ticks[-1] = depths[-1]  # the deepest net always gets its label, in place of the spread's last one (no crowding)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(d) for d in ticks])
    ax.set_xlabel(label)


def _spans_decades(values: Sequence[float]) -> bool:
    positive = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return bool(positive) and max(positive) / min(positive) >= 10


def _save(fig: Figure, path: Path) -> Path:
    """Write the figure as a 256-colour PNG: line plots need no more, and the files stay small enough to
    commit (a third of the size of full colour)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    path.parent.mkdir(parents=True, exist_ok=True)
    palette.save(path, optimize=True)
    return path


def error_vs_depth(
    table: pd.DataFrame, series: Sequence[str], path: Path, title: str = "",
    depth_label: str = "depth (weight layers)",
) -> Path | None:
    """Final test error (%) against depth, a line per series: mean over seeds with ± 1 std error bars.

    ``table`` has one row per run (``depth``, ``status``, ``test_acc`` and the ``series`` columns);
    only completed runs count, and lines come in the order their runs first appear. A point's label
    gives its n where seeds are missing. ``depth_label`` names the x axis (what the family's depth counts).
    """
    done = table[(table.status == "completed") & table.test_acc.notna()].copy()
    if done.empty:
        return None
    done["error"] = 100 * (1 - done.test_acc.astype(float))
    done["series"] = series_labels(done, series)
    labels = list(dict.fromkeys(done.series))
    colours = _colours(labels)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    depths = sorted(done.depth.unique())
    for i, label in enumerate(labels):
        runs = done[done.series == label]
        stats = runs.groupby("depth").error.agg(["mean", "std", "count"]).reset_index()
        spread = stats["std"].fillna(0)
        # error bars stop at 0% and 100% error; each run is a dot, nudged sideways so the series do not overlap
        bars = [spread.clip(upper=stats["mean"]), spread.clip(upper=100 - stats["mean"])]
        ax.errorbar(stats.depth, stats["mean"], yerr=bars, marker="o",
                    capsize=4, color=colours[label], label=f"{label}: mean ± std (n = {_counts(stats['count'])})")
        nudge = 1 + 0.03 * (i - (len(labels) - 1) / 2) if len(depths) > 1 else 1
        ax.scatter(runs.depth * nudge, runs.error, s=14, color=colours[label], alpha=0.45, zorder=3)
    _depth_axis(ax, done.depth.tolist(), depth_label)
    ax.set_ylabel("test error (%)")
    ax.set_title(title or "Final test error against depth (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    # Beside the axes once the lines are many, where it cannot hide them; the dots are the single runs.
    beside = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if len(labels) > 4 else {}
    ax.legend(fontsize="small", title="dots: each run", title_fontsize="small", **beside)
    return _save(fig, path)


def _counts(counts: pd.Series) -> str:
    values = sorted({int(c) for c in counts})
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def series_labels(table: pd.DataFrame, series: Sequence[str]) -> pd.Series:
    """``V1``, ``fixup width=16``: the first series column's value as it is, then each other series setting
    as key=value, the key without its section (``width``, ``warmup.steps``); missing values left out."""
    first, *settings = series

    def label(row: pd.Series) -> str:
        parts = [str(row[first])]
        for key in settings:
            value = row[key]
            if not (value is None or (isinstance(value, float) and math.isnan(value))):
                parts.append(f"{key.split('.', 1)[-1]}={value}")
        return " ".join(parts)

    return table.apply(label, axis=1) if len(table) else pd.Series(dtype=str)


def training_curves(
    curves: pd.DataFrame, path: Path, title: str = "",
) -> Path | None:
    """Training loss and test error against step, a column per depth, a line per series (the views of
    [V1] Fig. 1 and [V2] Fig. 1/6). ``curves`` is tidy: ``series, depth, seed, step, train_loss, test_error``.
    Lines are the mean over seeds, bands their min..max."""
    if curves.empty:
        return None
    depths = sorted(curves.depth.unique())
    labels = list(dict.fromkeys(curves.series))
    colours = _colours(labels)
    fig = Figure(figsize=(4.2 * len(depths), 6.4), layout="constrained")
    axes = fig.subplots(2, len(depths), squeeze=False, sharex="col")
    for col, depth in enumerate(depths):
        top, bottom = axes[0][col], axes[1][col]
        for label in labels:
            part = curves[(curves.depth == depth) & (curves.series == label)]
            for ax, column in ((top, "train_loss"), (bottom, "test_error")):
                values = part.dropna(subset=[column]).groupby("step")[column].agg(["mean", "min", "max", "count"])
                if values.empty:
                    continue
                n = int(values["count"].max())
                ax.plot(values.index, values["mean"], color=colours[label], label=f"{label} (n = {n})")
                if n > 1:
                    ax.fill_between(values.index, values["min"], values["max"], color=colours[label], alpha=0.15)
        top.set_title(f"depth {depth}")
        if _spans_decades(curves.loc[curves.depth == depth, "train_loss"].tolist()):
            top.set_yscale("log")
        top.set_ylabel("training loss (cross-entropy)")
        bottom.set_ylabel("test error (%)")
        bottom.set_xlabel("training step (iterations)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        if len(labels) <= 4:
            top.legend(fontsize="small")
    if len(labels) > 4:  # one legend under the panels rather than one over each panel's lines
        handles = {h.get_label().rsplit(" (n = ", 1)[0]: h for ax in axes[0] for h in ax.get_lines()}
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(len(labels), 4),
                   fontsize="small")
    fig.suptitle(title or "Training loss and test error against step (mean over seeds, band = min..max)")
    return _save(fig, path)


def sensitivity(points: pd.DataFrame, path: Path, x_label: str, y_label: str, title: str = "") -> Path | None:
    """A validation metric against a tuned value, a line per series: the mean over seeds with ± 1 std error
    bars. A candidate stopped by successive halving is an open marker off the line, at its value where it
    stopped, since it was measured earlier than the others.

    ``points`` has a row per (series, candidate): ``panel, series, x, mean, std, n, pruned``, in line order;
    each panel (a version or unit) is a plot of its own, side by side with a shared y axis. Numeric x lies on
    a log axis when it spans a decade (learning rates); other values are placed in the order given.
    """
    shown = points[np.isfinite(points["mean"].astype(float))] if len(points) else points
    if shown.empty:
        return None
    numeric = all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in points.x)
    tried = sorted(set(points.x)) if numeric else list(dict.fromkeys(points.x))

    def place(xs: pd.Series) -> list[float]:
        return [float(x) if numeric else float(tried.index(x)) for x in xs]

    panels = list(dict.fromkeys(shown.panel))
    fig = Figure(figsize=(1.2 + 4.2 * len(panels), 4.6))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        mine = shown[shown.panel == panel]
        labels = list(dict.fromkeys(mine.series))
        colours = _colours(labels)
        for label in labels:
            part = mine[mine.series == label]
            trained, stopped = part[~part.pruned.astype(bool)], part[part.pruned.astype(bool)]
            if len(trained):
                ax.errorbar(place(trained.x), trained["mean"], yerr=trained["std"].fillna(0), marker="o", capsize=4,
                            color=colours[label], label=f"{label} (n = {_counts(trained['n'])})")
            if len(stopped):
                ax.scatter(place(stopped.x), stopped["mean"], s=40, facecolors="none", edgecolors=colours[label],
                           zorder=3, label=None if len(trained) else label)
        if numeric and _spans_decades(tried):
            ax.set_xscale("log")
            ax.minorticks_off()
        if len(tried) <= _MAX_TICKS:  # the values tried, as the grid writes them
            ax.set_xticks(place(pd.Series(tried)))
            ax.set_xticklabels([f"{x:g}" if isinstance(x, float) else str(x) for x in tried])
        ax.set_xlabel(x_label)
        ax.set_title(panel if len(panels) > 1 else "")
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        if mine.pruned.astype(bool).any():
            handles.append(Line2D([], [], ls="none", marker="o", markerfacecolor="none", color="grey"))
            names.append("open: pruned, at its rung")
        ax.legend(handles, names, fontsize="x-small", loc="lower left")
    axes[0].set_ylabel(y_label)
    fig.suptitle(title or f"{y_label} against {x_label} (mean ± std over seeds)")
    return _save(fig, path)


FLOW_MEASURES: dict[str, tuple[str, bool]] = {
    # measure: (axis label, log scale)
    "grad_input": ("||dL/dx_l|| at the unit's input", True),
    "grad_params": ("||dL/dW_l|| of the unit's weights", True),
    "cosine": ("cos(x_l, x_l+1)", False),
    "shortcut_zeroed": ("shortcut energy zeroed by ReLU", False),
    "identity_gain": ("identity-path gain through the block", True),  # ViT blocks (flow.py)
}


def unit_flow(
    entries: Sequence[dict[str, Any]], path: Path, measures: Sequence[str] = ("grad_input",), title: str = "",
) -> Path | None:
    """Per-unit measures against unit index (a row per measure, a column per depth), a line per series
    and step. ``entries`` are ``{"series", "depth", "step", "units"}``, ``units`` as :func:`depthbench.
    diagnose.measure` gives them; entries that share series, depth and step (seeds) are averaged
    (geometrically for gradient norms). Dotted verticals mark the first unit of each stage."""
    if not entries:
        return None
    grouped: dict[tuple[str, int, int], list[list[dict[str, Any]]]] = defaultdict(list)
    for entry in entries:
        grouped[(entry["series"], int(entry["depth"]), int(entry["step"]))].append(entry["units"])
    depths = sorted({k[1] for k in grouped})
    labels = list(dict.fromkeys(k[0] for k in grouped))
    colours = _colours(labels)
    fig = Figure(figsize=(max(5.0, 4.6 * len(depths)), 2.9 * len(measures) + 1.4), layout="constrained")
    axes = fig.subplots(len(measures), len(depths), squeeze=False, sharex="col")
    for col, depth in enumerate(depths):
        keys = sorted((k for k in grouped if k[1] == depth), key=lambda k: (labels.index(k[0]), k[2]))
        steps = sorted({k[2] for k in keys})
        for row, measure in enumerate(measures):
            ax = axes[row][col]
            label_text, log = FLOW_MEASURES[measure]
            for key in keys:
                runs = grouped[key]
                values = np.array([[np.nan if u[measure] is None else u[measure] for u in units] for units in runs])
                if np.all(np.isnan(values)):
                    continue
                with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-None columns: units without the measure
                    line = np.exp(np.nanmean(np.log(values), axis=0)) if log else np.nanmean(values, axis=0)
                step_text = "init" if key[2] == 0 else f"step {key[2]}"
                n = f", n = {len(runs)}" if len(runs) > 1 else ""
                ax.plot(np.arange(len(line)), line, color=colours[key[0]], lw=1.4,
                        ls=_STYLES[steps.index(key[2]) % len(_STYLES)], label=f"{key[0]}, {step_text}{n}")
            if log:
                ax.set_yscale("log")
            for index, unit in enumerate(grouped[keys[0]][0]):
                if unit["reshapes"] and index > 0:
                    ax.axvline(index, color="grey", ls=":", lw=0.8)
            ax.set_ylabel(label_text)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if row == 0:
                ax.set_title(f"depth {depth} ({len(grouped[keys[0]][0])} residual units)")
        axes[-1][col].set_xlabel("residual unit index (input side = 0)")
    # One legend for all panels, below them: the same series and steps appear in every panel.
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(len(labels), 4),
               fontsize="small")  # entries run series by series: a column per series
    fig.suptitle(title or "Gradient flow per residual unit")
    return _save(fig, path)


__all__ = ["FLOW_MEASURES", "error_vs_depth", "sensitivity", "series_labels", "training_curves", "unit_flow"]
