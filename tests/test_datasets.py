import gzip
import pickle
import struct
import urllib.error

import numpy as np
import pytest
import torch

import mcmi_lab.data.registry as datasets_mod
from mcmi_lab import DATASETS, load_dataset
from mcmi_lab.data.registry import DatasetSpec, check_dataset, dataset_classes, fashion_mnist_root
from mcmi_lab.study.pipelines import PARAMETERS, resolve_parameters


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


# ---- issue 31: hostile and odd own data -------------------------------------------------------------------------

def _one_line(err, *fragments):
    text = str(err.value)
    assert "\n" not in text and all(f in text for f in fragments), text


def test_uint8_labels_load_and_pass_the_dataset_check(tmp_path):
    _write_npz(tmp_path / "keras.npz", names=False, y_train=(np.arange(6) % 3).astype(np.uint8),
               y_test=np.array([[2], [0], [1], [0]], np.uint8))
    check_dataset(str(tmp_path / "keras.npz"))
    assert dataset_classes(str(tmp_path / "keras.npz")) == 3
    test = load_dataset(str(tmp_path / "keras.npz"), "test")
    assert test.labels.dtype == torch.int64 and test.labels.tolist() == [2, 0, 1, 0] and test.classes == ("0", "1", "2")


def _npz_with_header(path, key_shapes):
    """An .npz whose members' .npy headers declare `key_shapes` (key -> (shape, dtype)) but hold 8 bytes of data."""
    import io
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        for key, (shape, dtype) in key_shapes.items():
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                       "shape": shape})
            z.writestr(f"{key}.npy", buf.getvalue() + b"\0" * 8)


def test_npz_sizes_are_read_from_the_headers_before_any_data(tmp_path, monkeypatch):
    _npz_with_header(tmp_path / "huge.npz", {"x_train": ((10, 4, 4), "u1"), "y_train": ((10**11,), "<i8"),
                                             "x_test": ((2, 4, 4), "u1"), "y_test": ((2,), "<i8")})
    for call in (lambda: load_dataset(str(tmp_path / "huge.npz")), lambda: check_dataset(str(tmp_path / "huge.npz"))):
        with pytest.raises(ValueError) as err:  # was a raw _ArrayMemoryError (745 GiB)
            call()
        _one_line(err, "huge.npz", "(745 GiB) decoded", "MCMI_LAB_MAX_DATA_BYTES")
    # a large x_train stored small: refused from its header, before anything is decompressed
    np.savez_compressed(tmp_path / "bomb.npz", x_train=np.zeros((40, 50, 50), np.uint8), y_train=np.arange(40) % 2,
                        x_test=np.zeros((2, 50, 50), np.uint8), y_test=np.arange(2))
    monkeypatch.setenv("MCMI_LAB_MAX_DATA_BYTES", "50000")
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda *a: pytest.fail("data was decompressed"))
    with pytest.raises(ValueError) as err:
        load_dataset(str(tmp_path / "bomb.npz"))
    _one_line(err, "bomb.npz would take", "more than the limit of 50,000 bytes")
    monkeypatch.setenv("MCMI_LAB_MAX_DATA_BYTES", "lots")
    with pytest.raises(ValueError, match=r"MCMI_LAB_MAX_DATA_BYTES='lots' is not accepted"):
        load_dataset(str(tmp_path / "bomb.npz"))


def test_the_class_count_is_bounded_by_the_labels_present(tmp_path):
    _write_npz(tmp_path / "far.npz", names=False, y_train=np.array([0, 1, 2, 0, 1, 10**9]))
    with pytest.raises(ValueError) as err:  # was 10**9 class names built
        load_dataset(str(tmp_path / "far.npz"))
    _one_line(err, "y_train in", "has no sample of class 3 of the 1000000001 classes")


@pytest.mark.parametrize("override, fragment", [
    (dict(classes=np.array(["ant", "bee", "cat", "dog"])), "has no sample of class 3 ('dog') of the 4 classes"),
    (dict(y_train=np.array([0, 2, 0, 2, 0, 2])), "has no sample of class 1 ('bee')"),
    (dict(names=False, y_train=np.array([0, 1, 0, 1, 0, 1])), "y_test in"),
])
def test_label_coverage_is_refused_at_the_dataset_check(tmp_path, override, fragment):
    _write_npz(tmp_path / "gaps.npz", **override)
    with pytest.raises(ValueError) as err:  # the -p dataset check: before 01 trains anything
        PARAMETERS["dataset"].check("dataset", str(tmp_path / "gaps.npz"), {})
    _one_line(err, "gaps.npz", fragment)


def test_a_truncated_npz_is_one_line(tmp_path):
    _write_npz(tmp_path / "whole.npz")
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    for call in (lambda: load_dataset(str(tmp_path / "cut.npz")), lambda: check_dataset(str(tmp_path / "cut.npz"))):
        with pytest.raises(ValueError) as err:  # was zipfile.BadZipFile
            call()
        _one_line(err, "cut.npz")


@pytest.mark.parametrize("names, fragment", [
    (np.array([b"ant", b"b\xffe", b"cat"]), "name 1 (b'b\\xffe') is not valid UTF-8"),
    (np.array(["ant", "b\udc80e", "cat"]), "name 1 ('b\\udc80e') is not valid UTF-8"),
])
def test_class_names_that_are_not_text_name_the_file(tmp_path, names, fragment):
    _write_npz(tmp_path / "names.npz", classes=names)
    with pytest.raises(ValueError) as err:
        load_dataset(str(tmp_path / "names.npz"))
    _one_line(err, "classes in", "names.npz", fragment)


