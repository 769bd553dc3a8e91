"""pyproject ranges, constraints.txt (the exact set CI installs) and the install commands agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_declared_range_holds_its_tested_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{text}: the tested {pins[name]} is outside the range"
        lower = [s.version for s in req.specifier if s.operator in (">=", "==")]
        assert lower and Version(lower[0]) == pins[name], f"{text}: lower bound is not the tested {pins[name]}"
        assert any(s.operator in ("<", "==") for s in req.specifier), f"{text}: no upper bound"
    for unused in ("accelerate",):
        assert all(canonicalize_name(Requirement(t).name) != unused for t in project["dependencies"])


def test_ci_and_readme_pin_torch_first_and_use_the_constraints() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    torch_at, install_at = ci.index("pip install -q torch==2.13.0"), ci.index("-c constraints.txt -e")
    assert torch_at < install_at
    assert "torch==2.13.0" in _pins_text()
    for command in re.findall(r"pip install torch==2\.13\.0 && pip install ([^&]+)&&", (ROOT / "README.md").read_text()):
        assert command.startswith("-c constraints.txt"), command


def _pins_text() -> list[str]:
    return (ROOT / "constraints.txt").read_text().splitlines()
