"""What bench measures: one net and how it is trained, the data, and how long to time it, checked up
front (a bad depth or option fails before any data loads) and turned into the trainer's RunConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from depthbench.architecture import EVERY_UNIT, resolve_block
from depthbench.config import DatasetConfig, ModelConfig, RunConfig, TrainConfig
from depthbench.errors import DepthbenchError, did_you_mean
from depthbench.devices import resolve_device

# The shared CIFAR-10 JPEG tarball beside the project (../shared/data); absent on a user's machine.
SHARED_CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"
TEST_SUBSET = 1000  # images for the evaluation-throughput figure


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


def parse_depths(text: str) -> list[int]:
    """``"20,56,110"`` -> [20, 56, 110]."""
    try:
        depths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DepthbenchError(f"--depths '{text}' must be comma-separated whole numbers, e.g. 20,56,110,164") from None
    if not depths:
        raise DepthbenchError("--depths needs at least one depth, e.g. --depths 20,56,110,164")
    return depths


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
        model=ModelConfig(checkpointing=(spec.segments or EVERY_UNIT) if ckpt else 0),
        train=TrainConfig(batch_size=spec.batch_size, device=spec.device, precision=spec.precision,
                          compile=spec.compile),
    )
