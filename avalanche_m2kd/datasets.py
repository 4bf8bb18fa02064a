"""Image data sets held in memory, class orders, and Avalanche streams over them.

Loaders return :class:`ImageArrays` (images ``[N, C, H, W]``, ``uint8`` or
``float32`` in [0, 1]; ``int64`` labels ``0..K-1``). :func:`make_benchmark`
turns them into an Avalanche ``nc_benchmark`` stream (which Avalanche's
``ICaRL`` also accepts), normalising with the training set's per-channel
statistics and, optionally, with CIFAR-style augmentation.

Data sets by name (:func:`load_dataset`):

* ``digits`` — scikit-learn's bundled ``load_digits`` (8x8, 10 classes); no download.
* ``fmnist`` — Fashion-MNIST (28x28, 10 classes): the idx files under
  ``data_root`` (or ``data_root/FashionMNIST/raw``), else Debian's
  ``dataset-fashion-mnist`` files, else torchvision's download if allowed.
* ``cifar10`` / ``cifar100`` — torchvision's layout under ``data_root``
  (downloaded there if allowed).
* ``npz:PATH`` — arrays ``x_train, y_train, x_test, y_test``; images ``uint8``
  NHWC, NCHW or NHW.
* ``imagefolder:ROOT`` — ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``
  (class ids in sorted folder-name order).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from avalanche.benchmarks import nc_benchmark
from torch.utils.data import TensorDataset

DATA_SPLIT_SEED = 0
"""Seed of every data-set-level random choice (digits' train/test split,
per-class subsampling): fixed, so that every run and seed sees the same data."""

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

PODNET_CIFAR100_ORDER = [
    87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24, 32, 45, 88, 11, 4,
    67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9,
    31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56,
    48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39,
]  # fmt: skip
"""PODNet's first CIFAR-100 order (arthurdouillard/incremental_learning.pytorch,
options/data/cifar100_3orders.yaml), also used by Avalanche's baselines."""


class DatasetError(ValueError):
    """A data set that cannot be found or read; the message says how to fix it."""


@dataclass
class ImageArrays:
    """A labelled image data set held in memory."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: List[str] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])


# -- loaders ----------------------------------------------------------------------------
def load_digits_arrays(test_fraction: float = 0.3) -> ImageArrays:
    """scikit-learn's bundled ``load_digits`` (1,797 8x8 images, 10 classes),
    scaled to [0, 1], split stratified with :data:`DATA_SPLIT_SEED`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=DATA_SPLIT_SEED)
    return ImageArrays("digits", x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DatasetError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def load_fashion_mnist(data_root: Optional[str] = None, download: bool = False) -> ImageArrays:
    """Fashion-MNIST from ``data_root``, Debian's package, or a download."""
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    candidates = []
    if data_root:
        root = Path(data_root)
        candidates += [root, root / "FashionMNIST" / "raw"]
    candidates.append(DEBIAN_FASHION_MNIST)
    for folder in candidates:
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            arrays = [_read_idx(p) for p in paths]
            x_tr, y_tr, x_te, y_te = arrays
            return ImageArrays(
                "fmnist", x_tr[:, None], y_tr.astype(np.int64), x_te[:, None], y_te.astype(np.int64), FASHION_CLASSES
            )
    if not download:
        raise DatasetError(
            "fmnist: no Fashion-MNIST idx files in --data-root or /usr/share/datasets/fashion-mnist; "
            "install Debian's dataset-fashion-mnist, pass --data-root DIR holding them, or add --download"
        )
    from torchvision.datasets import FashionMNIST

    root = data_root or _default_root()
    try:
        FashionMNIST(root, train=True, download=True)
        FashionMNIST(root, train=False, download=True)
    except Exception as err:  # network errors have many types
        raise DatasetError(f"fmnist: download into {root} failed ({type(err).__name__}: {err})") from None
    return load_fashion_mnist(root, download=False)


def _default_root() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "avalanche_m2kd")


