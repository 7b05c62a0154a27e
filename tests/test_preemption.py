"""Preemption as a cluster delivers it, in real processes: a stop signal to every process of the job
(``os.killpg``) checkpoints the last completed step and exits 75; a stalled shard is named; a full
disk during a checkpoint is one line, exit 74, no partial folder."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import (ACCELERATE, ONE_PROCESS_STEPS, PYTHON, cpu_env, free_port, ok, records, run_cli,
                      train_args)
from test_train import assert_same_run, losses

from mmggem.config.run import ConfigError, load_config
from mmggem.checkpoint.manifest import verify_manifest
from mmggem.train.stopping import EXIT_DISK_FULL, EXIT_REQUEUE

ROOT = Path(__file__).resolve().parent.parent
LONG = ("train.steps=400",)  # never reached: every run here is stopped


class Job:
    """A training job: its processes in one process group, as a scheduler sees them; output in a file."""

    def __init__(self, commands: list[list[str]], envs: list[dict[str, str]], log: Path, started: list[Job]):
        self.log = log
        self._handle = open(log, "w")
        first = subprocess.Popen(commands[0], env=envs[0], stdout=self._handle, stderr=subprocess.STDOUT,
                                 process_group=0)  # a group of its own, which the others join
        self.processes, self.group = [first], first.pid
        started.append(self)
        self.processes += [subprocess.Popen(command, env=env, stdout=self._handle, stderr=subprocess.STDOUT,
                                            process_group=first.pid) for command, env in zip(commands[1:], envs[1:])]

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
        """Poll ``condition`` until it holds; fail if a process ends first (a loaded machine gets time)."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert all(p.poll() is None for p in self.processes), f"ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float = 180) -> list[int]:
        """The exit codes; then whatever the job left running in its group is killed (orphaned pipe: commands)."""
        try:
            return [p.wait(timeout=timeout) for p in self.processes]
        finally:
            self.kill()

    def kill(self) -> None:
        """End every process left in the job's group (also after a failed assertion); once."""
        if self._handle.closed:
            return
        try:
            os.killpg(self.group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for process in self.processes:
            process.wait()
        self._handle.close()


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    """The jobs a test starts; at teardown, what is left of them is killed, whether the test passed or not."""
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


def steps_logged(output_dir: Path) -> int:
    results = output_dir / "results.jsonl"
    return len(results.read_text().splitlines()) if results.is_file() else 0


def one_process_job(args: list[str], log: Path, started: list[Job]) -> Job:
    return Job([[PYTHON, "-m", "mmggem.cli", *args]], [cpu_env()], log, started)


def assert_stopped_with_checkpoint(out: Path, codes: list[int], output: str) -> int:
    """Every process exited 75 after checkpointing the last logged step; returns that step."""
    assert codes == [EXIT_REQUEUE] * len(codes), output[-3000:]
    step = len(losses(out))
    assert f"stopped at step {step} (signal)" in output, output[-3000:]
    checkpoint = out / "checkpoints" / f"step_{step:08d}"
    assert verify_manifest(checkpoint) and not list(checkpoint.parent.glob(".*.partial"))
    assert (out / "exit_code").read_text().strip() == str(EXIT_REQUEUE)
    assert "Traceback" not in output.split("(signal)")[0], output[-3000:]  # no worker died before the stop
    return step


def assert_resumes_at(out: Path, step: int, result: str) -> None:
    """A resume (run with train.stop_at_step=step + 1) continued from ``step``: one more step logged."""
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'} at step {step}" in result, result[-3000:]
    assert [r["step"] for r in records(out) if "train/loss" in r][-2:] == [step, step + 1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_to_the_process_group_checkpoints_and_resumes(
        signum: signal.Signals, train_shards: str, one_process_run: tuple[Path, object], tmp_path: Path,
        jobs: list[Job]) -> None:
    out = tmp_path / "run"
    args = train_args(train_shards, out, f"train.steps={ONE_PROCESS_STEPS}")  # one_process_run's run, 1 worker
    job = one_process_job(args, tmp_path / "log.txt", jobs)
    job.wait_for(lambda: steps_logged(out) >= 3, "3 steps")
    os.killpg(job.group, signum)  # the loader's worker process gets it too
    step = assert_stopped_with_checkpoint(out, job.finish(), job.output())
    if signum == signal.SIGTERM:  # the whole run continues as if never stopped
        ok(run_cli(*train_args(train_shards, out, f"train.steps={ONE_PROCESS_STEPS}", "train.resume=latest")))
        assert_same_run(one_process_run[0], out)
    else:
        resumed = ok(run_cli(*args, "train.resume=latest", f"train.stop_at_step={step + 1}"))
        assert_resumes_at(out, step, resumed.stdout)


def accelerate_command(args: list[str]) -> list[str]:
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "mmggem", *args]


@pytest.mark.parametrize("target", ["group", "launcher"])
def test_sigterm_under_accelerate_launch_checkpoints_every_rank(target: str, train_shards: str, tmp_path: Path,
                                                                jobs: list[Job]) -> None:
    """torch's elastic agent sends SIGTERM on to each rank's process group (its loader workers too), waits
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s) for them, then re-raises the signal: the launcher exits 1, and
    the run's own code is in OUTPUT_DIR/exit_code."""
    out = tmp_path / "run"
    args = train_args(train_shards, out, *LONG)
    job = Job([accelerate_command(args)], [cpu_env()], tmp_path / "log.txt", jobs)
    job.wait_for(lambda: steps_logged(out) >= 3, "3 steps")
    if target == "group":
        os.killpg(job.group, signal.SIGTERM)
    else:
        job.processes[0].send_signal(signal.SIGTERM)
    [launcher] = job.finish()
    output = job.output()
    assert launcher == 1 and "SignalException" in output, output[-3000:]
    assert output.count("stopped at step") == 1  # printed by the main process once both ranks agreed
    step = len(losses(out))
    assert f"stopped at step {step} (signal)" in output
    assert verify_manifest(out / "checkpoints" / f"step_{step:08d}")
    assert {p.name for p in (out / "checkpoints" / f"step_{step:08d}").glob("data_state_rank*.json")} == {
        "data_state_rank0.json", "data_state_rank1.json"}
    assert (out / "exit_code").read_text().strip() == str(EXIT_REQUEUE)
    if target == "group":
        resumed = subprocess.run(accelerate_command([*args, "train.resume=latest", f"train.stop_at_step={step + 1}"]),
                                 capture_output=True, text=True, env=cpu_env(), timeout=300)
        ok(resumed)
        assert_resumes_at(out, step, resumed.stdout)
        assert not (out / "exit_code").exists()  # a run that ends normally leaves none


def test_sigterm_to_slurm_style_tasks_checkpoints_and_resumes(train_shards: str, tmp_path: Path,
                                                              jobs: list[Job]) -> None:
    """One `python -m mmggem.cli train` per rank with torch's env:// variables, as launch/slurm.sh starts them."""
    out = tmp_path / "run"

    def tasks(*more: str) -> tuple[list[list[str]], list[dict[str, str]]]:
        port = str(free_port())
        envs = [cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for rank in range(2)]
        return [[PYTHON, "-m", "mmggem.cli", *train_args(train_shards, out, *LONG, *more)]] * 2, envs

    job = Job(*tasks(), tmp_path / "log.txt", jobs)
    job.wait_for(lambda: steps_logged(out) >= 3, "3 steps")
    os.killpg(job.group, signal.SIGTERM)
    step = assert_stopped_with_checkpoint(out, job.finish(), job.output())
    resumed = Job(*tasks("train.resume=latest", f"train.stop_at_step={step + 1}"), tmp_path / "resumed.txt", jobs)
    assert resumed.finish(timeout=300) == [0, 0], resumed.output()[-3000:]
    assert_resumes_at(out, step, resumed.output())


STALL_WARN_S = 2
STALL_WARNING = re.compile(r"WARNING: rank 0: no batch for (\d+) s; worker 0 reading (.*) for (\d+) s\n")


def test_a_stalled_shard_is_named_and_a_signal_still_stops_cleanly(train_shards: str, tmp_path: Path,
                                                                   jobs: list[Job]) -> None:
    """The shard's 40 samples (5 batches) arrive, then its `pipe:` command hangs, deaf to the job's signals
    as a read stuck in the kernel is: the rank warns naming it, at most once per data.stall_warn_s, and a
    SIGTERM while it waits checkpoints step 5."""
    shard = train_shards.replace("{000000..000003}", "000000")
    url = f"pipe:cat {shard}; trap '' TERM INT USR1; sleep 600"
    out = tmp_path / "run"
    job = one_process_job(train_args(url, out, *LONG, "data.num_samples=40", "data.shuffle_buffer=0",
                                     f"data.stall_warn_s={STALL_WARN_S}"), tmp_path / "log.txt", jobs)
    warnings = lambda: STALL_WARNING.findall(job.output())  # noqa: E731
    job.wait_for(lambda: steps_logged(out) >= 5, "5 steps")
    fifth_step = time.monotonic()
    seen = len(warnings())  # the first batch may have taken longer than the limit too
    job.wait_for(lambda: len(warnings()) > seen, "stall warning")
    assert time.monotonic() - fifth_step < STALL_WARN_S + 30  # a loaded machine's margin
    job.wait_for(lambda: len(warnings()) > seen + 1, "repeated stall warning")
    first, second = warnings()[seen:seen + 2]
    assert first[1] == repr(url) and int(first[0]) >= STALL_WARN_S and int(first[2]) >= int(first[0])
    assert int(second[0]) >= int(first[0]) + STALL_WARN_S - 1  # repeated, at most once per interval
    os.killpg(job.group, signal.SIGTERM)
    assert assert_stopped_with_checkpoint(out, job.finish(), job.output()) == 5


def test_a_stop_right_after_a_save_or_a_resume_does_not_write_the_step_again(train_shards: str, tmp_path: Path,
                                                                            jobs: list[Job]) -> None:
    """A shard whose 40 samples (5 batches) arrive, then its `pipe:` command hangs, in an epoch of 80: step 5 is
    saved (train.checkpoint_every=5) and the wait for batch 6 never ends. A SIGTERM then stops the run without
    writing step 5 again; so does one after a resume from it (which re-reads the shard to its position and
    waits for the same batch)."""
    shard = train_shards.replace("{000000..000003}", "000000")
    url = f"pipe:cat {shard}; trap '' TERM INT USR1; sleep 600"
    out = tmp_path / "run"
    args = train_args(url, out, *LONG, "data.num_samples=80", "data.shuffle_buffer=0", "train.checkpoint_every=5",
                      "data.stall_warn_s=1")
    checkpoint = out / "checkpoints" / "step_00000005"
    for attempt, resume in enumerate([(), ("train.resume=latest",)]):
        job = one_process_job([*args, *resume], tmp_path / f"log{attempt}.txt", jobs)
        if resume:  # the stall warning comes from inside the training loop, where the stop signals are caught
            job.wait_for(lambda: "WARNING: rank 0: no batch for" in job.output(), "the wait after the resume")
        else:
            job.wait_for(checkpoint.is_dir, "the checkpoint of step 5")
        written = (checkpoint / "manifest.json").stat()
        os.killpg(job.group, signal.SIGTERM)
        assert assert_stopped_with_checkpoint(out, job.finish(), job.output()) == 5
        assert f"stopped at step 5 (signal); step 5 is already saved in {checkpoint}\n" in job.output()
        again = (checkpoint / "manifest.json").stat()
        assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)


