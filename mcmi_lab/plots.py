"""Deprecated: ``mcmi_lab.plots`` moved to :mod:`mcmi_lab.figures.plots` (this path works for one more release)."""
import importlib
import sys
import warnings

warnings.warn("mcmi_lab.plots moved to mcmi_lab.figures.plots; import it from there (the old path goes in the next release)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("mcmi_lab.figures.plots")
