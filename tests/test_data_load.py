"""fastdd.data.load: files, image folders and torch Datasets, uint8 standardization, bad input."""
import os

import numpy as np
import pytest
import torch

from fastdd.data import DataFileError, load

MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist.npz")


def _uint8_images(n=40, h=6, w=5, c=None, seed=0):
    gen = np.random.default_rng(seed)
    shape = (n, h, w) if c is None else (n, h, w, c)
    return gen.integers(0, 256, size=shape, dtype=np.uint8), np.arange(n) % 4


def test_npz_uint8_is_standardized_with_train_statistics_and_maps_back(tmp_path):
    X, y = _uint8_images()
    Xt, yt = _uint8_images(n=12, seed=1)
    np.savez(tmp_path / "d.npz", X_train=X, y_train=y, X_test=Xt, y_test=yt)
    d = load(tmp_path / "d.npz")
    assert d.X_train.shape == (40, 1, 6, 5) and d.X_train.dtype == torch.float32
    pixels = torch.from_numpy(X).double() / 255
    assert d.normalization.mean[0] == pytest.approx(float(pixels.mean()))
    assert d.normalization.std[0] == pytest.approx(float(pixels.std(unbiased=False)))
    assert float(d.X_train.mean()) == pytest.approx(0, abs=1e-5)  # train statistics: mean 0, std 1
    torch.testing.assert_close(d.to_pixels(d.X_test).double(), torch.from_numpy(Xt).double().unsqueeze(1) / 255,
                               atol=1e-6, rtol=0)
    assert d.classes == ["0", "1", "2", "3"] and torch.equal(d.y_test, torch.from_numpy(yt))


def test_channel_layouts_agree_and_stats_are_per_channel(tmp_path):
    X, y = _uint8_images(c=3)
    np.savez(tmp_path / "hwc.npz", X=X, y=y)
    np.savez(tmp_path / "chw.npz", X=X.transpose(0, 3, 1, 2), y=y)
    a, b = load(tmp_path / "hwc.npz"), load(tmp_path / "chw.npz")
    assert a.X_train.shape[1:] == (3, 6, 5)
    torch.testing.assert_close(a.X_train, b.X_train)
    assert len(a.normalization.mean) == 3
    train = torch.from_numpy(X).double()[_train_rows(a, X)] / 255
    assert a.normalization.mean == pytest.approx(train.mean((0, 1, 2)).tolist())


def _train_rows(d, X):
    from fastdd.data import stratified_split

    return stratified_split(torch.from_numpy(np.arange(len(X)) % 4), 0.2, 0)[0]


def test_float_data_is_used_as_given_and_float64_stays(tmp_path):
    X = np.random.default_rng(0).normal(size=(30, 7))
    torch.save({"X": torch.from_numpy(X), "y": torch.arange(30) % 3}, tmp_path / "f.pt")
    d = load(tmp_path / "f.pt")
    assert d.X_train.dtype == torch.float64 and d.normalization is None
    assert len(d.y_train) + len(d.y_test) == 30 and set(d.y_test.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="used as given"):
        d.to_pixels(d.X_train)


def _write_folder(root, sizes=None, mode="L"):
    from PIL import Image

    gen = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            os.makedirs(root / split / c)
            for i in range(3 if split == "train" else 2):
                size = (sizes or {}).get((split, c, i), (5, 4))
                shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
                Image.fromarray(gen.integers(0, 256, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}.png")


def test_image_folder_with_splits(tmp_path):
    _write_folder(tmp_path)
    d = load(tmp_path)
    assert d.classes == ["cat", "dog"]
    assert d.X_train.shape == (6, 1, 4, 5) and d.X_test.shape == (4, 1, 4, 5)
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1] and d.y_test.tolist() == [0, 0, 1, 1]
    assert d.normalization is not None


def test_image_folder_without_splits_is_split_stratified(tmp_path):
    _write_folder(tmp_path, mode="RGB")
    d = load(tmp_path / "train")  # root/<class>/* only
    assert d.X_train.shape[1:] == (3, 4, 5) and len(d.y_train) + len(d.y_test) == 6
    assert sorted(d.y_test.tolist()) == [0, 1]


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, items, classes=None):
        self.items = items
        if classes:
            self.classes = classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_torch_dataset_of_pil_images_with_a_test_split():
    from PIL import Image

    gen = np.random.default_rng(0)
    items = [(Image.fromarray(gen.integers(0, 256, (6, 6), dtype=np.uint8)), i % 2) for i in range(10)]
    test = [(torch.from_numpy(np.array(im)), torch.tensor(lab)) for im, lab in items[:4]]
    d = load(_Pairs(items, classes=["even", "odd"]), test=_Pairs(test))
    assert d.X_train.shape == (10, 1, 6, 6) and d.X_test.shape == (4, 1, 6, 6)
    assert d.classes == ["even", "odd"]
    torch.testing.assert_close(d.X_test, d.X_train[:4])  # the same pixels through both item types