def load_cifar(name: str, data_root: Optional[str] = None, download: bool = False) -> ImageArrays:
    """CIFAR-10 / CIFAR-100 in torchvision's layout under ``data_root``."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    if not data_root and not download:
        raise DatasetError(f"{name}: pass --data-root DIR (torchvision's layout, e.g. DIR/{cls.base_folder}/) or add --download")
    root = data_root or _default_root()
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as err:
        raise DatasetError(f"{name}: not found under {root} ({err}); expected {root}/{cls.base_folder}/ or add --download") from None
    except Exception as err:
        raise DatasetError(f"{name}: download into {root} failed ({type(err).__name__}: {err})") from None
    return ImageArrays(
        name,
        np.ascontiguousarray(train.data.transpose(0, 3, 1, 2)),
        np.asarray(train.targets, dtype=np.int64),
        np.ascontiguousarray(test.data.transpose(0, 3, 1, 2)),
        np.asarray(test.targets, dtype=np.int64),
        list(train.classes),
    )


def _images_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DatasetError(f"{where}: images must be NHW, NHWC or NCHW, got shape {x.shape}")
    if x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        return x
    if x.shape[3] in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DatasetError(f"{where}: cannot tell the channel axis of shape {x.shape} (expected 1 or 3 channels)")


def _check_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1 or y.shape[0] != n:
        raise DatasetError(f"{where}: labels must be a vector of {n} entries, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{where}: labels must be integers, got {y.dtype}")
    if n and y.min() < 0:
        raise DatasetError(f"{where}: labels must be >= 0")
    return y.astype(np.int64)


def load_npz(path: str) -> ImageArrays:
    """``x_train, y_train, x_test, y_test`` from an ``.npz`` file."""
    where = f"npz:{path}"
    if not os.path.isfile(path):
        raise DatasetError(f"{where}: file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DatasetError(f"{where}: missing arrays {missing} (needs x_train, y_train, x_test, y_test)")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(f"{where}: not a readable npz file ({type(err).__name__}: {err})") from None
    x_tr = _images_nchw(arrays["x_train"], where + " x_train")
    x_te = _images_nchw(arrays["x_test"], where + " x_test")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DatasetError(f"{where}: train images {x_tr.shape[1:]} and test images {x_te.shape[1:]} differ in shape")
    if x_tr.dtype != x_te.dtype:  # a uint8 set and a float set are scaled differently: refuse, do not guess
        raise DatasetError(
            f"{where}: training images are {x_tr.dtype} but test images are {x_te.dtype}; store both as uint8 (0-255) "
            "or both as float (0-1)"
        )
    if x_tr.dtype != np.uint8:
        if not np.issubdtype(x_tr.dtype, np.floating):
            raise DatasetError(f"{where}: images must be uint8 (or float in [0, 1]), got {x_tr.dtype}")
        x_tr, x_te = x_tr.astype(np.float32), x_te.astype(np.float32)
    y_tr = _check_labels(arrays["y_train"], len(x_tr), where + " y_train")
    y_te = _check_labels(arrays["y_test"], len(x_te), where + " y_test")
    if set(np.unique(y_te)) - set(np.unique(y_tr)):
        raise DatasetError(f"{where}: test labels {sorted(set(np.unique(y_te)) - set(np.unique(y_tr)))} never occur in training")
    return ImageArrays(Path(path).stem, x_tr, y_tr, x_te, y_te)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_image_folder(root: str) -> ImageArrays:
    """``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``; all images must
    share one size; class ids follow sorted folder names."""
    from PIL import Image

    where = f"imagefolder:{root}"
    base = Path(root)
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise DatasetError(f"{where}: missing folder {base / split} (expected ROOT/train/<class>/ and ROOT/test/<class>/)")
    classes = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{where}: no class folders in {base / 'train'}")
    extra = sorted({p.name for p in (base / "test").iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DatasetError(f"{where}: test classes {extra} have no training folder")
    mode, size = None, None

    def read(split):
        nonlocal mode, size
        xs, ys = [], []
        for label, name in enumerate(classes):
            folder = base / split / name
            if not folder.is_dir():
                continue
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(file) as img:
                        mode = mode or ("L" if img.mode in ("L", "1", "I;16", "I") else "RGB")
                        arr = np.asarray(img.convert(mode))
                except Exception as err:
                    raise DatasetError(f"{where}: cannot read image {file} ({type(err).__name__})") from None
                size = size or arr.shape[:2]
                if arr.shape[:2] != size:
                    raise DatasetError(f"{where}: {file} is {arr.shape[1]}x{arr.shape[0]}, others are {size[1]}x{size[0]}; resize them to one size")
                xs.append(arr if arr.ndim == 3 else arr[:, :, None])
                ys.append(label)
        if not xs:
            raise DatasetError(f"{where}: no images under {base / split}")
        return np.stack(xs).transpose(0, 3, 1, 2).copy(), np.asarray(ys, dtype=np.int64)

    x_tr, y_tr = read("train")
    x_te, y_te = read("test")
    untrained = sorted(classes[c] for c in set(np.unique(y_te)) - set(np.unique(y_tr)))
    if untrained:
        raise DatasetError(f"{where}: test classes {untrained} have no training images; add some or remove their test folders")
    return ImageArrays(base.name, x_tr, y_tr, x_te, y_te, classes)


DATASETS = ("digits", "fmnist", "cifar10", "cifar100", "npz:PATH", "imagefolder:ROOT")
MAX_LABEL = 65_535
"""Largest class id accepted: Avalanche sizes per-class tables by the largest id."""


def check_arrays(data: ImageArrays) -> ImageArrays:
    """Reject, with one message naming the problem, data that would train on
    garbage or fail deep inside Avalanche: non-finite pixels (train or test),
    a class with training images but no test image, class ids above
    :data:`MAX_LABEL`. Returns ``data``."""
    where = data.name
    for split, x in (("training", data.x_train), ("test", data.x_test)):
        if np.issubdtype(x.dtype, np.floating):
            bad = int(x.size - np.isfinite(x).sum())
            if bad:
                raise DatasetError(f"{where}: {bad} {split} pixel values are NaN or infinite; clean the data set")
    for split, y in (("training", data.y_train), ("test", data.y_test)):
        if y.size and int(y.max()) > MAX_LABEL:
            raise DatasetError(
                f"{where}: {split} label {int(y.max())} is above {MAX_LABEL}; number the classes 0..K-1 "
                "(Avalanche allocates per-class tables up to the largest label)"
            )
    untested = sorted(set(np.unique(data.y_train).tolist()) - set(np.unique(data.y_test).tolist()))
    if untested:
        shown = ", ".join(map(str, untested[:10])) + (" ..." if len(untested) > 10 else "")
        raise DatasetError(
            f"{where}: classes {shown} have training images but no test image; every class needs test images "
            "(accuracy is measured per experience)"
        )
    return data


def load_dataset(spec: str, data_root: Optional[str] = None, download: bool = False) -> ImageArrays:
    """Load a data set by name (see the module docstring and :data:`DATASETS`)."""
    if data_root is not None and not os.path.isdir(data_root) and not download:
        raise DatasetError(f"--data-root {data_root} does not exist")
    if spec == "digits":
        return load_digits_arrays()
    if spec == "fmnist":
        return load_fashion_mnist(data_root, download)
    if spec in ("cifar10", "cifar100"):
        return load_cifar(spec, data_root, download)
    if spec.startswith("npz:"):
        return load_npz(spec[len("npz:") :])
    if spec.startswith("imagefolder:"):
        return load_image_folder(spec[len("imagefolder:") :])
    raise DatasetError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASETS)}")


# -- class orders and subsets ---------------------------------------------------------------
CLASS_ORDERS = ("natural", "seed1993", "podnet", "random:SEED")


def class_order(spec: str, classes: Sequence[int]) -> List[int]:
    """The order in which classes arrive.

    ``natural`` (ascending ids); ``seed1993`` =
    ``numpy.random.RandomState(1993).permutation`` of the classes (the iCaRL /
    FACIL / PyCIL order; starts 68, 56, 78 on CIFAR-100); ``podnet`` (PODNet's
    CIFAR-100 order, starting 87, 0, 52; 100 classes only); ``random:SEED``.
    """
    classes = sorted(int(c) for c in classes)
    if spec == "natural":
        return classes
    if spec == "seed1993":
        return [classes[i] for i in np.random.RandomState(1993).permutation(len(classes))]
    if spec == "podnet":
        if classes != list(range(100)):
            raise DatasetError("class order 'podnet' is CIFAR-100's (classes 0..99); use natural, seed1993 or random:SEED")
        return list(PODNET_CIFAR100_ORDER)
    if spec.startswith("random:"):
        try:
            seed = int(spec[len("random:") :])
        except ValueError:
            raise DatasetError(f"class order {spec!r}: the seed must be an integer, e.g. random:7") from None
        return [classes[i] for i in np.random.RandomState(seed).permutation(len(classes))]
    raise DatasetError(f"unknown class order {spec!r}; choose one of {', '.join(CLASS_ORDERS)}")


def subsample(data: ImageArrays, train_per_class: Optional[int] = None, test_per_class: Optional[int] = None) -> ImageArrays:
    """At most ``train_per_class`` / ``test_per_class`` images per class,
    chosen with :data:`DATA_SPLIT_SEED` (the same subset for every run)."""
    rng = np.random.RandomState(DATA_SPLIT_SEED)

    def pick(y, n):
        if n is None:
            return np.arange(len(y))
        keep = [rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]
        return np.sort(np.concatenate(keep))

    tr, te = pick(data.y_train, train_per_class), pick(data.y_test, test_per_class)
    return replace(data, x_train=data.x_train[tr], y_train=data.y_train[tr], x_test=data.x_test[te], y_test=data.y_test[te])


# -- streams ------------------------------------------------------------------------------------
class ToFloatNormalized:
    """``uint8`` -> float in [0, 1], then per-channel ``(x - mean) / std``.
    A class (not a lambda) so that data loaders with workers can pickle it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std


