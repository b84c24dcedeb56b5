"""Deprecated: ``mcmi_lab.widgets`` moved to :mod:`mcmi_lab.explorers.widgets` (this path works for one more release)."""
import importlib
import sys
import warnings

warnings.warn("mcmi_lab.widgets moved to mcmi_lab.explorers.widgets; import it from there (the old path goes in the next release)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("mcmi_lab.explorers.widgets")
