"""How fast the one trainer runs and how much memory it needs, measured against the usual CIFAR script.

``depthbench bench`` answers, on the machine at hand (REFERENCE.md sections 4 and 5):

- Speed against the usual pipeline. Both run in this process, on the same model (same config, same
  seeded init) and the same training images: (a) the trainer step of :mod:`depthbench.train`, with the
  uint8 set on the device, batched augmentation, channels_last and its precision, and (b) the script
  most CIFAR code starts from: a torchvision-style dataset that makes a PIL image of every sample,
  ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` in DataLoader
  workers, and an NCHW fp32 eager model.
- Distance from the machine: the model's training FLOPs per second (3x the forward FLOPs of
  :func:`depthbench.models.forward_flops`; checkpointing's recomputation is not counted) against the
  dense matmul peak of the same device, measured in the same run: model FLOPs utilisation (MFU).
- Growth with depth (``depths``): time per step and training memory with and without activation
  checkpointing, one row per depth.

Timings are steady-state steps after a warmup; data loading, setup and compilation are reported
apart as per-run overhead. Training memory is the peak above what was resident once the data and the
model were in place: CUDA's ``max_memory_allocated``, or on CPU the peak resident set (Linux VmHWM,
reset through /proc/self/clear_refs after returning freed heap to the OS), so the gradients, momentum
buffers, activations and batch of the steps, not the interpreter, the data or the weights. Beside it,
the activations alone: the bytes one forward pass saves for backward, exact whatever the allocator.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Group
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import VisionDataset

from depthbench.config import DatasetConfig, ModelConfig, RunConfig, TrainConfig
from depthbench.data import TensorData, load_dataset
from depthbench.errors import DepthbenchError, did_you_mean
from depthbench.models import count_params, forward_flops, model_from_config, resolve_block
from depthbench.train import TrainingSetup, _mix, evaluate, resolve_device, resolve_precision, sgd_step

# The shared CIFAR-10 JPEG tarball beside the project (../shared/data); absent on a user's machine.
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
TEST_SUBSET = 1000  # images for the evaluation-throughput figure
PAPER_STEPS = 64_000  # the CIFAR schedule of He et al., for the extrapolated run time
ALL_UNITS = 1_000_000  # checkpointing segments: one per residual unit (ModelConfig's `true`)
# Square fp32 (or the autocast dtype) matmuls whose best rate is taken as the device's dense peak.
MATMUL_SIZES = {"cpu": (2048, 4096), "cuda": (4096, 8192)}
MB = 2**20


@dataclass(frozen=True)
class BenchSpec:
    """What to measure: one net and how it is trained, the data, and how long to time it."""

    version: str = "v2"
    depth: int = 56
    batch_size: int = 128
    steps: int = 20
    warmup: int = 3
    device: str = "auto"
    precision: str = "auto"
    checkpointing: bool = False
    segments: int = 0  # checkpointed segments per stage; 0 is one per residual unit
    compile: bool = False
    data: str = "auto"
    train_subset: int = 5000
    workers: int | None = None


# ---------------------------------------------------------------------------------------------
# Data and configs


def bench_dataset(data: str, train_subset: int) -> tuple[DatasetConfig, str]:
    """The dataset to time on and a description of it. ``auto`` is real CIFAR-10 from the shared
    tarball when this machine has it, else synthetic 32x32 images; a path is an image folder or archive."""
    if data == "auto":
        data = str(SHARED_CIFAR) if SHARED_CIFAR.is_file() else "synthetic"
    if data == "synthetic":
        cfg = DatasetConfig(name="synthetic", train_subset=train_subset, test_subset=TEST_SUBSET)
        return cfg, f"synthetic 32x32, {train_subset} train images (no CIFAR-10 files used)"
    root = Path(data)
    if not root.exists():
        raise DepthbenchError(f"--data '{data}' is neither auto, synthetic nor an existing image folder or archive")
    cfg = DatasetConfig(name="imagefolder", root=str(root), train_subset=train_subset, test_subset=TEST_SUBSET)
    what = "real CIFAR-10 (the shared JPEG tarball)" if root.resolve() == SHARED_CIFAR else f"images of {root}"
    return cfg, f"{what}, {train_subset} train images"


def run_config(spec: BenchSpec, dataset: DatasetConfig, depth: int | None = None, checkpointing: bool | None = None,
               ) -> RunConfig:
    """The RunConfig that the trainer would get for this measurement (the paper recipe otherwise)."""
    depth = spec.depth if depth is None else depth
    resolve_block(depth)  # a clear error, with the nearest valid depths, before anything loads
    if spec.version not in ("v1", "v2"):
        hint = did_you_mean(spec.version, ("v1", "v2"))
        raise DepthbenchError(f"--version '{spec.version}' is unknown{hint}; v1 or v2")
    if spec.precision not in ("auto", "fp32", "bf16"):
        raise DepthbenchError(f"--precision '{spec.precision}' is unknown; auto, fp32 or bf16")
    resolve_device(spec.device, "--device")  # also: no GPU for --device cuda is an error now, before the data
    ckpt = spec.checkpointing if checkpointing is None else checkpointing
    if ckpt and spec.compile:
        raise DepthbenchError(
            "--checkpointing and --compile do not combine: the checkpoint's BN guard cannot be compiled")
    return RunConfig(
        name="bench", version=spec.version, depth=depth, seed=0, dataset=dataset,
        model=ModelConfig(checkpointing=(spec.segments or ALL_UNITS) if ckpt else 0),
        train=TrainConfig(batch_size=spec.batch_size, device=spec.device, precision=spec.precision,
                          compile=spec.compile),
    )


# ---------------------------------------------------------------------------------------------
# Measurements


@dataclass(frozen=True)
class StepTiming:
    """Wall time of ``steps`` steady-state training steps of ``batch_size`` images."""

    steps: int
    batch_size: int
    seconds: float

    @property
    def step_s(self) -> float:
        return self.seconds / self.steps

    @property
    def img_per_s(self) -> float:
        return self.steps * self.batch_size / self.seconds


@dataclass(frozen=True)
class TrainerFigures:
    timing: StepTiming
    setup_s: float  # data to the device, model built and moved, optimizer
    first_step_s: float  # the first step, compilation included when compiling
    peak_mem_mb: float | None  # training memory above the resident data and model
    peak_total_mb: float | None  # everything: CUDA allocations, or the process's resident set on CPU
    activation_mb: float  # what the forward pass keeps for the backward pass (see activation_mb)
    eval_img_per_s: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], None]) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class PeakMemory:
    """Peak memory between :meth:`start` and :meth:`stop`, above what was in use at ``start``.

    CUDA: the caching allocator's peak. CPU: the peak resident set size of this process (Linux only;
    None elsewhere). Freed heap is handed back to the OS first (``malloc_trim``), so memory freed by
    an earlier measurement in this process is neither counted nor silently reused.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base: int | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        gc.collect()  # an earlier measurement's model may sit in a reference cycle
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current VmRSS
            self.base = _proc_status_kb("VmRSS") * 1024
        except (OSError, ValueError):
            self.base = None

    def stop(self) -> tuple[float | None, float | None]:
        """(peak above the start, peak in total), in MiB."""
        if self.base is None:
            return None, None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_kb("VmHWM") * 1024
        return (peak - self.base) / MB, peak / MB


