"""What bench measures: one net and how it is trained, the data, and how long to time it, checked up
front (a bad depth or option fails before any data loads) and turned into the trainer's RunConfig; and
the tiny variant of that RunConfig on which the host's cost of a step is measured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from depthbench.architecture import EVERY_UNIT, resolve_block
from depthbench.config import DatasetConfig, ModelConfig, RunConfig, TrainConfig
from depthbench.errors import DepthbenchError, did_you_mean
from depthbench.families import FAMILIES
from depthbench.devices import resolve_device

# The shared CIFAR-10 JPEG tarball beside the project (../shared/data); absent on a user's machine.
SHARED_CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"
TEST_SUBSET = 1000  # images for the evaluation-throughput figure
# The host's cost of a step is timed on batches of 2 images of 8x8 pixels: the same kernels are launched
# as at full size, but their arithmetic is negligible, so the step takes what dispatching them takes.
HOST_BATCH, HOST_IMAGE_SIZE = 2, 8
HOST_WARMUP, HOST_STEPS = 5, 30
DIGITS_TRAIN = 1437  # the digits' training split (depthbench.data)  # the median of HOST_STEPS single steps after HOST_WARMUP
PRECISIONS: tuple[str, ...] = get_args(TrainConfig.model_fields["precision"].annotation)


@dataclass(frozen=True)
class BenchSpec:
    """What to measure: one net and how it is trained, the data, and how long to time it."""

    version: str = "v2"
    depth: int = 56
    family: str = "resnet"
    unit: str | None = None  # the version's unit when None
    # The net's size; None leaves the family's default (depthbench.families). heads, patch and mlp_ratio: ViT only.
    width: int | None = None
    heads: int | None = None
    patch: int | None = None
    mlp_ratio: float | None = None
    batch_size: int = 128
    steps: int = 20
    warmup: int = 3
    device: str = "auto"
    precision: str = "auto"
    checkpointing: bool = False
    segments: int = 0  # checkpointed segments per stage; 0 is one per residual unit
    compile: bool | str = "auto"  # train.compile: auto resolves as for a run of the paper's length
    cuda_graph: bool = True  # train.cuda_graph: on CUDA, the step captured once and replayed
    data: str = "auto"
    train_subset: int = 5000
    workers: int | None = None


def parse_depths(text: str) -> list[int]:
    """``"20,56,110"`` -> [20, 56, 110]."""
    return _parse_list(text, "--depths", "depth", "20,56,110,164")


def parse_counts(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]: how many runs share the device at once."""
    counts = _parse_list(text, "--concurrent", "count", "1,2,4")
    if min(counts) < 1:
        raise DepthbenchError(f"--concurrent '{text}': each count of runs at once must be at least 1, e.g. 1,2,4")
    return counts


