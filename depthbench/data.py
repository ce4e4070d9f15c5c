"""Datasets as whole uint8 tensors, decoded once and cached.

Every dataset becomes a :class:`TensorData`: the train, validation and test images as one contiguous
uint8 ``N x C x H x W`` tensor each, integer labels, class names and the per-channel mean/std of the
training split. Keeping the whole set as uint8 tensors lets the trainer move it to the device once
and augment and normalise per batch, as airbench does (Jordan 2024, arXiv:2404.00498); no per-image
Python runs while training.

Datasets (``dataset.name``):

- ``cifar10`` / ``cifar100``: torchvision's official archives in :func:`data_root`, downloaded there
  when missing.
- ``imagefolder``: ``dataset.root`` holding ``train/<class>/*`` and ``test/<class>/*`` (classes are
  the sorted folder names of ``train/``), or a tar archive (``.tar.gz``) of such a tree, read directly
  without unpacking it. Images are decoded with Pillow to RGB.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, offline), one channel,
  upsampled to ``image_size`` (32 by default). The test split is a fixed stratified 360 images
  (20%), the other 1437 train.
- ``synthetic``: generated, deterministic and learnable; ``train_subset`` / ``test_subset`` set its
  sizes (1024 / 256 by default).

Subsets (``train_subset`` / ``test_subset``) are class-balanced and drawn with a fixed generator, never
the run seed, so every run of a sweep trains and tests on the same images; a smaller subset is
contained in a larger one.

A validation split (``val_split``: a count of images, or a fraction of the training split) is held out
of the training split after its subset, class-balanced in the same way but drawn with a generator of
its own (:data:`_VAL_SPLIT_SEED`), so that it is not simply the first images of every subset. Every
run of a sweep validates on the same images, and the mean/std are those of the images left to train
on. Without a split the validation tensors are empty.

Two caches make a sweep decode only once: an in-process memo, and for cifar and imagefolder a tensor
file ``data_root()/cache/<hash>.pt`` keyed by everything that changes the data (for imagefolder the
names, sizes and mtimes of the files, or the archive's size and mtime, so an edit invalidates it).
Both hold the dataset before any validation split, which is cut from it in memory (and memoised too).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import posixpath
import sys
import tarfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from PIL import Image

from depthbench import stopping
from depthbench.config import DatasetConfig
from depthbench.errors import DepthbenchError


@dataclass(frozen=True, repr=False)
class TensorData:
    """A whole dataset in memory: uint8 images ``N x C x H x W`` (contiguous, CPU) and int64 labels.

    The validation split is empty (``0 x C x H x W``) unless ``dataset.val_split`` holds one out.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, over the training split, in [0, 1] pixel units
    std: tuple[float, ...]
    val_x: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    val_y: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    def __post_init__(self) -> None:
        if len(self.val_y) == 0:  # no split: empty images of the training images' shape, batched like any other
            object.__setattr__(self, "val_x", self.train_x.new_empty((0, *self.train_x.shape[1:])))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        """Side of the (square) images."""
        return self.train_x.shape[-1]

    def __repr__(self) -> str:
        val = f"{len(self.val_y)} val, " if len(self.val_y) else ""
        return (
            f"TensorData({len(self.train_y)} train, {val}{len(self.test_y)} test, "
            f"{self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes)"
        )


