"""Fashion-MNIST for the benchmarks, read from local IDX files (no downloads at run time).

Where the files are looked for, in order:

1. ``$IMC_DATA`` (a folder holding the four ``*-idx?-ubyte[.gz]`` files, or a parent with a
   ``fashion-mnist`` folder);
2. ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install dataset-fashion-mnist``).

If neither has them, :func:`load_fashion_mnist` returns random images with random labels and
says so in :attr:`Dataset.source` (the benchmark prints it as a warning): timings stay
meaningful, spectra do not look like a trained network's.

Images come back as float32 ``(N, 1, 28, 28)`` scaled to ``[0, 1]`` and standardized with
the training set's mean and standard deviation (0.2860, 0.3530), labels as int64 in
``[0, 10)``.

    data = load_fashion_mnist("train")
    data.images.shape, data.labels.shape  # (60000, 1, 28, 28), (60000,)
    data.source  # '/usr/share/datasets/fashion-mnist', or 'random data (...)'
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from pathlib import Path

import torch

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Mean and standard deviation of the 60,000 training images in [0, 1] (computed once from
# the Debian files; the usual published values).
MEAN, STD = 0.2860, 0.3530
# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes occur here.
_UBYTE = 0x08


@dataclasses.dataclass
class Dataset:
    """Images ``(N, 1, 28, 28)`` float32 (standardized), labels ``(N,)`` int64, and where
    they came from (a folder, or a sentence starting with ``"random"`` for the fallback)."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str

    @property
    def is_random(self) -> bool:
        return self.source.startswith("random")


def read_idx(path: str | Path) -> torch.Tensor:
    """One IDX file (optionally gzip-compressed) as a uint8 tensor of its stored shape.

    Raises:
        ValueError: a malformed header, a type other than unsigned byte, or a short file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    type_code, n_dims = raw[2], raw[3]
    if type_code != _UBYTE:
        raise ValueError(f"{path}: IDX type 0x{type_code:02x}, only unsigned bytes are supported")
    header = 4 + 4 * n_dims
    shape = struct.unpack(f">{n_dims}I", raw[4:header])
    count = 1
    for size in shape:
        count *= size
    if len(raw) - header != count:
        raise ValueError(f"{path}: {len(raw) - header} data bytes, the header promises {count}")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(shape)


def _find(name: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


def data_folders() -> list[Path]:
    """Folders searched for the IDX files, in order."""
    folders = []
    env = os.environ.get("IMC_DATA")
    if env:
        folders += [Path(env), Path(env) / "fashion-mnist"]
    folders.append(DEBIAN_DIR)
    return folders


def load_fashion_mnist(split: str = "train", *, limit: int | None = None, seed: int = 0) -> Dataset:
    """The Fashion-MNIST ``split`` ("train" or "test"), or random stand-in data.

    Args:
        split: "train" (60,000 images) or "test" (10,000).
        limit: keep only the first ``limit`` images.
        seed: seed of the random stand-in (used only when the files are missing).

    Returns:
        A :class:`Dataset`.
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_name, label_name = FILES[split]
    folders = data_folders()
    image_path, label_path = _find(image_name, folders), _find(label_name, folders)
    if image_path is None or label_path is None:
        n = limit or (60_000 if split == "train" else 10_000)
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(n, 1, 28, 28, generator=generator)
        labels = torch.randint(0, 10, (n,), generator=generator)
        searched = ", ".join(str(f) for f in folders)
        return Dataset(images, labels, f"random data (Fashion-MNIST not found in {searched})")
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.dim() != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(
            f"unexpected Fashion-MNIST shapes: images {tuple(images.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = (images.to(torch.float32) / 255.0 - MEAN) / STD
    return Dataset(images.unsqueeze(1), labels.to(torch.int64), str(image_path.parent))
