"""Data loaders, class orders and streams."""

import numpy as np
import pytest
import torch
from PIL import Image

from avalanche_m2kd import datasets
from avalanche_m2kd.datasets import DatasetError, class_order, load_dataset, make_benchmark, subsample


def write_npz(path, layout="NHWC", n_classes=4, per_class=5, side=6, channels=3):
    y_tr = np.repeat(np.arange(n_classes), per_class)
    y_te = np.repeat(np.arange(n_classes), 2)
    # each image's pixels encode its label, so loading can be checked exactly
    def images(y):
        x = np.stack([np.full((channels, side, side), 10 * label + i % 10, np.uint8) for i, label in enumerate(y)])
        return x if layout == "NCHW" else x.transpose(0, 2, 3, 1)

    np.savez(path, x_train=images(y_tr), y_train=y_tr, x_test=images(y_te), y_test=y_te)
    return y_tr, y_te


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_npz_loads_labels_shapes_and_class_order(tmp_path, layout):
    path = tmp_path / "toy.npz"
    y_tr, y_te = write_npz(path, layout)
    data = load_dataset(f"npz:{path}")
    assert data.x_train.shape == (20, 3, 6, 6) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (8, 3, 6, 6)
    assert data.y_train.tolist() == y_tr.tolist()
    assert (data.x_train[:, 0, 0, 0] // 10).tolist() == y_tr.tolist()  # pixels still match labels
    order = [3, 1, 0, 2]
    bm = make_benchmark(data, 2, order, *datasets.make_transforms(data))
    assert [sorted(e.classes_in_this_experience) for e in bm.train_stream] == [[1, 3], [0, 2]]
    x, y, _ = bm.train_stream[0].dataset[0]
    assert x.shape == (3, 6, 6) and x.dtype == torch.float32 and int(y) in (1, 3)


def test_npz_grayscale_nhw(tmp_path):
    path = tmp_path / "gray.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 255, (6, 8, 8), dtype=np.uint8), y_train=np.array([0, 0, 1, 1, 2, 2]),
             x_test=rng.integers(0, 255, (3, 8, 8), dtype=np.uint8), y_test=np.array([0, 1, 2]))
    data = load_dataset(f"npz:{path}")
    assert data.x_train.shape == (6, 1, 8, 8) and data.n_classes == 3


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not a zip file", "not a readable npz"),
        (dict(x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, np.int64)), "missing arrays"),
        (dict(x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(3, np.int64),
              x_test=np.zeros((1, 4, 4), np.uint8), y_test=np.zeros(1, np.int64)), "vector of 2"),
        (dict(x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0.5, 1.0]),
              x_test=np.zeros((1, 4, 4), np.uint8), y_test=np.zeros(1, np.int64)), "integers"),
        (dict(x_train=np.zeros((2, 5, 4, 4), np.uint8), y_train=np.zeros(2, np.int64),
              x_test=np.zeros((1, 5, 4, 4), np.uint8), y_test=np.zeros(1, np.int64)), "channel axis"),
    ],
)
def test_malformed_npz_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"npz:{path}")


def make_folder(root, classes=("cat", "ant", "bee"), per_class=3, size=(5, 4)):
    for split, n in (("train", per_class), ("test", 1)):
        for label, name in enumerate(sorted(classes)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, (40 * label, i, 0)).save(folder / f"{i}.png")


def test_image_folder_loads_sorted_classes(tmp_path):
    make_folder(tmp_path)
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.class_names == ["ant", "bee", "cat"]
    assert data.x_train.shape == (9, 3, 4, 5)  # width 5, height 4
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert (data.x_train[:, 0, 0, 0] // 40).tolist() == data.y_train.tolist()
    assert data.y_test.tolist() == [0, 1, 2]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="missing folder"):
        load_dataset(f"imagefolder:{tmp_path}")
    make_folder(tmp_path)
    Image.new("RGB", (9, 9)).save(tmp_path / "train" / "ant" / "big.png")
    with pytest.raises(DatasetError, match="resize"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "ant" / "big.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="cannot read image"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_class_orders():
    assert class_order("natural", [2, 0, 1]) == [0, 1, 2]
    assert class_order("seed1993", range(100))[:3] == [68, 56, 78]
    assert class_order("podnet", range(100))[:3] == [87, 0, 52]
    assert sorted(class_order("random:7", range(10))) == list(range(10))
    assert class_order("random:7", range(10)) == class_order("random:7", range(10))
    for bad, message in (("podnet", "CIFAR-100"), ("random:x", "integer"), ("sorted", "unknown class order")):
        with pytest.raises(DatasetError, match=message):
            class_order(bad, range(10))


def test_unknown_dataset_and_missing_root():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("mnist3d")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("cifar100", data_root="/nonexistent/folder")
    with pytest.raises(DatasetError, match="--data-root"):
        load_dataset("cifar10")


def test_subsample_is_per_class_and_fixed():
    data = datasets.load_digits_arrays()
    small = subsample(data, 7, 3)
    assert np.bincount(small.y_train).tolist() == [7] * 10
    assert np.bincount(small.y_test).tolist() == [3] * 10
    again = subsample(data, 7, 3)
    assert np.array_equal(small.x_train, again.x_train)


def test_fashion_mnist_reads_idx_files(tmp_path):
    import gzip

    def idx(values, dims):
        header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
        return header + bytes(values)

    labels = [3, 1]
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx([7] * 2 * 784, [2, 28, 28])))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx(labels, [2]))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx([9] * 784, [1, 28, 28]))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx([1], [1]))
    data = datasets.load_fashion_mnist(str(tmp_path))
    assert data.x_train.shape == (2, 1, 28, 28) and data.y_train.tolist() == labels
    assert int(data.x_test[0, 0, 0, 0]) == 9
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx([1], [2]))  # header says 2, body has 1
    with pytest.raises(DatasetError, match="truncated"):
        datasets.load_fashion_mnist(str(tmp_path))


def test_an_image_folder_class_with_test_images_but_no_training_images_is_refused(tmp_path):
    for split, name, count in (("train", "a", 2), ("train", "b", 0), ("test", "a", 1), ("test", "b", 1)):
        folder = tmp_path / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(DatasetError, match=r"test classes \['b'\] have no training images"):
        load_dataset(f"imagefolder:{tmp_path}")