def _parse_list(text: str, option: str, item: str, example: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DepthbenchError(f"{option} '{text}' must be comma-separated whole numbers, e.g. {example}") from None
    if not values:
        raise DepthbenchError(f"{option} needs at least one {item}, e.g. {option} {example}")
    return values


def bench_dataset(data: str, train_subset: int) -> tuple[DatasetConfig, str]:
    """The dataset to time on and a description of it. ``auto`` is real CIFAR-10 from the shared
    tarball when this machine has it, else synthetic 32x32 images; ``digits`` scikit-learn's bundled 8x8
    digits (offline); a path is an image folder or archive."""
    if data == "digits":
        subset = train_subset if train_subset < DIGITS_TRAIN else None  # None: the whole split
        cfg = DatasetConfig(name="digits", image_size=8, augment=False, train_subset=subset)
        return cfg, f"scikit-learn's digits, 8x8, unaugmented, {subset or DIGITS_TRAIN} train images"
    if data == "auto":
        data = str(SHARED_CIFAR) if SHARED_CIFAR.is_file() else "synthetic"
    if data == "synthetic":
        cfg = DatasetConfig(name="synthetic", train_subset=train_subset, test_subset=TEST_SUBSET)
        return cfg, f"synthetic 32x32, {train_subset} train images (no CIFAR-10 files used)"
    root = Path(data)
    if not root.exists():
        raise DepthbenchError(
            f"--data '{data}' is neither auto, synthetic, digits nor an existing image folder or archive")
    cfg = DatasetConfig(name="imagefolder", root=str(root), train_subset=train_subset, test_subset=TEST_SUBSET)
    what = "real CIFAR-10 (the shared JPEG tarball)" if root.resolve() == SHARED_CIFAR else f"images of {root}"
    return cfg, f"{what}, {train_subset} train images"


def run_config(spec: BenchSpec, dataset: DatasetConfig, depth: int | None = None, checkpointing: bool | None = None,
               ) -> RunConfig:
    """The RunConfig that the trainer would get for this measurement (the paper recipe otherwise);
    ``checkpointing`` overrides the spec's, as --depths measures both."""
    depth = spec.depth if depth is None else depth
    if spec.family not in FAMILIES:
        raise DepthbenchError(f"--family '{spec.family}' is unknown{did_you_mean(spec.family, FAMILIES)}; "
                              f"{' or '.join(FAMILIES)}")
    if spec.family == "resnet":
        resolve_block(depth)  # a clear error, with the nearest valid depths, before anything loads
    if spec.version not in ("v1", "v2"):
        hint = did_you_mean(spec.version, ("v1", "v2"))
        raise DepthbenchError(f"--version '{spec.version}' is unknown{hint}; v1 or v2")
    if spec.precision not in PRECISIONS:
        raise DepthbenchError(f"--precision '{spec.precision}' is unknown; {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
    resolve_device(spec.device, "--device")  # also: no GPU for --device cuda is an error now, before the data
    if checkpointing is None and spec.segments and not spec.checkpointing:
        raise DepthbenchError("--segments says how --checkpointing splits each stage; add --checkpointing")
    ckpt = spec.checkpointing if checkpointing is None else checkpointing
    if ckpt and spec.compile is True:
        raise DepthbenchError(
            "--checkpointing and --compile do not combine: the checkpoint's BN guard cannot be compiled")
    # Only what the spec sets is written, so that the family's and the unit's defaults fill the rest.
    shape = {key: getattr(spec, key) for key in ("unit", "width", "heads", "patch", "mlp_ratio")
             if getattr(spec, key) is not None}
    try:
        return RunConfig(
            name="bench", version=spec.version, depth=depth, seed=0, dataset=dataset,
            model=ModelConfig(family=spec.family, checkpointing=(spec.segments or EVERY_UNIT) if ckpt else 0, **shape),
            train=TrainConfig(batch_size=spec.batch_size, device=spec.device, precision=spec.precision,
                              compile=spec.compile, cuda_graph=spec.cuda_graph),
        )
    except ValidationError as err:  # a ViT shape that cannot be built, a unit of the other family
        raise DepthbenchError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None


def host_config(cfg: RunConfig, num_classes: int) -> RunConfig:
    """``cfg`` on tiny synthetic batches (HOST_BATCH images of HOST_IMAGE_SIZE pixels; a ViT's of its own size): the same net (with
    ``num_classes`` outputs), precision, memory format, checkpointing, compilation and optimizer, so the same
    kernels; enough images that the timed steps stay within one epoch (one data order drawn)."""
    images = HOST_BATCH * (HOST_WARMUP + HOST_STEPS + 2)
    # A ViT's position embedding fixes its image size: it keeps the run's, the batch alone is tiny.
    size = cfg.dataset.image_size if cfg.model.family == "vit" else HOST_IMAGE_SIZE
    tiny = DatasetConfig(name="synthetic", image_size=size, train_subset=images, test_subset=HOST_BATCH,
                         num_classes=num_classes, augment=cfg.dataset.augment, flip=cfg.dataset.flip)
    return cfg.model_copy(update={"dataset": tiny, "train": cfg.train.model_copy(update={"batch_size": HOST_BATCH})})
