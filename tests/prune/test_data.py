"""imc_prune.data: every on-disk format from small fixtures written here, plus the real files.

The fixtures are written the way the published archives are (IDX headers, the CIFAR python
pickles with their keys and dtypes, ImageNet class folders of PNG/JPEG), and each loader's
output is compared with a numpy reimplementation of the documented transform.
"""

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from imc_prune import data as imc_data
from imc_prune.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetNotFoundError,
    ImageFolderDataset,
    first_batch,
    iterate_batches,
    load_dataset,
    read_idx,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Standardised fp32 values: a float32 pixel in [0, 1] and the float32 constants are off by a
# few ulps (1e-7) relative to the float64 numpy reference, scaled by 1/std (< 10 here).
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _no_ambient_data(monkeypatch, tmp_path_factory):
    """No test sees the machine's IMC_DATA or Debian files unless it asks for them."""
    monkeypatch.delenv("IMC_DATA", raising=False)
    empty = tmp_path_factory.mktemp("no-debian")
    monkeypatch.setattr(imc_data, "DEBIAN_FASHION_MNIST", empty / "fashion-mnist")


def _standardised(raw_train: np.ndarray, raw: np.ndarray, scale: float) -> np.ndarray:
    """float64 reference: per-channel train mean/std (population) applied to ``raw``."""
    train = raw_train.astype(np.float64) / scale
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    return (raw.astype(np.float64) / scale - mean) / std


def _assert_standardised_train(x: torch.Tensor):
    """Train split: mean 0 and (population) std 1 per channel, up to fp32 accumulation."""
    dims = (0, *range(2, x.dim()))
    x64 = x.to(torch.float64)
    zeros = torch.zeros(x.shape[1], dtype=torch.float64)
    torch.testing.assert_close(x64.mean(dim=dims), zeros, atol=1e-5, rtol=0)
    torch.testing.assert_close(x64.std(dim=dims, correction=0), zeros + 1, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    payload = _idx_bytes(array)
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def _fashion_fixture(folder: Path, n_train: int, n_test: int, compress: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 7 % 10).astype(np.uint8)  # every class once n >= 10
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("n_train,n_test", [(20, 10), (13, 7)], ids=["aligned", "awkward"])
def test_fashion_mnist_fixture_shapes_labels_and_standardisation(
    tmp_path, compress, n_train, n_test
):
    arrays = _fashion_fixture(tmp_path, n_train, n_test, compress)
    data = load_dataset("fashion-mnist", tmp_path)
    assert (data.name, data.num_classes, data.input_shape) == ("fashion-mnist", 10, (1, 28, 28))
    assert data.source == str(tmp_path)
    x, y = data.train.tensors
    assert x.shape == (n_train, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(arrays["train"][1]).long())
    _assert_standardised_train(x)
    raw_train = arrays["train"][0][:, None]
    for split, dataset in (("train", data.train), ("test", data.test)):
        expected = _standardised(raw_train, arrays[split][0][:, None], 255.0)
        actual = dataset.tensors[0].double()
        torch.testing.assert_close(actual, torch.from_numpy(expected), atol=ATOL, rtol=0)
    mean = raw_train.astype(np.float64).mean() / 255
    assert data.mean == pytest.approx((mean,), rel=1e-6)


def test_fashion_mnist_flatten(tmp_path):
    _fashion_fixture(tmp_path, 11, 3, compress=True)
    flat = load_dataset("fashion-mnist", tmp_path, flatten=True)
    images = load_dataset("fashion-mnist", tmp_path)
    assert flat.input_shape == (784,)
    assert flat.train.tensors[0].shape == (11, 784) and flat.test.tensors[0].shape == (3, 784)
    assert torch.equal(flat.train.tensors[0], images.train.tensors[0].flatten(1))


def test_fashion_mnist_search_order_root_subfolder_and_imc_data(tmp_path, monkeypatch):
    _fashion_fixture(tmp_path / "env" / "fashion-mnist", 10, 4, compress=False, seed=1)
    _fashion_fixture(tmp_path / "explicit", 12, 4, compress=True, seed=2)
    # root may be the parent of the fashion-mnist folder
    assert len(load_dataset("fashion-mnist", tmp_path / "env").train) == 10
    monkeypatch.setenv("IMC_DATA", str(tmp_path / "env"))
    assert len(load_dataset("FashionMNIST").train) == 10
    assert load_dataset("fashion_mnist").source == str(tmp_path / "env" / "fashion-mnist")
    # an explicit root wins over IMC_DATA
    assert len(load_dataset("fashion-mnist", tmp_path / "explicit").train) == 12


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "IMC_DATA" in message and "root=" in message and str(tmp_path) in message
    # the label file alone is not enough
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), compress=True)
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", tmp_path)