def _proc_status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{key} is not in /proc/self/status")
    return int(match.group(1))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def activation_mb(model: nn.Module, xb: torch.Tensor, autocast: Callable[[], Any]) -> float:
    """MiB of tensors that one training forward pass saves for the backward pass: the activation memory.

    Exact and independent of the allocator, unlike a resident-set peak. With checkpointing these are
    the segments' inputs; the recomputation of one segment in backward comes on top of it. Parameters
    are not counted (they live anyway), and a storage saved by several ops counts once.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        model(xb)
    return sum(storages.values()) / MB


def measure_trainer(cfg: RunConfig, data: TensorData, *, steps: int, warmup: int, evaluate_too: bool = False,
                    ) -> TrainerFigures:
    """Time the trainer's step for ``cfg``: the setup and the step of :func:`depthbench.train.train_run`."""
    tc = cfg.train
    t_setup = time.perf_counter()
    setup = TrainingSetup.create(cfg, data)  # exactly train_run's setup
    device, model, autocast = setup.device, setup.model, setup.autocast
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    _sync(device)
    setup_s = time.perf_counter() - t_setup

    def train_step(step: int) -> None:
        # The body of train_run's loop, less its logging.
        xb, yb = setup.batch(step)
        loss, logits = sgd_step(setup.step_model, setup.optimizer, xb, yb, autocast)
        loss_sum.add_(loss.double() * len(yb))
        correct.add_((logits.argmax(1) == yb).sum())

    model.train()
    peak = PeakMemory(device)
    peak.start()  # before the first step, which allocates the gradients and momentum buffers
    first_step_s = _timed(device, lambda: train_step(0))
    for step in range(1, warmup):
        train_step(step)
    seconds = _timed(device, lambda: [train_step(s) for s in range(warmup, warmup + steps)])
    peak_mb, total_mb = peak.stop()
    xb, _ = setup.batch(0)
    activations = activation_mb(model, xb, autocast)  # eager: what the compiled graph saves may differ
    eval_rate = None
    if evaluate_too:
        test_x, test_y = data.test_x.to(device), data.test_y.to(device)
        eval_s = _timed(device, lambda: evaluate(model, test_x, test_y, setup.mean, setup.std, tc.eval_batch_size,
                                                 autocast, tc.channels_last))
        eval_rate = len(test_x) / eval_s
    return TrainerFigures(StepTiming(steps, tc.batch_size, seconds), setup_s, first_step_s, peak_mb, total_mb,
                          activations, eval_rate)


