"""A researcher's own data files: an ``.npz`` in the Keras layout and a folder in torchvision's ImageFolder layout.

Both give an :class:`~mcmi_lab.data.core.ImageData` named after the file or folder, with its class names, normalised by
the statistics of its training split and without augmentation (what suits someone's data is theirs to say).
``load_dataset(path, split)`` dispatches here. Every bad file is one ValueError/FileNotFoundError line naming it.

Sizes are read from the ``.npy`` headers inside the ``.npz`` and from the image files' headers before anything is
decompressed: a data set (a folder: a split) that would take more than :func:`max_data_bytes` decoded (2 GiB, set
``$MCMI_LAB_MAX_DATA_BYTES`` to allow more) is refused in one line. The training labels must name every class
(0..K-1, K the length of ``classes`` or the largest label + 1) and the test labels none beyond them.
"""
from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .core import SPLITS, ImageData, from_tensors
from ..utils import check_choice

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_ACCEPTED = "an .npz with x_train, y_train, x_test, y_test (optionally classes)"
FOLDER_ACCEPTED = "an ImageFolder folder with train/<class>/ and test/<class>/ image files"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
#: The environment variable that overrides :data:`MAX_DATA_BYTES` (a number of bytes).
MAX_BYTES_ENV = "MCMI_LAB_MAX_DATA_BYTES"
#: The most bytes a user data set may take decoded: the arrays of an .npz as stored, the images of one split of a
#: folder as uint8.
MAX_DATA_BYTES = 2 * 2**30
#: Image modes holding more than 8 bits per pixel (16-bit grey PNGs, 32-bit integer and float TIFFs): grey.
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_GREY_MODES = ("1", "L", "LA") + _DEEP_MODES


def max_data_bytes() -> int:
    """The decoded size refused above: ``$MCMI_LAB_MAX_DATA_BYTES`` when set, else :data:`MAX_DATA_BYTES` (2 GiB)."""
    value = os.environ.get(MAX_BYTES_ENV)
    if not value:
        return MAX_DATA_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"${MAX_BYTES_ENV}={value!r} is not accepted: expected a number of bytes >= 1")
    return limit


def _check_budget(need: int, what: str) -> None:
    limit = max_data_bytes()
    if need > limit:
        raise ValueError(f"{what} would take {need:,} bytes ({need / 2**30:.3g} GiB) decoded, more than the limit "
                         f"of {limit:,} bytes: set ${MAX_BYTES_ENV} to a larger number of bytes to allow it")


# ---- an .npz in the Keras layout -----------------------------------------------------------------------------------

def load_npz(path: str | os.PathLike, split: str = "train") -> ImageData:
    """A split of an ``.npz`` with ``x_train, y_train, x_test, y_test`` (and optionally ``classes``, names).

    Images (N, H, W) or (N, H, W, C) as Keras has them, or (N, C, H, W); uint8 0..255 or float in [0, 1]; labels
    (N,) or (N, 1) class indices, any integer type. Normalisation statistics come from x_train for both splits; no
    augmentation. Read without pickles (``allow_pickle=False``); shapes and sizes checked from the headers first.
    """
    check_choice("split", split, SPLITS)
    path = Path(path)
    with _open_npz(path) as archive:
        _npz_layout(archive, path)
        labels = {s: _npz_labels(_npz_array(archive, f"y_{s}", path), f"y_{s}", path) for s in SPLITS}
        classes = _npz_classes(archive, labels, path)
        train = _npz_images(_npz_array(archive, "x_train", path), "x_train", path)
        images = train if split == "train" else _npz_images(_npz_array(archive, f"x_{split}", path), f"x_{split}", path)
    return _user_data(images, labels[split], classes, train, path)


