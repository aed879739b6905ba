"""ppvi: variational inference you can trust, on Pyro.

``ppvi.fit(model, *data, guide="meanfield")`` fits; the result samples, summarises, saves, converts to ArviZ.

``import ppvi`` is cheap: the public names (``ppvi.fit``, ``ppvi.Fit``, ``ppvi.data``, ..., even ``__version__``,
read from the package metadata) are imported on first use (PEP 562), so that ``ppvi --help`` never imports torch
and a program pays only for what it uses. Names resolve as they did when this module imported them all:
``ppvi.fit(...)``, ``from ppvi import fit``, ``from ppvi import *`` and ``dir(ppvi)`` work, and any submodule
(``ppvi.result``, ``ppvi.training``) is an attribute once asked for.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
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

#: Where each lazy public name lives: ``(module, attribute)``, or ``(module, None)`` for a submodule itself.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "GUIDES": ("ppvi.guides", "GUIDES"),
    "Diagnosis": ("ppvi.diagnostics.diagnosis", "Diagnosis"),
    "Expectation": ("ppvi.result", "Expectation"),
    "Fit": ("ppvi.result", "Fit"),
    "FitFileError": ("ppvi.serialization", "FitFileError"),
    "FitWarning": ("ppvi.result", "FitWarning"),
    "GuideAttempt": ("ppvi.result", "GuideAttempt"),
    "GuideSpec": ("ppvi.guides", "GuideSpec"),
    "NonFiniteELBOError": ("ppvi.result", "NonFiniteELBOError"),
    "SBCResult": ("ppvi.calibration", "SBCResult"),
    "StoppingRule": ("ppvi.convergence", "StoppingRule"),
    "VSBCResult": ("ppvi.calibration", "VSBCResult"),
    "__version__": ("ppvi._version", "__version__"),  # read from the package metadata: importlib.metadata, 30 ms
    "amortized": ("ppvi.amortized", None),
    "compare": ("ppvi.compare", "compare"),
    "data": ("ppvi.data", None),
    "diagnostics": ("ppvi.diagnostics", None),
    "engine": ("ppvi.engine", None),
    "fit": ("ppvi.fit", "fit"),
    "load": ("ppvi.serialization", "load"),
    "options": ("ppvi.options", None),
    "plot_comparison": ("ppvi.plotting", "plot_comparison"),
    "sbc": ("ppvi.calibration", "sbc"),
    "vsbc": ("ppvi.calibration", "vsbc"),
}

#: Public functions named like the submodule that defines them: ``ppvi.fit`` is the function, not the module
#: ``ppvi.fit``, however and whenever that module is imported (see :class:`_Package`).
_FUNCTIONS_NAMED_AS_MODULES = frozenset({"fit", "compare"})


def _import(module_name: str) -> types.ModuleType:
    """``importlib.import_module``, but through ``__import__``, whose imports ``python -X importtime`` lists."""
    __import__(module_name)
    return sys.modules[module_name]


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule, on first use, and keep it (PEP 562)."""
    if name in _EXPORTS:
        module_name, attribute = _EXPORTS[name]
        module = _import(module_name)
        value = module if attribute is None else getattr(module, attribute)
    elif not name.startswith("_"):
        # Any other submodule, as when ``import ppvi`` imported them all: ``ppvi.result``, ``ppvi.training``.
        try:
            value = _import(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The names already bound and every public name, imported or not."""
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The ``ppvi`` module's type: importing the submodule ``ppvi.fit`` (or ``ppvi.compare``) leaves ``ppvi.fit``
    the function.

    Python's import system binds each imported submodule as an attribute of its package, which would replace the
    function ``ppvi.fit`` by the module of the same name when ``ppvi.fit`` is first imported (by ``ppvi.fit``'s
    lazy lookup, by ``from ppvi.fit import ...`` anywhere, or by ``import ppvi.fit``). The eager ``ppvi/__init__.py``
    ended with the function bound; this keeps it so.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            name in _FUNCTIONS_NAMED_AS_MODULES
            and isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
        ):
            value = getattr(value, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