class PILImageSet(VisionDataset):
    """A torchvision-style dataset, as ``torchvision.datasets.CIFAR10`` is: the images as one
    H x W x C uint8 array, and a PIL image made of each sample before its transforms run."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        super().__init__(root=None, transform=transform)
        self.images = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
        self.targets = y.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        return self.transform(pil), self.targets[index]


def usual_transform(data: TensorData, augment: bool = True) -> transforms.Compose:
    """The per-image transforms of the usual CIFAR script (pad-4 crop and flip when ``augment``)."""
    steps: list[Any] = [transforms.RandomCrop(data.image_size, padding=4), transforms.RandomHorizontalFlip()]
    return transforms.Compose([*(steps if augment else []), transforms.ToTensor(),
                               transforms.Normalize(data.mean, data.std)])


def default_workers() -> int:
    """DataLoader workers as CIFAR scripts usually set them: up to 4, no more than the cores."""
    return min(4, os.cpu_count() or 1)


def _forever(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def measure_usual(cfg: RunConfig, data: TensorData, *, steps: int, warmup: int, workers: int) -> StepTiming:
    """Time the usual CIFAR training script on the same model and images: per-image PIL transforms in
    DataLoader workers, NCHW fp32, eager, a ``loss.item()`` per step for its running average."""
    tc = cfg.train
    device = resolve_device(tc.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # the usual script leaves it at its default
    dataset = PILImageSet(data.train_x, data.train_y, usual_transform(data, cfg.dataset.augment))
    # Persistent workers: a real epoch is 391 steps, so restarting them at each end of our small
    # subset would charge the usual script far more worker start-up than it really pays.
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(_mix(cfg.seed, 0, 2))  # the trainer's init
    model = model_from_config(cfg.version, cfg.depth, cfg.model, data.num_classes, data.in_channels).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay,
                                nesterov=tc.nesterov and tc.momentum > 0)
    model.train()
    batches = _forever(loader)
    running = 0.0

    def step() -> None:
        nonlocal running
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running += loss.item()

    try:
        for _ in range(warmup):
            step()
        seconds = _timed(device, lambda: [step() for _ in range(steps)])
    finally:
        del batches  # shuts the workers down
    return StepTiming(steps, tc.batch_size, seconds)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """The best dense ``torch.mm`` rate of the device in FLOP/s, and the matrix size that gave it."""
    best, best_n = 0.0, 0
    for n in MATMUL_SIZES["cuda" if device.type == "cuda" else "cpu"]:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out = torch.empty_like(a)
        _timed(device, lambda: torch.mm(a, b, out=out))  # warmup: library handles, kernel choice
        once = _timed(device, lambda: torch.mm(a, b, out=out))
        reps = max(1, math.ceil(0.25 / max(once, 1e-6)))
        for _ in range(3):
            seconds = _timed(device, lambda: [torch.mm(a, b, out=out) for _ in range(reps)])
            rate = 2 * n**3 * reps / seconds
            if rate > best:
                best, best_n = rate, n
        del a, b, out
    return best, best_n


# ---------------------------------------------------------------------------------------------
# The two modes


def _process_age() -> float | None:
    """Seconds since this process started (Linux), i.e. interpreter start and imports so far."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 2)


def _prepare(spec: BenchSpec, depths: Sequence[int], checkpointing: bool | None = None,
             ) -> tuple[list[RunConfig], str, TensorData, float]:
    """Validate every configuration first (a bad depth fails fast), then load the data once."""
    dataset, described = bench_dataset(spec.data, spec.train_subset)
    cfgs = [run_config(spec, dataset, depth=d, checkpointing=checkpointing) for d in depths]
    t0 = time.perf_counter()
    data = load_dataset(dataset)
    return cfgs, described, data, time.perf_counter() - t0


