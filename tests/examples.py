"""Load a script of ``examples/`` as a module, so that tests can call its ``main`` with tiny settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a fresh module (examples are scripts, not a package)."""
    specification = importlib.util.spec_from_file_location(f"ppvi_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(module)
    return module
