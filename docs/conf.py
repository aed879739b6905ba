"""Sphinx configuration of ppvi's documentation.

Build: ``pip install -e ".[docs]" && sphinx-build -W --keep-going -b html docs docs/_build/html`` (as .ci/run
does); open ``docs/_build/html/index.html``. The API reference is generated from the docstrings (autodoc,
autosummary, numpydoc); the gallery pages from ``examples/`` (``docs/_ext/lecture_gallery.py``: one page per
lecture figure, the examples are not executed); the command-line reference from ``ppvi <command> --help``
(``docs/_ext/cli_help.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(ROOT))  # ppvi from this checkout, even where it is not installed
os.environ.setdefault("MPLBACKEND", "Agg")

from ppvi._version import __version__  # noqa: E402

project = "ppvi"
author = "the ppvi authors"
copyright = "2026, the ppvi authors"  # noqa: A001 - Sphinx's name
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "lecture_gallery",
    "cli_help",
]

exclude_patterns = ["_build", "api/generated/*.md"]
templates_path = ["_templates"]
html_static_path = ["_static"] if (DOCS / "_static").is_dir() else []  # git keeps no empty folder

# -- API reference -----------------------------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types; the signature stays readable
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- HTML ----------------------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"ppvi {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_sidebars = {"**": ["sidebar-nav-bs"]}
