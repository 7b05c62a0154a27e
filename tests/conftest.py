"""Shared fixtures: small real training shards and a way to run the CLI in real processes."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ROOT = Path(__file__).resolve().parent.parent


def colour_caption(shard: int, label: int) -> str:
    return f"a photo of colour {label}"


def write_color_shards(folder: Path, shards: int = 4, per_shard: int = 40, size: int = 28, seed: int = 0,
                       caption: Callable[[int, int], str] = colour_caption) -> str:
    """Shards of five colour classes in the img2dataset layout, with sizes.json; returns the brace pattern.

    ``caption(shard, label)`` is each sample's caption.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for shard in range(shards):
        name = f"{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for index in range(per_shard):
                label = int(rng.integers(0, 5))
                pixels = (rng.random((size, size, 3)) * 60 + label * 45).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                sink.write({"__key__": f"{shard:06d}{index:04d}", "png": buffer.getvalue(),
                            "txt": caption(shard, label)})
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"{{000000..{shards - 1:06d}}}.tar")


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_color_shards(tmp_path_factory.mktemp("shards"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a CPU-only child: one thread, no wandb network, no GPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "WANDB_SILENT": "true",
           "CUDA_VISIBLE_DEVICES": "", **extra}
    return env


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m mmggem ARGS` in one real process; ``env`` adds environment variables."""
    return subprocess.run([PYTHON, "-m", "mmggem", *args], capture_output=True, text=True,
                          env=cpu_env(**env), timeout=timeout)


def hub_cache(cache: Path, repo: str, *files: Path, commit: str = "0" * 40) -> Path:
    """Place ``files`` (a folder's files, or single files) in Hugging Face's cache layout under ``cache``,
    as `hf download --cache-dir` leaves them: ``models--ORG--NAME/refs/main`` names the
    commit whose ``snapshots/<commit>/`` holds them. huggingface_hub resolves it with HF_HUB_OFFLINE=1."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for path in files:
        for file in sorted(path.iterdir()) if path.is_dir() else [path]:
            (snapshot / file.name).write_bytes(file.read_bytes())
    return snapshot


def accelerate_cli(*args: str, processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` of the CLI on a real multi-process gloo group on the CPU.

    `--multi_gpu` with ACCELERATE_USE_CPU starts a real group; `--cpu --num_processes N`
    would silently run a single process.
    """
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "mmggem", *args]
    return subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=timeout)


def launch_config(config_file: Path, *args: str, processes: int | None = None, options: tuple[str, ...] = (),
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file CONFIG [OPTIONS] -m mmggem ARGS` on the CPU (ACCELERATE_USE_CPU).

    ``processes`` overrides the config's process count (and picks a free port for the group).
    """
    command = [ACCELERATE, "launch", "--config_file", str(config_file), *options]
    if processes is not None:
        command += ["--num_processes", str(processes), "--main_process_port", str(free_port())]
    return subprocess.run([*command, "-m", "mmggem", *args], capture_output=True, text=True, env=cpu_env(),
                          timeout=timeout)


def spawn_ranks(*args: str, processes: int = 2, command: tuple[str, ...] = (PYTHON, "-m", "mmggem")
                ) -> list[subprocess.Popen]:
    """Start ``command ARGS`` (the CLI by default) once per rank with torch's env:// variables, as srun does."""
    port = str(free_port())
    return [
        subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                                                LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
                                                MASTER_PORT=port))
        for rank in range(processes)
    ]


def train_args(shards: str, output_dir: Path, *overrides: str) -> list[str]:
    """`mmggem train` of configs/demo.yaml shortened to 8 steps of 8 samples on ``shards``; ``overrides`` win."""
    return ["train", str(ROOT / "configs" / "demo.yaml"), f"output_dir={output_dir}", f"data.train={shards}",
            "train.batch_size=8", "train.steps=8", "train.warmup_steps=2", "train.checkpoint_every=100",
            "log.every=1", "log.progress=false", "data.workers=1", "data.shuffle_buffer=40", "train.threads=1",
            *overrides]