def data_root(cfg: DatasetConfig | None = None) -> Path:
    """Where datasets are read from and downloaded to: ``cfg.root``, else $DEPTHBENCH_DATA, else ~/.cache/depthbench.

    Without a config it is the cache home, where the decoded tensors are kept (``cache/``).
    """
    if cfg is not None and cfg.root is not None:
        return Path(cfg.root).expanduser()
    env = os.environ.get("DEPTHBENCH_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "depthbench"


def load_dataset(cfg: DatasetConfig) -> TensorData:
    """Load the dataset ``cfg`` describes, from the in-process memo or the disk cache when possible.

    The data never depends on a run's seed: subsets and splits use fixed seeds so that every run of
    a sweep sees the same images.
    """
    key = _memo_key(cfg)
    if key not in _MEMO:
        _MEMO[key] = _LOADERS[cfg.name](cfg)
    if cfg.val_split is None:
        return _MEMO[key]
    split_key = (*key, cfg.val_split)
    if split_key not in _MEMO:
        _MEMO[split_key] = _hold_out_validation(_MEMO[key], cfg)
    return _MEMO[split_key]


_MEMO: dict[tuple[Any, ...], TensorData] = {}

# Fixed seeds: the data must be the same for every run of a sweep, whatever its seed.
_SUBSET_SEED = 0
_DIGITS_SPLIT_SEED = 0
_SYNTHETIC_SEED = 0
# Another seed than the subsets': with theirs, the split of a full training set would be exactly the
# images that every one of its subsets starts with.
_VAL_SPLIT_SEED = 1

_CACHE_FORMAT = 1  # bump when the cached tensors would change for the same inputs


def _memo_key(cfg: DatasetConfig) -> tuple[Any, ...]:
    """What the dataset before any validation split depends on."""
    reads_files = cfg.name in ("cifar10", "cifar100") or (cfg.name == "imagefolder" and cfg.root is not None)
    root = str(data_root(cfg).resolve()) if reads_files else None
    return (cfg.name, root, cfg.train_subset, cfg.test_subset, cfg.image_size, cfg.num_classes)


# ---------------------------------------------------------------------------------------------
# Shared steps: class-balanced subsets and validation splits, resizing, statistics


def _class_orders(labels: torch.Tensor, num_classes: int, seed: int) -> list[torch.Tensor]:
    """Each class's indices into ``labels``, in an order drawn by a generator seeded with ``seed``.

    A class-balanced pick of any size takes the first indices of each class, so it is the same in
    every run and a smaller pick is contained in a larger one. Every class's order is drawn, whatever
    it contributes, so that later classes do not depend on the size picked.
    """
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        orders.append(members[torch.randperm(len(members), generator=generator)])
    return orders


def _per_class(k: int, num_classes: int) -> list[int]:
    """A class-balanced share of ``k`` items: ``k // C`` per class, the remainder one each to the first classes."""
    return [k // num_classes + (c < k % num_classes) for c in range(num_classes)]


def _balanced_subset(labels: torch.Tensor, k: int | None, classes: tuple[str, ...], split: str) -> torch.Tensor:
    """Indices (ascending) of a class-balanced subset of ``k`` items (:func:`_per_class`), drawn with
    :data:`_SUBSET_SEED` (:func:`_class_orders`)."""
    if k is None:
        return torch.arange(len(labels))
    if k > len(labels):
        raise DepthbenchError(f"dataset.{split}_subset={k} is more than the {len(labels)} images of the {split} split")
    orders = _class_orders(labels, len(classes), _SUBSET_SEED)
    wants = _per_class(k, len(classes))
    for name, order, want in zip(classes, orders, wants, strict=True):
        if want > len(order):
            raise DepthbenchError(
                f"dataset.{split}_subset={k} needs {want} images of class '{name}' "
                f"but the {split} split has only {len(order)}"
            )
    return torch.cat([order[:want] for order, want in zip(orders, wants, strict=True)]).sort().values


def _hold_out_validation(base: TensorData, cfg: DatasetConfig) -> TensorData:
    """``base`` with ``cfg.val_split`` images of its training split moved to the validation split, and the
    mean/std measured again on the images left to train on."""
    held = _validation_indices(base.train_y, cfg, base.classes)
    train = torch.ones(len(base.train_y), dtype=torch.bool)
    train[held] = False
    train_x = base.train_x[train]
    mean, std = _channel_stats(train_x)
    return TensorData(
        train_x=train_x, train_y=base.train_y[train], test_x=base.test_x, test_y=base.test_y,
        classes=base.classes, mean=mean, std=std, val_x=base.train_x[held], val_y=base.train_y[held],
    )


def _validation_indices(labels: torch.Tensor, cfg: DatasetConfig, classes: tuple[str, ...]) -> torch.Tensor:
    """Indices (ascending) of the training images that ``cfg.val_split`` holds out: class-balanced
    (:func:`_per_class`), drawn with :data:`_VAL_SPLIT_SEED`; every class keeps an image to train on."""
    n, k = len(labels), cfg.val_size(len(labels))
    images = f"{k} image{'s' * (k != 1)}"
    written = f"dataset.val_split={cfg.val_split}" + (f" ({images})" if isinstance(cfg.val_split, float) else "")
    if k == 0:
        raise DepthbenchError(f"{written} holds out nothing of the training split's {n} images; raise it, "
                              "or give a count of images")
    orders = _class_orders(labels, len(classes), _VAL_SPLIT_SEED)
    wants = _per_class(k, len(classes))
    # Every class keeps one image to train on. The largest split holds out of every class what the class
    # with the fewest images can spare, and one more of each class before it (the remainder's classes).
    spare = [max(len(order) - 1, 0) for order in orders]
    poorest = spare.index(min(spare))
    largest = spare[poorest] * len(classes) + poorest
    if k > largest:
        name, have, want = next((name, len(order), want) for name, order, want, most in
                                zip(classes, orders, wants, spare, strict=True) if want > most)
        if k > n:
            problem = f"is more than the training split's {n} images"
        elif want > have:
            problem = f"needs {want} images of class '{name}', which has {have} in the training split of {n}"
        else:
            problem = f"holds out every training image of class '{name}' ({have} of the training split's {n})"
        if largest:
            fix = f"lower it to at most {largest} images, so that every class keeps one to train on"
        else:
            has = "only one training image" if len(orders[poorest]) else "no training image"
            fix = (f"none fits, as class '{classes[poorest]}' has {has} and must keep it: leave dataset.val_split out"
                   + (", or raise dataset.train_subset" if cfg.train_subset else ""))
        raise DepthbenchError(f"{written} {problem}; {fix}")
    return torch.cat([order[:want] for order, want in zip(orders, wants, strict=True)]).sort().values


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize uint8 images to ``size x size`` (bilinear, antialiased), in chunks to bound float memory."""
    if size is None or x.shape[-2:] == (size, size):
        return x
    out = torch.empty(*x.shape[:2], size, size, dtype=torch.uint8)
    for start in range(0, len(x), 4096):
        chunk = x[start : start + 4096].float()
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + 4096] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std in [0, 1] units.

    Computed from a 256-bin histogram per channel: exact, and far faster than a float copy of 50k images.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        m = (counts * values).sum() / counts.sum()
        var = (counts * (values - m).square()).sum() / counts.sum()
        mean.append(m.item())
        std.append(var.sqrt().item())
    return tuple(mean), tuple(std)


def _tensor_data(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    classes: tuple[str, ...],
) -> TensorData:
    mean, std = _channel_stats(train_x)
    return TensorData(
        train_x=train_x.contiguous(),
        train_y=train_y.to(torch.int64),
        test_x=test_x.contiguous(),
        test_y=test_y.to(torch.int64),
        classes=tuple(classes),
        mean=mean,
        std=std,
    )


def _from_arrays(
    cfg: DatasetConfig,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    classes: tuple[str, ...],
    default_size: int | None = None,
) -> TensorData:
    """Subset and resize full in-memory splits (``{"train": (x, y), "test": (x, y)}``), then measure."""
    chosen = {}
    for split, (x, y) in splits.items():
        keep = _balanced_subset(y, getattr(cfg, f"{split}_subset"), classes, split)
        chosen[split] = (_resize(x[keep], cfg.image_size or default_size), y[keep])
    return _tensor_data(*chosen["train"], *chosen["test"], classes)


# ---------------------------------------------------------------------------------------------
# Disk cache


def _disk_cached(ident: dict[str, Any], build: Callable[[], TensorData]) -> TensorData:
    """Load the dataset that ``ident`` names from ``data_root()/cache``, or build and save it.

    A file lock makes concurrent runs of a sweep wait for the one that decodes instead of repeating it;
    the file is written to a temporary name and renamed, so a reader never sees half of it.
    """
    ident = {"format": _CACHE_FORMAT, **ident}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    folder = data_root() / "cache"
    path = folder / f"{digest}.pt"
    lock = FileLock(f"{path}.lock")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as err:
        raise _cache_error(folder, err) from None
    try:
        cached = _read_cache(path, ident)
        if cached is not None:
            return cached
        data = build()
        _write_cache(path, ident, data)
        return data
    finally:
        lock.release()


def _cache_error(folder: Path, err: OSError) -> DepthbenchError:
    reason = err.strerror or str(err)
    return DepthbenchError(f"cannot use the data cache in {folder}: {reason}; set DEPTHBENCH_DATA to a writable folder")


def _write_cache(path: Path, ident: dict[str, Any], data: TensorData) -> None:
    payload = {"ident": ident, "classes": list(data.classes), "mean": list(data.mean), "std": list(data.std)}
    payload.update({name: getattr(data, name) for name in ("train_x", "train_y", "test_x", "test_y")})
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise _cache_error(path.parent, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def _read_cache(path: Path, ident: dict[str, Any]) -> TensorData | None:
    """The cached dataset, or None when the file is absent, unreadable or for other inputs."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except Exception:  # a damaged or foreign file is rebuilt, never trusted
        return None
    if not isinstance(payload, dict) or payload.get("ident") != ident:
        return None
    return TensorData(
        train_x=payload["train_x"],
        train_y=payload["train_y"],
        test_x=payload["test_x"],
        test_y=payload["test_y"],
        classes=tuple(payload["classes"]),
        mean=tuple(payload["mean"]),
        std=tuple(payload["std"]),
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's archives)

_CIFAR = {
    "cifar10": ("CIFAR-10", "cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR-100", "cifar-100-python.tar.gz"),
}


def _load_cifar(cfg: DatasetConfig) -> TensorData:
    root = data_root(cfg).resolve()
    ident = {
        "name": cfg.name,
        "root": str(root),
        "train_subset": cfg.train_subset,
        "test_subset": cfg.test_subset,
        "image_size": cfg.image_size,
    }
    return _disk_cached(ident, lambda: _build_cifar(cfg, root))


def _build_cifar(cfg: DatasetConfig, root: Path) -> TensorData:
    splits = {}
    for split in ("train", "test"):
        dataset = _torchvision_cifar(cfg.name, root, train=split == "train")
        # dataset.data is already one N x H x W x C uint8 array: no PIL image per sample.
        x = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        splits[split] = (x, torch.tensor(dataset.targets, dtype=torch.int64))
    return _from_arrays(cfg, splits, tuple(dataset.classes))


def _torchvision_cifar(name: str, root: Path, train: bool) -> Any:
    from torchvision import datasets  # imported here: it costs seconds and only CIFAR needs it

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        return cls(str(root), train=train, download=False)
    except RuntimeError:
        pass  # not there (or damaged): try to fetch it
    title, archive = _CIFAR[name]
    try:
        return cls(str(root), train=train, download=True)
    except (OSError, RuntimeError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise DepthbenchError(
            f"{title} is not in {root} and cannot be downloaded (offline? {reason}): "
            f"put {archive} into {root} or set dataset.root / DEPTHBENCH_DATA"
        ) from None


# ---------------------------------------------------------------------------------------------
# Image folders, and tar archives of them

_DECODE_IN_PROCESS_BELOW = 2000  # fewer files than this decode faster than a process pool starts
_DECODE_CHUNK = 250  # files per task of the pool


@dataclass(frozen=True)
class _Tree:
    """The files of an image tree, as paths relative to ``where`` (the folder holding train/ and test/)."""

    where: str
    dirs: set[str]
    files: list[str]  # sorted
    contents: dict[str, bytes] | None = None  # an archive's file bytes; None means read them from disk


def _load_imagefolder(cfg: DatasetConfig) -> TensorData:
    if cfg.root is None:
        raise DepthbenchError(
            "dataset.root is required for imagefolder: a folder holding train/<class>/ and test/<class>/, "
            "or a .tar.gz of one"
        )
    source = data_root(cfg).resolve()
    if not source.exists():
        raise DepthbenchError(f"dataset.root '{source}' does not exist")
    ident = {
        "name": "imagefolder",
        "root": str(source),
        "train_subset": cfg.train_subset,
        "test_subset": cfg.test_subset,
        "image_size": cfg.image_size,
    }
    if source.is_file():
        # An archive is only read on a cache miss; its size and mtime change whenever its contents do.
        stat = source.stat()
        ident["files"] = f"archive of {stat.st_size} bytes, mtime {stat.st_mtime_ns}"
        return _disk_cached(ident, lambda: _build_imagefolder(cfg, _read_archive(source)))
    tree, ident["files"] = _scan_folder(_tree_root(source))
    return _disk_cached(ident, lambda: _build_imagefolder(cfg, tree))


def _build_imagefolder(cfg: DatasetConfig, tree: _Tree) -> TensorData:
    classes, files, labels = _layout(tree)
    chosen: dict[str, list[str]] = {}
    for split in ("train", "test"):
        keep = _balanced_subset(labels[split], getattr(cfg, f"{split}_subset"), classes, split)
        chosen[split] = [files[split][i] for i in keep.tolist()]
        labels[split] = labels[split][keep]
    paths = chosen["train"] + chosen["test"]
    items = [
        (f"{tree.where}/{path}", tree.contents[path] if tree.contents is not None else os.path.join(tree.where, path))
        for path in paths
    ]
    images = _decode_files(items, cfg.image_size)  # one pool for both splits
    _check_sizes(images, paths, tree.where)
    n_train = len(chosen["train"])
    train_x, test_x = (_to_nchw(part) for part in (images[:n_train], images[n_train:]))
    return _tensor_data(train_x, labels["train"], test_x, labels["test"], classes)


def _to_nchw(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def _tree_root(folder: Path) -> Path:
    """The folder holding train/ and test/: ``folder`` itself or its single subfolder (as archives often nest)."""
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        return folder
    subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subfolders) == 1 and (subfolders[0] / "train").is_dir():
        return subfolders[0]
    return folder


def _scan_folder(folder: Path) -> tuple[_Tree, str]:
    """Every non-hidden folder and file below train/ and test/, and a fingerprint of them.

    The fingerprint hashes each file's path, size and mtime, so any edit gives a new cache key.
    os.scandir knows each entry's type from the listing, which keeps this fast even for CIFAR-10's 60,000 files.
    """
    dirs, files, stamps = set(), [], []
    prefix = len(str(folder)) + 1
    stack = [str(folder / split) for split in ("train", "test") if (folder / split).is_dir()]
    while stack:
        current = stack.pop()
        dirs.add(current[prefix:])
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append(entry.path)
                else:
                    stat = entry.stat()
                    files.append(entry.path[prefix:])
                    stamps.append(f"{entry.path[prefix:]}\0{stat.st_size}\0{stat.st_mtime_ns}")
    fingerprint = hashlib.sha256("\n".join(sorted(stamps)).encode()).hexdigest()
    return _Tree(str(folder), dirs, sorted(files)), fingerprint


def _read_archive(archive: Path) -> _Tree:
    """Every file of a tar archive (any compression), read in one streaming pass into memory.

    Reading beats extracting: unpacking many small files costs a disk write each, reading them costs
    none, and nothing is written outside the cache. A single top-level folder holding train/ and test/
    is looked through, as archives of a folder usually have one.
    """
    contents: dict[str, bytes] = {}
    dirs: set[str] = set()
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                name = posixpath.normpath(member.name).lstrip("/")  # "./train/a" -> "train/a"
                if any(part.startswith(".") for part in name.split("/")):
                    continue  # ".", hidden files and folders, as in a folder scan
                if member.isdir():
                    dirs.add(name)
                elif member.isfile():
                    contents[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DepthbenchError(
            f"dataset.root '{archive}' is a file but not a readable tar archive (.tar, .tar.gz, .tgz): {err}"
        ) from None
    for name in contents:  # archives need not list every folder
        parts = name.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    tops = {name.split("/", 1)[0] for name in dirs | set(contents)}
    top = next(iter(tops)) if len(tops) == 1 and not tops & {"train", "test"} else None
    if top is None or f"{top}/train" not in dirs:
        return _Tree(str(archive), dirs, sorted(contents), contents)
    cut = len(top) + 1
    inner = {name[cut:]: data for name, data in contents.items()}
    return _Tree(f"{archive}/{top}", {d[cut:] for d in dirs if d.startswith(f"{top}/")}, sorted(inner), inner)


def _layout(tree: _Tree) -> tuple[tuple[str, ...], dict[str, list[str]], dict[str, torch.Tensor]]:
    """Check the train/<class>/ + test/<class>/ layout; the classes are the sorted folder names of train/.

    Returns the classes and, per split, its image paths (grouped by class) and their labels.
    """
    where = tree.where
    for split in ("train", "test"):
        if split not in tree.dirs:
            raise DepthbenchError(
                f"'{where}' has no {split}/ folder: imagefolder needs train/<class>/ and test/<class>/"
            )
    class_names = {
        split: sorted(d.split("/")[1] for d in tree.dirs if d.startswith(f"{split}/") and d.count("/") == 1)
        for split in ("train", "test")
    }
    if not class_names["train"]:
        raise DepthbenchError(f"'{where}/train' has no class folders: put the images in train/<class>/")
    for split, other in (("train", "test"), ("test", "train")):
        missing = sorted(set(class_names[split]) - set(class_names[other]))
        if missing:
            names = ", ".join(repr(c) for c in missing)
            raise DepthbenchError(f"class {names} is in '{where}/{split}' but not in '{where}/{other}'")
    classes = tuple(class_names["train"])
    index = {name: label for label, name in enumerate(classes)}
    files: dict[str, list[str]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for path in tree.files:  # sorted, so each class's files come together and classes in order
        parts = path.split("/", 2)
        if len(parts) == 3 and parts[0] in files and parts[1] in index:
            files[parts[0]].append(path)
            labels[parts[0]].append(index[parts[1]])
    for split in ("train", "test"):
        counts = np.bincount(labels[split], minlength=len(classes))
        if (counts == 0).any():
            raise DepthbenchError(f"'{where}/{split}/{classes[int(np.argmin(counts))]}' has no images")
    return classes, files, {split: torch.tensor(labels[split], dtype=torch.int64) for split in labels}


def _check_sizes(images: list[np.ndarray], paths: list[str], where: str) -> None:
    first = images[0].shape[:2]
    for image, path in zip(images, paths, strict=True):
        if image.shape[:2] != first:
            raise DepthbenchError(
                f"images differ in size: '{paths[0]}' is {first[0]}x{first[1]} but '{path}' is "
                f"{image.shape[0]}x{image.shape[1]} (HxW) in '{where}'; set dataset.image_size to resize them all"
            )
    if first[0] != first[1]:
        raise DepthbenchError(
            f"images in '{where}' are {first[0]}x{first[1]} (HxW), not square; set dataset.image_size to resize them"
        )


_Image = tuple[str, str | bytes]  # a name for messages, and a file path or the encoded bytes


def _decode_files(items: list[_Image], size: int | None) -> list[np.ndarray]:
    """Decode images to H x W x 3 uint8 RGB arrays, in worker processes when there are many.

    Pillow decoding is Python-bound per file, so processes (not threads) are what use both cores.
    Workers are forked: they only run Pillow and numpy, never torch. A daemonic process (a
    multiprocessing pool worker) may not have children, so it decodes in-process.
    """
    workers = min(os.cpu_count() or 1, 8)
    if len(items) < _DECODE_IN_PROCESS_BELOW or workers < 2 or multiprocessing.current_process().daemon:
        return _decode_chunk(items, size)
    # Small chunks, so that a stop (Ctrl-C, SIGTERM) or a bad image waits for a few hundred images at most.
    chunks = [items[i : i + _DECODE_CHUNK] for i in range(0, len(items), _DECODE_CHUNK)]
    context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=stopping.ignore_stop_signals)
    try:
        with stopping.workers_born_deaf():  # the workers are started by the first submit; the sweep decides for them
            futures = [pool.submit(_decode_chunk, chunk, size) for chunk in chunks]
        return [image for future in futures for image in future.result()]
    finally:
        pool.shutdown(cancel_futures=True)


def _decode_chunk(items: list[_Image], size: int | None) -> list[np.ndarray]:
    return [_decode_image(name, source, size) for name, source in items]


def _decode_image(name: str, source: str | bytes, size: int | None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DepthbenchError(f"cannot read '{name}' as an image: {err}") from None
    if size is not None and rgb.size != (size, size):
        # Pillow's bilinear filter widens its support when shrinking, so this is antialiased.
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits

_DIGITS_TEST_SIZE = 360  # 20% of 1797, stratified with a fixed seed: 1437 train / 360 test


def _load_digits(cfg: DatasetConfig) -> TensorData:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Values are 0..16; scale to the 0..255 of every other dataset so one normalisation fits all.
    x = torch.from_numpy(digits.images * 255 / 16).round().to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(digits.target).to(torch.int64)
    train, test = train_test_split(
        np.arange(len(y)), test_size=_DIGITS_TEST_SIZE, stratify=digits.target, random_state=_DIGITS_SPLIT_SEED
    )
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    splits = {"train": (x[train], y[train]), "test": (x[test], y[test])}
    return _from_arrays(cfg, splits, tuple(str(d) for d in range(10)), default_size=32)


# ---------------------------------------------------------------------------------------------
# Synthetic


def _load_synthetic(cfg: DatasetConfig) -> TensorData:
    """A generated, learnable task that needs no files: small networks learn it in a few dozen steps.

    Each class has a fixed smooth colour template (a random 4x4 field per channel, upsampled). A sample
    is its class template plus a weaker smooth random field of its own (so no single pixel gives the
    class away) and pixel noise. Labels cycle through the classes, so every class gets
    ``n // C`` samples and the first ``n % C`` one more, as with the subsets of real datasets.
    """
    size = cfg.image_size or 32
    templates = _smooth_fields(cfg.num_classes, size, torch.Generator().manual_seed(_SYNTHETIC_SEED))
    splits = []
    for offset, n in ((1, cfg.train_subset or 1024), (2, cfg.test_subset or 256)):
        generator = torch.Generator().manual_seed(_SYNTHETIC_SEED + offset)
        y = torch.arange(n) % cfg.num_classes
        distractor = _smooth_fields(n, size, generator)
        noise = torch.randn(n, 3, size, size, generator=generator)
        x = 128 + 40 * templates[y] + 25 * distractor + 15 * noise
        splits += [x.round_().clamp_(0, 255).to(torch.uint8), y]
    return _tensor_data(*splits, tuple(f"class{c}" for c in range(cfg.num_classes)))


def _smooth_fields(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random low-frequency 3-channel fields of unit variance per pixel, ``size x size``."""
    coarse = torch.randn(n, 3, 4, 4, generator=generator)
    fields = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return fields / fields.std(dim=(1, 2, 3), keepdim=True)


_LOADERS: dict[str, Callable[[DatasetConfig], TensorData]] = {
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "imagefolder": _load_imagefolder,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
}

__all__ = ["TensorData", "data_root", "load_dataset"]
