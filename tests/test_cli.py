"""The `mmggem` console script itself, and its module entry points."""
import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import mmggem
from conftest import accelerate_cli
from mmggem.cli import build_parser

MMGGEM = str(Path(sys.executable).with_name("mmggem"))
DEMO_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")


def test_version_from_the_installed_console_script() -> None:
    result = subprocess.run([MMGGEM, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"mmggem {mmggem.__version__}"


@pytest.mark.parametrize("module", ["mmggem", "mmggem.cli"])
def test_module_entry_points_run_the_command_line(module: str) -> None:
    version = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"mmggem {mmggem.__version__}"
    bare = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True)
    assert bare.returncode == 2 and "usage: mmggem" in bare.stdout


def test_accelerate_launch_runs_the_package_module() -> None:
    """`accelerate launch -m mmggem train ...` reaches the train command on every process."""
    result = accelerate_cli("train", DEMO_CONFIG, "train.nonsense=1", processes=2, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("unknown key train.nonsense") == 2, result.stderr[-3000:]


def test_each_command_lives_in_the_module_of_its_name() -> None:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"data", "train", "eval", "demo", "ablate"} <= set(commands)
    for name in commands:
        registered = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"mmggem.cli.{name}").register(registered)
        assert list(registered.choices) == [name]


def test_overrides_after_options_are_kept_and_strays_refused() -> None:
    ok = subprocess.run([MMGGEM, "ablate", "configs/demo.yaml", "--seeds", "1", "train.nonsense=1"],
                        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert ok.returncode == 2 and "unknown key train.nonsense" in ok.stderr
    stray = subprocess.run([MMGGEM, "train", "configs/demo.yaml", "--bogus"], capture_output=True, text=True)
    assert stray.returncode == 2 and "unrecognized arguments: --bogus" in stray.stderr
