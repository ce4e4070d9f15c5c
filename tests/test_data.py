"""The data layer: every dataset as uint8 tensors, subsets, caches, errors, and batched augmentation."""

from __future__ import annotations

import pickle
import tarfile
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from depthbench import data
from depthbench.augment import augment_batch, normalize
from depthbench.config import DatasetConfig
from depthbench.data import TensorData, data_root, load_dataset
from depthbench.errors import DepthbenchError
from tests.conftest import CIFAR_JPEG, requires_cifar


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    data._MEMO.clear()  # each test sees the disk cache and the loaders, not a previous test's result


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cache-home"
    monkeypatch.setenv("DEPTHBENCH_DATA", str(home))
    return home


def reload(cfg: DatasetConfig) -> TensorData:
    data._MEMO.clear()
    return load_dataset(cfg)


def assert_same(a: TensorData, b: TensorData) -> None:
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.classes, a.mean, a.std) == (b.classes, b.mean, b.std)


def direct_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    pixels = x.double() / 255
    return pixels.mean(dim=(0, 2, 3)).tolist(), pixels.std(dim=(0, 2, 3), correction=0).tolist()


def assert_well_formed(d: TensorData) -> None:
    for x in (d.train_x, d.test_x):
        assert x.dtype == torch.uint8 and x.is_contiguous() and x.device.type == "cpu"
    assert d.train_y.dtype == torch.int64 and d.test_y.dtype == torch.int64
    assert len(d.train_x) == len(d.train_y) and len(d.test_x) == len(d.test_y)
    mean, std = direct_stats(d.train_x)
    assert d.mean == pytest.approx(mean, abs=1e-9) and d.std == pytest.approx(std, abs=1e-9)


# --------------------------------------------------------------------------------------------- paths


def test_data_root_prefers_config_then_environment_then_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPTHBENCH_DATA", "/env/data")
    assert data_root(DatasetConfig(root="/cfg/data")) == Path("/cfg/data")
    assert data_root(DatasetConfig()) == Path("/env/data")
    assert data_root() == Path("/env/data")
    monkeypatch.delenv("DEPTHBENCH_DATA")
    assert data_root(DatasetConfig()) == Path.home() / ".cache" / "depthbench"


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_sizes_types_balance_and_determinism() -> None:
    cfg = DatasetConfig(name="synthetic", num_classes=7)
    d = load_dataset(cfg)
    assert_well_formed(d)
    assert d.train_x.shape == (1024, 3, 32, 32) and d.test_x.shape == (256, 3, 32, 32)
    assert (d.num_classes, d.in_channels, d.image_size) == (7, 3, 32)
    assert d.classes == tuple(f"class{c}" for c in range(7))
    # 1024 = 7 * 146 + 2 and 256 = 7 * 36 + 4: the remainder goes to the first classes.
    assert d.train_y.bincount().tolist() == [147, 147, 146, 146, 146, 146, 146]
    assert d.test_y.bincount().tolist() == [37, 37, 37, 37, 36, 36, 36]
    assert load_dataset(cfg) is d  # memoised
    start = time.perf_counter()
    assert_same(reload(cfg), d)  # and regenerated identically
    assert time.perf_counter() - start < 1.0  # about 0.2 s on 2 cores; generous for a busy machine
    assert repr(d) == "TensorData(1024 train, 256 test, 3x32x32, 7 classes)"


def test_synthetic_subset_options_set_its_sizes_and_image_size() -> None:
    d = load_dataset(DatasetConfig(name="synthetic", train_subset=100, test_subset=30, image_size=8, num_classes=3))
    assert d.train_x.shape == (100, 3, 8, 8) and d.test_x.shape == (30, 3, 8, 8)
    assert d.train_y.bincount().tolist() == [34, 33, 33]
    # The classes differ in their mean image far more than the noise within a class.
    class_means = torch.stack([d.train_x[d.train_y == c].float().mean(0) for c in range(3)])
    assert torch.cdist(class_means.flatten(1), class_means.flatten(1)).fill_diagonal_(1e9).min() > 100


# --------------------------------------------------------------------------------------------- digits