def test_float_tensor_dataset_is_used_as_given():
    items = [(torch.randn(1, 4, 4), i % 3) for i in range(12)]
    d = load(_Pairs(items))
    assert d.normalization is None and d.X_train.shape[1:] == (1, 4, 4)


def test_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFileError, match="no class subfolders"):
        load(tmp_path / "empty")
    _write_folder(tmp_path / "mixed", sizes={("train", "dog", 1): (7, 4)})
    with pytest.raises(DataFileError, match=r"cat/0.png is 5x4 with 1 channel\(s\), .*dog/1.png is 7x4"):
        load(tmp_path / "mixed")
    _write_folder(tmp_path / "broken")
    (tmp_path / "broken" / "train" / "cat" / "1.png").write_bytes(b"not an image")
    with pytest.raises(DataFileError, match=r"cat/1.png: cannot read this image"):
        load(tmp_path / "broken")
    with pytest.raises(DataFileError, match=r"item 0 is a Tensor; expected \(image, label\)"):
        load(_Pairs([torch.zeros(2, 2)] * 3))
    with pytest.raises(DataFileError, match=r"item 1's label is 0.5 \(float\); labels must be integer"):
        load(_Pairs([(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 2, 2), 0.5)]))
    with pytest.raises(DataFileError, match="item 0's label is 'cat'"):
        load(_Pairs([(torch.zeros(1, 2, 2), "cat")]))
    np.savez(tmp_path / "fl.npz", X=np.zeros((4, 2, 2), np.uint8), y=np.array([0, 1, 0.5, 1]))
    with pytest.raises(DataFileError, match="labels must be integer class labels"):
        load(tmp_path / "fl.npz")
    with pytest.raises(DataFileError, match="no such file or folder"):
        load(tmp_path / "nope.npz")


def test_a_set_too_large_for_memory_is_refused_with_its_size(tmp_path, monkeypatch):
    import fastdd.data.sources as loader

    X, y = _uint8_images(n=100, h=28, w=28)
    np.savez(tmp_path / "big.npz", X=X, y=y)
    monkeypatch.setattr(loader, "available_bytes", lambda: 100_000)
    with pytest.raises(DataFileError, match=r"100 items of 784 values take 0.0 GiB as float32, more than"):
        load(tmp_path / "big.npz")


@pytest.mark.skipif(not os.path.exists(MNIST), reason="real MNIST (../shared/data/mnist.npz) is not here")
def test_real_mnist_loads_with_its_published_statistics():
    d = load(MNIST)
    assert d.X_train.shape == (60000, 1, 28, 28) and d.X_test.shape == (10000, 1, 28, 28)
    assert d.normalization.mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert d.normalization.std[0] == pytest.approx(0.3081, abs=1e-4)
    assert torch.bincount(d.y_test).tolist()[:2] == [980, 1135]  # the official test split


def test_cli_takes_an_image_folder_and_the_synthetic_set_shows_in_pixels(tmp_path):
    from fastdd.cli import main
    from fastdd.distill import SyntheticSet
    from PIL import Image

    gen = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(tmp_path / "imgs" / f"class{c}")
        for i in range(6):
            arr = np.clip(gen.normal(60 + 120 * c, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "L").save(tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    out = tmp_path / "syn.pt"
    assert main(["distill", "--data", str(tmp_path / "imgs"), "--method", "dm", "--ipc", "1", "--iterations", "2",
                 "--width", "8", "--out", str(out), "--no-progress"]) == 0
    syn = SyntheticSet.load(str(out))
    pixels = syn.to_pixels()
    assert pixels.shape == (2, 1, 8, 8) and float(pixels.min()) >= 0 and float(pixels.max()) <= 1
    # initialized from real images and barely moved: class 1 stays the brighter one in pixel space
    assert float(pixels[syn.labels == 1].mean()) > float(pixels[syn.labels == 0].mean()) + 0.2
