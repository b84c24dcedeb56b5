"""Named data sets and the files behind them: the registry, the loaders, and where the files are found.

``load_dataset(name, split, root)`` takes a name of :data:`DATASETS` or a researcher's own files: a path to an
``.npz`` (Keras layout: ``x_train, y_train, x_test, y_test``, optional ``classes``) or a folder in torchvision's
``ImageFolder`` layout with ``train/`` and ``test/``. Every loader returns an :class:`~mcmi_lab.data.core.ImageData`.

A folder the user names (``root=`` or ``$MCMI_LAB_DATA``) is the only place read: a missing or bad one is one clear
error naming the folder and the file, never a silent fall-back to another copy. This module only finds and reads
files; installing Debian's package is ``mcmi-lab data``'s job.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .core import SPLITS, ImageData
from .synthetic import load_synthetic
from .user_files import FOLDER_ACCEPTED, NPZ_ACCEPTED, load_image_folder, load_npz, path_num_classes
from ..utils import check_choice

#: Environment variable naming a directory that holds Fashion-MNIST (IDX files, gzipped or not) or CIFAR.
DATA_ENV = "MCMI_LAB_DATA"
#: Where Debian's `dataset-fashion-mnist` package puts the files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
_FASHION_ACCEPTED = (f"the four Fashion-MNIST IDX files ({', '.join(FASHION_FILES)}, optionally .gz) or "
                     "torchvision's FashionMNIST/raw/")


def cache_dir() -> Path:
    """The user cache directory: $XDG_CACHE_HOME/mcmi_lab (default ~/.cache/mcmi_lab)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mcmi_lab"


