"""Every `mmggem data` command, round trip: files in -> command -> the sets load back with what went in."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import byte_tokenizer, decode_tokens, image_bytes, noise, plain_transform, run_cli, solid
from mmggem.data.fashion_mnist import SYNONYMS
from mmggem.data.loader import TrainLoader
from mmggem.evaluate.dataset import open_eval_set


def clip_benchmark_load(root: Path) -> list:
    from clip_benchmark.datasets.builder import build_wds_dataset

    return list(build_wds_dataset("set", transform=lambda im: np.asarray(im), split="test", data_dir=str(root)))


def all_captions(spec: str) -> list[str]:
    loader = TrainLoader(spec, transform=plain_transform, tokenizer=byte_tokenizer, batch_size=1, num_workers=0,
                         seed=0, resampled=False, shuffle_buffer=0, rank=0, world_size=1)
    return [decode_tokens(tokens)[0] for _, tokens in loader]


def test_demo_writes_training_shards_and_both_evaluation_sets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["data", "demo", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote training shards: 7000 samples in 7 shard(s) to {tmp_path / 'demo' / 'train'}" in printed
    assert "wrote classification set: 1500 samples in 2 shard(s)" in printed
    assert "wrote retrieval set: 1500 samples in 2 shard(s)" in printed
    sizes = json.loads((tmp_path / "demo" / "train" / "sizes.json").read_text())
    assert sizes == {f"{i:05d}.tar": 1000 for i in range(7)}
    loader = TrainLoader(str(tmp_path / "demo/train/{00000..00006}.tar"), transform=plain_transform,
                         tokenizer=byte_tokenizer, batch_size=50, num_workers=0, seed=0, resampled=False,
                         shuffle_buffer=100, rank=0, world_size=1)
    images, tokens = next(iter(loader))
    assert loader.batches_per_epoch == 140 and images.shape == (50, 3, 8, 8)
    names = [name for synonyms in SYNONYMS for name in synonyms]
    assert all(any(name in caption for name in names) for caption in decode_tokens(tokens))
    zeroshot = clip_benchmark_load(tmp_path / "demo" / "zeroshot")
    assert len(zeroshot) == 1500 and zeroshot[0][0].shape == (28, 28, 3)
    assert np.bincount([label for _, label in zeroshot]).tolist() == [150] * 10
    retrieval = open_eval_set(tmp_path / "demo" / "retrieval")
    assert len(retrieval.samples) == 1500 and all(len(s.captions) == 2 for s in retrieval.samples)
    assert run_cli(["data", "demo", str(tmp_path / "demo")]) == 1
    assert "is not empty" in capsys.readouterr().err


def test_captions_command_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "images").mkdir()
    for i in range(5):
        (tmp_path / "images" / f"{i}.png").write_bytes(image_bytes(noise(i)))
    rows = [{"path": f"{i}.png", "text": f"caption {i}"} for i in range(5)] + [{"path": "9.png", "text": "gone"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["data", "captions", "--images", str(tmp_path / "images"), "--captions", str(tmp_path / "rows.jsonl"),
            "--out", str(tmp_path / "shards"), "--samples-per-shard", "2", "--file-column", "path",
            "--caption-column", "text"]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote training shards: 5 samples in 3 shard(s)" in printed
    assert "skipped 1 (missing_file): 9.png" in printed
    pattern = f"{tmp_path / 'shards'}/{{00000..00002}}.tar"
    assert f"train on them with data.train='{pattern}'" in printed  # the pattern a run config needs, as printed
    assert sorted(all_captions(pattern)) == [f"caption {i}" for i in range(5)]
    (tmp_path / "images" / "0.png").write_bytes(image_bytes(solid((1, 2, 3))))
    assert run_cli(argv) == 1
    assert run_cli(argv + ["--overwrite"]) == 0


def test_classes_command_round_trip_with_custom_templates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    colours = {"red_thing": (255, 0, 0), "blue_thing": (0, 0, 255)}
    for name, colour in colours.items():
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "images" / name / f"{i}.jpg").write_bytes(image_bytes(solid(colour), "JPEG"))
    (tmp_path / "templates.txt").write_text("a photo of a {c}.\n\nsomething {c}-like.\n")
    assert run_cli(["data", "classes", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "set"),
                    "--templates", str(tmp_path / "templates.txt"), "--samples-per-shard", "4"]) == 0
    assert "wrote classification set: 6 samples in 2 shard(s)" in capsys.readouterr().out
    loaded = clip_benchmark_load(tmp_path / "set")
    assert [label for _, label in loaded] == [0, 0, 0, 1, 1, 1]  # blue_thing sorts first
    assert all(np.abs(image[0, 0].astype(int) - (0, 0, 255)).max() < 8 for image, label in loaded if label == 0)
    assert (tmp_path / "set" / "classnames.txt").read_text() == "blue thing\nred thing\n"
    assert (tmp_path / "set" / "zeroshot_classification_templates.txt").read_text() == \
        "a photo of a {c}.\nsomething {c}-like.\n"
    (tmp_path / "bad_templates.txt").write_text("no placeholder\n")
    assert run_cli(["data", "classes", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "other"),
                    "--templates", str(tmp_path / "bad_templates.txt")]) == 1
    assert "has no {c}" in capsys.readouterr().err and not (tmp_path / "other").exists()


def class_folder_images(images: Path, folders: list[str]) -> None:
    for index, name in enumerate(folders):
        (images / name).mkdir(parents=True)
        (images / name / "0.png").write_bytes(image_bytes(noise(index)))


def test_imagenet_wordnet_id_folders_get_imagenet_names_and_the_80_openai_templates(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    class_folder_images(tmp_path / "val", ["n02123045", "n01440764", "n01443537"])  # tabby, tench, goldfish
    assert run_cli(["data", "classes", "--images", str(tmp_path / "val"), "--out", str(tmp_path / "set")]) == 0
    loaded = open_eval_set(tmp_path / "set")
    assert loaded.classnames == ["tench", "goldfish", "tabby cat"]  # sorted by WordNet id, ImageNet's label order
    assert loaded.templates == [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]
    assert len(loaded.templates) == 80 and [s.label for s in loaded.samples] == [0, 1, 2]
    assert [label for _, label in clip_benchmark_load(tmp_path / "set")] == [0, 1, 2]

    class_folder_images(tmp_path / "wider", ["n01440764", "n99999999"])  # not all ImageNet-1k: plain folder names
    assert run_cli(["data", "classes", "--images", str(tmp_path / "wider"), "--out", str(tmp_path / "plain"),
                    "--templates", "simple_imagenet"]) == 0
    plain = open_eval_set(tmp_path / "plain")
    assert plain.classnames == ["n01440764", "n99999999"] and len(plain.templates) == 7


def test_classnames_file_and_named_templates_replace_the_folder_names(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    class_folder_images(tmp_path / "images", ["b_folder", "a_folder"])
    (tmp_path / "names.txt").write_text("first class\nsecond class\n")
    argv = ["data", "classes", "--images", str(tmp_path / "images"), "--classnames", str(tmp_path / "names.txt")]
    assert run_cli(argv + ["--out", str(tmp_path / "set"), "--templates", "openai_imagenet"]) == 0
    loaded = open_eval_set(tmp_path / "set")
    assert loaded.classnames == ["first class", "second class"] and len(loaded.templates) == 80
    (tmp_path / "three.txt").write_text("x\ny\nz\n")
    assert run_cli(argv[:-1] + [str(tmp_path / "three.txt"), "--out", str(tmp_path / "bad")]) == 1
    assert f"{tmp_path / 'three.txt'}: 3 class names for 2 class folders" in capsys.readouterr().err
    assert run_cli(argv + ["--out", str(tmp_path / "bad"), "--templates", "openai_imagenett"]) == 2
    error = capsys.readouterr().err
    assert "'openai_imagenett' is neither a file nor a template set" in error and "simple_imagenet" in error
    assert not (tmp_path / "bad").exists()


def test_retrieval_command_round_trip_with_several_captions_per_image(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.webp").write_bytes(image_bytes(noise(i), "WEBP"))
    (tmp_path / "captions.tsv").write_text(
        "file\tcaption\n0.webp\tzero\n1.webp\tone\n0.webp\tnought\n2.webp\t\n2.webp\ttwo\n")
    command = [sys.executable, "-m", "mmggem.cli", "data", "retrieval", "--images", str(tmp_path / "images"),
               "--captions", str(tmp_path / "captions.tsv"), "--out", str(tmp_path / "set")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = result.stdout
    assert "wrote retrieval set: 3 samples in 1 shard(s)" in printed
    assert "skipped 1 (empty_caption): 2.webp (line 5)" in printed
    assert [captions for _, captions in clip_benchmark_load(tmp_path / "set")] == [["zero", "nought"], ["one"], ["two"]]


def test_a_split_column_selects_rows_and_several_captions_go_in_rounds(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "images").mkdir()
    for i in range(5):
        (tmp_path / "images" / f"{i}.png").write_bytes(image_bytes(noise(i)))
    rows = ["image,caption,split", "0.png,zero a,train", "1.png,one a,train", "0.png,zero b,train",
            "2.png,two a,test", "2.png,two b,test", "3.png,three,val", "1.png,one b,train", "0.png,zero c,train"]
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    common = ["--images", str(tmp_path / "images"), "--captions", str(tmp_path / "c.csv"), "--file-column", "image",
              "--split-column", "split"]
    assert run_cli(["data", "captions", *common, "--split", "train", "--out", str(tmp_path / "train")]) == 0
    printed = capsys.readouterr().out
    assert "wrote training shards: 5 samples in 1 shard(s)" in printed
    assert "skipped 2 (other_split): 2.png, 3.png" in printed and "skipped 1 (no_caption_row): 4.png" in printed
    loader = TrainLoader(str(tmp_path / "train" / "00000.tar"), transform=plain_transform, tokenizer=byte_tokenizer,
                         batch_size=1, num_workers=0, seed=0, resampled=False, shuffle_buffer=0, rank=0, world_size=1)
    # one sample per pair, in rounds: each image's first caption, then each one's second, ...
    assert [decode_tokens(t)[0] for _, t in loader] == ["zero a", "one a", "zero b", "one b", "zero c"]

    assert run_cli(["data", "retrieval", *common, "--split", "test", "--out", str(tmp_path / "test")]) == 0
    assert [captions for _, captions in clip_benchmark_load(tmp_path / "test")] == [["two a", "two b"]]
    assert run_cli(["data", "retrieval", *common, "--split", "tset", "--out", str(tmp_path / "x")]) == 1
    assert "c.csv: no row has split == 'tset'; its values: test, train, val" in capsys.readouterr().err
    assert run_cli(["data", "retrieval", *common[:-2], "--split", "test", "--out", str(tmp_path / "x")]) == 2


def test_a_missing_input_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "c.csv").write_text("file,caption\n")
    assert run_cli(["data", "captions", "--images", str(tmp_path / "nope"), "--captions", str(tmp_path / "c.csv"),
                    "--out", str(tmp_path / "out")]) == 1
    assert f"{tmp_path / 'nope'} is not a directory of images" in capsys.readouterr().err


def test_captions_with_no_usable_pair_name_the_out_folder_and_every_reason(tmp_path: Path) -> None:
    """One error line, no traceback: the user's --out (not the staging folder), counts by reason, file names."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "images" / "silent.png").write_bytes(image_bytes(noise(0)))
    rows = ["file,caption", "broken.png,a broken file", "silent.png,", *(f"gone{i}.png,lost {i}" for i in range(7))]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "mmggem", "data", "captions", "--images", str(tmp_path / "images"),
               "--captions", str(tmp_path / "captions.csv"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]  # after the progress bar
    assert ".partial" not in error
    assert error.startswith(f"mmggem data: error: nothing written to {out}: no usable (image, caption) pair (")
    assert "skipped 7 (missing_file): gone0.png, gone1.png, gone2.png, gone3.png, gone4.png, ..." in error
    assert "skipped 1 (corrupt_image): broken.png" in error
    assert "skipped 1 (empty_caption): silent.png (line 3)" in error and "skipped 1 (no_caption): silent.png" in error
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["captions.csv", "images"]
