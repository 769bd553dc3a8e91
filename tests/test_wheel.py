"""The wheel holds the product: every `raymed` module and the data it loads at run time (the shipped tiny bases,
the default sweep), and nothing of the repository's own (benchmark results, test fixtures, developer tools)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from raymed.models import PRESETS
from raymed.pretrained import PACKAGE_ROOT
from raymed.tune.sweep import DEFAULT_SWEEP

REPO = Path(__file__).resolve().parents[1]
# What a tiny base's directory needs to load (`load_model`, `load_processor`) and to state its origin.
BASE_FILES = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json",
              "tokenizer.json", "tokenizer_config.json", "provenance.json"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The file names in a wheel built from a copy of the package sources (the checkout is left untouched: no
    build/ or egg-info written into it), offline: no build isolation, the installed setuptools."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "raymed", src / "raymed", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp / "dist")], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [wheel] = (tmp / "dist").glob("raymed-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_ships_no_results_fixtures_or_tools(wheel_names: set[str]) -> None:
    package = {n for n in wheel_names if not n.startswith("raymed-")}  # leave out the .dist-info metadata
    assert package and all(n.startswith("raymed/") for n in package), sorted(package)[:10]
    assert not [n for n in package if re.search(r"(^|/)results[^/]*(/.*)?\.json$", n)]
    assert not [n for n in package if "benchmarks/" in n]
    assert not [n for n in package if "fixture" in n.rsplit("/", 1)[-1]]
    assert not [n for n in package if n.endswith("/pretrain.py") or n.startswith(("tests/", "tools/"))]
    data = {n for n in package if not n.endswith(".py")}
    assert {n.rsplit(".", 1)[-1] for n in data} <= {"json", "safetensors", "yaml"}, sorted(data)


def test_wheel_holds_every_module_and_what_the_code_loads(wheel_names: set[str]) -> None:
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "raymed").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - wheel_names == set()  # e.g. a sub-package without __init__.py
    assert DEFAULT_SWEEP.resolve().relative_to(PACKAGE_ROOT.parent).as_posix() in wheel_names
    shipped = sorted(p.shipped_dir for p in PRESETS.values() if p.shipped_dir)
    assert shipped == ["pretrained/tiny-llava-med", "pretrained/tiny-miss-med"]
    for directory in shipped:
        assert {f"raymed/{directory}/{f}" for f in BASE_FILES} <= wheel_names, directory
    # Every file of the data folders goes (a new default or tokenizer file would not be left out silently).
    data = {p.relative_to(REPO).as_posix() for d in ("pretrained", "defaults") for p in (PACKAGE_ROOT / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    assert data - wheel_names == set()
