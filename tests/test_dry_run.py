"""`mmggem train CONFIG --dry-run` and `mmggem ablate CONFIG --dry-run`: checked, described, nothing written."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, ok, run_cli
from data_fixtures import caption_shards
from mmggem.cli import main as cli_main
from mmggem.config.run import load_config, to_dict

DEMO_CONFIG = str(ROOT / "configs" / "demo.yaml")


def dry_run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``mmggem ARGS --dry-run`` in this process: exit code, stdout, stderr."""
    code = cli_main([*args, "--dry-run"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fake_checkpoint(output_dir: Path, step: int) -> Path:
    """The files by which a run folder lists a complete checkpoint (mmggem.checkpoint.store.list_checkpoints)."""
    folder = output_dir / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"step": %d}' % step)
    return folder


def test_train_dry_run_describes_the_run_in_seconds_and_writes_nothing(train_shards: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", f"data.train={train_shards}", "train.steps=7", "train.batch_size=8",
                 f"eval.datasets=[{tmp_path / 'no_such_set'}]"]
    start = time.perf_counter()
    result = ok(run_cli("train", DEMO_CONFIG, *overrides, "--dry-run", WORLD_SIZE="4", RANK="0",
                        ACCELERATE_MIXED_PRECISION="bf16", timeout=120), code=2)  # the missing set: exit 2
    elapsed = time.perf_counter() - start
    config_text, _, described = result.stdout.partition("\n\n")
    assert yaml.safe_load(config_text) == to_dict(load_config(DEMO_CONFIG, overrides))
    lines = described.splitlines()
    for expected in ("processes: 4 (cpu; WORLD_SIZE of the launcher, 1 without one)",
                     "precision: bf16 (bf16 autocast; set by the launcher)",
                     "steps: 7", "batch: 8 per process, 32 global", "samples: 224 (steps x global batch)",
                     f"  {train_shards}: 4 shard(s)", "samples per epoch: 160 (counted from the sizes.json or img2dataset stats beside the shards)",
                     f"  {tmp_path / 'no_such_set'}: not found",
                     "resume: no (train.resume is empty): starts at step 0"):
        assert expected in lines, described
    assert "a real run would stop on 1 problem(s) as things stand (so this dry run exits 2):" in lines
    assert f"  - evaluation set {tmp_path / 'no_such_set'} not found" in lines
    assert "parameters:" not in result.stdout  # no model was built
    assert list(tmp_path.iterdir()) == [], "a dry run wrote files"
    assert elapsed < 60, f"a dry run took {elapsed:.0f} s"


def test_a_wrong_key_fails_the_dry_run_with_exit_2_naming_it(tmp_path: Path) -> None:
    result = run_cli("train", DEMO_CONFIG, f"output_dir={tmp_path / 'run'}", "train.lrr=1", "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("mmggem train: error: unknown key train.lrr; allowed under 'train': ")
    assert not (tmp_path / "run").exists()


def test_missing_shards_are_reported_not_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    pattern = str(tmp_path / "{00000..00331}.tar")
    code, out, _ = dry_run(capsys, "train", DEMO_CONFIG, f"data.train={pattern}", f"output_dir={tmp_path / 'run'}")
    assert code == 2
    assert f"  {pattern}: 332 shard(s) named, not usable now: shard pattern {pattern!r} matches no file" in out
    assert "samples per epoch: unknown until the shards are there" in out
    assert "a real run would stop on 1 problem(s) as things stand (so this dry run exits 2):" in out


def test_shards_of_unknown_size_are_a_problem_the_run_would_stop_on(capsys: pytest.CaptureFixture,
                                                                   tmp_path: Path) -> None:
    caption_shards(tmp_path / "shards", [3, 4], sizes_json=False)  # as img2dataset leaves them, less its stats
    args = ["train", DEMO_CONFIG, f"data.train={tmp_path / 'shards' / '{00000..00001}.tar'}",
            f"output_dir={tmp_path / 'run'}", "eval.datasets=[]"]
    code, out, _ = dry_run(capsys, *args)
    assert code == 2 and "a real run would stop on 1 problem(s) as things stand (so this dry run exits 2):" in out
    assert "no sizes.json in" in out and "data.num_samples=N" in out
    code, out, _ = dry_run(capsys, *args, "data.num_samples=7")
    assert "samples per epoch: 7 (data.num_samples)" in out and "problem" not in out and code == 0


def test_the_dry_run_says_from_which_checkpoint_a_run_would_resume(capsys: pytest.CaptureFixture,
                                                                      train_shards: str, tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    fake_checkpoint(out_dir, 4)
    newest = fake_checkpoint(out_dir, 8)
    common = ["train", DEMO_CONFIG, f"output_dir={out_dir}", f"data.train={train_shards}"]
    code, out, _ = dry_run(capsys, *common, "train.resume=latest")
    assert code == 0 and f"resume: from {newest} (verified at start)" in out.splitlines()
    assert f"output_dir: {out_dir} (exists, 2 checkpoint(s); a dry run writes nothing)" in out.splitlines()
    assert "a real run would start" in out.splitlines()
    code, out, _ = dry_run(capsys, *common)  # train.resume empty over a run with checkpoints: a run would refuse
    assert code == 2 and "already holds checkpoints: set train.resume=latest" in out


def test_fp16_on_the_cpu_is_reported_as_a_real_run_would_refuse_it(capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    train_shards: str, tmp_path: Path) -> None:
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    code, out, _ = dry_run(capsys, "train", DEMO_CONFIG, "train.precision=fp16", f"data.train={train_shards}",
                           f"output_dir={tmp_path / 'run'}")
    assert code == 2
    assert "precision: fp16 (fp16 autocast with a loss scaler; set by train.precision)" in out.splitlines()
    assert "  - precision fp16 is refused on the CPU; use bf16 or no" in out.splitlines()


SWAPIN_CONFIG = str(ROOT / "configs" / "vit_b16_swapin_ggem.yaml")


@pytest.fixture
def nothing_built_or_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a model or fetching weights fails the test: a dry run does neither."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run built a model or fetched weights")

    monkeypatch.setattr("mmggem.model.clip.build_model", refuse)
    monkeypatch.setattr("mmggem.model.pretrained._download", refuse)
    monkeypatch.setattr("mmggem.model.pretrained.download_model_folder", refuse)
    monkeypatch.setattr("mmggem.model.pretrained.fetch_config", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(("name", "problem"), [
    ("ViT-B-61", "  - model.name: unknown model 'ViT-B-61'; mmggem's own: "),
    ("RN50", "  - model.name: model 'RN50' has no open_clip ViT image tower (timm or ResNet): not supported"),
])
def test_a_model_name_the_factory_refuses_is_a_problem(capsys: pytest.CaptureFixture, nothing_built_or_fetched: None,
                                                        train_shards: str, tmp_path: Path, name: str,
                                                        problem: str) -> None:
    common = ["train", DEMO_CONFIG, f"data.train={train_shards}", f"output_dir={tmp_path / 'run'}"]
    code, out, _ = dry_run(capsys, *common, f"model.name={name}")
    assert code == 2 and "a real run would stop on 1 problem(s) as things stand (so this dry run exits 2):" in out
    assert any(line.startswith(problem) for line in out.splitlines()), out
    code, out, _ = dry_run(capsys, *common, "model.name=ViT-Ti-8-64")  # one of mmggem's own
    assert code == 0 and "model: ViT-Ti-8-64" in out.splitlines() and "a real run would start" in out.splitlines()


def test_pretrained_weights_are_looked_up_but_never_fetched(capsys: pytest.CaptureFixture,
                                                            nothing_built_or_fetched: None, train_shards: str,
                                                            tmp_path: Path) -> None:
    """The swap-in config ships a placeholder path: a problem. A tag of the model or an hf-hub: name is
    fetched by a real run at start, so the dry run says so and passes; an existing file is found."""
    cache = tmp_path / "cache"
    common = ["train", SWAPIN_CONFIG, f"data.train={train_shards}", "eval.datasets=[]", "eval.every=0",
              f"output_dir={tmp_path / 'run'}", f"model.cache_dir={cache}"]
    code, out, _ = dry_run(capsys, *common)
    assert code == 2 and "pretrained: /path/to/open_clip/ViT-B-16.pt (not found)" in out.splitlines()
    assert ("  - model.pretrained: /path/to/open_clip/ViT-B-16.pt is not a file or folder, an open_clip tag of "
            "'ViT-B-16' (its tags: openai, ") in out
    fetched = "fetched at start (or read from the cache)"
    weights = tmp_path / "ViT-B-16.pt"
    weights.write_bytes(b"")
    for pretrained, line in [("laion2b_s34b_b88k", f"laion2b_s34b_b88k, an open_clip tag of ViT-B-16, {fetched}"),
                             ("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", f"hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K, {fetched}"),
                             (str(weights), f"{weights} (found)")]:
        code, out, _ = dry_run(capsys, *common, f"model.pretrained={pretrained}")
        assert code == 0 and f"pretrained: {line}" in out.splitlines() and "a real run would start" in out, out
    code, out, _ = dry_run(capsys, *common, "model.pretrained=laion2b_s34b_b88k", "model.name=ViT-B-32")
    assert code == 2 and "  - model.pretrained: laion2b_s34b_b88k is not a file or folder, an open_clip tag of " \
                         "'ViT-B-32'" in out  # the tag is ViT-B-16's, not this model's
    assert not cache.exists()


def test_tensorboard_that_does_not_import_is_a_problem(capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch, train_shards: str,
                                                       tmp_path: Path) -> None:
    common = ["train", DEMO_CONFIG, f"data.train={train_shards}", f"output_dir={tmp_path / 'run'}",
              "log.tensorboard=true"]
    code, out, _ = dry_run(capsys, *common)
    assert code == 0 and "tensorboard: on, into the run folder's tensorboard/" in out.splitlines()
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` meets when it is not installed
    code, out, _ = dry_run(capsys, *common)
    assert code == 2 and "  - log.tensorboard=true, but the tensorboard package does not import (" in out
    assert "pip install tensorboard" in out and not (tmp_path / "run").exists()


def test_only_the_main_process_prints_but_every_process_exits_with_the_verdict(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, train_shards: str, tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert dry_run(capsys, "train", DEMO_CONFIG, f"output_dir={tmp_path / 'run'}") == (2, "", "")  # no shards
    assert dry_run(capsys, "train", DEMO_CONFIG, f"output_dir={tmp_path / 'run'}", f"data.train={train_shards}") \
        == (0, "", "")


def test_ablate_dry_run_lists_the_planned_runs_and_trains_nothing(train_shards: str, tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    finished = out / "cls" / "seed_0" / "final"
    finished.mkdir(parents=True)
    (finished / "open_clip_config.json").write_text("{}")
    fake_checkpoint(out / "ggem" / "seed_0", 6)
    before = sorted(tmp_path.rglob("*"))
    result = ok(run_cli("ablate", DEMO_CONFIG, "--poolings", "cls,ggem", "--seeds", "2", "--output-dir", str(out),
                        "--variant", "ggem-signed=ggem model.pooling_kwargs.negatives=signed", "--dry-run",
                        f"data.train={train_shards}", "train.steps=5", timeout=120))
    planned = [line.split() for line in result.stdout.splitlines() if " seed " in line]
    assert planned == [
        ["cls", "seed", "0", "finished", "(reused)", str(out / "cls" / "seed_0")],
        ["ggem", "seed", "0", "resumable", "from", "step_00000006", str(out / "ggem" / "seed_0")],
        ["ggem-signed", "seed", "0", "new", str(out / "ggem-signed" / "seed_0")],
        ["cls", "seed", "1", "new", str(out / "cls" / "seed_1")],
        ["ggem", "seed", "1", "new", str(out / "ggem" / "seed_1")],
        ["ggem-signed", "seed", "1", "new", str(out / "ggem-signed" / "seed_1")],
    ]
    assert "planned runs: 6 (3 arm(s) x 2 seed(s))" in result.stdout
    assert "  steps: 5" in result.stdout.splitlines()
    assert sorted(tmp_path.rglob("*")) == before, "a dry run trained or wrote something"


def test_ablate_dry_run_checks_every_arms_overrides(tmp_path: Path) -> None:
    result = run_cli("ablate", DEMO_CONFIG, "--poolings", "avg", "--seeds", "1", "--output-dir", str(tmp_path / "a"),
                     "--variant", "typo=ggem model.pooling_kwargs.negativs=signed", "--dry-run")
    assert result.returncode == 2 and "model.pooling_kwargs" in result.stderr and "negativs" in result.stderr
    assert not (tmp_path / "a").exists()


def test_ablate_dry_run_exits_2_on_what_every_run_would_stop_on(capsys: pytest.CaptureFixture, train_shards: str,
                                                                tmp_path: Path) -> None:
    common = ["ablate", DEMO_CONFIG, "--poolings", "avg,ggem", "--seeds", "1", "--output-dir", str(tmp_path / "a"),
              f"data.train={train_shards}"]
    code, out, _ = dry_run(capsys, *common, "model.name=ViT-B-61", "log.tensorboard=true")
    assert code == 2 and "  - model.name: unknown model 'ViT-B-61'; " in out
    assert "  tensorboard: on, into the run folder's tensorboard/" in out.splitlines()
    code, out, _ = dry_run(capsys, *common)
    assert code == 0 and "a real run would start" in out.splitlines() and not (tmp_path / "a").exists()