# ---- the registry and the one entry point -----------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: ``load(split, root=None, download=True, **kwargs) -> ImageData`` and its class count
    (known before anything is loaded, e.g. to check omitted classes)."""

    load: Callable[..., ImageData]
    num_classes: int


def load_dataset(name: str | os.PathLike = "fashion-mnist", split: str = "train",
                 root: str | os.PathLike | None = None, download: bool = True, **kwargs) -> ImageData:
    """Load a data set split as an :class:`ImageData` (CPU tensors).

    name: one of ``DATASETS`` ("fashion-mnist", the default, is found offline, see :func:`fashion_mnist_root`), a
    path to an ``.npz`` (:func:`load_npz`) or an ImageFolder folder (:func:`load_image_folder`); split: "train" or
    "test". `kwargs` go to the registered loader (e.g. the synthetic task's knobs).
    """
    check_choice("split", split, SPLITS)
    if isinstance(name, str) and name in DATASETS:
        return DATASETS[name].load(split, root=root, download=download, **kwargs)
    path = _path_dataset(name)
    if path is None and isinstance(name, (str, os.PathLike)) and os.sep in str(name):
        raise FileNotFoundError(f"data set {str(name)!r} does not exist: expected {NPZ_ACCEPTED} or "
                                f"{FOLDER_ACCEPTED}")
    if path is None:
        raise ValueError(f"data set {str(name)!r} is not known: expected one of {', '.join(sorted(DATASETS))}, "
                         f"{NPZ_ACCEPTED} or {FOLDER_ACCEPTED}")
    if root is not None or kwargs:
        extra = ", ".join((["root="] if root is not None else []) + [f"{k}=" for k in kwargs])
        raise ValueError(f"{extra} is not accepted with the data set path {str(path)!r}: the path is all it reads")
    return load_npz(path, split) if path.suffix == ".npz" else load_image_folder(path, split)


def _path_dataset(name) -> Path | None:
    """`name` as a path when it names an .npz (existing or not: then load_npz says it is missing) or a folder."""
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        return None
    path = Path(name).expanduser()
    return path if path.suffix == ".npz" or path.is_dir() else None


def dataset_classes(name) -> int | None:
    """The class count of a registered name or a path data set; None when it cannot be told."""
    if isinstance(name, str) and name in DATASETS:
        return DATASETS[name].num_classes
    try:
        return path_num_classes(_path_dataset(name))
    except (ValueError, OSError, TypeError):
        return None


def data_fingerprint(name) -> dict[str, Any]:
    """What a data set held, to tell a run made on other data: ``{"dataset": name}`` for a registered name (its
    files are checked where they are found: Fashion-MNIST's sizes and headers, CIFAR's md5 sums), and for a path
    ``{"dataset": path, "bytes": size, "blake2b": digest}`` of the .npz, or of a folder's files (their paths relative
    to it, sizes and contents, in sorted order; hidden ones left out, as the loader leaves them out)."""
    if not isinstance(name, (str, os.PathLike)) or (isinstance(name, str) and name in DATASETS):
        return {"dataset": name}
    path = _path_dataset(name)
    if path is None or not path.exists():
        return {"dataset": str(name)}
    files = [path] if path.is_file() else sorted(  # hidden files and folders are not data (.ipynb_checkpoints)
        p for p in path.rglob("*") if p.is_file() and not any(q.startswith(".") for q in p.relative_to(path).parts))
    digest = hashlib.blake2b(digest_size=16)
    for f in files:
        digest.update(f"{f.relative_to(path) if f != path else ''}\0{f.stat().st_size}\0{_file_digest(f)}\0".encode())
    return {"dataset": str(name), "bytes": sum(f.stat().st_size for f in files), "blake2b": digest.hexdigest()}


def check_dataset(value, name: str = "dataset") -> None:
    """One ValueError line unless `value` is a registered name or an absolute path to a readable .npz or
    ImageFolder folder (absolute: the notebooks run in their own folder)."""
    if isinstance(value, str) and value in DATASETS:
        return
    path = _path_dataset(value)
    if path is None:
        raise ValueError(f"{name}={value!r} is not accepted: expected one of {', '.join(sorted(DATASETS))}, "
                         f"{NPZ_ACCEPTED} or {FOLDER_ACCEPTED}")
    if not path.is_absolute():
        raise ValueError(f"{name}={value!r} is not accepted: expected an absolute path (the notebooks run in "
                         "their own folder)")
    try:
        path_num_classes(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{name}={value!r} is not accepted: {err}") from None


# ---- Fashion-MNIST: discovery, a cache keyed by its source, a strict IDX reader -----------------------------------

def load_fashion_mnist(split: str = "train", root=None, download: bool = True) -> ImageData:
    raw = fashion_mnist_root(root, download) / "FashionMNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(raw / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte")
    _check_fashion_labels(labels, raw / f"{prefix}-labels-idx1-ubyte")
    return ImageData(images.unsqueeze(1).contiguous(), labels.long(), FASHION_CLASSES, (0.2860,), (0.3530,),
                     name="fashion-mnist", pad=2, flip=True)


def fashion_mnist_root(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """A checked directory in torchvision's layout (``<dir>/FashionMNIST/raw/`` with the four plain IDX files).

    With `root` (else $MCMI_LAB_DATA, when set) that folder is the only place read. Otherwise: Debian's
    ``/usr/share/datasets/fashion-mnist``, then a copy downloaded by torchvision into the user cache (when
    `download`). Gzipped or flat sources are decompressed once into ``<cache>/fashion-mnist/<key>/``, keyed by the
    source's path and content and checked against its manifest before every use.
    """
    if root is not None or os.environ.get(DATA_ENV):
        label = f"root={str(root)!r}" if root is not None else f"${DATA_ENV}={os.environ[DATA_ENV]!r}"
        folder = Path(root if root is not None else os.environ[DATA_ENV])
        return _lay_out(label, _find_fashion_files(label, folder, required=True))
    found = _find_fashion_files(f"Debian's {DEBIAN_FASHION_MNIST}", DEBIAN_FASHION_MNIST, required=False)
    if found is not None:
        return _lay_out(f"Debian's {DEBIAN_FASHION_MNIST}", found)
    downloaded = cache_dir() / "fashion-mnist" / "download"
    if _sealed(downloaded):
        return downloaded
    reason = ""
    if download:
        try:
            _download_fashion_mnist(downloaded)
            _seal(f"the download in {downloaded}", downloaded, source="torchvision download")
            return downloaded
        except Exception as err:  # offline: fall through to the one clear error below
            reason = f" (download failed: {type(err).__name__}: {err})"
    raise FileNotFoundError(
        "Fashion-MNIST was not found" + reason + ". Get it one of three ways: "
        "(1) `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files in /usr/share/datasets/fashion-mnist), "
        f"(2) point ${DATA_ENV} or root= at a directory holding the four IDX files, "
        f"(3) run once with a network so torchvision downloads it into {downloaded}.")


def _download_fashion_mnist(dest: Path) -> None:
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(dest), train=True, download=True)


def _find_fashion_files(label: str, folder: Path, required: bool) -> dict[str, Path] | None:
    """name -> file (plain or .gz) of the four IDX files in `folder` or its FashionMNIST/raw/; None when not
    `required` and none is there; else one FileNotFoundError naming the folder and the missing files."""
    if not folder.is_dir():
        if not required:
            return None
        raise FileNotFoundError(f"{label} does not exist: expected a folder holding {_FASHION_ACCEPTED}")
    best: dict[str, Path | None] = {}
    for where in (folder / "FashionMNIST" / "raw", folder):
        found = {f: next((where / n for n in (f, f + ".gz") if (where / n).is_file()), None) for f in FASHION_FILES}
        if all(found.values()):
            return found
        if sum(p is not None for p in found.values()) > sum(p is not None for p in best.values()):
            best = found
    if not required and not best:
        return None
    missing = [f for f in FASHION_FILES if best.get(f) is None]
    raise FileNotFoundError(f"{label} holds no {', '.join(missing)} (nor .gz): expected {_FASHION_ACCEPTED}")


def _lay_out(label: str, files: dict[str, Path]) -> Path:
    """A torchvision-layout root for `files`: their own folder when it is one, else a checked, keyed cache copy."""
    raw = files[FASHION_FILES[0]].parent
    if raw.parts[-2:] == ("FashionMNIST", "raw") and all(p.suffix != ".gz" for p in files.values()):
        for path in files.values():
            _idx_dims(path, label)
        return raw.parent.parent
    digest = hashlib.blake2b(str(raw.resolve()).encode(), digest_size=10)
    for name in FASHION_FILES:
        digest.update(name.encode() + _file_digest(files[name]).encode())
    entry = cache_dir() / "fashion-mnist" / digest.hexdigest()
    if _sealed(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        (tmp / "FashionMNIST" / "raw").mkdir(parents=True)
        for name, path in files.items():
            try:
                with _open_idx(path) as src, open(tmp / "FashionMNIST" / "raw" / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (EOFError, zlib.error, gzip.BadGzipFile) as err:
                raise ValueError(f"{path} in {label} is not readable ({type(err).__name__}: {err}): "
                                 f"expected {_FASHION_ACCEPTED}") from None
        _seal(label, tmp, source=str(raw.resolve()), files=files)
        shutil.rmtree(entry, ignore_errors=True)  # a damaged copy (it failed the manifest check)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process laid out the same source first
            if not _sealed(entry):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _seal(label: str, root: Path, source: str, files: dict[str, Path] | None = None) -> None:
    """Check the four plain files under `root` completely, then write the manifest that :func:`_sealed` trusts."""
    raw = root / "FashionMNIST" / "raw"
    shown = files or {f: raw / f for f in FASHION_FILES}
    counts = {}
    for name in FASHION_FILES:
        data = read_idx(raw / name, label, shown=shown[name])
        if "labels" in name:
            _check_fashion_labels(data, shown[name], label)
        counts[name] = len(data)
        if name.endswith("labels-idx1-ubyte") and counts[name] != counts[name.replace("labels-idx1", "images-idx3")]:
            raise ValueError(f"{shown[name]} in {label} holds {counts[name]} labels for "
                             f"{counts[name.replace('labels-idx1', 'images-idx3')]} images: expected one per image")
    sizes = {name: (raw / name).stat().st_size for name in FASHION_FILES}
    (root / "manifest.json").write_text(json.dumps({"source": source, "sizes": sizes}))


def _sealed(root: Path) -> bool:
    """True when `root` holds the four files with the sizes (and IDX headers) its manifest recorded."""
    try:
        sizes = json.loads((root / "manifest.json").read_text())["sizes"]
        raw = root / "FashionMNIST" / "raw"
        return all((raw / f).stat().st_size == sizes[f] and _idx_dims(raw / f, str(root)) for f in FASHION_FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_idx(path: Path):
    return gzip.open(path) if path.suffix == ".gz" else open(path, "rb")


def _idx_dims(path: Path, label: str, shown: Path | None = None, size: int | None = None) -> tuple[int, ...]:
    """The dimensions in an unsigned-byte IDX header, checked against the file size (plain files: the stat)."""
    shown = shown or path
    try:
        with _open_idx(path) as f:
            header = f.read(4)
            if len(header) < 4 or header[:3] != b"\0\0\x08" or not 1 <= header[3] <= 3:
                raise ValueError(f"{shown} in {label} has no unsigned-byte IDX header: expected {_FASHION_ACCEPTED}")
            ndim = header[3]
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    except (OSError, EOFError, zlib.error, struct.error) as err:
        raise ValueError(f"{shown} in {label} is not readable ({type(err).__name__}: {err}): "
                         f"expected {_FASHION_ACCEPTED}") from None
    size = size if size is not None else (path.stat().st_size if path.suffix != ".gz" else None)
    expected = 4 + 4 * ndim + math.prod(dims)
    if size is not None and size != expected:
        raise ValueError(f"{shown} in {label} holds {size} bytes where its IDX header promises {expected}: "
                         f"expected {_FASHION_ACCEPTED}, unmodified")
    return dims


def read_idx(path: Path, label: str | None = None, shown: Path | None = None) -> torch.Tensor:
    """An unsigned-byte IDX file (gzipped or not) as a uint8 tensor of its dimensions; one ValueError line naming
    the file when it is cut short, padded or not IDX."""
    label = label or str(path.parent)
    try:
        with _open_idx(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{shown or path} in {label} is not readable ({type(err).__name__}: {err}): "
                         f"expected {_FASHION_ACCEPTED}") from None
    dims = _idx_dims(path, label, shown, size=len(data))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * len(dims)).view(dims)


def _check_fashion_labels(labels: torch.Tensor, path: Path, label: str | None = None) -> None:
    if labels.dim() != 1 or (len(labels) and int(labels.max()) >= len(FASHION_CLASSES)):
        raise ValueError(f"{path} in {label or path.parent} is not accepted: expected labels 0..9, one per image")


# ---- CIFAR-10/100 (torchvision's files) and the synthetic task ----------------------------------------------------

_CIFAR_STATS = {10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


def load_cifar10(split: str = "train", root=None, download: bool = True) -> ImageData:
    return _load_cifar(10, split, root, download)


def load_cifar100(split: str = "train", root=None, download: bool = True) -> ImageData:
    return _load_cifar(100, split, root, download)


def _load_cifar(num_classes: int, split: str, root, download: bool) -> ImageData:
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import check_integrity

    cls = CIFAR10 if num_classes == 10 else CIFAR100
    named = root if root is not None else os.environ.get(DATA_ENV) or None
    folder = Path(named) if named is not None else cache_dir() / f"cifar{num_classes}"
    if named is not None and not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-{num_classes} was not found: {str(folder)!r} does not exist: expected a "
                                f"folder holding torchvision's {cls.base_folder}/")
    try:
        ds = cls(str(folder), train=split == "train", download=download)
    except (RuntimeError, OSError) as err:  # "Dataset not found or corrupted."; offline: URLError (an OSError)
        listed = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        md5 = dict(cls.train_list + cls.test_list, **{cls.meta["filename"]: cls.meta["md5"]})
        bad = next((n for n in listed if not check_integrity(str(folder / cls.base_folder / n), md5[n])), None)
        what = f"{cls.base_folder}/{bad} is missing or corrupt" if bad else f"{type(err).__name__}: {err}"
        if bad and isinstance(err, OSError):
            what += f", and the download failed ({type(err).__name__}: {err})"
        raise FileNotFoundError(f"CIFAR-{num_classes} was not found under {folder} ({what}): put torchvision's "
                                f"{cls.base_folder}/ there, pass root=, or allow download with a network") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    mean, std = _CIFAR_STATS[num_classes]
    return ImageData(images, torch.tensor(ds.targets), tuple(ds.classes), mean, std,
                     name=f"cifar{num_classes}", pad=4, flip=True)


def _load_synthetic(split: str = "train", root=None, download: bool = True, **kwargs) -> ImageData:
    if root is not None:
        raise ValueError(f"root={str(root)!r} is not accepted for the synthetic data set: it is drawn, not read")
    return load_synthetic(split, **kwargs)


#: name -> DatasetSpec(loader, class count); a plain dict: one entry registers a data set.
DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(load_fashion_mnist, 10),
    "cifar10": DatasetSpec(load_cifar10, 10),
    "cifar100": DatasetSpec(load_cifar100, 100),
    "synthetic": DatasetSpec(_load_synthetic, 10),
}
