"""Tests for advlab.data: loaders, the IDX reader, source validation and subsets."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from advlab import data
from advlab.data import (
    DATASETS,
    DataError,
    Dataset,
    SubsetSplit,
    load_dataset,
    parse_subset,
    read_idx,
    select_subset,
    validate_dataset_source,
)
from advlab.sources import attacked_split
from advlab.spec import DatasetSpec

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

# IDX type codes, written out here independently of the reader's own table.
_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write ``array`` as IDX: magic (0, 0, type, ndim), big-endian dims, big-endian data."""
    code = _IDX_CODES[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_fake_mnist(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> dict:
    """Four IDX files with known contents (5x6 images, so height and width can't be swapped)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n_train, 5, 6), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, 5, 6), dtype=np.uint8),
        "y_test": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    arrays["x_train"][0, 0, 0] = 255  # so the max pixel is exactly 1.0
    for key, stem in data.IDX_FILES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key], gz=gz)
    return arrays


def toy_dataset(labels: list[int] | np.ndarray, name: str = "toy") -> Dataset:
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    x = torch.zeros(len(y), 1, 2, 2)
    return Dataset(name=name, x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])


# --------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_split_sizes() -> None:
    ds = load_dataset("digits")
    # 1797 images; a stratified 25% test split holds ceil(0.25 * 1797) = 450 of them.
    assert ds.x_train.shape == (1347, 1, 8, 8)
    assert ds.x_test.shape == (450, 1, 8, 8)
    assert ds.y_train.shape == (1347,) and ds.y_test.shape == (450,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.is_contiguous() and ds.x_test.is_contiguous()
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0  # 16/16
    # The raw pixels are integers 0..16, so every value is a multiple of 1/16.
    assert torch.equal(ds.x_train * 16, (ds.x_train * 16).round())
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    # What sweep files are checked against before any data loads is what loading gives.
    assert data.FACTS["digits"] == data.DatasetFacts(ds.input_shape, ds.num_classes)
    assert sorted(ds.y_test.unique().tolist()) == list(range(10))
    # Stratified: each class's test count is within one of a quarter of its total.
    total = torch.bincount(ds.y_train, minlength=10) + torch.bincount(ds.y_test, minlength=10)
    test = torch.bincount(ds.y_test, minlength=10)
    assert ((test - total * 0.25).abs() <= 1).all()


def test_digits_split_is_identical_on_a_fresh_load() -> None:
    first = load_dataset("digits")
    data._load_cached.cache_clear()  # force a real second load, not the cached object
    second = load_dataset("digits")
    assert first is not second
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    # Pinned: if scikit-learn ever changes its split, stored digits results would silently change.
    assert second.y_test[:10].tolist() == [2, 0, 4, 9, 4, 1, 2, 4, 6, 7]


def test_load_dataset_is_cached_in_process() -> None:
    assert load_dataset("digits") is load_dataset("digits")


def test_attacked_split_is_the_split_a_trial_attacked() -> None:
    spec = DatasetSpec()  # the embedded digits
    ds = load_dataset("digits")
    for split, (x, y) in (("train", (ds.x_train, ds.y_train)), ("test", (ds.x_test, ds.y_test))):
        images, labels = attacked_split(spec, split)
        assert images is x and labels is y  # the loaded tensors, not copies
    with pytest.raises(DataError, match=r"^attack_split: 'val' is not a split; use test or train$"):
        attacked_split(spec, "val")


# --------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) * 7 - 20).reshape(2, 3, 4)
    array = (array % 256 if dtype is np.uint8 else array).astype(dtype)
    out = read_idx(write_idx(tmp_path / "file.idx", array, gz=gz))
    assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 1  # the result is a writable copy, not a view on the file buffer


def test_read_idx_labels_1d(tmp_path: Path) -> None:
    labels = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l", labels, gz=True)), labels)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good", np.zeros((4, 3, 3), dtype=np.uint8))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(truncated)
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"PK\x03\x04not an idx file")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(foreign)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_local_idx_folder(tmp_path: Path, gz: bool) -> None:
    arrays = write_fake_mnist(tmp_path / "mnist", gz=gz)
    ds = load_dataset("mnist", str(tmp_path / "mnist"))
    assert ds.name == "mnist"
    assert ds.x_train.shape == (20, 1, 5, 6) and ds.x_test.shape == (10, 1, 5, 6)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    expected = torch.from_numpy(arrays["x_train"].astype(np.float32) / 255)[:, None]
    assert torch.allclose(ds.x_train, expected)
    assert ds.x_train.max() == 1.0
    assert ds.y_test.tolist() == (np.arange(10)[::-1] % 10).tolist()


def test_load_idx_from_torchvision_layout(tmp_path: Path) -> None:
    # A root that torchvision once downloaded into holds the files under FashionMNIST/raw.
    write_fake_mnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    ds = load_dataset("fashion_mnist", str(tmp_path))
    assert ds.x_train.shape == (20, 1, 5, 6)


def test_idx_image_label_count_mismatch(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8), gz=True)
    with pytest.raises(DataError, match="test files disagree"):
        load_dataset("mnist", str(tmp_path))


def test_idx_wrong_dtypes(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    images = np.zeros((20, 5, 6), dtype=np.float32)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    with pytest.raises(DataError, match="expected unsigned-byte images"):
        load_dataset("mnist", str(tmp_path))


@pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir(),
    reason=f"{DEBIAN_FASHION} absent; apt-get install dataset-fashion-mnist to run this test",
)
def test_real_debian_fashion_mnist() -> None:
    ds = load_dataset("fashion_mnist", str(DEBIAN_FASHION))
    assert ds.x_train.shape == (60000, 1, 28, 28)
    assert ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # Fashion-MNIST is exactly balanced: 6000 / 1000 images of each of its 10 classes.
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    facts = data.DatasetFacts(ds.input_shape, ds.num_classes)
    assert data.FACTS["fashion_mnist"] == data.FACTS["mnist"] == facts
    split = select_subset(ds, "p1")
    assert len(split.train_idx) == 30000 and len(split.heldout_idx) == 30000


# --------------------------------------------------------------------------- downloads (faked)


class _FakeTorchvisionMNIST:
    def __init__(self, root: str, train: bool, download: bool) -> None:
        assert download
        n = 6 if train else 4
        self.data = torch.arange(n * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8)
        self.data = self.data.reshape(n, 28, 28)
        self.targets = torch.arange(n) % 10


def test_download_path_uses_torchvision_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    monkeypatch.setattr(data, "default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(torchvision.datasets, "MNIST", _FakeTorchvisionMNIST)
    data._load_cached.cache_clear()
    try:
        ds = load_dataset("mnist")
    finally:
        data._load_cached.cache_clear()
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert ds.x_train[0, 0, 0, 1].item() == pytest.approx(1 / 255)
    assert (tmp_path / "cache").is_dir()


def test_download_failure_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried a, got:\nboom\n")

    monkeypatch.setattr(data, "default_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    data._load_cached.cache_clear()
    try:
        with pytest.raises(DataError, match=r"downloading fashion_mnist .* failed") as info:
            load_dataset("fashion_mnist")
        assert "\n" not in str(info.value) and "Tried a, got: boom" in str(info.value)
    finally:
        data._load_cached.cache_clear()


def test_cifar10_from_root_converts_hwc_to_chw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            assert not download and root == str(tmp_path)
            self.data = np.zeros((3, 32, 32, 3), dtype=np.uint8)
            self.data[..., 2] = 255  # channel 2 (blue) saturated in HWC layout
            self.targets = [0, 1, 2]

    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in data._CIFAR_FILES:
        (batches / name).touch()
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = load_dataset("cifar10", str(batches))  # the batches folder itself is accepted too
    assert ds.x_train.shape == (3, 3, 32, 32)
    assert ds.x_train[:, 2].min() == 1.0 and ds.x_train[:, :2].max() == 0.0
    assert ds.y_train.tolist() == [0, 1, 2]


def test_cifar10_corrupt_files_are_a_data_error(tmp_path: Path) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in data._CIFAR_FILES:
        (batches / name).write_bytes(b"junk")
    validate_dataset_source("cifar10", str(tmp_path))  # the files are there...
    with pytest.raises(DataError, match="cannot load CIFAR-10"):  # ...but fail the checksum
        load_dataset("cifar10", str(tmp_path))


# --------------------------------------------------------------------------- validation


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match=r"dataset.name: 'imagenet' is not a dataset; use digits"):
        validate_dataset_source("imagenet", None)
    with pytest.raises(DataError, match="not a dataset"):
        load_dataset("MNIST")


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as info:
        load_dataset("mnist", str(missing))
    message = str(info.value)
    assert "\n" not in message
    assert str(missing) in message and "does not exist" in message
    assert "train-images-idx3-ubyte(.gz)" in message and "drop it to download" in message
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        validate_dataset_source("cifar10", str(missing))


def test_missing_files_are_named(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte\(\.gz\); point"):
        validate_dataset_source("mnist", str(tmp_path))
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="lacks data_batch_1"):
        validate_dataset_source("cifar10", str(tmp_path / "other"))


def test_validate_accepts_good_sources(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    validate_dataset_source("mnist", str(tmp_path))
    for name in DATASETS:
        validate_dataset_source(name, None)  # downloads are checked when they happen
    with pytest.raises(DataError, match="digits ships with scikit-learn"):
        validate_dataset_source("digits", str(tmp_path))


# --------------------------------------------------------------------------- subsets


def test_parse_subset_forms() -> None:
    assert parse_subset("all").kind == "all"
    assert parse_subset("p2").kind == "p2"
    assert parse_subset("fraction:0.25").fraction == 0.25
    assert parse_subset("fraction:1").fraction == 1.0
    assert parse_subset("per_class:7").per_class == 7


@pytest.mark.parametrize(
    "bad",
    [
        "p3",
        "",
        "ALL",
        "half",
        "fraction",
        "fraction:",
        "fraction:0",
        "fraction:1.5",
        "fraction:-0.1",
        "fraction:nan",
        "fraction:abc",
        "per_class:0",
        "per_class:-3",
        "per_class:2.5",
        "per_class:",
        "perclass:5",
        0.5,
    ],
)
def test_parse_subset_rejects(bad: object) -> None:
    with pytest.raises(DataError) as info:
        parse_subset(bad)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"subset: {bad!r}") and "per_class:K" in message


def test_p3_message_matches_the_contract() -> None:
    with pytest.raises(
        DataError, match=r"^subset: 'p3' is not a subset; use all, p1, p2, fraction"
    ):
        parse_subset("p3")


def test_all_subset() -> None:
    ds = toy_dataset([0, 1] * 5)
    split = select_subset(ds, "all")
    assert split.train_idx.tolist() == list(range(10))
    assert split.heldout_idx.numel() == 0 and split.heldout_idx.dtype == torch.int64


def test_p1_p2_disjoint_covering_and_stable() -> None:
    ds = load_dataset("digits")
    n = len(ds.y_train)  # 1347
    p1, p2 = select_subset(ds, "p1"), select_subset(ds, "p2")
    assert isinstance(p1, SubsetSplit)
    assert p1.train_idx.dtype == torch.int64
    assert len(p1.train_idx) == n // 2 == 673 and len(p2.train_idx) == n - n // 2 == 674
    assert set(p1.train_idx.tolist()).isdisjoint(p2.train_idx.tolist())
    assert sorted(p1.train_idx.tolist() + p2.train_idx.tolist()) == list(range(n))
    # p1's heldout set is exactly p2, and vice versa.
    assert torch.equal(p1.heldout_idx, p2.train_idx) and torch.equal(p2.heldout_idx, p1.train_idx)
    # Sorted indices, and the same split on every call.
    assert torch.equal(p1.train_idx, p1.train_idx.sort().values)
    assert torch.equal(select_subset(ds, "p1").train_idx, p1.train_idx)
    # A random half, not the first half of the file.
    assert p1.train_idx.tolist() != list(range(n // 2))


def test_subsets_depend_on_split_seed_only() -> None:
    ds = load_dataset("digits")
    torch.manual_seed(0)
    np.random.seed(0)
    first = {s: select_subset(ds, s, split_seed=3) for s in ("p1", "fraction:0.3", "per_class:5")}
    torch.manual_seed(12345)
    np.random.seed(999)
    torch.rand(100)
    np.random.rand(100)
    for subset, split in first.items():
        again = select_subset(ds, subset, split_seed=3)
        assert torch.equal(again.train_idx, split.train_idx), subset
        other = select_subset(ds, subset, split_seed=4)
        assert not torch.equal(other.train_idx, split.train_idx), subset


def test_subset_keys_are_pinned() -> None:
    # splitmix64 is hand-rolled so no numpy/torch upgrade can move P1; pin its first outputs
    # (splitmix64 with state 0 yields 0xE220A8397B1DCDAF first, the published reference value).
    assert int(data._shuffle_keys(1, 0)[0]) == 0xE220A8397B1DCDAF
    ds = toy_dataset(np.arange(8) % 2)
    assert select_subset(ds, "p1").train_idx.tolist() == select_subset(ds, "p1").train_idx.tolist()


def test_fraction_sizes_exact_and_stratified() -> None:
    ds = load_dataset("digits")
    sizes = torch.bincount(ds.y_train, minlength=10)
    for fraction in (0.1, 0.25, 0.5, 0.9):
        split = select_subset(ds, f"fraction:{fraction}")
        assert len(split.train_idx) == round(fraction * 1347)
        assert len(split.train_idx) + len(split.heldout_idx) == 1347
        picked = torch.bincount(ds.y_train[split.train_idx], minlength=10)
        # Each class gives floor or ceil of its proportional share.
        exact = sizes.double() * fraction
        assert ((picked >= exact.floor()) & (picked <= exact.ceil())).all(), fraction
    assert len(select_subset(ds, "fraction:1").train_idx) == 1347


def test_fraction_hand_computed_allocation() -> None:
    # Classes of sizes 5, 3, 2 and F=0.5: shares 2.5, 1.5, 1.0 -> floors 2, 1, 1 (4 of round(5)=5);
    # the leftover goes to the largest remainder, a tie (0.5, 0.5) broken by lower class: 3, 1, 1.
    ds = toy_dataset([0] * 5 + [1] * 3 + [2] * 2)
    split = select_subset(ds, "fraction:0.5")
    assert torch.bincount(ds.y_train[split.train_idx], minlength=3).tolist() == [3, 1, 1]


def test_fraction_selecting_nothing_is_an_error() -> None:
    with pytest.raises(DataError, match="selects no examples"):
        select_subset(toy_dataset([0, 1, 2, 3]), "fraction:0.01")


def test_per_class_sizes_exact_and_nested() -> None:
    ds = load_dataset("digits")
    split = select_subset(ds, "per_class:10")
    assert len(split.train_idx) == 100
    assert torch.bincount(ds.y_train[split.train_idx]).tolist() == [10] * 10
    assert len(split.heldout_idx) == 1347 - 100
    bigger = select_subset(ds, "per_class:20")
    assert set(split.train_idx.tolist()) <= set(bigger.train_idx.tolist())
    # The smallest digits training class (8) has 131 examples: exactly that many is fine.
    assert len(select_subset(ds, "per_class:131").train_idx) == 1310


def test_per_class_too_large() -> None:
    ds = load_dataset("digits")
    with pytest.raises(DataError, match=r"class 8 of digits has \(131\); use per_class:131"):
        select_subset(ds, "per_class:132")


def test_bad_split_seed() -> None:
    with pytest.raises(DataError, match="split_seed"):
        select_subset(toy_dataset([0, 1]), "p1", split_seed=-1)