# The final export made slow: a stand-in save_model that says so, then sleeps before the real export.
SLOW_EXPORT = """
import sys, time
from mmggem.train import loop
real_save_model = loop.save_model
def save_model(*args, **kwargs):
    print("exporting", flush=True)
    time.sleep(120)
    return real_save_model(*args, **kwargs)
loop.save_model = save_model
from mmggem.cli import main
sys.argv[0] = "mmggem"
sys.exit(main())
"""


def test_a_signal_during_the_final_export_stops_the_process(train_shards: str, tmp_path: Path,
                                                            jobs: list[Job]) -> None:
    """Training is over and its last step saved: the stop signals are no longer caught, so a SIGTERM ends the
    process at once (it was noted and ignored until the export had finished, and the run exited 0). The next
    start with train.resume=latest trains nothing and evaluates and exports."""
    out = tmp_path / "run"
    job = Job([[PYTHON, "-c", SLOW_EXPORT, *train_args(train_shards, out, "train.steps=2")]], [cpu_env()],
              tmp_path / "log.txt", jobs)
    job.wait_for(lambda: "exporting" in job.output(), "the final export")
    os.killpg(job.group, signal.SIGTERM)
    assert job.finish(timeout=60) == [-signal.SIGTERM], job.output()[-3000:]
    assert verify_manifest(out / "checkpoints" / "step_00000002") and not (out / "final").exists()
    assert "stopped at step" not in job.output()
    resumed = ok(run_cli(*train_args(train_shards, out, "train.steps=2", "train.resume=latest")))
    assert (out / "final" / "open_clip_config.json").is_file() and [r["step"] for r in records(out)] == [1, 2]
    assert f"trained 2 steps; model saved to {out / 'final'}" in resumed.stdout