def test_digits_fixed_stratified_split_one_channel_32px() -> None:
    d = load_dataset(DatasetConfig(name="digits"))
    assert_well_formed(d)
    assert d.train_x.shape == (1437, 1, 32, 32) and d.test_x.shape == (360, 1, 32, 32)
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 1, 32)
    assert d.classes == tuple("0123456789")
    assert d.train_y.bincount().tolist() == [142, 146, 142, 146, 145, 145, 145, 143, 139, 144]
    assert d.test_y.bincount().tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert int(d.train_x.min()) == 0 and int(d.train_x.max()) == 255


def test_digits_native_values_are_scaled_to_0_255_and_resized_bilinearly() -> None:
    from sklearn.datasets import load_digits

    native = load_dataset(DatasetConfig(name="digits", image_size=8))
    raw = torch.from_numpy(load_digits().images)
    all_x = torch.cat([native.train_x, native.test_x])[:, 0]
    assert all_x.shape == (1797, 8, 8)
    # The two splits hold every image exactly once, each scaled by 255/16.
    expected = (raw * 255 / 16).round().to(torch.uint8)
    assert sorted(map(tuple, all_x.flatten(1).tolist())) == sorted(map(tuple, expected.flatten(1).tolist()))

    small = load_dataset(DatasetConfig(name="digits", image_size=16))
    assert small.train_x.shape == (1437, 1, 16, 16)
    upsampled = torch.nn.functional.interpolate(native.train_x.float(), size=(16, 16), mode="bilinear")
    assert torch.equal(small.train_x, upsampled.round().clamp(0, 255).to(torch.uint8))
    assert_well_formed(small)


# --------------------------------------------------------------------------------------------- subsets


def test_subset_is_class_balanced_fixed_and_nested() -> None:
    d = load_dataset(DatasetConfig(name="digits", train_subset=25, test_subset=10))
    assert d.train_y.bincount().tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    assert d.test_y.bincount().tolist() == [1] * 10
    assert_well_formed(d)
    assert_same(reload(DatasetConfig(name="digits", train_subset=25, test_subset=10)), d)
    # A larger subset contains the smaller one, so growing a study adds images, never swaps them.
    bigger = load_dataset(DatasetConfig(name="digits", train_subset=100))
    small_rows = {tuple(row.flatten().tolist()) for row in d.train_x}
    assert small_rows <= {tuple(row.flatten().tolist()) for row in bigger.train_x}


def test_subset_larger_than_the_split_is_an_error() -> None:
    with pytest.raises(DepthbenchError, match=r"^dataset.test_subset=361 is more than the 360 images of the test"):
        load_dataset(DatasetConfig(name="digits", test_subset=361))


# --------------------------------------------------------------------------------------------- image folders


def write_tree(root: Path, counts: dict[str, dict[str, int]], size: int = 8) -> dict[str, np.ndarray]:
    """PNG images with random pixels under root/<split>/<class>/; returns them by relative path."""
    rng = np.random.default_rng(0)
    images = {}
    for split, classes in counts.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
                images[f"{split}/{name}/{i}.png"] = pixels
    return images


TREE = {"train": {"b": 2, "a": 3}, "test": {"a": 1, "b": 2}}


def folder_cfg(root: Path, **options) -> DatasetConfig:
    return DatasetConfig(name="imagefolder", root=str(root), **options)


def test_imagefolder_loads_pixels_and_labels_exactly(tmp_path: Path, cache_home: Path) -> None:
    images = write_tree(tmp_path / "tree", TREE)
    d = load_dataset(folder_cfg(tmp_path / "tree"))
    assert_well_formed(d)
    assert d.classes == ("a", "b") and (d.in_channels, d.image_size) == (3, 8)
    assert d.train_y.tolist() == [0, 0, 0, 1, 1] and d.test_y.tolist() == [0, 1, 1]
    order = ["train/a/0.png", "train/a/1.png", "train/a/2.png", "train/b/0.png", "train/b/1.png"]
    expected = torch.from_numpy(np.stack([images[p] for p in order])).permute(0, 3, 1, 2)
    assert torch.equal(d.train_x, expected)


