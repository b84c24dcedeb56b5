import gzip
import pickle
import struct

import pytest
import torch

import mcmi_lab.data as data_mod
from mcmi_lab import (ImageData, batches, few_shot, from_dataset, from_tensors, load_dataset, omit_classes,
                      stratified_split, subset)
from mcmi_lab.data import augment_batch, epoch_generator


# ---- Fashion-MNIST ------------------------------------------------------------------------------------------

def test_fashion_mnist_real_files(fashion_train, fashion_test):
    assert fashion_train.images.shape == (60000, 1, 28, 28) and fashion_train.images.dtype == torch.uint8
    assert fashion_train.class_counts().tolist() == [6000] * 10
    assert len(fashion_test) == 10000 and fashion_train.num_classes == 10
    assert fashion_train.classes[0] == "T-shirt/top"


def test_few_shot_exact_and_seeded(fashion_train):
    a = few_shot(fashion_train, 0.05, seed=0)
    assert a.class_counts().tolist() == [300] * 10
    b = few_shot(fashion_train, 0.05, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = few_shot(fashion_train, 0.05, seed=1)
    assert not torch.equal(a.images, c.images)
    tiny = few_shot(fashion_train, 1e-6, seed=0)
    assert tiny.class_counts().tolist() == [1] * 10  # at least one per class


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


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No Debian files, an empty cache, no env var, and no network download."""
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data_mod.DATA_ENV, raising=False)

    def offline(cache):
        raise OSError("network unreachable")
    monkeypatch.setattr(data_mod, "_download_fashion_mnist", offline)
    return tmp_path


def test_search_order_root_env_debian_cache(isolated, monkeypatch):
    _fake_fashion(isolated / "debian", value=1)
    assert int(load_dataset("fashion-mnist").images[0, 0, 0, 0]) == 1  # Debian files
    _fake_fashion(isolated / "env", value=2, gz=False)
    monkeypatch.setenv(data_mod.DATA_ENV, str(isolated / "env"))
    # Debian files were laid out into the cache already; env comes before both
    got = load_dataset("fashion-mnist")
    assert len(got) == 20
    _fake_fashion(isolated / "root" / "FashionMNIST" / "raw", value=3, gz=False)
    assert int(load_dataset("fashion-mnist", root=isolated / "root").images[0, 0, 0, 0]) == 3
    assert len(load_dataset("fashion-mnist", "test", root=isolated / "root")) == 10


def test_cache_is_used_when_nothing_else(isolated):
    _fake_fashion(isolated / "cache" / "mcmi_lab" / "fashion-mnist" / "FashionMNIST" / "raw", value=5, gz=False)
    assert int(load_dataset("fashion-mnist").images[0, 0, 0, 0]) == 5


def test_offline_error_lists_three_ways(isolated):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion-mnist")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and data_mod.DATA_ENV in msg and "network" in msg
    assert "(1)" in msg and "(2)" in msg and "(3)" in msg
    with pytest.raises(FileNotFoundError, match="root="):
        load_dataset("fashion-mnist", root=isolated / "nothing")


# ---- CIFAR in the real pickle layout ------------------------------------------------------------------------------

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
    with pytest.raises(FileNotFoundError, match="CIFAR-10 was not found"):
        load_dataset("cifar10", root=tmp_path, download=False)


# ---- user data, views, bad input ---------------------------------------------------------------------------------

def test_from_tensors_and_dataset():
    images = torch.rand(10, 3, 8, 8)
    d = from_tensors(images, torch.arange(10) % 2, ["a", "b"])
    assert d.num_classes == 2 and d.in_channels == 3 and len(d.mean) == 3
    assert torch.allclose(torch.tensor(d.mean), images.mean((0, 2, 3)), atol=1e-6)
    ds = torch.utils.data.TensorDataset(images, torch.arange(10) % 2)
    d2 = from_dataset(ds, classes=["a", "b"])
    assert torch.equal(d2.images, images) and d2.labels.tolist() == (torch.arange(10) % 2).tolist()


def test_bad_input_messages():
    with pytest.raises(ValueError, match=r"not known: expected one of .*fashion-mnist"):
        load_dataset("mnist2")
    with pytest.raises(ValueError, match="split"):
        load_dataset("fashion-mnist", "val")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        from_tensors(torch.zeros(3, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="class indices"):
        ImageData(torch.zeros(2, 1, 4, 4), torch.tensor([0, 5]), ("a", "b"), (0.0,), (1.0,))
    d = from_tensors(torch.zeros(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]), 3)
    for fraction in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            few_shot(d, fraction)
    with pytest.raises(ValueError, match="omitted class 7"):
        omit_classes(d, [7])
    with pytest.raises(ValueError, match="at least one"):
        omit_classes(d, [0, 1, 2])


def test_omit_classes_and_subset():
    d = from_tensors(torch.zeros(30, 1, 4, 4), torch.arange(30) % 3, ["a", "b", "c"])
    o = omit_classes(d, ["b"])
    assert o.class_counts().tolist() == [10, 0, 10] and o.num_classes == 3
    s = subset(d, 7, seed=0)
    assert len(s) == 7 and (s.class_counts() >= 2).all()
    rest, val = stratified_split(d, 0.2, seed=0)
    assert val.class_counts().tolist() == [2, 2, 2] and len(rest) == 24


def test_augment_batch_is_pad_and_window_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (16, 2, 6, 6), generator=g, dtype=torch.uint8)
    out = augment_batch(x, 2, True, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    oy, ox = torch.randint(0, 5, (16,), generator=g), torch.randint(0, 5, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        ref = padded[i, :, oy[i]:oy[i] + 6, ox[i]:ox[i] + 6]
        ref = ref.flip(2) if flip[i] else ref
        assert torch.equal(out[i], ref)


def test_batches_cover_each_sample_once_and_shard_exactly():
    d = from_tensors(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).clone(),
                     torch.arange(10) % 2, 2, mean=(0.0,), std=(1.0,))
    idx = torch.cat([b[2] for b in batches(d, 3, shuffle=True, seed=1, index=True)])
    assert sorted(idx.tolist()) == list(range(10))
    again = torch.cat([b[2] for b in batches(d, 3, shuffle=True, seed=1, index=True)])
    assert torch.equal(idx, again)
    shards = [torch.cat([b[2] for b in batches(d, 4, rank=r, world_size=3, index=True)]) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))  # exact: no padding duplicates
    x, y = next(batches(d, 10))
    assert torch.allclose(x[:, 0, 0, 0], torch.arange(10) / 255.0)
    assert epoch_generator(1, 2).initial_seed() != epoch_generator(1, 3).initial_seed()


def test_ranks_draw_their_own_augmentation_and_one_process_draws_as_before():
    image = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)
    d = from_tensors(image.expand(64, 1, 8, 8).clone(), torch.arange(64) % 2, 2, pad=2, flip=True)
    kw = dict(shuffle=True, augment=True, seed=3, epoch=1)
    ranks = [torch.cat([x for x, _ in batches(d, 8, rank=r, world_size=2, **kw)]) for r in (0, 1)]
    assert not torch.equal(ranks[0], ranks[1])  # identical images: only the crops and flips can differ
    again = torch.cat([x for x, _ in batches(d, 8, rank=1, world_size=2, **kw)])
    assert torch.equal(again, ranks[1])  # reproducible per (seed, epoch, rank)
    single = torch.cat([x for x, _ in batches(d, 8, **kw)])
    gen = epoch_generator(3, 1)
    order = torch.randperm(64, generator=gen)  # one process: the order, then the crops from the same stream
    expected = torch.cat([d.normalize(augment_batch(d.images[order[i:i + 8]], 2, True, gen)) for i in range(0, 64, 8)])
    assert torch.equal(single, expected)
