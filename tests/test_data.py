import pytest
import torch

from mcmi_lab import (ImageData, batches, few_shot, from_dataset, from_tensors, load_dataset, omit_classes,
                      stratified_split, subset)
from mcmi_lab.data.core import augment_batch, epoch_generator


# ---- Fashion-MNIST (its discovery and cache, and CIFAR: tests/test_datasets.py) -----------------------------

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


def test_stacked_batches_are_each_members_own_batches():
    """stacked_batches (fit_stack's data path: one gather, augmentation and normalisation for N members) against
    its brute-force reference, one `batches` per member: bit-identical images, labels and indices, with two data
    sets (one of them serving two members), three seeds, with and without augmentation and the dropped tail."""
    from mcmi_lab.data.core import stacked_batches

    def data(seed):
        images = torch.randint(0, 256, (37, 2, 9, 9), generator=torch.Generator().manual_seed(seed),
                               dtype=torch.uint8)
        return from_tensors(images, torch.arange(37) % 3, 3, mean=[0.3, 0.5], std=[0.2, 0.4], pad=2, flip=True)
    a, b = data(1), data(2)
    datas, seeds = [a, b, a], [0, 3, 5]
    for augment in (True, False):
        for drop_last in (False, True):
            got = list(stacked_batches(datas, 8, seeds=seeds, epoch=2, augment=augment, drop_last=drop_last))
            refs = [list(batches(d, 8, shuffle=True, augment=augment, seed=s, epoch=2, drop_last=drop_last,
                                 index=True)) for d, s in zip(datas, seeds)]
            assert len(got) == len(refs[0]) == (4 if drop_last else 5)
            for step, (images, labels, indices) in enumerate(got):
                assert images.shape == (3, len(refs[0][step][1]), 2, 9, 9)
                for i in range(3):
                    assert torch.equal(images[i], refs[i][step][0])
                    assert torch.equal(labels[i], refs[i][step][1])
                    assert torch.equal(indices[i], refs[i][step][2])
    assert not torch.equal(got[0][0][0], got[0][0][2])  # one data set, two seeds: two orders
    short = from_tensors(torch.zeros(36, 2, 9, 9, dtype=torch.uint8), torch.arange(36) % 3, 3, pad=2, flip=True)
    with pytest.raises(ValueError, match="data set 1 differs from data set 0 in size"):
        next(stacked_batches([a, short], 8, seeds=[0, 1]))