def test_imagefolder_decodes_jpeg_and_grey_images_to_rgb(tmp_path: Path, cache_home: Path) -> None:
    write_tree(tmp_path / "tree", TREE)
    Image.new("L", (8, 8), 200).save(tmp_path / "tree/test/a/grey.jpg")
    d = load_dataset(folder_cfg(tmp_path / "tree"))
    assert d.test_x.shape == (4, 3, 8, 8)
    assert (d.test_x[1].int() - 200).abs().max() <= 2  # sorted: test/a/0.png, then test/a/grey.jpg


def test_imagefolder_cache_is_written_reused_and_invalidated_by_edits(
    tmp_path: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tree(tmp_path / "tree", TREE)
    cfg = folder_cfg(tmp_path / "tree")
    first = load_dataset(cfg)
    assert len(list((cache_home / "cache").glob("*.pt"))) == 1

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "_decode_files", no_decoding)
    assert_same(reload(cfg), first)

    Image.new("RGB", (8, 8)).save(tmp_path / "tree/train/a/new.png")
    with pytest.raises(AssertionError, match="decoded again"):
        reload(cfg)


def test_imagefolder_subset_per_class_shortage_names_the_class(tmp_path: Path, cache_home: Path) -> None:
    write_tree(tmp_path / "tree", {"train": {"a": 2, "b": 3}, "test": {"a": 1, "b": 1}})
    assert load_dataset(folder_cfg(tmp_path / "tree", train_subset=4)).train_y.tolist() == [0, 0, 1, 1]
    with pytest.raises(DepthbenchError, match=r"^dataset.train_subset=5 needs 3 images of class 'a' but the train"):
        reload(folder_cfg(tmp_path / "tree", train_subset=5))


def test_imagefolder_of_mixed_sizes_needs_image_size(tmp_path: Path, cache_home: Path) -> None:
    write_tree(tmp_path / "tree", TREE)
    Image.new("RGB", (12, 10)).save(tmp_path / "tree/train/b/wide.png")
    with pytest.raises(DepthbenchError, match=r"'train/b/wide.png' is 10x12 .*set dataset.image_size"):
        load_dataset(folder_cfg(tmp_path / "tree"))
    d = reload(folder_cfg(tmp_path / "tree", image_size=16))
    assert d.train_x.shape == (6, 3, 16, 16) and d.test_x.shape == (3, 3, 16, 16)


def test_imagefolder_from_an_archive_reads_it_without_unpacking(
    tmp_path: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tree(tmp_path / "tree", TREE)
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="tiny")  # one top-level folder holding train/ and test/
    from_archive = load_dataset(folder_cfg(archive))
    assert_same(from_archive, reload(folder_cfg(tmp_path / "tree")))
    assert sorted(p.name for p in cache_home.iterdir()) == ["cache"]  # nothing unpacked

    def no_reading(*args: object) -> None:
        raise AssertionError("archive read again")

    monkeypatch.setattr(data, "_read_archive", no_reading)
    assert_same(reload(folder_cfg(archive)), from_archive)  # the disk cache answers


def test_imagefolder_archive_errors(tmp_path: Path, cache_home: Path) -> None:
    write_tree(tmp_path / "tree", TREE)
    archive = tmp_path / "flat.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "tree/train", arcname="./train")  # no test/, and "./" names
    with pytest.raises(DepthbenchError, match=f"^'{archive}' has no test/ folder"):
        load_dataset(folder_cfg(archive))
    (tmp_path / "images.zip").write_bytes(b"PK\x03\x04 not a tar")
    with pytest.raises(DepthbenchError, match=r"images.zip' is a file but not a readable tar archive"):
        load_dataset(folder_cfg(tmp_path / "images.zip"))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, r"^dataset.root '{root}' does not exist$"),
        (lambda root: (root / "train/a").mkdir(parents=True), r"^'{root}' has no test/ folder"),
        (lambda root: (root / "test").mkdir(parents=True) or (root / "train").mkdir(), r"'{root}/train' has no class"),
        (
            lambda root: [(root / p).mkdir(parents=True) for p in ("train/a", "train/b", "test/a")],
            r"^class 'b' is in '{root}/train' but not in '{root}/test'$",
        ),
        (
            lambda root: [(root / p).mkdir(parents=True) for p in ("train/a", "test/a", "test/z")],
            r"^class 'z' is in '{root}/test' but not in '{root}/train'$",
        ),
        (
            lambda root: [(root / p).mkdir(parents=True) for p in ("train/a", "test/a")],
            r"^'{root}/train/a' has no images$",
        ),
    ],
    ids=["missing-root", "no-test", "no-classes", "class-missing-in-test", "class-missing-in-train", "empty-class"],
)
def test_imagefolder_layout_errors_name_the_path(tmp_path: Path, cache_home: Path, setup, message: str) -> None:
    root = tmp_path / "tree"
    setup(root)
    with pytest.raises(DepthbenchError, match=message.format(root=root)):
        load_dataset(folder_cfg(root))