def _corrupt(kind: str, folder: Path) -> None:
    """Break one thing in a valid fixture."""
    images = folder / "train-images-idx3-ubyte.gz"
    labels = folder / "train-labels-idx1-ubyte.gz"
    if kind == "magic":
        images.write_bytes(gzip.compress(b"\x12\x34" + _idx_bytes(np.zeros((2, 28, 28)))[2:]))
    elif kind == "type":
        payload = bytearray(_idx_bytes(np.zeros((2, 28, 28))))
        payload[2] = 0x0D  # float
        images.write_bytes(gzip.compress(bytes(payload)))
    elif kind == "ndim":
        labels.write_bytes(gzip.compress(_idx_bytes(np.zeros((2, 1, 1)))))
    elif kind == "truncated":
        images.write_bytes(gzip.compress(_idx_bytes(np.zeros((10, 28, 28)))[:-5]))
    elif kind == "gzip":
        images.write_bytes(gzip.compress(_idx_bytes(np.zeros((10, 28, 28))))[:40])
    elif kind == "size":
        images.write_bytes(gzip.compress(_idx_bytes(np.zeros((10, 27, 27)))))
    elif kind == "count":
        labels.write_bytes(gzip.compress(_idx_bytes(np.zeros(9))))
    elif kind == "labels":
        labels.write_bytes(gzip.compress(_idx_bytes(np.full(10, 10))))


