"""The package's layers import one way: a module never imports from a layer above its own (issue 33).

The order, lowest first, is the folder listing's story: checks and helpers, metrics (CMI), pure losses, data,
models, training, KD methods, the study's bookkeeping, figures, the report, the explorers, the command line.
Function-level imports count: an import hidden in a function still ties the layers together.
"""
import ast
from pathlib import Path

import pytest

import mcmi_lab

LAYERS = ("utils", "metrics", "losses", "data", "models", "training", "kd", "study", "figures", "report",
          "explorers", "cli")
#: top-level modules and the layer each belongs to (the deprecated shims sit at the top, as their users do)
TOP = {"utils": "utils", "__init__": "cli", "cam": "cli", "plots": "cli", "widgets": "cli"}
ROOT = Path(mcmi_lab.__file__).parent


def _layer(parts: list[str]) -> int:
    """parts: a module path inside mcmi_lab, e.g. ['training', 'loop']."""
    name = parts[0] if len(parts) > 1 else TOP.get(parts[0], parts[0])
    return LAYERS.index(name)


def _imports(path: Path) -> list[list[str]]:
    """The mcmi_lab modules `path` imports (anywhere in the file), as paths inside mcmi_lab."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = list(rel[:-1]) if rel[-1] != "__init__" else list(rel[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "mcmi_lab":
                target = node.module.split(".")[1:]
            else:
                continue
            if node.level and not node.module:  # `from . import x`: x is a module of that package
                out += [target + [a.name] for a in node.names]
            else:
                out.append(target)
        elif isinstance(node, ast.Import):
            out += [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "mcmi_lab" and "." in a.name]
    return out


def test_no_module_imports_from_a_higher_layer():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = list(path.relative_to(ROOT).with_suffix("").parts)
        own = _layer(rel)
        for target in _imports(path):
            if _layer(target) > own:
                wrong.append(f"{'/'.join(rel)} ({LAYERS[own]}) imports {'.'.join(target)} ({LAYERS[_layer(target)]})")
    assert not wrong, "\n".join(wrong)


def test_the_top_of_the_package_is_small():
    top = sorted(p.stem for p in ROOT.glob("*.py"))
    assert len(top) <= 8, top
    assert set(top) <= set(TOP), top
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("__")} == set(LAYERS) - {"utils"}


@pytest.mark.parametrize("old, new", [("mcmi_lab.plots", "mcmi_lab.figures.plots"), ("mcmi_lab.cam", "mcmi_lab.figures.cam"),
                                      ("mcmi_lab.widgets", "mcmi_lab.explorers.widgets")])
def test_the_old_figure_paths_still_import_with_a_deprecation_warning(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_the_modules_that_became_packages_keep_their_names():
    from mcmi_lab.cli import main, run_pipeline  # noqa: F401
    from mcmi_lab.data import ImageData, batches, few_shot  # noqa: F401
    from mcmi_lab.losses import kd_loss, mcmi_loss  # noqa: F401
    from mcmi_lab.report import build_report, markdown_table  # noqa: F401
