"""Data sets as resident tensors, few-/zero-shot views, and batch iteration with tensor augmentation.

A data set is an :class:`ImageData`: images ``(N, C, H, W)`` (uint8 or float), labels ``(N,)``, class names and
normalisation statistics. A whole epoch lives on the training device; batches are cut and augmented there with
tensor ops (random crop through padding + offsets, horizontal flip), never per-sample Python. The named data sets
and the files behind them are in :mod:`mcmi_lab.data.registry`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..utils import check_float, check_int

#: The splits of every data set (``load_dataset`` in :mod:`mcmi_lab.data.registry` reads them).
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ImageData:
    """An image classification data set held as tensors.

    images: (N, C, H, W) uint8 (0..255) or float (already in [0, 1]); labels: (N,) int64 in [0, K).
    `mean`/`std` normalise a batch per channel; `pad`/`flip` are the training augmentation that suits the data.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "custom"
    pad: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4:
            shape = tuple(self.images.shape) if isinstance(self.images, torch.Tensor) else type(self.images).__name__
            raise ValueError(f"images of shape {shape} are not accepted: expected a tensor (N, C, H, W)")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise ValueError(f"labels of shape {tuple(getattr(self.labels, 'shape', ()))} are not accepted: "
                             f"expected a 1-D tensor of {len(self.images)} class indices")
        if self.labels.dtype != torch.long:
            object.__setattr__(self, "labels", self.labels.long())
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        k = len(self.classes)
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= k):
            raise ValueError(f"labels in [{int(self.labels.min())}, {int(self.labels.max())}] are not accepted: "
                             f"expected class indices in [0, {k - 1}] for {k} classes")
        c = self.images.shape[1]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std of length {len(self.mean)}/{len(self.std)} are not accepted: "
                             f"expected one value per channel ({c})")

    # ---- shape facts ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes)

    # ---- transforms -----------------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "ImageData":
        """The same data on `device` (no copy if already there)."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def take(self, index: torch.Tensor) -> "ImageData":
        """The samples at `index` (a 1-D index tensor), same classes and statistics."""
        index = index.to(self.labels.device)
        return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images -> normalised float32 (B, C, H, W)."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        dtype = torch.get_default_dtype()
        return (x - _channel_values(self.mean, x.device, dtype)) / _channel_values(self.std, x.device, dtype)


@functools.lru_cache(maxsize=64)
def _channel_values(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, C, 1, 1) tensor of per-channel values on `device`, made once: building it per batch copied it from the
    host each time, and on a GPU each such copy waits for all queued work (no run-ahead)."""
    with torch.inference_mode(False):  # a normal tensor, usable wherever the batch goes
        return torch.tensor(values, dtype=dtype).view(1, -1, 1, 1).to(device)


# ---- user data ------------------------------------------------------------------------------------------------

