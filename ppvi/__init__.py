"""ppvi: variational inference you can trust, on Pyro.

``ppvi.fit(model, *data, guide="meanfield")`` fits; the result samples, summarises, saves, converts to ArviZ.
"""

from ppvi import amortized, data, diagnostics, engine, options
from ppvi._version import __version__
from ppvi.calibration import SBCResult, VSBCResult, sbc, vsbc
from ppvi.compare import compare
from ppvi.convergence import StoppingRule
from ppvi.diagnostics.diagnosis import Diagnosis
from ppvi.fit import fit
from ppvi.guides import GUIDES, GuideSpec
from ppvi.plotting import plot_comparison
from ppvi.result import Expectation, Fit, FitWarning, GuideAttempt, NonFiniteELBOError
from ppvi.serialization import FitFileError, load

__all__ = [
    "GUIDES",
    "Diagnosis",
    "Expectation",
    "Fit",
    "FitFileError",
    "FitWarning",
    "GuideAttempt",
    "GuideSpec",
    "NonFiniteELBOError",
    "SBCResult",
    "StoppingRule",
    "VSBCResult",
    "__version__",
    "amortized",
    "compare",
    "data",
    "diagnostics",
    "engine",
    "fit",
    "load",
    "options",
    "plot_comparison",
    "sbc",
    "vsbc",
]
