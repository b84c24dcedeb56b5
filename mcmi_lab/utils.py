"""Small shared basics: device choice, seeding, atomic file writes, argument checks."""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: `device` if given, else $MCMI_LAB_DEVICE, else cuda > mps > cpu."""
    device = device or os.environ.get("MCMI_LAB_DEVICE")
    if device:
        return _available(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _available(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or one line saying why it cannot be used here (a typo, no such GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r} is not accepted: expected cpu, cuda, cuda:<index> or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ValueError(f"device={str(device)!r} is not available: this machine has {count} CUDA device(s)"
                             + (f" (cuda:0..cuda:{count - 1})" if count else "; use cpu"))
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                    and torch.backends.mps.is_available()):
        raise ValueError(f"device={str(device)!r} is not available: MPS needs an Apple GPU; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"device={str(device)!r} is not accepted: expected cpu, cuda, cuda:<index> or mps")
    return dev


def set_seed(seed: int) -> None:
    """Seed Python, NumPy (if present) and torch (all devices)."""
    check_int("seed", seed, minimum=0)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write a file through `write(handle)` into a temporary sibling, then rename it over `path`.

    A reader (or a run killed half-way) never sees a half-written file: either the old one or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, (OSError, RuntimeError)) and disk_full(err, path.parent):
            raise OSError(errno.ENOSPC, f"disk full: {path} could not be written (free space on its file system: "
                                        f"{_free_mb(path.parent)}); free some space and rerun") from None
        raise
    return path


def disk_full(err: BaseException, folder: str | os.PathLike) -> bool:
    """True when `err` is a write that failed for want of space: ENOSPC itself, or torch.save's own wording of it
    ("enforce fail at inline_container.cc ... file write failed") on a file system with (almost) no space left."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if "inline_container" in text or "write failed" in text or "No space left" in text:
        try:
            return shutil.disk_usage(folder).free < 64 * 2**20 or "No space left" in text
        except OSError:
            return False
    return False


def _free_mb(folder: str | os.PathLike) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MB"
    except OSError:
        return "unknown"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON."""
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False, default=_json_default), "w")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda f: f.write(text), "w")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


# ---- argument checks: one clear line naming the parameter, the value and what is accepted -----------------

def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        rng = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"{name}={value!r} is not accepted: expected {rng}")
    return value


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """Check that `value` is a finite real number in the stated interval; return it as float."""
    try:  # a number, a numpy scalar or a 0-dim tensor; never a string ("0.1" would parse, silently)
        v = float(value)
        ok = not isinstance(value, (bool, str, bytes)) and math.isfinite(v)
    except (TypeError, ValueError, RuntimeError):
        ok, v = False, float("nan")
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name}={value!r} is not accepted: expected a finite number in {interval}")
    return v


def check_choice(name: str, value: Any, choices) -> Any:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not accepted: expected one of {', '.join(map(repr, choices))}")
    return value


def mpl_text(text: Any) -> str:
    """`text` as literal matplotlib text: every ``$`` escaped, so a class name such as ``$x^$`` is drawn as written
    instead of parsed as math text (which fails with "ValueError: x^")."""
    return str(text).replace("$", r"\$")
