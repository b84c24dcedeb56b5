"""A researcher's own data files: an ``.npz`` in the Keras layout and a folder in torchvision's ImageFolder layout.

Both give an :class:`~mcmi_lab.data.ImageData` named after the file or folder, with its class names, normalised by
the statistics of its training split and without augmentation (what suits someone's data is theirs to say).
``load_dataset(path, split)`` dispatches here. Every bad file is one ValueError/FileNotFoundError line naming it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .data import SPLITS, ImageData, from_tensors
from .utils import check_choice

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_ACCEPTED = "an .npz with x_train, y_train, x_test, y_test (optionally classes)"
FOLDER_ACCEPTED = "an ImageFolder folder with train/<class>/ and test/<class>/ image files"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def load_npz(path: str | os.PathLike, split: str = "train") -> ImageData:
    """A split of an ``.npz`` with ``x_train, y_train, x_test, y_test`` (and optionally ``classes``, names).

    Images (N, H, W) or (N, H, W, C) as Keras has them, or (N, C, H, W); uint8 0..255 or float in [0, 1]; labels
    (N,) or (N, 1) class indices. Normalisation statistics come from x_train for both splits; no augmentation.
    Read without pickles (``allow_pickle=False``).
    """
    check_choice("split", split, SPLITS)
    path = Path(path)
    with _open_npz(path) as archive:  # both splits, whichever is asked for: each split accepts the same files
        images, labels = {}, {}
        for s in SPLITS:
            images[s] = _npz_images(_npz_array(archive, f"x_{s}", path), f"x_{s}", path)
            labels[s] = _npz_labels(_npz_array(archive, f"y_{s}", path), f"y_{s}", path, len(images[s]))
        classes = _npz_classes(archive, path)
    if images["test"].shape[1:] != images["train"].shape[1:]:
        raise ValueError(f"x_test in {path} holds images {tuple(images['test'].shape[1:])} where x_train holds "
                         f"{tuple(images['train'].shape[1:])}: expected one image shape (C, H, W)")
    for s in SPLITS:
        _check_labels(labels[s], classes, path, f"y_{s}")
    return _user_data(images[split], labels[split], classes, images["train"], path)


def _open_npz(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: expected {NPZ_ACCEPTED}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz ({type(err).__name__}: {err}): expected {NPZ_ACCEPTED}, "
                         "as numpy.savez writes it") from None
    if not hasattr(archive, "files"):
        raise ValueError(f"{path} holds one array, not named arrays: expected {NPZ_ACCEPTED}")
    missing = [k for k in NPZ_KEYS if k not in archive.files]
    if missing:
        archive.close()
        raise ValueError(f"{path} holds no {', '.join(missing)} (it has {', '.join(archive.files) or 'nothing'}): "
                         f"expected {NPZ_ACCEPTED}")
    return archive


def _npz_array(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except (ValueError, OSError, EOFError) as err:  # object arrays need pickles; a truncated member
        raise ValueError(f"{key} in {path} is not readable ({err}): expected a plain array (no pickled "
                         "objects)") from None


def _npz_images(x: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3, 4):  # Keras' channels last (it wins when both could be channels)
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise ValueError(f"{key} in {path} of shape {x.shape} is not accepted: expected (N, H, W), (N, H, W, C) or "
                         "(N, C, H, W) images with C 1, 3 or 4")
    if len(x) == 0:
        raise ValueError(f"{key} in {path} is empty: expected at least one image")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype.kind in "iu" and x.min() >= 0 and x.max() <= 255:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
    if x.dtype.kind == "f" and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise ValueError(f"{key} in {path} ({x.dtype}, values {x.min()}..{x.max()}) is not accepted: expected uint8 "
                     "0..255 or float in [0, 1]")


def _npz_labels(y: np.ndarray, key: str, path: Path, n: int) -> torch.Tensor:
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1:] == (1,) else y
    if y.ndim != 1 or len(y) != n or y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise ValueError(f"{key} in {path} ({y.dtype}, shape {y.shape}) is not accepted: expected {n} integer "
                         "class indices >= 0, shape (N,) or (N, 1)")
    return torch.from_numpy(y.astype(np.int64))


def _npz_classes(archive, path: Path) -> tuple[str, ...] | int:
    """The names in `classes`, else the count max(label) + 1 over both splits."""
    if "classes" not in archive.files:
        return int(max(_npz_array(archive, k, path).max(initial=-1) for k in ("y_train", "y_test"))) + 1
    names = _npz_array(archive, "classes", path)
    if names.ndim != 1 or names.dtype.kind not in "USiu":
        raise ValueError(f"classes in {path} ({names.dtype}, shape {names.shape}) is not accepted: expected a 1-D "
                         "array of class names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())


def load_image_folder(path: str | os.PathLike, split: str = "train") -> ImageData:
    """A split of a folder in torchvision's ImageFolder layout: ``<path>/<split>/<class>/<image>``.

    Classes are train/'s subfolders, sorted (test/ may lack some); grey images (mode 1, L, LA) stay one channel,
    any other makes the data RGB; all images one size. Statistics from train/; no augmentation.
    """
    check_choice("split", split, SPLITS)
    folder = Path(path)
    classes = _folder_classes(folder)
    train = _read_images(_image_files(folder, "train", classes))
    images, labels = train if split == "train" else _read_images(_image_files(folder, split, classes), like=train[0])
    return _user_data(images, labels, classes, train[0], folder)


def _folder_classes(folder: Path) -> tuple[str, ...]:
    missing = [s for s in SPLITS if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} has no {'/, '.join(missing)}/ folder: expected {FOLDER_ACCEPTED}")
    classes = tuple(sorted(p.name for p in (folder / "train").iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise ValueError(f"{folder / 'train'} holds no class folders: expected {FOLDER_ACCEPTED}")
    return classes


def _image_files(folder: Path, split: str, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    extra = sorted(p.name for p in (folder / split).iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise ValueError(f"{folder / split} has class folders {extra} that train/ lacks: expected the classes "
                         f"{list(classes)}")
    files = []
    for k, name in enumerate(classes):
        found = sorted(p for p in (folder / split / name).glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and p.is_file() and not p.name.startswith(".")) if (folder / split / name).is_dir() else []
        if split == "train" and not found:
            raise ValueError(f"{folder / split / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): expected "
                             "at least one per training class")
        files += [(p, k) for p in found]
    if not files:
        raise ValueError(f"{folder / split} holds no images: expected {FOLDER_ACCEPTED}")
    return files


def _read_images(files: list[tuple[Path, int]], like: torch.Tensor | None = None):
    """(images (N, C, H, W) uint8, labels (N,)); `like`: the training images, whose channels and size rule."""
    from PIL import Image, UnidentifiedImageError

    def picture(path: Path, mode: str | None = None):
        try:
            with Image.open(path) as image:  # without `mode` only the header is read
                return (image.mode, image.size) if mode is None else np.asarray(image.convert(mode))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path} is not a readable image ({type(err).__name__}): "
                             f"expected {FOLDER_ACCEPTED}") from None

    headers = [picture(path) for path, _ in files]
    grey = like.shape[1] == 1 if like is not None else all(mode in ("1", "L", "LA") for mode, _ in headers)
    size = (like.shape[3], like.shape[2]) if like is not None else headers[0][1]
    for (path, _), (_, got) in zip(files, headers):
        if got != size:
            raise ValueError(f"{path} is {got[0]}x{got[1]} where the training images are {size[0]}x{size[1]}: "
                             "expected images of one size (resize them first)")
    images = torch.from_numpy(np.stack([picture(path, "L" if grey else "RGB") for path, _ in files]))
    images = images[:, None] if grey else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.tensor([k for _, k in files])


def _check_labels(labels: torch.Tensor, classes: tuple[str, ...] | int, path: Path, key: str) -> None:
    k = classes if isinstance(classes, int) else len(classes)
    if len(labels) and int(labels.max()) >= k:
        raise ValueError(f"{key} in {path} holds class {int(labels.max())}: expected indices below the {k} "
                         "classes named in classes")


def _user_data(images, labels, classes, train_images, path: Path) -> ImageData:
    """ImageData of a user split, named after its file or folder, normalised by the training images' statistics."""
    x = train_images.float() / (255.0 if train_images.dtype == torch.uint8 else 1.0)
    mean, std = x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    return from_tensors(images, labels, classes, mean, std, name=path.stem if path.suffix == ".npz" else path.name)


def path_num_classes(path: Path | None) -> int:
    """The class count of a path data set, read cheaply (labels and names, or train/'s subfolders)."""
    if path is None:
        raise ValueError("not a path data set")
    if path.suffix != ".npz":
        return len(_folder_classes(path))
    with _open_npz(path) as archive:
        classes = _npz_classes(archive, path)
    return classes if isinstance(classes, int) else len(classes)