def test_imagefolder_non_image_file_is_named(tmp_path: Path, cache_home: Path) -> None:
    write_tree(tmp_path / "tree", TREE)
    (tmp_path / "tree/train/b/notes.txt").write_text("not a picture")
    with pytest.raises(DepthbenchError, match=f"^cannot read '{tmp_path}/tree/train/b/notes.txt' as an image: "):
        load_dataset(folder_cfg(tmp_path / "tree"))


def test_imagefolder_needs_a_root() -> None:
    with pytest.raises(DepthbenchError, match="^dataset.root is required for imagefolder"):
        load_dataset(DatasetConfig(name="imagefolder"))


# --------------------------------------------------------------------------------------------- CIFAR


def test_cifar_offline_and_missing_says_where_to_put_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.cifar

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DepthbenchError) as err:
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path)))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"CIFAR-10 is not in {tmp_path} and cannot be downloaded (offline?")
    assert message.endswith(f"put cifar-10-python.tar.gz into {tmp_path} or set dataset.root / DEPTHBENCH_DATA")


def write_fake_cifar10(root: Path) -> tuple[np.ndarray, list[int]]:
    """CIFAR-10's python pickles in miniature: 5 training batches of 4 images and a test batch of 3."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = 3 if name == "test_batch" else 4
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
        if name != "test_batch":
            rows.append(batch["data"])
            labels += batch["labels"]
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return np.concatenate(rows), labels


def test_cifar_arrays_become_nchw_tensors_and_are_cached(
    tmp_path: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)  # no real md5s here
    rows, labels = write_fake_cifar10(tmp_path)
    cfg = DatasetConfig(name="cifar10", root=str(tmp_path))
    d = load_dataset(cfg)
    assert_well_formed(d)
    assert d.classes[:2] == ("airplane", "automobile") and d.num_classes == 10
    assert torch.equal(d.train_x, torch.from_numpy(rows).view(20, 3, 32, 32))  # the pickles are row-major CHW
    assert d.train_y.tolist() == labels and d.test_x.shape == (3, 3, 32, 32)
    assert len(list((cache_home / "cache").glob("*.pt"))) == 1

    (tmp_path / "cifar-10-batches-py/data_batch_1").unlink()  # the cache no longer needs the pickles
    assert_same(reload(cfg), d)


def test_cifar_image_size_resizes_once_at_load(
    tmp_path: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    write_fake_cifar10(tmp_path)
    native = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path)))
    small = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), image_size=16))
    assert small.train_x.shape == (20, 3, 16, 16) and small.image_size == 16
    expected = torch.nn.functional.interpolate(
        native.train_x.float(), size=(16, 16), mode="bilinear", antialias=True, align_corners=False
    )
    assert torch.equal(small.train_x, expected.round().clamp(0, 255).to(torch.uint8))


@requires_cifar
def test_real_cifar10_from_the_shared_tarball(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A cache home shared by the whole test session (as conftest's), never the user's or the repo's.
    monkeypatch.setenv("DEPTHBENCH_DATA", str(tmp_path_factory.getbasetemp() / "data-cache"))
    cfg = DatasetConfig(name="imagefolder", root=str(CIFAR_JPEG), train_subset=1000, test_subset=500)
    start = time.perf_counter()
    d = load_dataset(cfg)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = reload(cfg)
    cached = time.perf_counter() - start
    assert_same(again, d)
    assert d.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert d.train_x.shape == (1000, 3, 32, 32) and d.test_x.shape == (500, 3, 32, 32)
    assert d.train_y.bincount().tolist() == [100] * 10 and d.test_y.bincount().tolist() == [50] * 10
    assert d.mean == pytest.approx((0.485, 0.477, 0.439), abs=0.03)
    with capsys.disabled():
        print(f"\nreal CIFAR-10 subset: first load {first:.2f} s (read archive, decode 1,500), cached {cached:.3f} s")


# --------------------------------------------------------------------------------------------- augmentation


def marked_batch(n: int, size: int = 32) -> torch.Tensor:
    """Blank images with a two-pixel marker (255 then 128, left to right) at row 16, columns 16-17."""
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[:, 0, 16, 16], x[:, 0, 16, 17] = 255, 128
    return x


def recover_moves(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flipped) per image from where the marker landed; out[i, j] reads x[i + dy, j + dx] before a flip."""
    n, _, h, w = out.shape
    flat = out.view(n, -1).argmax(dim=1)
    r, c = flat // w, flat % w
    flipped = out[torch.arange(n), 0, r, (c - 1).clamp(min=0)] == 128
    assert torch.equal(flipped, out[torch.arange(n), 0, r, (c + 1).clamp(max=w - 1)] != 128)
    dy = 16 - r
    dx = torch.where(flipped, c - (w - 1 - 16), 16 - c)
    return dy, dx, flipped