def _open_npz(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: expected {NPZ_ACCEPTED}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # BadZipFile: a truncated file
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


def _npz_header(archive, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of member `key` from its .npy header, without decompressing the data."""
    member = f"{key}.npy" if f"{key}.npy" in archive.zip.namelist() else key
    try:
        with archive.zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"npy format version {version[0]}.{version[1]}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{key} in {path} is not readable ({type(err).__name__}: {err}): expected a plain array, "
                         "as numpy.savez writes it") from None
    if dtype.hasobject:
        raise ValueError(f"{key} in {path} holds Python objects ({dtype}): expected a plain array (no pickled "
                         "objects)")
    return shape, dtype


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(C, H, W) of stored images of `shape` ((N, H, W), (N, H, W, C) or (N, C, H, W)); None when not images."""
    if len(shape) == 3:
        return (1, *shape[1:])
    if len(shape) == 4 and shape[3] in (1, 3, 4):  # Keras' channels last (it wins when both could be channels)
        return (shape[3], shape[1], shape[2])
    return tuple(shape[1:]) if len(shape) == 4 and shape[1] in (1, 3, 4) else None


def _npz_layout(archive, path: Path) -> None:
    """Check the shapes and types of every array from the headers, and the decoded size, before reading data."""
    headers = {k: _npz_header(archive, k, path) for k in NPZ_KEYS + (("classes",) if "classes" in archive.files
                                                                     else ())}
    _check_budget(sum(math.prod(s) * d.itemsize for s, d in headers.values()), f"{path}")
    for s in SPLITS:
        (xs, xd), (ys, yd) = headers[f"x_{s}"], headers[f"y_{s}"]
        if _image_shape(xs) is None or xd.kind not in "iuf":
            raise ValueError(f"x_{s} in {path} ({xd}, shape {xs}) is not accepted: expected (N, H, W), (N, H, W, C) "
                             "or (N, C, H, W) images with C 1, 3 or 4, uint8 0..255 or float in [0, 1]")
        if xs[0] == 0:
            raise ValueError(f"x_{s} in {path} is empty: expected at least one image")
        if ys not in ((xs[0],), (xs[0], 1)) or yd.kind not in "iu":
            raise ValueError(f"y_{s} in {path} ({yd}, shape {ys}) is not accepted: expected {xs[0]} integer class "
                             "indices >= 0, shape (N,) or (N, 1)")
    if _image_shape(headers["x_test"][0]) != _image_shape(headers["x_train"][0]):
        raise ValueError(f"x_test in {path} holds images {_image_shape(headers['x_test'][0])} where x_train holds "
                         f"{_image_shape(headers['x_train'][0])}: expected one image shape (C, H, W)")
    if "classes" in headers:
        shape, dtype = headers["classes"]
        if len(shape) != 1 or dtype.kind not in "USiu":
            raise ValueError(f"classes in {path} ({dtype}, shape {shape}) is not accepted: expected a 1-D array of "
                             "class names")


def _npz_array(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # pickles; a damaged member
        raise ValueError(f"{key} in {path} is not readable ({type(err).__name__}: {err}): expected a plain array "
                         "(no pickled objects), as numpy.savez writes it") from None


def _npz_images(x: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[3] in (1, 3, 4):  # channels last, as _image_shape reads it
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype.kind in "iu" and x.min() >= 0 and x.max() <= 255:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
    if x.dtype.kind == "f" and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise ValueError(f"{key} in {path} ({x.dtype}, values {x.min()}..{x.max()}) is not accepted: expected uint8 "
                     "0..255 or float in [0, 1]")


def _npz_labels(y: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Labels (N,) as int64 (any integer type stored, uint8 included); shapes are checked by :func:`_npz_layout`."""
    y = y.reshape(-1)
    if len(y) and (y.min() < 0 or y.max() >= 2**31):
        raise ValueError(f"{key} in {path} holds the class index {y.min() if y.min() < 0 else y.max()}: expected "
                         "class indices 0..K-1")
    return y.astype(np.int64)


def _npz_classes(archive, labels: dict[str, np.ndarray], path: Path) -> tuple[str, ...] | int:
    """The names in `classes`, else the count max(label) + 1; refused unless y_train holds every class 0..K-1 and
    y_test no other (so the count is bounded by the number of training labels)."""
    names = _class_names(_npz_array(archive, "classes", path), path) if "classes" in archive.files else None
    present = np.unique(labels["train"])
    k = len(names) if names is not None else int(present[-1]) + 1
    named = "named in classes" if names is not None else "(the largest label + 1)"
    if len(present) and present[-1] >= k:
        raise ValueError(f"y_train in {path} holds class {int(present[-1])}: expected indices below the {k} classes "
                         f"{named}")
    if len(present) != k:
        gap = int(np.flatnonzero(present != np.arange(len(present)))[0]) if np.any(
            present != np.arange(len(present))) else len(present)
        shown = f" ({names[gap]!r})" if names is not None else ""
        raise ValueError(f"y_train in {path} has no sample of class {gap}{shown} of the {k} classes {named}: expected "
                         "every class in the training labels (remove the class from classes, or number the labels "
                         "0..K-1 without gaps)")
    if len(labels["test"]) and int(labels["test"].max()) >= k:
        raise ValueError(f"y_test in {path} holds class {int(labels['test'].max())}: expected indices below the {k} "
                         f"classes {named}, the classes of y_train")
    return names if names is not None else k


def _class_names(names: np.ndarray, path: Path) -> tuple[str, ...]:
    out = []
    for i, n in enumerate(names.tolist()):
        try:
            name = n.decode("utf-8") if isinstance(n, bytes) else str(n)
            name.encode("utf-8")  # a lone surrogate in a str array cannot be written into any report
        except UnicodeError as err:
            raise ValueError(f"classes in {path}: name {i} ({n!r}) is not valid UTF-8 ({err.reason}): expected "
                             "class names as text") from None
        out.append(name)
    return tuple(out)


# ---- a folder in torchvision's ImageFolder layout ----------------------------------------------------------------

def load_image_folder(path: str | os.PathLike, split: str = "train") -> ImageData:
    """A split of a folder in torchvision's ImageFolder layout: ``<path>/<split>/<class>/[subfolders/]<image>``.

    Classes are train/'s subfolders, sorted (test/ may lack some); images in nested subfolders of a class count,
    hidden files and folders (``.ipynb_checkpoints``) do not. Grey images (mode 1, L, LA, and 16-bit or float grey,
    scaled from their full range 0..65535 or [0, 1] to 0..255) stay one channel, any other makes the data RGB; all
    images one size. Statistics from train/; no augmentation.
    """
    check_choice("split", split, SPLITS)
    folder = Path(path)
    classes = _folder_classes(folder)
    train = _read_images(_image_files(folder, "train", classes))
    images, labels = train if split == "train" else _read_images(_image_files(folder, split, classes), like=train[0])
    return _user_data(images, labels, classes, train[0], folder)


def _visible_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_classes(folder: Path) -> tuple[str, ...]:
    missing = [s for s in SPLITS if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} has no {'/, '.join(missing)}/ folder: expected {FOLDER_ACCEPTED}")
    classes = tuple(_visible_dirs(folder / "train"))
    if not classes:
        raise ValueError(f"{folder / 'train'} holds no class folders: expected {FOLDER_ACCEPTED}")
    for name in classes:
        try:
            name.encode("utf-8")  # a byte the file system's encoding could not decode: a lone surrogate
        except UnicodeEncodeError:
            raise ValueError(f"{folder / 'train'} holds a class folder whose name is not valid UTF-8 ({name!r}): "
                             "expected class names as text (rename the folder)") from None
    return classes


def _class_files(folder: Path) -> list[Path]:
    """The image files under `folder`, its subfolders included, sorted; hidden files and folders are skipped."""
    found = []
    for root, dirs, files in os.walk(folder):  # symlinked folders are not followed: a link loop cannot hang it
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in
                  IMAGE_EXTENSIONS and (Path(root) / f).is_file()]
    return sorted(found)


def _image_files(folder: Path, split: str, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    extra = [name for name in _visible_dirs(folder / split) if name not in classes]
    if extra:
        raise ValueError(f"{folder / split} has class folders {extra} that train/ lacks: expected the classes "
                         f"{list(classes)}")
    files = []
    for k, name in enumerate(classes):
        found = _class_files(folder / split / name) if (folder / split / name).is_dir() else []
        if split == "train" and not found:
            raise ValueError(f"{folder / split / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): expected "
                             "at least one per training class")
        files += [(p, k) for p in found]
    if not files:
        raise ValueError(f"{folder / split} holds no images: expected {FOLDER_ACCEPTED}")
    return files


def _read_images(files: list[tuple[Path, int]], like: torch.Tensor | None = None):
    """(images (N, C, H, W) uint8, labels (N,)); `like`: the training images, whose channels and size rule.
    Every header is read (mode, size) and the decoded size checked before any image is decoded."""
    headers = [_picture(path) for path, _ in files]
    grey = like.shape[1] == 1 if like is not None else all(mode in _GREY_MODES for mode, _ in headers)
    size = (like.shape[3], like.shape[2]) if like is not None else headers[0][1]
    for (path, _), (_, got) in zip(files, headers):
        if got != size:
            raise ValueError(f"{path} is {got[0]}x{got[1]} where the training images are {size[0]}x{size[1]}: "
                             "expected images of one size (resize them first)")
    _check_budget(len(files) * size[0] * size[1] * (1 if grey else 3), f"{files[0][0].parent.parent}")
    pixels = np.empty((len(files), size[1], size[0]) + (() if grey else (3,)), np.uint8)  # filled: no second copy
    for i, (path, _) in enumerate(files):
        pixels[i] = _picture(path, grey)
    images = torch.from_numpy(pixels)
    images = images[:, None] if grey else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.tensor([k for _, k in files])


def _picture(path: Path, grey: bool | None = None):
    """(mode, size) from the header when `grey` is None, else the pixels as uint8 (H, W) or (H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:  # reads the header only; PIL refuses decompression bombs here
            if grey is None:
                return image.mode, image.size
            if image.mode in _DEEP_MODES:
                pixels = _eight_bit(np.asarray(image), image.mode, path)
                return pixels if grey else np.repeat(pixels[..., None], 3, axis=2)
            return np.asarray(image.convert("L" if grey else "RGB"))
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path} is refused as a possible decompression bomb ({err}): expected images of at "
                         f"most {Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image ({type(err).__name__}): "
                         f"expected {FOLDER_ACCEPTED}") from None


def _eight_bit(pixels: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """A 16-bit or 32-bit integer grey image (0..65535) or a float one ([0, 1]) scaled to uint8 0..255 by that full
    range (never clipped: a value of 1,000 and one of 60,000 stay apart); other values are refused."""
    full = 1.0 if mode == "F" else 65535.0
    finite = np.isfinite(pixels).all()
    low, high = (pixels.min(), pixels.max()) if finite else (float("nan"), float("nan"))
    if not finite or low < 0 or high > full:
        raise ValueError(f"{path} (mode {mode}) holds values {low}..{high}: expected "
                         f"{'float values in [0, 1]' if mode == 'F' else 'integer values 0..65535'}")
    return np.rint(pixels.astype(np.float64) * (255.0 / full)).astype(np.uint8)


def _user_data(images, labels, classes, train_images, path: Path) -> ImageData:
    """ImageData of a user split, named after its file or folder, normalised by the training images' statistics."""
    mean, std = _channel_stats(train_images)
    return from_tensors(images, torch.as_tensor(labels), classes, mean, std,
                        name=path.stem if path.suffix == ".npz" else path.name)


def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of images (N, C, H, W) in [0, 1] units, in chunks (no float copy of the
    whole set), std at least 1e-6."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    rows = max(1, 2**22 // max(1, images[0].numel()))
    for chunk in images.split(rows):
        x = chunk.double() / scale
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    n = images.numel() // images.shape[1]
    mean = total / n
    var = (squares - n * mean * mean) / max(n - 1, 1)
    return mean.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-6).tolist()


def path_num_classes(path: Path | None) -> int:
    """The class count of a path data set, every check but the pixels' done cheaply: for an .npz the headers, the
    sizes and the labels (the images are not decompressed); for a folder the class folders and the files listed."""
    if path is None:
        raise ValueError("not a path data set")
    if path.suffix != ".npz":
        classes = _folder_classes(path)
        for split in SPLITS:
            _image_files(path, split, classes)
        return len(classes)
    with _open_npz(path) as archive:
        _npz_layout(archive, path)
        labels = {s: _npz_labels(_npz_array(archive, f"y_{s}", path), f"y_{s}", path) for s in SPLITS}
        classes = _npz_classes(archive, labels, path)
    return classes if isinstance(classes, int) else len(classes)
