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


def test_overrides_after_options_are_kept_and_strays_refused() -> None:
    ok = subprocess.run([MMGGEM, "ablate", "configs/demo.yaml", "--seeds", "1", "train.nonsense=1"],
                        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert ok.returncode == 2 and "unknown key train.nonsense" in ok.stderr
    stray = subprocess.run([MMGGEM, "train", "configs/demo.yaml", "--bogus"], capture_output=True, text=True)
    assert stray.returncode == 2 and "unrecognized arguments: --bogus" in stray.stderr