def test_augment_shifts_cover_minus4_to_4_uniformly_and_flip_half() -> None:
    out = augment_batch(marked_batch(4000), torch.Generator().manual_seed(0))
    assert out.shape == (4000, 1, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out.view(4000, -1).sum(1), torch.full((4000,), 255 + 128))  # the marker always survives
    dy, dx, flipped = recover_moves(out)
    for shift in (dy, dx):
        counts = torch.bincount(shift + 4)
        assert len(counts) == 9 and int(shift.min()) == -4  # exactly [-4, 4]
        assert counts.min() > 350 and counts.max() < 540, counts.tolist()  # uniform: 444 each expected
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) == 81  # x and y shifts independent
    assert 0.45 < flipped.float().mean() < 0.55


def test_augment_output_is_a_zero_padded_crop_or_its_mirror() -> None:
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = augment_batch(x, torch.Generator().manual_seed(2), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    crops = [padded[:, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
    candidates = torch.stack(crops + [crop.flip(-1) for crop in crops], dim=1)  # N x 50 x C x H x W
    matches = (candidates == out[:, None]).flatten(2).all(-1)
    assert matches.any(dim=1).all()


def test_augment_identity_determinism_float_and_channels_last() -> None:
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(0), pad=0, flip=False), x)

    a = augment_batch(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, augment_batch(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, augment_batch(x, torch.Generator().manual_seed(6)))

    as_float = augment_batch(x.float(), torch.Generator().manual_seed(5))
    assert as_float.dtype == torch.float32 and torch.equal(as_float, a.float())

    cl = augment_batch(x.contiguous(memory_format=torch.channels_last), torch.Generator().manual_seed(5))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, a)


def test_augment_rejects_a_batch_that_is_not_nchw() -> None:
    with pytest.raises(DepthbenchError, match=r"N x C x H x W batch, got shape \(3, 32, 32\)"):
        augment_batch(torch.zeros(3, 32, 32, dtype=torch.uint8), torch.Generator())


# --------------------------------------------------------------------------------------------- normalisation


def test_normalize_matches_the_formula_and_keeps_channels_last() -> None:
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
    expected = (x.double() / 255 - mean.double()) / std.double()
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, atol=1e-5)

    cl = normalize(x.contiguous(memory_format=torch.channels_last), mean, std)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, out)

    half = normalize(x, mean, std, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.double(), expected, atol=0.02)
