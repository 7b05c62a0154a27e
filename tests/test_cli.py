"""The `mmggem` console script itself."""
import subprocess
import sys
from pathlib import Path

import mmggem

MMGGEM = str(Path(sys.executable).with_name("mmggem"))


def test_version_from_the_installed_console_script() -> None:
    result = subprocess.run([MMGGEM, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"mmggem {mmggem.__version__}"


def test_module_entry_point_without_a_command_prints_help_and_fails() -> None:
    result = subprocess.run([sys.executable, "-m", "mmggem.cli"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: mmggem" in result.stdout
