"""What a run shows on its dashboards, read back with the trackers' own readers.

One SigLIP run (4 steps, evaluated at steps 2 and 4) with wandb offline and TensorBoard, then
resumed from its step-2 checkpoint: TensorBoard's ``EventAccumulator`` and wandb's own reader of
its transaction log (``wandb leet inspect --json``) must show what ``results.jsonl`` holds, under
the run's name, group, tags and notes, with the pictures of each evaluation.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import ok, records, run_cli, train_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

import mmggem
from mmggem.config.run import ConfigError, load_config
from mmggem.evaluate.dataset import open_eval_set, read_image

WANDB = str(Path(sys.executable).with_name("wandb"))
IDENTITY = ("log.group=pooling-study", "log.tags=[siglip, tiny]", "log.notes=dashboards test",
            "log.entity=mmggem-tests", "log.run_name=siglip-tiny")


@pytest.fixture(scope="module")
def dashboard_run(train_shards: str, small_eval_sets: tuple[Path, Path], tmp_path_factory) -> Path:
    """The run, trained to step 4 and then resumed from its step-2 checkpoint (steps 3 and 4 logged twice)."""
    zeroshot, retrieval = small_eval_sets
    out = tmp_path_factory.mktemp("dashboards") / "run"
    args = train_args(train_shards, out, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                      "train.loss=siglip",
                      "eval.every=2", f"eval.datasets=[{zeroshot}, {retrieval}]", "eval.batch_size=500",
                      "data.workers=0", "log.wandb=offline", "log.tensorboard=true", *IDENTITY)
    ok(run_cli(*args))
    ok(run_cli(*args, f"train.resume={out / 'checkpoints' / 'step_00000002'}"))
    return out


def tensorboard(out: Path) -> EventAccumulator:
    """TensorBoard's reader of the run's events, keeping every event (0: no sampling)."""
    kept = {"scalars": 0, "images": 0, "tensors": 0, "histograms": 0}
    return EventAccumulator(str(out / "tensorboard"), size_guidance=kept).Reload()


def wandb_records(transaction_log: Path) -> list[dict]:
    """The records of a ``.wandb`` file, as wandb's own inspector prints them."""
    result = subprocess.run([WANDB, "leet", "inspect", "--json", str(transaction_log)], capture_output=True,
                            text=True, check=True, timeout=120)
    return [json.loads(line) for line in result.stdout.splitlines()]


def wandb_runs(out: Path) -> list[list[dict]]:
    """The records of every wandb transaction log of the run (one per process start), oldest first."""
    return [wandb_records(log) for log in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))]


def test_results_have_the_new_metrics(dashboard_run: Path) -> None:
    logged = records(dashboard_run)
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3, 4]  # one run, though resumed
    for record in (r for r in logged if "train/loss" in r):
        assert record["perf/step_time_s"] > 0 and 0 <= record["perf/data_wait_fraction"] <= 1
        assert record["perf/samples_per_s_per_device"] == pytest.approx(record["perf/samples_per_s"])
        assert record["perf/step_time_s"] == pytest.approx(8 / record["perf/samples_per_s"])
        assert 0.05 < record["perf/max_memory_gb"] < 64  # this process's peak RSS
        assert math.isfinite(record["train/logit_bias"])
    assert logged[0]["train/logit_bias"] == pytest.approx(-10, abs=0.1)  # SigLIP's initial bias, one step on
    assert [r["step"] for r in logged if "val/loss" in r] == [2, 4]


def test_validation_loss_is_open_clips_siglip_loss_on_the_pairs(dashboard_run: Path,
                                                                small_eval_sets: tuple[Path, Path]) -> None:
    evalset = open_eval_set(small_eval_sets[1])
    model, preprocess, tokenizer = mmggem.load(dashboard_run / "final")
    images = torch.stack([preprocess(read_image(s)) for s in evalset.samples])
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokenizer([s.captions[0] for s in evalset.samples]), normalize=True)
        expected = open_clip.loss.SigLipLoss()(image_features, text_features, model.logit_scale.exp(),
                                                model.logit_bias)
    final = [r for r in records(dashboard_run) if "val/loss" in r][-1]
    assert final["val/loss"] == pytest.approx(float(expected), rel=1e-4)
    assert final["val/retrieval/loss"] == final["val/loss"]


def test_tensorboard_holds_every_logged_value_once(dashboard_run: Path) -> None:
    events = tensorboard(dashboard_run)
    scalars = {}
    for record in records(dashboard_run):  # numbers; results.jsonl also notes facts such as run/precision
        scalars.update({(key, record["step"]): value for key, value in record.items()
                        if key != "step" and isinstance(value, (int, float))})
    assert set(events.Tags()["scalars"]) == {key for key, _ in scalars}
    for tag in events.Tags()["scalars"]:
        logged = {step: value for (key, step), value in scalars.items() if key == tag}
        shown = {event.step: event.value for event in events.Scalars(tag)}
        assert len(events.Scalars(tag)) == len(shown)  # the steps logged twice are shown once
        assert shown == pytest.approx(logged, rel=1e-6), tag


