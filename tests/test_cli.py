"""The `raymed` command: every subcommand answers `--help`, both as `raymed CMD` and `python -m raymed.CMD`."""

from __future__ import annotations

import runpy
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from raymed import cli

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_is_declared() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["raymed"] == "raymed.cli:main"
    assert scripts["raymed-params"] == "raymed.models.params:main"


def test_top_level_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "raymed.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(cli.COMMANDS)
    for name, (_, desc) in cli.COMMANDS.items():
        assert f"{name}  " in out.stdout and desc in out.stdout


def test_unknown_command_and_no_command_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "Commands:" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_subcommand_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`raymed NAME --help` exits 0 with a usage text; `python -m MODULE --help` reaches the same parser, MODULE
    being the package of a staged command (`raymed.train`, `raymed.tune`, `raymed.eval`, `raymed.data`,
    `raymed.bench`) or the command's module (`raymed.tune.report`, ...)."""
    assert cli.main([name, "--help"]) == 0
    via_cli = capsys.readouterr().out
    assert via_cli.startswith("usage:"), via_cli[:200]

    argv = sys.argv
    module = cli.COMMANDS[name][0].removesuffix(".__main__")
    if (Path(cli.__file__).parent / name / "__main__.py").is_file():
        module = f"raymed.{name}"
    sys.argv = [module, "--help"]
    try:
        with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    assert exit_.value.code in (0, None)
    assert capsys.readouterr().out == via_cli
