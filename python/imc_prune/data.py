"""Datasets for the pruning experiments, read from local files (nothing is downloaded).

``load_dataset(name, root)`` returns a :class:`DatasetSplits` with a train and a test
``torch.utils.data.Dataset``:

=================  ====================================================  ===========  ===========
name               files                                                 samples      input shape
=================  ====================================================  ===========  ===========
``fashion-mnist``  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``  60000/10000  (1, 28, 28)
``digits``         bundled with scikit-learn (``load_digits``)           1437/360     (1, 8, 8)
``cifar10``        ``cifar-10-batches-py/{data_batch_1..5,test_batch}``  50000/10000  (3, 32, 32)
``cifar100``       ``cifar-100-python/{train,test}`` (fine labels)       50000/10000  (3, 32, 32)
``imagenet``       ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``    lazy         (3, S, S)
=================  ====================================================  ===========  ===========

The in-memory datasets are ``TensorDataset(images float32, labels int64)`` standardised with
the per-channel mean and standard deviation of their training split (so the training images
have mean 0 and standard deviation 1 per channel; the test split uses the same constants).
ImageNet is read lazily with PIL: each image is resized (shorter side to ``S / 0.875``),
center-cropped to ``S x S`` and standardised with the usual ImageNet constants.

Where files are looked for: ``root`` when given (the folder itself, or the dataset's usual
sub-folder below it), else ``$IMC_DATA`` (likewise), else, for Fashion-MNIST only,
``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install dataset-fashion-mnist``).
A dataset that is not there raises :class:`DatasetNotFoundError` saying what was searched
and how to get the files; a file that is there but malformed raises ``ValueError`` naming it.

Example:
    >>> data = load_dataset("digits")
    >>> data.num_classes, data.input_shape, len(data.train), len(data.test)
    (10, (1, 8, 8), 1437, 360)
    >>> x, y = first_batch(data.train, 32)
    >>> x.shape, y.dtype
    (torch.Size([32, 1, 8, 8]), torch.int64)
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import math
import os
import pickle
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "DATASET_NAMES",
    "DEBIAN_FASHION_MNIST",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetNotFoundError",
    "DatasetSplits",
    "ImageFolderDataset",
    "data_folders",
    "first_batch",
    "iterate_batches",
    "load_dataset",
    "read_fashion_mnist",
    "read_idx",
]

DATASET_NAMES = ("fashion-mnist", "digits", "cifar10", "cifar100", "imagenet")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Sub-folder names the archives unpack to; a root may point at the folder or its parent.
_SUBFOLDERS = {
    "fashion-mnist": "fashion-mnist",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "imagenet": "imagenet",
}
_CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": (["train"], ["test"], b"fine_labels", 100),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# IDX header (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number of
# dimensions, then one big-endian uint32 per dimension. Only unsigned bytes (0x08) occur.
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
# Standardisation statistics are accumulated in float64 over chunks of this many samples,
# so Fashion-MNIST's 47M pixels never need a float64 copy of the whole set (~380 MB).
_STATS_CHUNK = 8192
# torchvision's ImageNet evaluation transform: resize to 256, center-crop 224 (224/256).
_CROP_FRACTION = 0.875


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says how to fix it."""