def channel_stats(x: np.ndarray) -> tuple[list, list]:
    """Per-channel mean and std of images in [0, 1] (``uint8`` scaled by 1/255)."""
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    flat = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).astype(np.float64) / scale
    std = flat.std(axis=1)
    return flat.mean(axis=1).tolist(), np.where(std > 0, std, 1.0).tolist()


def make_transforms(data: ImageArrays, augment: bool = False):
    """(train, eval) transforms: normalisation with the training set's
    statistics; ``augment`` adds CIFAR-style random crop (padding 4) and
    horizontal flip, applied to the raw images first."""
    from torchvision.transforms import v2

    normalize = ToFloatNormalized(*channel_stats(data.x_train))
    if not augment:
        return normalize, normalize
    side = data.x_train.shape[-1]
    train = v2.Compose([v2.RandomCrop(side, padding=4), v2.RandomHorizontalFlip(), normalize])
    return train, normalize


def experience_sizes(n_classes: int, n_experiences: int) -> List[int]:
    """Classes per experience: ``n_classes // n_experiences`` each, the
    remainder added to the last one (ED's rule: 100 classes in 3 -> 33, 33, 34)."""
    sizes = [n_classes // n_experiences] * n_experiences
    sizes[-1] += n_classes % n_experiences
    return sizes


def with_sample_ids(dataset, ids: Optional[Sequence[int]] = None):
    """``dataset`` as an Avalanche classification dataset with a ``sample_id``
    attribute (default ``0..len-1``). Subsets and concatenations keep it, so a
    replay memory drawn from the stream can be checkpointed as ids
    (:mod:`avalanche_m2kd.checkpoint`); batches are unchanged."""
    from avalanche.benchmarks.utils import DataAttribute, _make_taskaware_classification_dataset
    from avalanche.benchmarks.utils.data import AvalancheDataset

    ids = list(range(len(dataset))) if ids is None else [int(i) for i in ids]
    if len(ids) != len(dataset) or len(set(ids)) != len(ids):
        raise ValueError(f"with_sample_ids: need {len(dataset)} distinct ids, got {len(ids)} ({len(set(ids))} distinct)")
    if not isinstance(dataset, AvalancheDataset):
        dataset = _make_taskaware_classification_dataset(dataset)
    return type(dataset)([dataset], data_attributes=[DataAttribute(ids, "sample_id", use_in_getitem=False)])


def make_benchmark(
    data: ImageArrays,
    n_experiences: int,
    class_order: Optional[Sequence[int]] = None,
    train_transform=None,
    eval_transform=None,
    sizes: Optional[Sequence[int]] = None,
):
    """An Avalanche class-incremental ``nc_benchmark`` over ``data``, classes
    taken in ``class_order`` (default: natural order), ``sizes[i]`` classes in
    experience ``i`` (default :func:`experience_sizes`). Transforms default to
    none (float images are used as they are)."""
    present = sorted(set(np.unique(data.y_train).tolist()))
    order = present if class_order is None else [int(c) for c in class_order]
    if sorted(order) != present:
        raise DatasetError(f"class order must be a permutation of the data set's classes {present}")
    if not 1 <= n_experiences <= len(order):
        raise DatasetError(f"n_experiences must be between 1 and {len(order)} (the number of classes), got {n_experiences}")
    sizes = list(sizes) if sizes is not None else experience_sizes(len(order), n_experiences)
    if len(sizes) != n_experiences or sum(sizes) != len(order) or min(sizes) < 1:
        raise DatasetError(f"experience sizes {sizes} must be {n_experiences} positive counts summing to {len(order)}")
    train = with_sample_ids(TensorDataset(torch.from_numpy(np.ascontiguousarray(data.x_train)), torch.from_numpy(data.y_train)))
    test = TensorDataset(torch.from_numpy(np.ascontiguousarray(data.x_test)), torch.from_numpy(data.y_test))
    return nc_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        task_labels=False,
        shuffle=False,
        fixed_class_order=order,
        per_exp_classes=dict(enumerate(sizes)),
        train_transform=train_transform,
        eval_transform=eval_transform,
    )


def split_digits(n_experiences: int = 5, class_order: Optional[Sequence[int]] = None):
    """Split-Digits: scikit-learn's digits as a class-incremental stream
    (default 5 experiences of 2 classes, natural order). No download."""
    return make_benchmark(load_digits_arrays(), n_experiences, class_order)


__all__ = [
    "CLASS_ORDERS",
    "with_sample_ids",
    "DATASETS",
    "DATA_SPLIT_SEED",
    "DatasetError",
    "ImageArrays",
    "PODNET_CIFAR100_ORDER",
    "ToFloatNormalized",
    "channel_stats",
    "check_arrays",
    "class_order",
    "experience_sizes",
    "load_cifar",
    "load_dataset",
    "load_digits_arrays",
    "load_fashion_mnist",
    "load_image_folder",
    "load_npz",
    "make_benchmark",
    "make_transforms",
    "split_digits",
    "subsample",
]
