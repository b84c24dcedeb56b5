"""Strip outputs from the notebooks kept in git (executed copies belong in a run folder).

    python tools/strip_notebooks.py                 # notebooks/*.ipynb, in place
    python tools/strip_notebooks.py --check a.ipynb # exit 1 and name the files that hold outputs

Removes cell outputs, execution counts and papermill's per-cell metadata; keeps tags, ids and the notebook's
kernelspec / language_info (papermill needs both).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def strip(nb: nbformat.NotebookNode) -> bool:
    """Strip `nb` in place; True if anything changed."""
    changed = False
    for cell in nb.cells:
        for key in ("papermill", "execution"):
            if cell.get("metadata", {}).pop(key, None) is not None:
                changed = True
        if cell.cell_type == "code":
            if cell.outputs or cell.execution_count is not None:
                cell.outputs, cell.execution_count = [], None
                changed = True
    for key in ("papermill", "widgets"):
        if nb.metadata.pop(key, None) is not None:
            changed = True
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook holds outputs")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    for path in dirty:
        print(f"{'has outputs' if args.check else 'stripped'}: {path}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