@dataclasses.dataclass
class DatasetSplits:
    """A dataset's train and test splits and what a model needs to know about them.

    Attributes:
        name: canonical dataset name (one of :data:`DATASET_NAMES`).
        train: training split; yields ``(image float32 of input_shape, label int64)``.
        test: test split, standardised with the training split's constants.
        num_classes: labels are in ``[0, num_classes)``.
        input_shape: shape of one image, ``(C, H, W)``, or ``(C*H*W,)`` when flattened.
        mean: per-channel mean subtracted from the images (in ``[0, 1]`` pixel units).
        std: per-channel standard deviation the images were divided by.
        source: where the data came from (a folder, or the scikit-learn loader).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple
    mean: tuple = ()
    std: tuple = ()
    source: str = ""


# --------------------------------------------------------------------------------------
# entry point


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    flatten: bool = False,
    image_size: int = 224,
) -> DatasetSplits:
    """Load a dataset's train and test splits from local files.

    Args:
        name: one of :data:`DATASET_NAMES` (case, ``-`` and ``_`` are ignored:
            ``"FashionMNIST"`` and ``"fashion_mnist"`` both work).
        root: folder holding the files (or the folder the archive unpacked into); None
            searches ``$IMC_DATA`` and, for Fashion-MNIST, ``/usr/share/datasets``.
            Ignored for ``digits``, which ships with scikit-learn.
        flatten: return images as vectors ``(C*H*W,)`` instead of ``(C, H, W)``.
        image_size: side ``S`` of the square ImageNet crops (ignored for other datasets).

    Returns:
        A :class:`DatasetSplits`.

    Raises:
        ValueError: an unknown name, a bad ``image_size``, or a malformed file.
        DatasetNotFoundError: the files are not there (the message says how to get them).

    Example:
        >>> data = load_dataset("fashion-mnist")  # /usr/share/datasets/fashion-mnist
        >>> len(data.train), len(data.test), data.input_shape
        (60000, 10000, (1, 28, 28))
    """
    canonical = _canonical_name(name)
    if canonical == "fashion-mnist":
        train_x, train_y, folder = read_fashion_mnist("train", root)
        test_x, test_y, _ = read_fashion_mnist("test", root)
        return _in_memory_splits(
            canonical,
            train_x.unsqueeze(1),
            train_y,
            test_x.unsqueeze(1),
            test_y,
            10,
            255.0,
            flatten,
            str(folder),
        )
    if canonical == "digits":
        return _load_digits(flatten)
    if canonical in _CIFAR_FILES:
        return _load_cifar(canonical, root, flatten)
    return _load_imagenet(root, image_size, flatten)


def _canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    for canonical in DATASET_NAMES:
        if key == canonical.replace("-", ""):
            return canonical
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def _in_memory_splits(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    scale: float,
    flatten: bool,
    source: str,
) -> DatasetSplits:
    """Scale raw ``(N, C, H, W)`` pixels to ``[0, 1]``, standardise with train statistics."""
    train = train_x.to(torch.float32).div_(scale)
    test = test_x.to(torch.float32).div_(scale)
    mean, std = _channel_stats(train)
    shape = (1, -1, 1, 1)
    for images in (train, test):
        images.sub_(mean.view(shape)).div_(std.view(shape))
    input_shape = tuple(train.shape[1:])
    if flatten:
        train, test = train.flatten(1), test.flatten(1)
        input_shape = (math.prod(input_shape),)
    return DatasetSplits(
        name=name,
        train=TensorDataset(train, train_y.to(torch.int64)),
        test=TensorDataset(test, test_y.to(torch.int64)),
        num_classes=num_classes,
        input_shape=input_shape,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        source=source,
    )


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) standard deviation of ``(N, C, H, W)`` images."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for chunk in images.split(_STATS_CHUNK):
        chunk = chunk.to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = images.numel() // channels
    mean = total / count
    # E[x^2] - E[x]^2 in float64 is exact enough for pixels in [0, 1] (no cancellation issue
    # at 1e-16 relative on variances of order 0.1).
    std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
    # A constant channel would divide by zero: leave it centred but unscaled.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.to(torch.float32), std.to(torch.float32)


def _search_folders(root, dataset: str, defaults: Sequence[Path] = ()) -> list[Path]:
    """Folders to look in: ``root`` (and its sub-folder), else ``$IMC_DATA``, then defaults."""
    subfolder = _SUBFOLDERS[dataset]
    if root is not None:
        base = Path(root).expanduser()
        return [base, base / subfolder]
    folders = []
    env = os.environ.get("IMC_DATA")
    if env:
        base = Path(env).expanduser()
        folders += [base, base / subfolder]
    return folders + list(defaults)


def data_folders(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for the Fashion-MNIST IDX files, in order.

    Args:
        root: an explicit folder; when given, only it and ``root/fashion-mnist`` are searched.

    Returns:
        ``[root, root/fashion-mnist]``, or ``[$IMC_DATA, $IMC_DATA/fashion-mnist,
        /usr/share/datasets/fashion-mnist]`` (without the ``IMC_DATA`` entries when unset).
    """
    return _search_folders(root, "fashion-mnist", [DEBIAN_FASHION_MNIST])


