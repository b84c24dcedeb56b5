"""Strip outputs from the notebooks kept in git (executed copies belong in a run folder).

    python tools/strip_notebooks.py                 # notebooks/*.ipynb, in place
    python tools/strip_notebooks.py --check a.ipynb # exit 1 and name the files that hold outputs
    python tools/strip_notebooks.py --stdin         # a git clean filter: stdin -> stdout (make data sets it up)

Removes cell outputs (and so saved widget views, which JupyterLab shows as "Error displaying widget: model not
found" when the notebook is reopened), execution counts, papermill's per-cell metadata and the notebook's widget
state; keeps tags, ids and the notebook's kernelspec / language_info (papermill needs both). Reads and writes plain
JSON in the files' own layout (indent 1, key order kept), so a notebook without outputs comes out byte for byte.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def strip(nb: dict) -> bool:
    """Strip the notebook `nb` (its JSON as a dict) in place; True if anything changed."""
    changed = False
    for cell in nb.get("cells", []):
        for key in ("papermill", "execution"):
            if cell.get("metadata", {}).pop(key, None) is not None:
                changed = True
        if cell.get("cell_type") == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            cell["outputs"], cell["execution_count"] = [], None
            changed = True
    for key in ("papermill", "widgets"):
        if nb.get("metadata", {}).pop(key, None) is not None:
            changed = True
    return changed


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook holds outputs")
    parser.add_argument("--stdin", action="store_true", help="filter one notebook from stdin to stdout (git)")
    args = parser.parse_args(argv)
    if args.stdin:
        text = sys.stdin.read()
        try:
            nb = json.loads(text)
        except ValueError:  # not a notebook git can parse: pass it through, the commit shows what it is
            sys.stdout.write(text)
            return 0
        sys.stdout.write(dumps(nb) if strip(nb) else text)
        return 0
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = json.loads(path.read_text(encoding="utf-8"))
        if strip(nb):
            dirty.append(path)
            if not args.check:
                path.write_text(dumps(nb), encoding="utf-8")
    for path in dirty:
        print(f"{'has outputs' if args.check else 'stripped'}: {path}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