def _net(cfg: RunConfig, data: TensorData) -> tuple[str, int, int, int]:
    """Block, units per stage, parameters and training FLOPs per image (3x forward) of cfg's net."""
    block, n = resolve_block(cfg.depth, cfg.model.block)
    with torch.device("meta"):  # shapes only: no memory or init cost, even for ResNet-1001
        net = model_from_config(cfg.version, cfg.depth, cfg.model, data.num_classes, data.in_channels)
    return block, n, count_params(net), 3 * forward_flops(net, data.image_size, data.in_channels)


def _context(spec: BenchSpec, cfg: RunConfig, described: str, load_s: float, startup: float | None) -> dict[str, Any]:
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        found = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
        name = f"{found.group(1).strip() if found else 'CPU'}, {os.cpu_count()} cores"
    return {
        "version": cfg.version, "batch_size": spec.batch_size, "steps": spec.steps, "warmup": spec.warmup,
        "compile": spec.compile, "channels_last": cfg.train.channels_last, "data": described,
        "device": str(device), "device_name": name, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "precision": str(amp_dtype or torch.float32).removeprefix("torch."),
        "load_1m": _load_avg(), "startup_s": startup, "data_load_s": load_s,
    }


def _load_avg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    """Trainer vs usual pipeline on one net: speed, FLOP/s against the matmul peak, memory, overhead."""
    startup = _process_age()
    if spec.segments and not spec.checkpointing:
        raise DepthbenchError("--segments says how --checkpointing splits each stage; add --checkpointing")
    (cfg,), described, data, load_s = _prepare(spec, [spec.depth])
    context = _context(spec, cfg, described, load_s, startup)
    device = resolve_device(cfg.train.device)
    block, n, params, flops = _net(cfg, data)
    workers = spec.workers if spec.workers is not None else default_workers()

    trainer = measure_trainer(cfg, data, steps=spec.steps, warmup=spec.warmup, evaluate_too=True)
    usual = measure_usual(cfg, data, steps=spec.steps, warmup=spec.warmup, workers=workers)
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
        "setup_s": trainer.setup_s,
        "first_step_s": trainer.first_step_s,
        "compile_s": extra_first if spec.compile else 0.0,
        # Paid once per run: data load, setup, and what the first step costs beyond a steady one.
        "overhead_s": load_s + trainer.setup_s + extra_first,
        "paper_run_h": PAPER_STEPS * step_s / 3600,
        "load_1m_end": _load_avg(),
    }


def run_scaling(spec: BenchSpec, depths: Sequence[int]) -> dict[str, Any]:
    """Time per step and training memory against depth, without and with activation checkpointing."""
    if not depths:
        raise DepthbenchError("--depths needs at least one depth, e.g. --depths 20,56,110,164")
    startup = _process_age()
    cfgs, described, data, load_s = _prepare(spec, depths, checkpointing=False)
    context = _context(spec, cfgs[0], described, load_s, startup)
    device = resolve_device(cfgs[0].train.device)
    peak, peak_n = matmul_peak(device, resolve_precision(cfgs[0].train.precision, device) or torch.float32)
    rows = []
    for cfg in cfgs:
        block, n, params, flops = _net(cfg, data)
        plain = measure_trainer(cfg, data, steps=spec.steps, warmup=spec.warmup)
        ckpt = None
        if not spec.compile:  # checkpointing does not compile (run_config says why)
            ckpt_cfg = run_config(spec, cfg.dataset, depth=cfg.depth, checkpointing=True)
            ckpt = measure_trainer(ckpt_cfg, data, steps=spec.steps, warmup=spec.warmup)
        rows.append({
            "depth": cfg.depth, "block": block, "units_per_stage": n, "params": params,
            "train_flops_per_img": flops,
            "step_s": plain.timing.step_s, "img_per_s": plain.timing.img_per_s,
            "mfu": flops * plain.timing.img_per_s / peak,
            "peak_mem_mb": plain.peak_mem_mb, "activation_mb": plain.activation_mb,
            "step_s_ckpt": ckpt.timing.step_s if ckpt else None,
            "peak_mem_mb_ckpt": ckpt.peak_mem_mb if ckpt else None,
            "activation_mb_ckpt": ckpt.activation_mb if ckpt else None,
        })
    _add_linearity(rows)
    return {"mode": "scaling", **context, "checkpoint_segments": spec.segments or ALL_UNITS,
            "matmul_peak_flops": peak, "matmul_peak_size": peak_n,
            "rows": rows, "notes": linearity_notes(rows), "load_1m_end": _load_avg()}