def from_tensors(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 name: str = "custom", pad: int = 0, flip: bool = False, unit_range: bool = True) -> ImageData:
    """Wrap user tensors. images: (N, C, H, W) uint8 or float in [0, 1] (`unit_range=False`: any real values, e.g.
    the synthetic task's Gaussian inputs); labels: (N,) integer class indices.

    `classes` may be names, a count, or None (then max(label)+1 classes named "0", "1", ...);
    `mean`/`std` default to the per-channel statistics of `images`.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images of shape {shape} are not accepted: expected a tensor (N, C, H, W)")
    if len(images) == 0:
        raise ValueError("an empty set of images is not accepted: expected at least one image")
    if images.shape[1] > 4 and images.shape[3] in (1, 3, 4):
        raise ValueError(f"images of shape {tuple(images.shape)} are not accepted: they look like (N, H, W, C) with "
                         f"{images.shape[3]} channel(s); expected (N, C, H, W): pass images.permute(0, 3, 1, 2)")
    if images.is_floating_point():
        finite = images[torch.isfinite(images)]  # a NaN is the training guard's to name, at its step
        low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 0.0)
        if unit_range and (low < 0 or high > 1):
            raise ValueError(f"float images in [{low:g}, {high:g}] are not accepted: expected values in [0, 1] "
                             "(divide 0..255 images by 255, or pass them as uint8; unit_range=False for real-valued "
                             "inputs that are not pixels)")
    elif images.dtype != torch.uint8:
        raise ValueError(f"images of dtype {images.dtype} are not accepted: expected uint8 (0..255) or float in [0, 1]")
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex():
        bad = labels[labels != labels.round()] if labels.is_floating_point() else labels
        if len(bad):
            raise ValueError(f"labels such as {bad[0].item()!r} are not accepted: expected integer class indices")
    if labels.dim() != 1 or len(labels) != len(images):
        raise ValueError(f"labels of shape {tuple(labels.shape)} are not accepted: expected a 1-D tensor of "
                         f"{len(images)} class indices")
    labels = labels.long()
    if classes is None:
        classes = int(labels.max()) + 1 if len(labels) else 0
    if isinstance(classes, int):
        classes = [str(i) for i in range(classes)]
    if mean is None or std is None:
        x = images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)
        mean = x.mean(dim=(0, 2, 3)).tolist() if mean is None else mean
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist() if std is None else std
    return ImageData(images, labels, tuple(classes), tuple(float(m) for m in mean),
                     tuple(float(s) for s in std), name=name, pad=pad, flip=flip)


def from_dataset(dataset, classes: Sequence[str] | None = None, **kwargs) -> ImageData:
    """Read any torchvision-style Dataset (items ``(image, label)``, image a PIL image or CHW tensor) into tensors.

    PIL images become uint8 tensors; tensors are kept as they are (float expected in [0, 1]).
    """
    from torchvision.transforms.functional import pil_to_tensor

    images, labels = [], []
    for i in range(len(dataset)):
        image, label = dataset[i]
        images.append(image if isinstance(image, torch.Tensor) else pil_to_tensor(image))
        labels.append(int(label))
    if not images:
        raise ValueError("an empty dataset is not accepted: expected at least one (image, label) item")
    classes = classes if classes is not None else getattr(dataset, "classes", None)
    return from_tensors(torch.stack(images), torch.tensor(labels), classes, **kwargs)


# ---- views ----------------------------------------------------------------------------------------------------

def few_shot(data: ImageData, fraction: float, seed: int = 0) -> ImageData:
    """A stratified, seeded subset keeping round(fraction * n_c) samples (at least 1) of every class c."""
    return data.take(_stratified_indices(data, fraction, seed))


def _stratified_indices(data: ImageData, fraction: float, seed: int) -> torch.Tensor:
    check_float("fraction", fraction, 0.0, 1.0, low_open=True)
    gen = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    labels = data.labels.cpu()
    keep = []
    for c in range(data.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx):
            keep.append(idx[torch.randperm(len(idx), generator=gen)[:max(1, round(fraction * len(idx)))]])
    return torch.cat(keep).sort().values


def omit_classes(data: ImageData, classes: Sequence[int | str]) -> ImageData:
    """The data without the samples of `classes` (indices or names). The label space stays the same (K outputs)."""
    if isinstance(classes, (int, str)):
        classes = [classes]
    indices = []
    for c in classes:
        if isinstance(c, str) and c in data.classes:
            c = data.classes.index(c)
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < data.num_classes:
            raise ValueError(f"omitted class {c!r} is not accepted: expected a class index in "
                             f"[0, {data.num_classes - 1}] or one of the names {list(data.classes)}")
        indices.append(c)
    if len(set(indices)) >= data.num_classes:
        raise ValueError(f"omitting classes {sorted(set(indices))} is not accepted: at least one of the "
                         f"{data.num_classes} classes must remain")
    mask = ~torch.isin(data.labels.cpu(), torch.tensor(indices, dtype=torch.long))
    return data.take(torch.nonzero(mask).flatten())


def subset(data: ImageData, n: int, seed: int = 0) -> ImageData:
    """n samples for smoke runs, drawn at random but interleaved across classes so that every class appears."""
    check_int("n", n, minimum=1, maximum=len(data))
    gen = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    perm = torch.randperm(len(data), generator=gen)
    labels = data.labels.cpu()[perm]
    # rank of each sample within its class, in the permuted order; taking the smallest ranks interleaves classes
    onehot = F.one_hot(labels, data.num_classes)
    rank = (onehot.cumsum(0) * onehot).sum(1)
    order = torch.argsort(rank * len(data) + torch.arange(len(data)))
    return data.take(perm[order[:n]].sort().values)


def stratified_split(data: ImageData, fraction: float, seed: int = 0) -> tuple[ImageData, ImageData]:
    """(rest, validation): a stratified validation part of `fraction`, for model selection that never reads
    the test set."""
    val = _stratified_indices(data, fraction, seed)
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[val] = False
    return data.take(torch.nonzero(mask).flatten()), data.take(val)


# ---- batches --------------------------------------------------------------------------------------------------

def augment_batch(images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding `pad`, then a random HxW window) and random horizontal flip, on a whole batch.

    images: (B, C, H, W) on any device; the random numbers come from the CPU `generator` so that a run is the same
    on every device.
    """
    draws = _augment_draws(len(images), pad, flip, generator)
    return _apply_augment(images, pad, flip, None if draws is None else draws.to(images.device, non_blocking=True))