# --------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)


def read_idx(path: str | os.PathLike, *, ndim: int | None = None) -> torch.Tensor:
    """Read one IDX file (gzip-compressed or raw, detected from its content) as uint8.

    Args:
        path: the file.
        ndim: expected number of dimensions (3 for images, 1 for labels); None accepts any.

    Returns:
        A uint8 tensor of the shape stored in the header.

    Raises:
        ValueError: a bad magic number, a type other than unsigned byte, an unexpected
            number of dimensions, a truncated or oversized file, or broken gzip data.

    Example:
        >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape
        torch.Size([10000])
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}, expected "
            "0000 followed by a type byte and a dimension count)"
        )
    type_code, n_dims = raw[2], raw[3]
    if type_code != _IDX_UBYTE:
        raise ValueError(
            f"{path}: IDX type 0x{type_code:02x}, only unsigned bytes (0x08) are supported"
        )
    if ndim is not None and n_dims != ndim:
        raise ValueError(
            f"{path}: IDX file with {n_dims} dimensions (magic 0x{raw[:4].hex()}), "
            f"expected {ndim} (magic 0x000008{ndim:02x})"
        )
    header = 4 + 4 * n_dims
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = struct.unpack(f">{n_dims}I", raw[4:header])
    count = math.prod(shape)
    if len(raw) - header != count:
        raise ValueError(
            f"{path}: {len(raw) - header} data bytes, the header's shape {shape} promises {count}"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(shape)


def read_fashion_mnist(
    split: str, root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """The raw Fashion-MNIST images and labels of one split.

    Args:
        split: ``"train"`` or ``"test"``.
        root: folder with the IDX files (see :func:`data_folders` for the search order).

    Returns:
        ``(images uint8 (N, 28, 28), labels int64 (N,), folder they were read from)``.

    Raises:
        ValueError: a bad split or malformed files (shapes, labels outside ``[0, 10)``).
        DatasetNotFoundError: no searched folder holds both files of the split.

    Example:
        >>> images, labels, folder = read_fashion_mnist("test")
        >>> images.shape, int(labels.max())
        (torch.Size([10000, 28, 28]), 9)
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_name, label_name = _FASHION_FILES[split]
    folders = data_folders(root)
    for folder in folders:
        image_path = _idx_file(folder, image_name)
        label_path = _idx_file(folder, label_name)
        if image_path is not None and label_path is not None:
            break
    else:
        searched = ", ".join(str(f) for f in folders)
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} split not found: no folder among [{searched}] holds both "
            f"{image_name}[.gz] and {label_name}[.gz]. Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to "
            f"{DEBIAN_FASHION_MNIST}), or put the four *-ubyte.gz files from "
            "https://github.com/zalandoresearch/fashion-mnist in a folder and pass "
            "root=<folder> or set IMC_DATA=<folder>."
        )
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"{image_path}: images of size {tuple(images.shape[1:])}, expected 28x28")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{image_path.parent}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    _check_labels(labels, 10, label_path)
    return images, labels.to(torch.int64), image_path.parent


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _check_labels(labels, num_classes: int, where) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{where}: labels range over [{int(labels.min())}, {int(labels.max())}], "
            f"expected [0, {num_classes})"
        )


# --------------------------------------------------------------------------------------
# scikit-learn digits


def _load_digits(flatten: bool) -> DatasetSplits:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DatasetNotFoundError(
            "the digits data set ships with scikit-learn, which is not installed: "
            "pip install scikit-learn (or pip install 'imc_kernels[digits]')"
        ) from exc

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797,1,8,8)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    # A fixed stratified 80/20 split (seed 0): every class keeps its share in both splits.
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=digits.target
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return _in_memory_splits(
        "digits",
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        10,
        16.0,
        flatten,
        "sklearn.datasets.load_digits",
    )


# --------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches without running arbitrary code from the file.

    The batches hold a dict of bytes, lists and one numpy array; a pickle naming any other
    global is refused (a plain ``pickle.load`` would import and call it).
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: CIFAR batches hold only numpy arrays, "
                "lists and bytes"
            )
        if module.endswith("core.multiarray"):
            # The original files name numpy.core (numpy 1.x), numpy >= 2 writes numpy._core;
            # import whichever this numpy has (numpy.core warns as a deprecated alias).
            return _multiarray()._reconstruct
        return super().find_class(module, name)