# Within these bounds, time per FLOP (against the first row) and activation memory per added unit
# (against the other increments of the same block) count as linear in depth.
LINEAR_BAND = (0.8, 1.25)


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
            added = 3 * (row["units_per_stage"] - prev["units_per_stage"])
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


# ---------------------------------------------------------------------------------------------
# Presentation


def _si(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MB"


def _segments(segments: int) -> str:
    return "one segment per unit" if segments >= ALL_UNITS else f"{segments} segments per stage"


def _where(result: dict[str, Any]) -> str:
    load = f", 1-min load {result['load_1m']} -> {result['load_1m_end']}" if result.get("load_1m") is not None else ""
    return (f"{result['device']} ({result['device_name']}, {result['cpu_capability']}, {result['threads']} threads), "
            f"{result['precision']}{load}; data: {result['data']}")


def render_bench(result: dict[str, Any]) -> Group:
    """The single-net measurement as a few lines and a table, for the terminal."""
    r = result
    header = (f"{r['version']} ResNet-{r['depth']} ({r['block']}, n={r['units_per_stage']}, {r['params']:,} params), "
              f"batch {r['batch_size']}, {r['steps']} timed steps after {r['warmup']}"
              + (f", checkpointing ({_segments(r['checkpoint_segments'])})" if r["checkpointing"] else "")
              + (", compiled" if r["compile"] else ""))
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
        f"per-run overhead {r['overhead_s']:.2f} s: data load {r['data_load_s']:.2f} s, setup {r['setup_s']:.2f} s, "
        f"first step {1000 * r['first_step_s']:.0f} ms vs {1000 * r['step_s']:.0f} ms steady"
        + (f" (compile {r['compile_s']:.1f} s)" if r["compile"] else "")
        + f"; process start to bench {r['startup_s']} s; "
        f"a {PAPER_STEPS:,}-step run would train {r['paper_run_h']:.1f} h",
    ]
    return Group(header, _where(r), table, *lines)


def render_scaling(result: dict[str, Any]) -> Group:
    """The scaling table, one row per depth, then the notes on linearity."""
    r = result
    header = (f"{r['version']} time per step and training memory against depth, batch {r['batch_size']}, "
              f"{r['steps']} timed steps after {r['warmup']}; "
              f"ckpt = checkpointing ({_segments(r['checkpoint_segments'])}); "
              f"matmul peak {_si(r['matmul_peak_flops'], 'FLOP/s')}")
    table = Table()
    for column in ("depth", "block (n)", "params", "train GFLOP/img", "ms/step", "img/s", "MFU", "time vs FLOPs",
                   "memory", "activations", "ms/step ckpt", "memory ckpt", "activations ckpt"):
        table.add_column(column, justify="right")
    for row in r["rows"]:
        ckpt_ms = "n/a" if row["step_s_ckpt"] is None else f"{1000 * row['step_s_ckpt']:.0f}"
        table.add_row(
            str(row["depth"]), f"{row['block']} ({row['units_per_stage']})", f"{row['params']:,}",
            f"{row['train_flops_per_img'] / 1e9:.3f}", f"{1000 * row['step_s']:.0f}", f"{row['img_per_s']:.1f}",
            f"{100 * row['mfu']:.1f}%", f"{row['time_vs_flops']:.2f}x", _mb(row["peak_mem_mb"]),
            _mb(row["activation_mb"]), ckpt_ms, _mb(row["peak_mem_mb_ckpt"]), _mb(row["activation_mb_ckpt"]),
        )
    legend = ("memory: peak above data and weights (CPU: resident set; CUDA: allocator); activations: tensors the "
              "forward pass saves for backward; ckpt: the same with activation checkpointing")
    return Group(header, _where(r), table, legend, *(f"note: {note}" for note in r["notes"]))


def parse_depths(text: str) -> list[int]:
    """``"20,56,110"`` -> [20, 56, 110]."""
    try:
        depths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DepthbenchError(f"--depths '{text}' must be comma-separated whole numbers, e.g. 20,56,110,164") from None
    if not depths:
        raise DepthbenchError("--depths needs at least one depth, e.g. --depths 20,56,110,164")
    return depths


__all__ = [
    "BenchSpec",
    "PILImageSet",
    "PeakMemory",
    "activation_mb",
    "linearity_notes",
    "matmul_peak",
    "measure_trainer",
    "measure_usual",
    "parse_depths",
    "render_bench",
    "render_scaling",
    "run_bench",
    "run_scaling",
    "usual_transform",
]