@pytest.mark.parametrize(
    "kind,message",
    [
        ("magic", "not an IDX file"),
        ("type", "IDX type 0x0d"),
        ("ndim", "expected 1"),
        ("truncated", "promises"),
        ("gzip", "corrupt gzip"),
        ("size", "expected 28x28"),
        ("count", "10 images but 9 labels"),
        ("labels", r"expected \[0, 10\)"),
    ],
)
def test_fashion_mnist_corrupt_files_name_the_problem(tmp_path, kind, message):
    _fashion_fixture(tmp_path, 10, 3, compress=True)
    _corrupt(kind, tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("fashion-mnist", tmp_path)
    assert str(tmp_path) in str(info.value)


def test_read_idx_detects_gzip_by_content(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "renamed.idx"  # gzip data without the .gz suffix
    path.write_bytes(gzip.compress(_idx_bytes(array)))
    assert torch.equal(read_idx(path), torch.from_numpy(array))
    raw_path = _write_idx(tmp_path / "a", array, compress=False)
    assert torch.equal(read_idx(raw_path, ndim=3), torch.from_numpy(array))


# Captured at import: the autouse fixture hides the Debian folder from every test.
_REAL_FASHION_MNIST = imc_data.DEBIAN_FASHION_MNIST


@pytest.mark.skipif(
    not (_REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    data = load_dataset("fashion-mnist", _REAL_FASHION_MNIST)
    assert (len(data.train), len(data.test)) == (60_000, 10_000)
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28)
    for split in (data.train, data.test):
        counts = torch.bincount(split.tensors[1], minlength=10)
        assert len(counts) == 10 and torch.all(counts == counts[0])  # balanced: 6000 / 1000
    # the published constants of the training set, pixels in [0, 1]
    assert data.mean == pytest.approx((0.2860,), abs=1e-4)
    assert data.std == pytest.approx((0.3530,), abs=1e-4)
    _assert_standardised_train(data.train.tensors[0])


def test_benchmarks_data_still_works(tmp_path, monkeypatch):
    if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a folder of scripts, not installed
        monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks import data as bench_data

    arrays = _fashion_fixture(tmp_path, 12, 5, compress=True)
    monkeypatch.setenv("IMC_DATA", str(tmp_path))
    loaded = bench_data.load_fashion_mnist("test", limit=4)
    expected = (arrays["test"][0][:4, None] / 255.0 - bench_data.MEAN) / bench_data.STD
    actual = loaded.images.double()
    torch.testing.assert_close(actual, torch.from_numpy(expected), atol=ATOL, rtol=0)
    assert loaded.labels.dtype == torch.int64 and not loaded.is_random
    assert bench_data.data_folders()[0] == tmp_path
    monkeypatch.setenv("IMC_DATA", str(tmp_path / "empty"))
    fallback = bench_data.load_fashion_mnist("train", limit=6)
    assert fallback.is_random and fallback.images.shape == (6, 1, 28, 28)


# --------------------------------------------------------------------------------------
# scikit-learn digits


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order (a canonical form of a set of images)."""
    order = torch.arange(len(rows))
    for column in reversed(range(rows.shape[1])):
        order = order[torch.sort(rows[order, column], stable=True).indices]
    return rows[order]


def test_digits_split_and_standardisation():
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    summary = (data.num_classes, data.input_shape, len(data.train), len(data.test))
    assert summary == (10, (1, 8, 8), 1437, 360)
    x, y = data.train.tensors
    _assert_standardised_train(x)
    # stratified: each class keeps 1/5 of its images (+-1) in the test split
    digits = load_digits()
    test_counts = torch.bincount(data.test.tensors[1], minlength=10).numpy()
    assert np.all(np.abs(test_counts - np.bincount(digits.target) * 0.2) <= 1)

    # undoing the standardisation gives back the integer pixels 0..16 of the originals
    # (fp32 round trip of values <= 16: error ~ 16 * 1e-7 per step)
    def pixels(dataset):
        return (dataset.tensors[0] * data.std[0] + data.mean[0]) * 16

    for split in (data.train, data.test):
        torch.testing.assert_close(pixels(split), pixels(split).round(), atol=1e-4, rtol=0)
    # together the splits hold every image once (compared as sorted rows)
    both = torch.cat([pixels(data.train), pixels(data.test)]).round().flatten(1)
    original = torch.as_tensor(digits.data, dtype=torch.float32)
    assert torch.equal(_sorted_rows(both), _sorted_rows(original))
    again = load_dataset("digits", flatten=True)
    assert again.input_shape == (64,)
    assert torch.equal(again.train.tensors[0], x.flatten(1))
    assert torch.equal(again.test.tensors[1], data.test.tensors[1])


# --------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickles)


def _write_cifar_batch(path: Path, data: np.ndarray, labels, label_key: bytes, extra=None):
    filenames = [b"img%d.png" % i for i in range(len(data))]
    batch = {b"batch_label": b"testing batch", label_key: labels, b"data": data}
    batch[b"filenames"] = filenames
    batch.update(extra or {})
    # Protocol 2 and numpy.core, as the original (Python 2 / numpy 1) files are written.
    payload = pickle.dumps(batch, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    path.write_bytes(payload)


def _cifar_fixture(root: Path, name: str, sizes, seed=0):
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, label_key, num_classes = root / "cifar-10-batches-py", b"labels", 10
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        folder, label_key, num_classes = root / "cifar-100-python", b"fine_labels", 100
        names = ["train", "test"]
    folder.mkdir(parents=True)
    batches = {}
    for file_name, n in zip(names, sizes):
        # channel-dependent brightness so per-channel statistics differ
        data = rng.integers(0, 256, size=(n, 3, 1024)) * np.array([0.3, 0.6, 1.0])[:, None]
        data = data.astype(np.uint8).reshape(n, 3072)
        labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
        extra = {b"coarse_labels": [v // 5 for v in labels]} if name == "cifar100" else None
        _write_cifar_batch(folder / file_name, data, labels, label_key, extra)
        batches[file_name] = (data, labels)
    return folder, batches


@pytest.mark.parametrize(
    "name,sizes",
    [("cifar10", [4, 4, 4, 4, 4, 8]), ("cifar10", [3, 1, 5, 2, 4, 7]), ("cifar100", [13, 6])],
    ids=["cifar10-aligned", "cifar10-awkward", "cifar100"],
)
def test_cifar_fixture(tmp_path, name, sizes):
    folder, batches = _cifar_fixture(tmp_path, name, sizes)
    data = load_dataset(name, tmp_path)
    train_names = [n for n in batches if n not in ("test_batch", "test")]
    test_name = "test_batch" if name == "cifar10" else "test"
    raw_train = np.concatenate([batches[n][0] for n in train_names]).reshape(-1, 3, 32, 32)
    assert data.num_classes == (10 if name == "cifar10" else 100)
    assert data.input_shape == (3, 32, 32) and data.source == str(folder)
    assert (len(data.train), len(data.test)) == (sum(sizes[:-1]), sizes[-1])
    labels = [v for n in train_names for v in batches[n][1]]
    assert data.train.tensors[1].tolist() == labels
    assert data.test.tensors[1].tolist() == batches[test_name][1]
    _assert_standardised_train(data.train.tensors[0])
    raw_test = batches[test_name][0].reshape(-1, 3, 32, 32)
    for dataset, raw in ((data.train, raw_train), (data.test, raw_test)):
        expected = _standardised(raw_train, raw, 255.0)
        actual = dataset.tensors[0].double()
        torch.testing.assert_close(actual, torch.from_numpy(expected), atol=ATOL, rtol=0)
    assert len(set(data.mean)) == 3  # three different channel means, not one pooled value
    # the folder itself works as root too
    assert len(load_dataset(name, folder).train) == sum(sizes[:-1])


def test_cifar_layout_is_channel_planes(tmp_path):
    folder, _ = _cifar_fixture(tmp_path, "cifar10", [2, 2, 2, 2, 2, 2])
    # one image: red plane 0..1023 mod 256, green constant 7, blue constant 200
    row = np.concatenate([np.arange(1024) % 256, np.full(1024, 7), np.full(1024, 200)])
    _write_cifar_batch(folder / "test_batch", row[None].astype(np.uint8), [3], b"labels")
    data = load_dataset("cifar10", tmp_path)
    x = data.test.tensors[0][0] * torch.tensor(data.std).view(3, 1, 1)
    x = (x + torch.tensor(data.mean).view(3, 1, 1)) * 255
    torch.testing.assert_close(x[0, 1, :3], torch.tensor([32.0, 33.0, 34.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(x[1], torch.full((32, 32), 7.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(x[2], torch.full((32, 32), 200.0), atol=1e-3, rtol=0)


def test_cifar_missing_says_where_to_point(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", tmp_path)
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message and "cs.toronto.edu" in message
    assert "root=" in message and "IMC_DATA" in message
    folder, _ = _cifar_fixture(tmp_path, "cifar10", [1] * 6)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must not run",))


@pytest.mark.parametrize(
    "kind,message",
    [
        ("garbage", "not a CIFAR python batch"),
        ("exploit", r"refusing to load (__builtin__|builtins)\.print"),
        ("no-labels", "b'labels'"),
        ("dtype", r"expected uint8 \(N, 3072\)"),
        ("shape", r"expected uint8 \(N, 3072\)"),
        ("label-count", "expected 2 integers"),
        ("label-range", r"expected \[0, 10\)"),
    ],
)
def test_cifar_corrupt_batches_name_the_problem(tmp_path, capsys, kind, message):
    folder, _ = _cifar_fixture(tmp_path, "cifar10", [2] * 6)
    path = folder / "data_batch_2"
    good = np.zeros((2, 3072), np.uint8)
    if kind == "garbage":
        path.write_bytes(b"\x80\x02not a pickle at all")
    elif kind == "exploit":
        path.write_bytes(pickle.dumps({b"data": _Exploit()}, protocol=2))
    elif kind == "no-labels":
        _write_cifar_batch(path, good, [0, 1], b"fine_labels")
    elif kind == "dtype":
        _write_cifar_batch(path, good.astype(np.float32), [0, 1], b"labels")
    elif kind == "shape":
        _write_cifar_batch(path, np.zeros((2, 1024), np.uint8), [0, 1], b"labels")
    elif kind == "label-count":
        _write_cifar_batch(path, good, [0, 1, 2], b"labels")
    elif kind == "label-range":
        _write_cifar_batch(path, good, [0, 10], b"labels")
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_2" in str(info.value)
    assert "must not run" not in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# ImageNet (class folders)

_COLOURS = {"n01": (255, 0, 0), "n02": (0, 128, 0), "n03": (10, 20, 250)}


def _imagenet_fixture(root: Path, per_class=(2, 1, 3), val_per_class=(1, 1, 1)):
    for split, counts in (("train", per_class), ("val", val_per_class)):
        for (name, colour), count in zip(_COLOURS.items(), counts):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = (23 + 5 * i, 17 + 3 * i)  # odd, non-square
                image = Image.new("RGB", size, colour)
                suffix = (".png", ".JPEG", ".jpg")[i % 3]
                image.save(folder / f"img{i}{suffix}")
            (folder / "notes.txt").write_text("not an image")


def _expected_constant(colour) -> torch.Tensor:
    rgb = torch.tensor(colour, dtype=torch.float32) / 255
    return (rgb - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


@pytest.mark.parametrize("image_size", [16, 11], ids=["aligned", "awkward"])
def test_imagenet_folders(tmp_path, image_size):
    _imagenet_fixture(tmp_path)
    data = load_dataset("imagenet", tmp_path, image_size=image_size)
    assert isinstance(data.train, ImageFolderDataset)
    assert (data.num_classes, data.input_shape) == (3, (3, image_size, image_size))
    assert (len(data.train), len(data.test)) == (6, 3)
    assert data.train.classes == ["n01", "n02", "n03"] and data.test.classes == data.train.classes
    labels = []
    for (path, _), (x, y) in zip(data.train.samples, (data.train[i] for i in range(6))):
        assert x.shape == (3, image_size, image_size) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        labels.append(int(y))
        expected = _expected_constant(_COLOURS[path.parent.name]).view(3, 1, 1).expand_as(x)
        # PNG is lossless and a resize of a constant image is constant; JPEG's chroma
        # quantisation moves a flat colour by a few levels (/255, /std ~ 4).
        atol = 1e-6 if path.suffix == ".png" else 0.1
        torch.testing.assert_close(x, expected, atol=atol, rtol=0)
    assert labels == [0, 0, 1, 2, 2, 2]
    assert [int(data.test[i][1]) for i in range(3)] == [0, 1, 2]


def test_imagenet_resize_and_center_crop(tmp_path):
    _imagenet_fixture(tmp_path, (1, 1, 1))
    # 60x20, vertical thirds red | green | blue: the 12x12 center crop of the 42x14 resize
    # (shorter side round(12 / 0.875) = 14) keeps green and no pure red or blue column.
    stripes = np.zeros((20, 60, 3), np.uint8)
    stripes[:, :20, 0] = stripes[:, 20:40, 1] = stripes[:, 40:, 2] = 255
    Image.fromarray(stripes).save(tmp_path / "train" / "n02" / "img0.png")
    grey = Image.new("L", (30, 30), 100)  # grayscale becomes three equal channels
    grey.save(tmp_path / "train" / "n01" / "img0.png")
    dataset = ImageFolderDataset(tmp_path / "train", image_size=12)
    x, _ = dataset[1]
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    pixels = x * std + mean
    assert torch.all(pixels[1, :, 2:-2] > 0.99)  # green in the middle ten columns
    assert pixels[0].max() < 0.5 and pixels[2].max() < 0.5
    g, _ = dataset[0]
    expected = _expected_constant((100, 100, 100)).view(3, 1, 1).expand(3, 12, 12)
    torch.testing.assert_close(g, expected, atol=1e-6, rtol=0)
    assert dataset.resize_size == 14


def test_imagenet_batches_and_flatten(tmp_path):
    _imagenet_fixture(tmp_path)
    data = load_dataset("imagenet", tmp_path, image_size=8, flatten=True)
    assert data.input_shape == (192,)
    g = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(data.train, 4, shuffle=True, generator=g))
    assert [b[0].shape for b in batches] == [(4, 192), (2, 192)]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0, 0, 1, 2, 2, 2]


def test_imagenet_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train/ and val/") as info:
        load_dataset("imagenet", tmp_path)
    assert "root=" in str(info.value) and "IMC_DATA" in str(info.value)
    _imagenet_fixture(tmp_path)
    (tmp_path / "train" / "n02" / "img0.png").write_bytes(b"not a png")
    data = load_dataset("imagenet", tmp_path, image_size=8)
    with pytest.raises(ValueError, match="img0.png: not a readable image"):
        data.train[2]
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagenet", tmp_path, image_size=0)
    for path in (tmp_path / "val" / "n03").iterdir():
        path.unlink()
    (tmp_path / "val" / "n03").rmdir()
    with pytest.raises(DatasetNotFoundError, match="no folder for class 'n03'"):
        load_dataset("imagenet", tmp_path)


# --------------------------------------------------------------------------------------
# batches


class _PlainDataset(Dataset):
    """A map-style dataset that is not a TensorDataset (takes the DataLoader path)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _ids_dataset(n):
    return TensorDataset(torch.arange(n, dtype=torch.float32).view(n, 1) * 10, torch.arange(n))


@pytest.mark.parametrize("n", [20, 23], ids=["aligned", "awkward"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_iterate_batches_covers_every_sample_once(n, drop_last):
    dataset = _ids_dataset(n)
    g = torch.Generator().manual_seed(1)
    batches = list(iterate_batches(dataset, 5, shuffle=True, generator=g, drop_last=drop_last))
    sizes = [len(y) for _, y in batches]
    full = n // 5
    assert sizes == [5] * full + ([] if drop_last or n % 5 == 0 else [n % 5])
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == len(seen)  # no sample twice
    if not drop_last:
        assert sorted(seen.tolist()) == list(range(n))
    assert seen.tolist() != sorted(seen.tolist())  # shuffled (1 / 20! chance of a false alarm)
    for x, y in batches:
        assert torch.equal(x.view(-1), y.float() * 10)  # x and y stay paired


def test_iterate_batches_deterministic_and_path_independent():
    dataset = _ids_dataset(23)

    def order(ds, seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in iterate_batches(ds, 4, generator=g, **kw)]).tolist()

    assert order(dataset, 3, shuffle=True) == order(dataset, 3, shuffle=True)
    assert order(dataset, 3, shuffle=True) != order(dataset, 4, shuffle=True)
    assert order(dataset, 3, shuffle=False) == list(range(23))
    plain = _PlainDataset(*dataset.tensors)
    assert order(plain, 3, shuffle=True) == order(dataset, 3, shuffle=True)
    # consecutive epochs from one generator differ
    g = torch.Generator().manual_seed(0)
    epochs = [next(iterate_batches(dataset, 23, shuffle=True, generator=g))[1] for _ in "ab"]
    assert not torch.equal(*epochs)


def test_iterate_batches_subset_of_tensor_dataset():
    dataset = _ids_dataset(30)
    subset = Subset(dataset, [29, 3, 17, 8, 11])
    batches = list(iterate_batches(subset, 2))
    assert [y.tolist() for _, y in batches] == [[29, 3], [17, 8], [11]]


def test_iterate_batches_and_first_batch_reject_bad_sizes():
    dataset = _ids_dataset(5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            next(iterate_batches(dataset, bad))
        with pytest.raises(ValueError, match="n must be a positive int"):
            first_batch(dataset, bad)
    with pytest.raises(ValueError, match="empty"):
        first_batch(_ids_dataset(0), 3)


def test_first_batch_in_order_and_clamped():
    dataset = _ids_dataset(9)
    x, y = first_batch(dataset, 4)
    assert y.tolist() == [0, 1, 2, 3] and x.shape == (4, 1)
    assert first_batch(dataset, 100)[1].tolist() == list(range(9))
    x, y = first_batch(_PlainDataset(*dataset.tensors), 3)
    assert y.tolist() == [0, 1, 2] and x.shape == (3, 1)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'") as info:
        load_dataset("mnist")
    for name in imc_data.DATASET_NAMES:
        assert name in str(info.value)
