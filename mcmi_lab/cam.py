"""Deprecated: ``mcmi_lab.cam`` moved to :mod:`mcmi_lab.figures.cam` (this path works for one more release)."""
import importlib
import sys
import warnings

warnings.warn("mcmi_lab.cam moved to mcmi_lab.figures.cam; import it from there (the old path goes in the next release)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("mcmi_lab.figures.cam")