def _augment_draws(b: int, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor | None:
    """The random numbers of one batch's augmentation, drawn on the CPU in this order: (row shift, column shift,
    flip) rows of a (k, b) tensor (the shifts only with `pad`, the flip only with `flip`), or None."""
    draws = []
    if pad > 0:
        draws += [torch.randint(0, 2 * pad + 1, (b,), generator=generator) for _ in range(2)]
    if flip:
        draws.append((torch.rand(b, generator=generator) < 0.5).long())
    return torch.stack(draws) if draws else None


def _apply_augment(images: torch.Tensor, pad: int, flip: bool, draws: torch.Tensor | None) -> torch.Tensor:
    """augment_batch with its draws given (on the images' device: moved in one copy that does not wait for queued
    GPU work)."""
    b, c, h, w = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if pad > 0:
        images = F.pad(images, (pad, pad, pad, pad))
        rows = rows + draws[0][:, None]
        cols = cols + draws[1][:, None]
    if flip:
        cols = torch.where(draws[-1][:, None].bool(), cols.flip(1), cols)
    # Window and flip are one gather over the flattened planes: 4-8x faster on a CPU than indexing with four
    # broadcast index tensors (see benchmarks/README.md).
    hp, wp = images.shape[2:]
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return images.reshape(b, c, hp * wp).gather(2, index).view(b, c, h, w)


def epoch_generator(seed: int, epoch: int, rank: int | None = None) -> torch.Generator:
    """The CPU generator for one epoch's order and augmentation: a function of (seed, epoch) only, so a resumed
    run draws exactly what an uninterrupted one would have; with `rank`, a stream of that rank's own (a hash:
    the CPU generator keeps only the low 32 bits of a seed)."""
    if rank is None:
        return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    digest = hashlib.blake2b(f"{int(seed)},{int(epoch)},{int(rank)}".encode(), digest_size=4).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def batches(data: ImageData, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0,
            epoch: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
            index: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield normalised ``(images, labels)`` batches (and the sample indices when `index`) on `data`'s device.

    With `world_size` > 1 the epoch's permutation is cut into equal per-rank shards (the tail that does not divide
    is dropped when shuffling, so every rank takes the same number of steps); without shuffling the shards are
    contiguous and exact (no padding duplicates). Every rank draws its own augmentation (crops and flips) from a
    generator of (seed, epoch, rank); a single process draws them from the order's generator, as before.
    """
    check_int("batch_size", batch_size, minimum=1)
    gen = epoch_generator(seed, epoch)
    n = len(data)
    if shuffle:
        order = torch.randperm(n, generator=gen)
        per_rank = n // world_size
        order = (order[rank * per_rank:(rank + 1) * per_rank] if world_size > 1 else order).to(data.device)
        first, last = 0, len(order)
    else:  # a contiguous shard, cut in slices: no gather and no index tensor of length N (memory O(batch))
        order = None
        first, last = n * rank // world_size, n * (rank + 1) // world_size
    if world_size > 1:  # the same order on every rank, but not the same crops and flips
        gen = epoch_generator(seed, epoch, rank)
    stop = last - ((last - first) % batch_size if drop_last else 0)
    for start in range(first, stop, batch_size):
        end = min(start + batch_size, last)
        if order is None:
            idx = torch.arange(start, end, device=data.device) if index else None
            images, labels = data.images[start:end], data.labels[start:end].clone()
        else:
            idx = order[start:end]
            images, labels = data.images[idx], data.labels[idx]
        if augment and (data.pad or data.flip):
            images = augment_batch(images, data.pad, data.flip, gen)
        out = (data.normalize(images), labels)
        yield (out + (idx,)) if index else out


def stacked_batches_problem(datas: Sequence[ImageData]) -> str | None:
    """Why :func:`stacked_batches` cannot serve these data sets (None when it can): they must agree in size, image
    shape and dtype, normalisation, augmentation and device."""
    first = datas[0]
    for i, d in enumerate(datas[1:], 1):
        if (len(d), d.images.shape[1:], d.images.dtype, d.mean, d.std, d.pad, d.flip, d.device) != (
                len(first), first.images.shape[1:], first.images.dtype, first.mean, first.std, first.pad, first.flip,
                first.device):
            return f"data set {i} differs from data set 0 in size, shape, dtype, normalisation, augmentation or device"
    return None


def stacked_batches(datas: Sequence[ImageData], batch_size: int, *, seeds: Sequence[int], epoch: int = 0,
                    augment: bool = False, drop_last: bool = False
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For N models trained together: per step, ``(images (N, B, C, H, W), labels (N, B), indices (N, B))``, where
    member i's slice is exactly the batch ``batches(datas[i], shuffle=True, augment=augment, seed=seeds[i],
    epoch=epoch, drop_last=drop_last, index=True)`` yields (the same order and crops and flips, drawn from the same
    generators in the same order), made with one gather, one augmentation and one normalisation for all members:
    on a GPU a step's host work no longer grows with N. The data sets must agree (:func:`stacked_batches_problem`);
    the same data set may serve several members (it is held once)."""
    check_int("batch_size", batch_size, minimum=1)
    problem = stacked_batches_problem(datas)
    if problem:
        raise ValueError(f"stacked_batches: {problem}")
    pools, offsets = {}, []
    for d in datas:  # each distinct data set once, members index into the pool
        if id(d.images) not in pools:
            pools[id(d.images)] = (d, sum(len(x) for x, _ in pools.values()))
        offsets.append(pools[id(d.images)][1])
    first = datas[0]
    if len(pools) == 1:
        images_pool, labels_pool = first.images, first.labels
    else:
        images_pool = torch.cat([d.images for d, _ in pools.values()])
        labels_pool = torch.cat([d.labels for d, _ in pools.values()])
    gens = [epoch_generator(s, epoch) for s in seeds]
    n, members = len(first), len(datas)
    offsets = torch.tensor(offsets)[:, None]
    orders = torch.stack([torch.randperm(n, generator=g) for g in gens])
    local = orders.to(first.device)
    pooled = (orders + offsets).to(first.device)
    augmenting = augment and (first.pad or first.flip)
    stop = n - (n % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        b = end - start
        images = images_pool[pooled[:, start:end].reshape(-1)]
        if augmenting:
            draws = torch.cat([_augment_draws(b, first.pad, first.flip, g) for g in gens], 1)
            images = _apply_augment(images, first.pad, first.flip, draws.to(first.device, non_blocking=True))
        labels = labels_pool[pooled[:, start:end].reshape(-1)].view(members, b)
        yield first.normalize(images).unflatten(0, (members, b)), labels, local[:, start:end]