def _multiarray():
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.multiarray")


def _read_cifar_batch(path: Path, label_key: bytes, num_classes: int):
    try:
        with path.open("rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
    except Exception as exc:  # a corrupt pickle fails in many ways; all mean the same here
        raise ValueError(f"{path}: not a CIFAR python batch ({exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with b'data' and {label_key!r}, got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' is {data.dtype} of shape {data.shape}, expected uint8 (N, 3072)"
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: {label_key!r} has shape {labels.shape} ({labels.dtype}), expected "
            f"{data.shape[0]} integers"
        )
    _check_labels(labels, num_classes, path)
    # Rows are the red, green and blue 32x32 planes one after the other (row-major).
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def _load_cifar(name: str, root, flatten: bool) -> DatasetSplits:
    train_files, test_files, label_key, num_classes = _CIFAR_FILES[name]
    folders = _search_folders(root, name)
    folder = next((f for f in folders if all((f / n).is_file() for n in train_files)), None)
    if folder is None or not all((folder / n).is_file() for n in test_files):
        pretty = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        wanted = ", ".join(train_files + test_files)
        searched = ", ".join(str(f) for f in folders) or "nothing (root=None and IMC_DATA unset)"
        raise DatasetNotFoundError(
            f"{pretty} not found: looked for {wanted} in {searched}. Download {archive} "
            f"(the python version) from {_CIFAR_URL}, extract it, and pass root=<folder "
            f"holding {_SUBFOLDERS[name]}> or set IMC_DATA=<that folder>."
        )
    splits = []
    for names in (train_files, test_files):
        parts = [_read_cifar_batch(folder / n, label_key, num_classes) for n in names]
        splits.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    (train_x, train_y), (test_x, test_y) = splits
    return _in_memory_splits(
        name, train_x, train_y, test_x, test_y, num_classes, 255.0, flatten, str(folder)
    )


# --------------------------------------------------------------------------------------
# ImageNet (class folders, read lazily)


class ImageFolderDataset(Dataset):
    """Images in ``<folder>/<class>/<file>`` read lazily with PIL.

    Each item is resized (shorter side to ``round(image_size / 0.875)``, bilinear),
    center-cropped to ``image_size x image_size``, converted to RGB in ``[0, 1]`` and
    standardised with ``mean``/``std``; the label is the class's index in ``classes``.

    Args:
        folder: the split's folder (e.g. ``<root>/train``).
        classes: class folder names, in label order; None takes the sorted sub-folders.
        image_size: side of the square crop.
        mean: per-channel mean (RGB, ``[0, 1]`` units); ImageNet's by default.
        std: per-channel standard deviation; ImageNet's by default.
        flatten: return ``(3*S*S,)`` vectors instead of ``(3, S, S)`` images.

    Raises:
        DatasetNotFoundError: ``folder`` or one of ``classes`` is missing, or holds no images.
        ValueError: a bad ``image_size``.

    Example:
        >>> train = ImageFolderDataset("/data/imagenet/train", image_size=224)  # doctest: +SKIP
        >>> x, y = train[0]  # doctest: +SKIP
        >>> x.shape, y.dtype  # doctest: +SKIP
        (torch.Size([3, 224, 224]), torch.int64)
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        classes: Sequence[str] | None = None,
        *,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flatten: bool = False,
    ):
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DatasetNotFoundError(f"image folder {self.folder} does not exist")
        if classes is None:
            classes = sorted(p.name for p in self.folder.iterdir() if p.is_dir())
        self.classes = list(classes)
        if not self.classes:
            raise DatasetNotFoundError(f"{self.folder} has no class sub-folders")
        self.image_size = image_size
        self.resize_size = round(image_size / _CROP_FRACTION)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.flatten = flatten
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            class_dir = self.folder / name
            if not class_dir.is_dir():
                raise DatasetNotFoundError(
                    f"{self.folder} has no folder for class {name!r} (a class of the training "
                    "split): every split needs the same class folders"
                )
            files = sorted(
                p
                for p in class_dir.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise DatasetNotFoundError(
                f"{self.folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
                "class folders"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{path}: not a readable image ({exc})") from exc
        image = _center_crop(_resize_shorter(image, self.resize_size), self.image_size)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        x = pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)
        x = (x - self.mean) / self.std
        if self.flatten:
            x = x.flatten()
        return x, torch.tensor(label, dtype=torch.int64)


def _resize_shorter(image, size: int):
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    # PIL's bilinear resize widens its filter when shrinking, so downscaling is antialiased.
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BILINEAR)


def _center_crop(image, size: int):
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _load_imagenet(root, image_size: int, flatten: bool) -> DatasetSplits:
    folders = _search_folders(root, "imagenet")
    folder = next((f for f in folders if (f / "train").is_dir() and (f / "val").is_dir()), None)
    if folder is None:
        searched = ", ".join(str(f) for f in folders) or "nothing (root=None and IMC_DATA unset)"
        raise DatasetNotFoundError(
            f"ImageNet not found: looked for train/ and val/ class folders in {searched}. "
            "Pass root=<folder> (or set IMC_DATA) where <folder>/train/<class>/*.JPEG and "
            "<folder>/val/<class>/*.JPEG exist; the validation images must be sorted into "
            "class folders (e.g. with the valprep.sh script of the PyTorch ImageNet example)."
        )
    train = ImageFolderDataset(folder / "train", image_size=image_size, flatten=flatten)
    test = ImageFolderDataset(folder / "val", train.classes, image_size=image_size, flatten=flatten)
    shape = (3, image_size, image_size)
    return DatasetSplits(
        name="imagenet",
        train=train,
        test=test,
        num_classes=len(train.classes),
        input_shape=(math.prod(shape),) if flatten else shape,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source=str(folder),
    )


# --------------------------------------------------------------------------------------
# batches


def _tensor_view(dataset) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
    """The tensors behind a TensorDataset (or a Subset of one) and the subset's indices."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors, None
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        return dataset.dataset.tensors, torch.as_tensor(dataset.indices, dtype=torch.int64)
    return None


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One epoch over ``dataset`` in batches: every sample exactly once.

    A ``TensorDataset`` (or a ``Subset`` of one) is batched by indexing its tensors directly,
    which is several times faster than a DataLoader collating single samples; any other
    dataset goes through a ``DataLoader`` (``num_workers=0``) with the same sample order, so
    both paths yield the same batches for the same generator state.

    Args:
        dataset: a map-style dataset yielding ``(x, y)``.
        batch_size: samples per batch (the last one may be smaller unless ``drop_last``).
        shuffle: visit the samples in a random order drawn from ``generator``.
        generator: the source of the order (None: the global RNG); seed it for
            reproducible epochs.
        drop_last: drop the last batch when it is smaller than ``batch_size``.

    Yields:
        ``(x, y)`` batches (tensors stacked along a new first dimension).

    Raises:
        ValueError: ``batch_size`` is not a positive int.

    Example:
        >>> data = load_dataset("digits")
        >>> g = torch.Generator().manual_seed(0)
        >>> sum(len(y) for _, y in iterate_batches(data.train, 100, shuffle=True, generator=g))
        1437
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if drop_last:
        order = order[: n - n % batch_size]
    view = _tensor_view(dataset)
    if view is None:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=0)
        yield from (tuple(batch) for batch in loader)
        return
    tensors, subset = view
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        if subset is not None:
            index = subset[index]
        yield tuple(t[index] for t in tensors)


def first_batch(dataset: Dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of ``dataset`` (all of them when it has fewer), in order.

    Args:
        dataset: a map-style dataset yielding ``(x, y)``.
        n: number of samples.

    Returns:
        ``(x, y)`` with ``min(n, len(dataset))`` rows.

    Raises:
        ValueError: ``n`` is not a positive int, or the dataset is empty.

    Example:
        >>> x, y = first_batch(load_dataset("digits").train, 64)
        >>> x.shape
        torch.Size([64, 1, 8, 8])
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    x, y = next(iterate_batches(dataset, min(n, len(dataset))))
    return x, y