def test_a_class_folder_named_in_no_utf8_is_one_line(tmp_path):
    import os
    _write_folder(tmp_path / "pets")
    os.rename(tmp_path / "pets" / "train" / "cat", os.fsencode(tmp_path / "pets" / "train") + b"/c\xffat")
    with pytest.raises(ValueError) as err:
        load_dataset(str(tmp_path / "pets"))
    _one_line(err, "pets/train holds a class folder whose name is not valid UTF-8 ('c\\udcffat')")


def test_decompression_bombs_and_large_folders_are_one_line(tmp_path, monkeypatch):
    from PIL import Image
    _write_folder(tmp_path / "pets")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 6x5 = 30 pixels > 2 x 10: PIL's DecompressionBombError
    with pytest.raises(ValueError) as err:
        load_dataset(str(tmp_path / "pets"))
    _one_line(err, "0.png is refused as a possible decompression bomb", "PIL.Image.MAX_IMAGE_PIXELS")
    monkeypatch.undo()
    monkeypatch.setenv("MCMI_LAB_MAX_DATA_BYTES", str(6 * 30 - 1))  # six 6x5 grey images: 180 bytes
    with pytest.raises(ValueError) as err:
        load_dataset(str(tmp_path / "pets"))
    _one_line(err, "pets/train would take 180 bytes", "MCMI_LAB_MAX_DATA_BYTES")
    monkeypatch.setenv("MCMI_LAB_MAX_DATA_BYTES", str(6 * 30))
    assert len(load_dataset(str(tmp_path / "pets"))) == 6


def test_sixteen_bit_and_float_grey_images_keep_their_range(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for k, name in enumerate(("dark", "light")):
            (tmp_path / "deep" / split / name).mkdir(parents=True)
            value = (1000, 60000)[k]
            Image.fromarray(np.full((4, 3), value, np.uint16)).save(tmp_path / "deep" / split / name / "a.png")
            Image.fromarray(np.full((4, 3), (0.25, 1.0)[k], np.float32)).save(
                tmp_path / "deep" / split / name / "b.tif")
    data = load_dataset(str(tmp_path / "deep"))  # both once loaded as 255 (16-bit) and 0 (float): std 0
    assert data.in_channels == 1
    expected = [round(1000 * 255 / 65535), round(0.25 * 255), round(60000 * 255 / 65535), 255]
    assert data.images[:, 0, 0, 0].tolist() == expected
    assert data.std[0] > 0.1
    Image.fromarray(np.full((4, 3), 2.5, np.float32)).save(tmp_path / "deep" / "train" / "dark" / "c.tif")
    with pytest.raises(ValueError) as err:
        load_dataset(str(tmp_path / "deep"))
    _one_line(err, "c.tif (mode F) holds values 2.5..2.5: expected float values in [0, 1]")


def test_image_folders_skip_hidden_folders_and_include_nested_ones(tmp_path):
    from PIL import Image
    pixels = _write_folder(tmp_path / "pets")
    for split in ("train", "test"):  # what Jupyter leaves behind
        (tmp_path / "pets" / split / ".ipynb_checkpoints").mkdir()
        (tmp_path / "pets" / split / "cat" / ".ipynb_checkpoints").mkdir()
        Image.new("L", (9, 9)).save(tmp_path / "pets" / split / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (tmp_path / "pets" / "test" / "dog" / "more" / "deeper").mkdir(parents=True)
    extra = np.full((6, 5), 77, np.uint8)
    Image.fromarray(extra).save(tmp_path / "pets" / "test" / "dog" / "more" / "deeper" / "x.png")
    test = load_dataset(str(tmp_path / "pets"), "test")  # as torchvision's ImageFolder: nested files count
    assert test.classes == ("cat", "dog") and test.labels.tolist() == [0, 1, 1]
    assert torch.equal(test.images[1, 0], torch.from_numpy(pixels["test", "dog", 0]))
    assert torch.equal(test.images[2, 0], torch.from_numpy(extra))
    check_dataset(str(tmp_path / "pets"))


def test_class_names_with_dollars_are_drawn_as_written(tmp_path):
    """A class name `$x^$` failed notebooks 02 and 06 with "ValueError: x^" (matplotlib's math text)."""
    from mcmi_lab.figures.plots import plot_confusion, plot_kl_distributions, plot_output_projection, plot_per_class_cmi
    from mcmi_lab.utils import mpl_text
    assert mpl_text("$x^$ costs 5$") == r"\$x^\$ costs 5\$" and mpl_text("plain") == "plain"
    classes = ("$x^$", "b$")
    labels = torch.tensor([0, 1, 0, 1])
    plot_per_class_cmi({"mll": torch.tensor([0.1, 0.2])}, classes, path=tmp_path / "a.png")
    plot_kl_distributions(torch.rand(4), labels, torch.rand(4), labels, classes, path=tmp_path / "b.png")
    plot_output_projection({"mll": torch.randn(4, 2)}, labels, classes, path=tmp_path / "c.png")
    fig = plot_confusion(torch.tensor([[3, 1], [0, 4]]), classes, path=tmp_path / "d.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [r"\$x^\$", r"b\$"]
    assert all((tmp_path / f"{n}.png").stat().st_size > 0 for n in "abcd")
