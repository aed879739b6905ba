"""The installed ppvi's version, single-sourced from the package metadata (``[project] version`` in
pyproject.toml), so that ``ppvi.__version__``, ``ppvi --version`` and the files ppvi writes agree."""

from __future__ import annotations

import importlib.metadata

#: Reported when ppvi runs from a source tree that was never installed (no package metadata to read).
UNKNOWN_VERSION = "0+unknown"

try:
    __version__: str = importlib.metadata.version("ppvi")
except importlib.metadata.PackageNotFoundError:  # a source checkout on sys.path, not installed
    __version__ = UNKNOWN_VERSION

__all__ = ["UNKNOWN_VERSION", "__version__"]
