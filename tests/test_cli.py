"""The `mmggem` console script itself, and its module entry points."""
import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import mmggem
from conftest import accelerate_cli, cpu_env
from mmggem.cli import build_parser
from mmggem.cli import main as cli_main

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


def test_a_user_error_deep_in_a_run_is_one_line(tmp_path: Path) -> None:
    """A bad pooler option is found only when the model is built, inside training: still one line, exit 1."""
    result = subprocess.run([sys.executable, "-m", "mmggem", "train", DEMO_CONFIG, f"output_dir={tmp_path / 'run'}",
                             "model.pooling_kwargs={groups: 5}"], capture_output=True, text=True,
                            env=cpu_env())
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mmggem train: error:")]
    assert errors == ["mmggem train: error: GGeM needs dim divisible by groups: dim=192, groups=5; "
                      "valid groups: [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 192]"]


def test_an_error_that_is_not_the_users_keeps_its_traceback(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError from inside a library (here made to come from the summary reader) is not turned into a line."""
    import mmggem.evaluate.results

    def broken(results_dir: str) -> list:
        raise ValueError("an internal invariant failed")

    monkeypatch.setattr(mmggem.evaluate.results, "summary_rows", broken)
    with pytest.raises(ValueError, match="an internal invariant failed"):
        cli_main(["eval", "summary", str(tmp_path)])
    monkeypatch.undo()
    assert cli_main(["eval", "summary", str(tmp_path / "nowhere")]) == 1  # the real reader: a user error
