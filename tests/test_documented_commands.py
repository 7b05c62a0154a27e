"""Every `mmggem` command of README.md, CONTRIBUTING.md and docs/ keeps working (tests/doc_commands.py says how)."""
from __future__ import annotations

from pathlib import Path

import pytest

from doc_commands import (ROOT, SLURM_APPENDS, SLURM_SCRIPT, check_file, display_path, documented_commands,
                          documented_files)


@pytest.mark.parametrize("path", documented_files(), ids=display_path)
def test_documented_commands_work(path: Path) -> None:
    checks = check_file(path)
    skipped = [f"{check.command.where}: {check.skipped}" for check in checks if check.skipped]
    print(f"{display_path(path)}: {len(checks)} mmggem commands, {len(skipped)} skipped" +
          "".join(f"\n  {note}" for note in skipped))
    failures = [check.failure for check in checks if check.failure]
    assert not failures, f"{len(failures)} of {len(checks)} documented commands fail:\n" + "\n".join(failures)


PLANTED = """\
# A page

```bash
mmggem train configs/demo.yaml train.steps=20 output_dir=runs/ok
mmggem train configs/demo.yaml \\
    train.lrr=1
mmggem eval zeroshot --checkpoint runs/x/final --dataset /data/set --bogus-flag
mmggem train /path/to/your.yaml train.steps=20
mmggem train configs/no_such_config.yaml
accelerate launch --config_file launch/accelerate/no_such.yaml -m mmggem train configs/demo.yaml
mmggem demo --output-dir runs/d train.stepz=3
```
"""


def test_a_wrong_key_a_wrong_flag_and_missing_files_are_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(PLANTED)
    checks = check_file(page)
    assert len(checks) == 7
    passed, wrong_key, wrong_flag, placeholder, missing, moved_launch_config, demo_key = checks
    assert passed.failure is None and passed.skipped is None
    assert wrong_key.failure.startswith(f"{page}:5: mmggem train configs/demo.yaml train.lrr=1")
    assert "unknown key train.lrr" in wrong_key.failure
    assert wrong_flag.failure.startswith(f"{page}:7: ") and "unrecognized arguments: --bogus-flag" in wrong_flag.failure
    assert placeholder.failure is None and "placeholder" in placeholder.skipped
    assert "config file not found: configs/no_such_config.yaml" in missing.failure
    assert "the launcher's launch/accelerate/no_such.yaml does not exist" in moved_launch_config.failure
    assert "mmggem demo: error: unknown key train.stepz" in demo_key.failure


FORMS = """\
Text with `mmggem train nothing.yaml` inline is not a command.

```sh
python -m venv .venv && .venv/bin/pip install -e . && .venv/bin/mmggem demo   # a comment
pip install mmggem; python -m mmggem --version | tee version.txt
ACCELERATE_USE_CPU=true accelerate launch --config_file launch/accelerate/cpu_2proc.yaml --num_processes 2 \\
    -m mmggem train configs/demo.yaml "eval.datasets=[a, b]" > log.txt 2>&1 &
srun --job-name mmggem python -u -m mmggem.cli ablate configs/demo.yaml --seeds 1
sbatch --nodes 4 launch/slurm.sh configs/demo.yaml output_dir=runs/x
mmggem data classes --images DIR --out OUT [--templates openai_imagenet|FILE]
python - <<'PY'
import mmggem
mmggem train in a heredoc
PY
python -c "
mmggem eval summary inside a string"
```

```python
mmggem.create_model("ViT-Ti-4-28")
```

```console
$ mmggem train configs/demo.yaml \\
>     train.steps=5
mmggem output is not a command
```
"""


def test_every_documented_form_of_the_command_is_found(tmp_path: Path) -> None:
    page = tmp_path / "forms.md"
    page.write_text(FORMS)
    found = [(command.line, command.argv) for command in documented_commands(page)]
    assert found == [
        (4, ("demo",)),
        (5, ("--version",)),
        (6, ("train", "configs/demo.yaml", "eval.datasets=[a, b]")),
        (8, ("ablate", "configs/demo.yaml", "--seeds", "1")),
        (9, ("train", "configs/demo.yaml", "output_dir=runs/x", *SLURM_APPENDS)),
        (10, ("data", "classes", "--images", "DIR", "--out", "OUT", "--templates", "openai_imagenet")),
        (24, ("train", "configs/demo.yaml", "train.steps=5")),
    ]


def test_the_slurm_script_runs_mmggem_train_as_the_checker_assumes() -> None:
    script = (ROOT / SLURM_SCRIPT).read_text()
    assert f'-m mmggem.cli train "$@" {" ".join(SLURM_APPENDS)}' in script