# The full disk, as torch's writer meets it: a stand-in torch.save that writes part of a file of the
# second checkpoint (step 4), then fails with ENOSPC; the launch itself is `python -m mmggem.cli`.
FULL_DISK = """
import errno, sys, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if ".step_00000004.partial" in str(f):
        with open(f, "wb") as handle:
            handle.write(b"0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from mmggem.cli import main
sys.argv[0] = "mmggem"
sys.exit(main())
"""


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(train_shards: str,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = train_args(train_shards, out, "train.checkpoint_every=2", "train.keep_checkpoints=3")
    result = subprocess.run([PYTHON, "-c", FULL_DISK, *args], capture_output=True, text=True, env=cpu_env(),
                            timeout=300)
    assert result.returncode == EXIT_DISK_FULL, result.stdout[-3000:] + result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if "disk full" in line]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"writing checkpoint {out / 'checkpoints' / 'step_00000004'} on /" in line
    assert re.search(r"needs about \d+\.\d MiB \(the size of step_00000002\), \d+\.\d MiB \(\d+ bytes\) were free",
                     line), line
    assert "removed .step_00000004.partial" in line and "train.resume=latest" in line
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]  # no partial folder left
    assert verify_manifest(checkpoints / "step_00000002")
    assert (out / "exit_code").read_text().strip() == str(EXIT_DISK_FULL)
    resumed = ok(run_cli(*args, "train.resume=latest", "train.stop_at_step=3"))
    assert_resumes_at(out, 2, resumed.stdout)


def test_stall_warn_s_is_checked() -> None:
    config = ROOT / "configs" / "demo.yaml"
    assert load_config(config).data.stall_warn_s == 300
    assert load_config(config, ["data.stall_warn_s=0"]).data.stall_warn_s == 0
    with pytest.raises(ConfigError, match=r"data\.stall_warn_s: must be >= 0, got -1"):
        load_config(config, ["data.stall_warn_s=-1"])