def ok(result: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(output_dir: Path) -> list[dict]:
    """The lines of a run's results.jsonl as the trainer wrote them, one dict each."""
    return [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines()]


def evaluations(output_dir: Path) -> dict[tuple[int, str], float]:
    """Every evaluation metric a run logged in its results.jsonl, by (step, key)."""
    return {(record["step"], key): value for record in records(output_dir) for key, value in record.items()
            if key.startswith("eval/")}


# The uninterrupted runs that several tests compare theirs with: each is trained once per session.
ONE_PROCESS_STEPS = 30
ONE_PROCESS_ARGS = (f"train.steps={ONE_PROCESS_STEPS}", "train.checkpoint_every=3", "train.keep_checkpoints=2",
                    "log.wandb=offline")


@pytest.fixture(scope="session")
def one_process_run(train_shards: str, tmp_path_factory: pytest.TempPathFactory
                    ) -> tuple[Path, subprocess.CompletedProcess]:
    """A 30-step run in one process (checkpoints every 3 steps, the last 2 kept; wandb offline), and how it ended.

    Long enough for a test to signal or kill a run of the same arguments mid-way; checkpointing and
    logging do not change what a run computes, so its stopped and resumed twins must equal it.
    """
    out = tmp_path_factory.mktemp("one_process") / "run"
    return out, ok(run_cli(*train_args(train_shards, out, *ONE_PROCESS_ARGS)))


def two_process_args(shards: str, eval_set: Path, output_dir: Path, *overrides: str) -> list[str]:
    """6 steps evaluated on ``eval_set`` at steps 3 and 6: the arguments of ``two_process_run``."""
    return train_args(shards, output_dir, "train.steps=6", "eval.every=3", f"eval.datasets=[{eval_set}]", *overrides)


@pytest.fixture(scope="session")
def two_process_run(train_shards: str, small_eval_sets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
                    ) -> Path:
    """A 6-step DDP run on 2 real processes, evaluated at steps 3 and 6: what the 2-process runs of the
    resume, FSDP and multi-node tests are compared with.

    Launched with the shipped launch/accelerate/cpu_2proc.yaml (what test_launch_configs checks of that
    config, it checks on this run); the launch's output is in ``stdout.txt`` beside the run folder.
    """
    out = tmp_path_factory.mktemp("two_process") / "run"
    result = ok(launch_config(ROOT / "launch" / "accelerate" / "cpu_2proc.yaml",
                              *two_process_args(train_shards, small_eval_sets[0], out), processes=2))
    (out.parent / "stdout.txt").write_text(result.stdout)
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mmggem demo` shortened to 25 steps: data, a trained model, results and evaluation JSON."""
    out = tmp_path_factory.mktemp("demo")
    result = run_cli("demo", "--output-dir", str(out), "train.steps=25", "train.warmup_steps=5",
                     "log.progress=false", "log.every=5", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (out / "stdout.txt").write_text(result.stdout)
    return out


@pytest.fixture(scope="session")
def small_eval_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 200-image classification set and retrieval set from the demo's held-out split."""
    from mmggem.data.fashion_mnist import CLASSNAMES, _png, load_splits
    from mmggem.data.write import ClassSample, RetrievalSample, write_classification_set, write_retrieval_set

    root = tmp_path_factory.mktemp("small_eval")
    splits = load_splits()
    images, labels = splits.test_images[::7][:200], splits.test_labels[::7][:200]
    (root / "zeroshot").mkdir()
    (root / "retrieval").mkdir()
    write_classification_set(root / "zeroshot", (ClassSample(_png(i), int(l)) for i, l in zip(images, labels)),
                             CLASSNAMES)
    write_retrieval_set(root / "retrieval", (RetrievalSample(_png(i), [f"a photo of a {CLASSNAMES[l]}"])
                                             for i, l in zip(images, labels)))
    return root / "zeroshot", root / "retrieval"


@pytest.fixture(scope="session")
def checkpointed_run(train_shards: str, small_eval_sets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
                     ) -> Path:
    """A 4-step one-process run keeping checkpoints at steps 2 and 4, evaluated on the small zero-shot set at both."""
    out = tmp_path_factory.mktemp("runs") / "first"
    result = run_cli("train", str(Path(__file__).parent.parent / "configs" / "demo.yaml"), f"output_dir={out}",
                     f"data.train={train_shards}", "train.batch_size=8", "train.steps=4", "train.warmup_steps=1",
                     "train.checkpoint_every=2", "train.keep_checkpoints=5", "log.every=1", "log.progress=false",
                     "data.workers=1", "data.shuffle_buffer=40", "train.threads=1", "eval.every=2",
                     f"eval.datasets=[{small_eval_sets[0]}]", "eval.workers=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out
