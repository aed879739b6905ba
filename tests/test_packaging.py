"""The install CI tests is the install a new user gets: constraints.txt pins every dependency that pyproject.toml
names, at a version inside pyproject's range, and the test and demo commands both install through it."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _requirements(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(text) for text in listed]


def test_every_runtime_and_test_dependency_is_pinned_inside_its_range():
    pins = _pins()
    for requirement in [*_requirements(), *_requirements("test")]:
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{requirement.name} is in pyproject.toml but not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement.specifier}"
        )


def test_every_runtime_dependency_has_a_ceiling():
    for requirement in _requirements():
        assert any(spec.operator == "<" for spec in requirement.specifier), f"{requirement} has no upper bound"


def test_the_readme_and_ci_install_through_the_constraints():
    assert "-c constraints.txt" in (ROOT / "scripts" / "test.sh").read_text()
    readme = (ROOT / "README.md").read_text()
    demo = next(line for line in readme.splitlines() if "examples/demo.py" in line and "pip install" in line)
    assert "-c constraints.txt" in demo
