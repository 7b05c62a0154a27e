"""Bad sets and checkpoints: a clear error naming the file, key or value, or a counted skip; never a wrong number."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import mmggem
from mmggem.cli import main as cli_main
from mmggem.evaluate import evaluate_dataset
from test_evaluate_parity import (
    CLASSNAMES, TEMPLATES, assert_same_metrics, classification_samples, clip_benchmark_metrics, retrieval_set,
    tiny_model, write_set,
)


@pytest.fixture(scope="module")
def tiny() -> tuple:
    return tiny_model(11)


def evaluate(tiny: tuple, root: Path, **kwargs) -> mmggem.evaluate.EvalResult:
    model, preprocess, tokenizer = tiny
    return evaluate_dataset(model, root, preprocess, tokenizer, batch_size=8, num_workers=0, amp=False,
                            progress=False, **kwargs)


def image_ext(sample: dict) -> str:
    return "png" if "png" in sample else "jpg"


def run_cli(*args: str) -> int:
    """``mmggem eval ARGS``, returning its exit code."""
    return cli_main(["eval", *args])


def test_labels_not_covered_by_the_class_names_are_an_error_naming_sample_and_file(tiny, tmp_path: Path) -> None:
    samples = classification_samples(9, 3, seed=0)
    samples[6]["cls"] = 4
    root = write_set(tmp_path / "set", [samples], dataset_type="classification", classnames=CLASSNAMES[:3],
                     templates=TEMPLATES)
    with pytest.raises(ValueError, match=r"0\.tar:s0000006\.cls: label 4 is not covered by the 3 class names of "
                                         r".*classnames\.txt \(valid labels: 0\.\.2\)"):
        evaluate(tiny, root)


def test_a_label_that_is_not_an_integer_is_an_error(tiny, tmp_path: Path) -> None:
    samples = classification_samples(4, 3, seed=0)
    samples[2]["cls"] = "three"
    root = write_set(tmp_path / "set", [samples], dataset_type="classification", classnames=CLASSNAMES[:3],
                     templates=TEMPLATES)
    with pytest.raises(ValueError, match=r"s0000002\.cls: label b'three' is not an integer class index"):
        evaluate(tiny, root)


@pytest.mark.parametrize("templates, message", [
    (["a photo of a {c}.", "a photo of something."], r"line 2 template 'a photo of something\.' has no \{c\}"),
    (["a photo of a {c} {}."], r"line 1 template .* is not a format string with only \{c\}"),
    (["a photo of a {c}.", ""], r"line 2 template '' has no \{c\}"),
])
def test_bad_templates_are_an_error_naming_file_and_line(tiny, tmp_path: Path, templates: list[str],
                                                         message: str) -> None:
    root = write_set(tmp_path / "set", [classification_samples(4, 3, seed=0)], dataset_type="classification",
                     classnames=CLASSNAMES[:3], templates=templates)
    with pytest.raises(ValueError, match=r"zeroshot_classification_templates\.txt: " + message):
        evaluate(tiny, root)


def test_missing_class_names_without_built_ins_are_an_error_but_built_ins_fill_in(tiny, tmp_path: Path) -> None:
    samples = classification_samples(12, 10, seed=1)
    root = write_set(tmp_path / "my_set", [samples], dataset_type="classification", templates=TEMPLATES)
    with pytest.raises(ValueError, match=r"my_set: classnames\.txt is missing and 'my_set' has no built-in"):
        evaluate(tiny, root)
    result = evaluate(tiny, root, name="wds_cifar10")  # CIFAR-10's built-in class names, the set's templates
    assert result.dataset == "wds_cifar10" and set(result.metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    samples[0]["cls"] = 10
    cifar = write_set(tmp_path / "cifar10", [samples], dataset_type="classification")
    with pytest.raises(ValueError, match=r"label 10 is not covered by the 10 class names of built-in cifar10"):
        evaluate(tiny, cifar)


def test_missing_empty_or_short_splits_are_errors(tiny, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere"):
        evaluate(tiny, tmp_path / "nowhere")
    (tmp_path / "nosplit").mkdir()
    with pytest.raises(FileNotFoundError, match=r"nosplit/test/nshards\.txt is missing"):
        evaluate(tiny, tmp_path / "nosplit")
    empty = write_set(tmp_path / "empty", [[]], dataset_type="classification", classnames=CLASSNAMES,
                      templates=TEMPLATES)
    with pytest.raises(ValueError, match=r"empty/test: no usable sample in 1 shard"):
        evaluate(tiny, empty)
    short = write_set(tmp_path / "short", [classification_samples(3, 3, seed=0)], dataset_type="classification",
                      classnames=CLASSNAMES, templates=TEMPLATES)
    (short / "test" / "nshards.txt").write_text("2\n")
    with pytest.raises(FileNotFoundError, match=r"short/test/1\.tar is missing .*says 2 shards"):
        evaluate(tiny, short)
    (short / "test" / "nshards.txt").write_text("two\n")
    with pytest.raises(ValueError, match=r"nshards\.txt: expected a positive integer shard count, got 'two'"):
        evaluate(tiny, short)


@pytest.mark.parametrize("cut", [2500, 1536, 4096, 5120])  # in a header, in data, at a member boundary
def test_a_truncated_shard_is_an_error(tiny, tmp_path: Path, cut: int) -> None:
    root = write_set(tmp_path / "set", [classification_samples(6, 3, seed=0)], dataset_type="classification",
                     classnames=CLASSNAMES, templates=TEMPLATES)
    shard = root / "test" / "0.tar"
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ValueError, match=r"0\.tar: truncated"):
        evaluate(tiny, root)


def test_undecodable_images_and_incomplete_samples_are_skipped_counted_and_left_out_of_the_metrics(
    tiny, tmp_path: Path
) -> None:
    samples = classification_samples(30, 7, seed=2)
    clean = [s for i, s in enumerate(samples) if i not in (4, 9, 17, 21, 25)]
    samples[4][image_ext(samples[4])] = b"\x89PNG\r\n\x1a\n not really"
    samples[9][image_ext(samples[9])] = samples[9][image_ext(samples[9])][:300]  # a truncated image
    samples[17][image_ext(samples[17])] = b""
    del samples[21]["cls"]
    samples[25]["gif"] = samples[25].pop(image_ext(samples[25]))
    root = write_set(tmp_path / "bad", [samples], dataset_type="classification", classnames=CLASSNAMES,
                     templates=TEMPLATES)
    reference_root = write_set(tmp_path / "clean", [clean], dataset_type="classification", classnames=CLASSNAMES,
                               templates=TEMPLATES)
    result = evaluate(tiny, root)
    assert result.skipped == {"corrupt_image": 3, "no_label": 1, "no_image": 1}
    assert result.num_samples == 25
    model, preprocess, tokenizer = tiny
    assert_same_metrics(result.metrics, clip_benchmark_metrics(model, reference_root, preprocess, tokenizer,
                                                               batch_size=8, amp=False))


def test_a_set_whose_every_image_fails_is_an_error(tiny, tmp_path: Path) -> None:
    samples = classification_samples(3, 3, seed=0)
    for sample in samples:
        sample[image_ext(sample)] = b"junk"
    root = write_set(tmp_path / "set", [samples], dataset_type="classification", classnames=CLASSNAMES,
                     templates=TEMPLATES)
    with pytest.raises(ValueError, match=r"no image could be decoded \(3 x corrupt_image \(first: .*s0000000"):
        evaluate(tiny, root)


def test_a_set_of_the_other_type_or_an_unknown_type_is_an_error(tiny, tmp_path: Path) -> None:
    root = retrieval_set(tmp_path / "captions", n=6)
    with pytest.raises(ValueError, match=r"captions: a retrieval set .* not one for zeroshot_classification"):
        evaluate(tiny, root, task="zeroshot_classification")
    (root / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(ValueError, match=r"dataset type 'multilabel' is not supported; valid: classification"):
        evaluate(tiny, root)


def test_cli_reports_a_bad_set_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = mmggem.save_model(tiny_model(12)[0], tmp_path / "model")
    samples = classification_samples(5, 3, seed=0)
    samples[1]["cls"] = 3
    root = write_set(tmp_path / "set", [samples], dataset_type="classification", classnames=CLASSNAMES[:3],
                     templates=TEMPLATES)
    code = run_cli("zeroshot", "--checkpoint", str(checkpoint), "--dataset", str(root), "--output",
                   str(tmp_path / "out" / "result.json"), "--num-workers", "0", "--quiet")
    assert code == 1
    assert "label 3 is not covered by the 3 class names" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_architecture_is_an_error_naming_both(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    root = retrieval_set(tmp_path / "captions", n=6)
    tiny_weights = tmp_path / "tiny.pt"
    torch.save(tiny_model(13)[0].state_dict(), tiny_weights)
    code = run_cli("retrieval", "--checkpoint", "open_clip:ViT-S-8-64", "--pretrained", str(tiny_weights),
                   "--dataset", str(root), "--output", str(tmp_path / "a.json"), "--quiet")
    assert code == 1
    assert f"{tiny_weights} does not fit open_clip model 'ViT-S-8-64'" in capsys.readouterr().err

    folder = mmggem.save_model(mmggem.create_model("ViT-Ti-4-28"), tmp_path / "tiny")
    other = mmggem.save_model(mmggem.create_model("ViT-S-8-64"), tmp_path / "small")
    shutil.copy(other / "open_clip_model.safetensors", folder / "open_clip_model.safetensors")
    code = run_cli("retrieval", "--checkpoint", str(folder), "--dataset", str(root), "--output",
                   str(tmp_path / "b.json"), "--quiet")
    assert code == 1
    assert "open_clip_model.safetensors do not match the config" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_one_output_file_for_several_sets_is_refused_before_any_work(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    checkpoint = mmggem.save_model(tiny_model(14)[0], tmp_path / "model")
    first, second = retrieval_set(tmp_path / "a" / "caps", n=3), retrieval_set(tmp_path / "b" / "caps", n=3)
    for output, message in ((tmp_path / "one.json", "names one file for 2 datasets; put {dataset} in it"),
                            (tmp_path / "{dataset}.json", "gives the same file for two datasets")):
        assert run_cli("retrieval", "--checkpoint", str(checkpoint), "--dataset", str(first), str(second),
                       "--output", str(output), "--quiet") == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "model"]
