import gzip
import pickle
import struct
import urllib.error

import numpy as np
import pytest
import torch

import mcmi_lab.datasets as datasets_mod
from mcmi_lab import DATASETS, load_dataset
from mcmi_lab.datasets import DatasetSpec, check_dataset, dataset_classes, fashion_mnist_root
from mcmi_lab.pipelines import PARAMETERS, resolve_parameters


# ---- Fashion-MNIST: where it is found, and a cache keyed by its source ----------------------------------------------

def _write_idx(path, array, gz):
    """IDX format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, then the bytes."""
    header = bytes([0, 0, 8, array.dim()]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.to(torch.uint8).numpy().tobytes()
    opener = gzip.open if gz else open
    with opener(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(payload)


def _fake_fashion(folder, n=20, gz=True, value=7):
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("t10k", n // 2)):
        _write_idx(folder / f"{split}-images-idx3-ubyte", torch.full((count, 28, 28), value), gz)
        _write_idx(folder / f"{split}-labels-idx1-ubyte", torch.arange(count) % 10, gz)


def _first_pixel(**kwargs):
    return int(load_dataset("fashion-mnist", **kwargs).images[0, 0, 0, 0])


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No Debian files, an empty cache, no env var, and no network download."""
    monkeypatch.setattr(datasets_mod, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(datasets_mod.DATA_ENV, raising=False)

    def offline(dest):
        raise OSError("network unreachable")
    monkeypatch.setattr(datasets_mod, "_download_fashion_mnist", offline)
    return tmp_path


def test_search_order_root_env_debian_cache(isolated, monkeypatch):
    _fake_fashion(isolated / "debian", value=1)
    assert _first_pixel() == 1  # Debian files
    _fake_fashion(isolated / "env", value=2, gz=False)
    monkeypatch.setenv(datasets_mod.DATA_ENV, str(isolated / "env"))
    got = load_dataset("fashion-mnist")  # env comes before Debian, whose copy is in the cache already
    assert len(got) == 20 and int(got.images[0, 0, 0, 0]) == 2
    _fake_fashion(isolated / "root" / "FashionMNIST" / "raw", value=3, gz=False)
    assert _first_pixel(root=isolated / "root") == 3
    assert len(load_dataset("fashion-mnist", "test", root=isolated / "root")) == 10


def test_a_sealed_download_is_used_when_nothing_else(isolated, monkeypatch):
    def download(dest):
        _fake_fashion(dest / "FashionMNIST" / "raw", value=5, gz=False)
    monkeypatch.setattr(datasets_mod, "_download_fashion_mnist", download)
    assert _first_pixel() == 5
    monkeypatch.setattr(datasets_mod, "_download_fashion_mnist", lambda dest: 1 / 0)
    assert _first_pixel() == 5  # the downloaded copy, checked against its manifest
    # an unsealed copy in the old cache place is not trusted
    _fake_fashion(isolated / "cache" / "mcmi_lab" / "fashion-mnist" / "FashionMNIST" / "raw", value=9, gz=False)
    assert _first_pixel() == 5
    cached = fashion_mnist_root(download=False) / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    cached.write_bytes(cached.read_bytes()[:-5])  # cut short: no longer the copy its manifest describes
    with pytest.raises(FileNotFoundError, match="was not found"):
        load_dataset("fashion-mnist")


def test_offline_error_lists_three_ways(isolated):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion-mnist")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and datasets_mod.DATA_ENV in msg and "network" in msg
    assert "(1)" in msg and "(2)" in msg and "(3)" in msg
    with pytest.raises(FileNotFoundError, match="root="):
        load_dataset("fashion-mnist", root=isolated / "nothing")


def test_a_given_root_is_the_only_place_read(isolated, monkeypatch):
    _fake_fashion(isolated / "debian", value=1)
    assert _first_pixel() == 1  # the cache now holds Debian's copy: it must not stand in for a bad root
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion-mnist", root=isolated / "nonexistent")
    assert "nonexistent" in str(err.value) and "does not exist" in str(err.value) and "IDX" in str(err.value)
    _fake_fashion(isolated / "partial", gz=True)
    (isolated / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"partial.* holds no t10k-labels-idx1-ubyte \(nor \.gz\)"):
        load_dataset("fashion-mnist", root=isolated / "partial")
    monkeypatch.setenv(datasets_mod.DATA_ENV, str(isolated / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="MCMI_LAB_DATA.*elsewhere.* does not exist"):
        load_dataset("fashion-mnist")


@pytest.mark.parametrize("gz", [True, False])
def test_corrupt_files_are_one_line_and_never_poison_the_cache(isolated, gz):
    _fake_fashion(isolated / "bad", gz=gz)
    path = isolated / "bad" / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    if gz:
        with gzip.open(path) as f:
            payload = f.read()
        with gzip.open(path, "wb") as f:
            f.write(payload[:-100])  # a cut IDX file inside a valid gzip
    else:
        path.write_bytes(path.read_bytes()[:-100])
    for _ in range(2):  # the second time too: nothing was cached from the bad folder
        with pytest.raises(ValueError) as err:
            load_dataset("fashion-mnist", root=isolated / "bad")
        msg = str(err.value)
        assert "train-images-idx3-ubyte" in msg and "bad" in msg and "IDX header promises" in msg
        assert "\n" not in msg
    _fake_fashion(isolated / "debian", value=1)
    assert _first_pixel() == 1  # Debian's files read as they are: the bad folder left no trace


def test_not_idx_at_all_is_one_line(isolated):
    _fake_fashion(isolated / "junk", gz=False)
    (isolated / "junk" / "train-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte in root=.*junk.* has no unsigned-byte IDX header"):
        load_dataset("fashion-mnist", root=isolated / "junk")
    _fake_fashion(isolated / "gzjunk", gz=True)
    (isolated / "gzjunk" / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08 broken")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz in root=.*gzjunk.* is not readable"):
        load_dataset("fashion-mnist", root=isolated / "gzjunk")


def test_the_cache_is_keyed_by_the_source_content(isolated):
    _fake_fashion(isolated / "debian", value=1)
    assert _first_pixel() == 1
    _fake_fashion(isolated / "debian", value=4)  # the same folder, new content: not the old copy
    assert _first_pixel() == 4
    cached = fashion_mnist_root() / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    cached.write_bytes(cached.read_bytes()[:-1])  # a damaged copy is laid out again from its source
    assert _first_pixel() == 4 and len(load_dataset("fashion-mnist")) == 20


# ---- CIFAR in the real pickle layout --------------------------------------------------------------------------------

def _write_cifar(root, k):
    from torchvision.datasets import CIFAR10, CIFAR100
    cls = CIFAR10 if k == 10 else CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(k)
    key = "labels" if k == 10 else "fine_labels"
    md5 = {}
    for name, _ in cls.train_list + cls.test_list:
        n = 6
        batch = {"data": torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy(),
                 key: (torch.arange(n) % k).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    meta_key = cls.meta["key"]
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(k)]}, f)
    from torchvision.datasets.utils import calculate_md5
    for name in [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]:
        md5[name] = calculate_md5(str(folder / name))
    return cls, md5


@pytest.mark.parametrize("k", [10, 100])
def test_cifar_tiny_files_in_real_layout(tmp_path, monkeypatch, k):
    cls, md5 = _write_cifar(tmp_path, k)
    # the real integrity check runs, against the checksums of our tiny files
    monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5[n]] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=md5[cls.meta["filename"]]))
    train = load_dataset(f"cifar{k}", "train", root=tmp_path, download=False)
    test = load_dataset(f"cifar{k}", "test", root=tmp_path, download=False)
    n_train = 6 * len(cls.train_list)
    assert train.images.shape == (n_train, 3, 32, 32) and len(test) == 6
    assert train.num_classes == k and train.classes[1] == "class1" and train.pad == 4 and train.flip


def test_cifar_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 was not found.*cifar-10-batches-py/data_batch_1 is missing"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_cifar_offline_and_a_missing_root_are_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(datasets_mod.DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar100", download=True)
    assert "CIFAR-100 was not found" in str(err.value) and "URLError" in str(err.value)
    assert "network" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.* does not exist"):  # not created, not downloaded into
        load_dataset("cifar10", root=tmp_path / "nowhere", download=True)
    assert not (tmp_path / "nowhere").exists()


# ---- the registry ---------------------------------------------------------------------------------------------------

def test_the_registry_carries_each_class_count(monkeypatch):
    assert {name: spec.num_classes for name, spec in DATASETS.items()} == {
        "fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "synthetic": 10}
    assert dataset_classes("cifar100") == 100 and dataset_classes("nope") is None
    tiny = load_dataset("synthetic", n=12, num_classes=3, size=8)
    monkeypatch.setitem(DATASETS, "tiny", DatasetSpec(lambda split, root=None, download=True: tiny, 3))
    assert load_dataset("tiny", "test") is tiny  # one entry registers a data set: loading and the checks
    assert resolve_parameters("smoke", {"dataset": "tiny", "omit_classes": [2]})["dataset"] == "tiny"
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        resolve_parameters("smoke", {"dataset": "tiny", "omit_classes": [3]})
    with pytest.raises(ValueError, match="synthetic data set"):
        load_dataset("synthetic", root="/data")


# ---- a researcher's own files: .npz and ImageFolder -----------------------------------------------------------------

def _write_npz(path, layout="nhw", names=True, **override):
    g = np.random.default_rng(0)
    shape = {"nhw": (6, 5, 7), "nhwc": (6, 5, 7, 3), "nchw": (6, 3, 5, 7)}[layout]
    arrays = {"x_train": g.integers(0, 256, shape, dtype=np.uint8), "y_train": np.arange(6) % 3,
              "x_test": g.integers(0, 256, (4,) + shape[1:], dtype=np.uint8), "y_test": np.array([2, 0, 1, 0])}
    if names:
        arrays["classes"] = np.array(["ant", "bee", "cat"])
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_npz_in_the_keras_layout(tmp_path):
    arrays = _write_npz(tmp_path / "bugs.npz")
    train = load_dataset(str(tmp_path / "bugs.npz"), "train")
    test = load_dataset(tmp_path / "bugs.npz", "test")
    assert train.name == "bugs" and train.classes == ("ant", "bee", "cat") and test.classes == train.classes
    assert train.images.shape == (6, 1, 5, 7) and train.images.dtype == torch.uint8
    assert torch.equal(test.images[:, 0], torch.from_numpy(arrays["x_test"])) and test.labels.tolist() == [2, 0, 1, 0]
    assert test.mean == train.mean == pytest.approx((arrays["x_train"].mean() / 255,))  # train statistics for both
    assert train.pad == 0 and not train.flip


def test_npz_channels_last_and_first_and_float_agree(tmp_path):
    nhwc = _write_npz(tmp_path / "a.npz", "nhwc")["x_train"]
    _write_npz(tmp_path / "b.npz", "nchw", x_train=nhwc.transpose(0, 3, 1, 2))
    _write_npz(tmp_path / "c.npz", "nhwc", names=False, x_train=nhwc / 255.0, y_train=(np.arange(6) % 3)[:, None])
    a, b, c = (load_dataset(str(tmp_path / f"{n}.npz")) for n in "abc")
    assert a.images.shape == (6, 3, 5, 7) and torch.equal(a.images, b.images)
    assert torch.allclose(c.images, a.images.float() / 255) and c.classes == ("0", "1", "2")
    assert c.labels.tolist() == a.labels.tolist()


@pytest.mark.parametrize("override, fragment", [
    (dict(x_test=None), "holds no x_test"),
    (dict(x_train=np.zeros((6, 5, 7), np.float32) + 3), "expected uint8 0..255 or float in [0, 1]"),
    (dict(y_train=np.arange(6) / 2), "expected 6 integer class indices"),
    (dict(y_train=np.arange(5)), "expected 6 integer class indices"),
    (dict(x_train=np.zeros((6, 5, 7, 7), np.uint8)), "expected (N, H, W), (N, H, W, C) or (N, C, H, W)"),
    (dict(y_test=np.array([0, 1, 2, 3])), "holds class 3: expected indices below the 3 classes"),
    (dict(x_test=np.zeros((4, 6, 7), np.uint8)), "expected one image shape"),
    (dict(classes=np.array([{"a": 1}], dtype=object)), "classes in"),
])
def test_bad_npz_is_one_line_naming_the_file(tmp_path, override, fragment):
    _write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(ValueError) as err:
        load_dataset(str(tmp_path / "bad.npz"), "test")
    assert fragment in str(err.value) and "bad.npz" in str(err.value) and "\n" not in str(err.value)


def test_unreadable_or_missing_npz_is_one_line(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(ValueError, match="junk.npz is not a readable .npz"):
        load_dataset(str(tmp_path / "junk.npz"))
    with pytest.raises(FileNotFoundError, match="gone.npz' does not exist: expected an .npz with x_train"):
        load_dataset(str(tmp_path / "gone.npz"))
    with pytest.raises(ValueError, match="not accepted with the data set path"):
        load_dataset(str(tmp_path / "junk.npz"), root=tmp_path)


def _write_folder(root, mode="L", sizes=None):
    from PIL import Image
    g = np.random.default_rng(1)
    pixels = {}
    for split, per_class in (("train", 3), ("test", 1)):
        for name in ("dog", "cat"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                shape = (6, 5) if mode == "L" else (6, 5, 3)
                pixels[split, name, i] = g.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels[split, name, i], mode).save(root / split / name / f"{i}.png")
    return pixels


def test_image_folder_grey_and_rgb(tmp_path):
    pixels = _write_folder(tmp_path / "pets")
    train = load_dataset(str(tmp_path / "pets"), "train")
    test = load_dataset(str(tmp_path / "pets"), "test")
    assert train.name == "pets" and train.classes == ("cat", "dog")  # sorted, as torchvision's ImageFolder
    assert train.images.shape == (6, 1, 6, 5) and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(train.images[3, 0], torch.from_numpy(pixels["train", "dog", 0]))
    assert test.labels.tolist() == [0, 1] and test.mean == train.mean
    _write_folder(tmp_path / "rgb", mode="RGB")
    rgb = load_dataset(str(tmp_path / "rgb"), "test")
    assert rgb.images.shape == (2, 3, 6, 5) and len(rgb.mean) == 3


def test_bad_image_folders_are_one_line(tmp_path):
    from PIL import Image
    _write_folder(tmp_path / "sizes")
    Image.new("L", (9, 9)).save(tmp_path / "sizes" / "test" / "cat" / "big.png")
    with pytest.raises(ValueError, match=r"big.png is 9x9 where the training images are 5x6"):
        load_dataset(str(tmp_path / "sizes"), "test")
    _write_folder(tmp_path / "broken")
    (tmp_path / "broken" / "train" / "dog" / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"dog/1.png is not a readable image"):
        load_dataset(str(tmp_path / "broken"))
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="half' has no test/ folder"):
        load_dataset(str(tmp_path / "half"))
    with pytest.raises(FileNotFoundError, match="no-such-folder' does not exist: expected an .npz.*ImageFolder"):
        load_dataset(str(tmp_path / "no-such-folder"))
    with pytest.raises(ValueError, match="not known: expected one of .*npz.*ImageFolder"):
        load_dataset("fashion_mnist")


def test_the_dataset_parameter_takes_paths(tmp_path):
    _write_npz(tmp_path / "bugs.npz")
    _write_folder(tmp_path / "pets")
    check = PARAMETERS["dataset"].check
    for value in ("fashion-mnist", str(tmp_path / "bugs.npz"), str(tmp_path / "pets")):
        check("dataset", value, {})
    assert dataset_classes(str(tmp_path / "bugs.npz")) == 3 and dataset_classes(str(tmp_path / "pets")) == 2
    for value, fragment in ((str(tmp_path / "gone.npz"), "does not exist"), ("bugs.npz", "an absolute path"),
                            ("mnist2", "expected one of cifar10"), (str(tmp_path), "has no train/")):
        with pytest.raises(ValueError, match=fragment):
            check("dataset", value, {})
    with pytest.raises(ValueError, match=r"omit_classes\[0\]=3 .*\[0, 2\]"):
        resolve_parameters("smoke", {"dataset": str(tmp_path / "bugs.npz"), "omit_classes": [3]})
    with pytest.raises(ValueError, match="dataset="):
        check_dataset(7)
