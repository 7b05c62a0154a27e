"""The training loop reads no device value outside log and checkpoint steps (1 and 2 real processes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, spawn_ranks
from host_reads import HostReads
from test_train import train_args

WORKER = str(Path(__file__).with_name("train_reads_worker.py"))
STEPS, LOG_EVERY = 9, 4  # log steps 4, 8 and the last one, 9 (also its checkpoint)


def run_workers(out: Path, shards: str, processes: int, *overrides: str) -> list[dict]:
    config_and_overrides = train_args(shards, out / "run", f"train.steps={STEPS}", f"log.every={LOG_EVERY}",
                                      *overrides)[1:]
    ranks = spawn_ranks(str(out / "reads.json"), *config_and_overrides, processes=processes,
                        command=(PYTHON, WORKER))
    for rank in ranks:
        output, _ = rank.communicate(timeout=300)
        assert rank.returncode == 0, output[-3000:]
    return [json.loads((out / f"reads.rank{rank}.json").read_text()) for rank in range(processes)]


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("grad_clip", ["1.0", "null"])
def test_steps_between_log_steps_read_nothing_from_the_device(train_shards: str, tmp_path: Path, processes: int,
                                                              grad_clip: str) -> None:
    results = run_workers(tmp_path, train_shards, processes, f"train.grad_clip={grad_clip}")
    assert len({result["initial_weights"] for result in results}) == 1  # every rank starts from the same model
    for result in results:
        reads = {int(step): ops for step, ops in result["reads"].items()}
        quiet = [step for step in range(1, STEPS) if step % LOG_EVERY]
        assert {step: reads[step] for step in quiet} == {step: [] for step in quiet}
        # the counter does see reads: the log steps read the loss, norm, scale and counters
        for step in (LOG_EVERY, 2 * LOG_EVERY, STEPS):
            assert any("_local_scalar_dense" in op for op in reads[step]), (step, reads[step])


def test_an_injected_per_step_tolist_is_counted(train_shards: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault the count must catch on a CPU: reading device counters with ``.tolist()`` every step
    reaches no dispatcher op, and only the wrapped Tensor method sees it."""
    monkeypatch.setenv("INJECT_PER_STEP_READ", "1")
    [result] = run_workers(tmp_path, train_shards, 1)
    reads = {int(step): ops for step, ops in result["reads"].items()}
    assert all("Tensor.tolist" in reads[step] for step in range(1, STEPS + 1)), reads


def test_the_count_sees_tolist_and_numpy_of_a_cpu_tensor() -> None:
    counter = HostReads()
    values = torch.arange(3)
    with counter:
        counter.step = 1
        values + 1
        counter.step = 2
        values.tolist()
        counter.step = 3
        values.numpy()
    assert counter.per_step(3) == {0: [], 1: [], 2: ["Tensor.tolist"], 3: ["Tensor.numpy"]}
    assert values.tolist() == [0, 1, 2] and len(counter.reads) == 2  # outside the count, nothing is recorded