def test_tensorboard_shows_the_pictures_and_the_exponent_chart(dashboard_run: Path) -> None:
    events = tensorboard(dashboard_run)
    for tag in ("pictures/retrieval/retrieval", "pictures/zeroshot/confusion_matrix"):
        assert [image.step for image in events.Images(tag)] == [2, 4]
        assert events.Images(tag)[-1].encoded_image_string[:4] == b"\x89PNG"
    assert [h.step for h in events.Histograms("train/pool_p")] == [1, 2, 3, 4]
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    [chart] = [chart for category in layout.category for chart in category.chart]
    pattern = chart.multiline.tag[0]
    assert sorted(t for t in events.Tags()["scalars"] if re.fullmatch(pattern, t)) == [
        f"train/pool_p/group_{g}" for g in range(6)]
    table = events.Tensors("pictures/retrieval/retrieval_table/text_summary")[-1].tensor_proto.string_val[0]
    assert b"a photo of a" in table


def test_wandb_run_is_named_grouped_tagged_and_resumed(dashboard_run: Path) -> None:
    runs = wandb_runs(dashboard_run)
    assert len(runs) == 2  # the first start and the resume
    run_id = (dashboard_run / "wandb_run_id").read_text().strip()
    for logged in runs:
        [run] = [r["run"] for r in logged if r["type"] == "run"]
        assert (run["run_id"], run["display_name"], run["run_group"], run["tags"], run["notes"], run["entity"]) == (
            run_id, "siglip-tiny", "pooling-study", ["siglip", "tiny"], "dashboards test", "mmggem-tests")
    history = {int(r["history"]["step"]["num"]): r["history"]["item"] for r in runs[-1] if r["type"] == "history"}
    assert sorted(history) == [3, 4]
    final = history[4]
    expected = [r for r in records(dashboard_run) if r["step"] == 4]
    for key, value in ((k, v) for r in expected for k, v in r.items() if k != "step"):
        assert final[key] == pytest.approx(value, rel=1e-6), key
    assert final["pictures/retrieval/retrieval._type"] == "image-file"
    assert final["pictures/zeroshot/confusion_matrix._type"] == "image-file"
    assert final["pictures/retrieval/retrieval_table._type"] == "table-file"
    assert final["pictures/retrieval/retrieval_table.nrows"] == 4
    assert final["pictures/pool_p_table._type"] == "table-file"  # the exponents' line chart


def test_log_tags_must_be_words() -> None:
    with pytest.raises(ConfigError, match="log.tags"):
        load_config(None, ["data.train=x.tar", "log.tags=[ok, 3]"])


def test_wandb_failing_to_start_drops_only_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import wandb
    from accelerate import Accelerator

    from mmggem.train.tracking import RunLog, start_trackers, trackers

    def refuse(*args: object, **kwargs: object) -> None:
        raise wandb.errors.CommError("no network")

    monkeypatch.setattr(wandb, "init", refuse)
    cfg = load_config(None, ["data.train=x.tar", "log.wandb=online", "log.tensorboard=true"])
    accelerator = Accelerator(log_with=trackers(cfg.log.wandb, cfg.log.tensorboard, tmp_path), project_dir=tmp_path)
    start_trackers(accelerator, cfg.log, tmp_path, {"seed": 0}, resume_step=0)
    assert [tracker.name for tracker in accelerator.trackers] == ["tensorboard"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "wandb could not start (no network): it is off for this run; results.jsonl and the other trackers continue"]
    run_log = RunLog(accelerator, tmp_path)
    run_log.log({"train/loss": 1.5}, step=1)
    run_log.finish()
    assert [event.value for event in tensorboard(tmp_path).Scalars("train/loss")] == [1.5]
    assert not (tmp_path / "wandb_run_id").exists()


def test_a_resume_drops_a_record_cut_short_by_a_kill(train_shards: str, tmp_path: Path) -> None:
    """A kill (or a full disk) in the middle of appending to results.jsonl leaves half a line; the
    resume that follows rewinds the file to its checkpoint and carries on, instead of a traceback."""
    out = tmp_path / "run"
    args = train_args(train_shards, out, "train.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                      "log.every=1", "data.workers=0")
    ok(run_cli(*args))
    with open(out / "results.jsonl", "a") as handle:
        handle.write('{"step": 3, "train/lo')
    resumed = ok(run_cli(*args, f"train.resume={out / 'checkpoints' / 'step_00000001'}"))
    assert "line 3: a record cut short" in resumed.stderr + resumed.stdout
    assert [r["step"] for r in records(out) if "train/loss" in r] == [1, 2]
