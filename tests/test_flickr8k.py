"""Flickr8k through its real caption file: the split column, five captions per image, retrieval as
CLIP_benchmark computes it, and the recipe for a couple of steps.

Flickr8k is research-use data kept out of the repository; these tests read it from
``../shared/data/flickr8k`` beside the repository root and are skipped when it is not there. They
use a handful of its images (the real rows of the real ``captions.csv``) to stay cheap.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import records, run_cli as run_process
from data_fixtures import CONTEXT, byte_tokenizer, decode_tokens, plain_transform, run_cli
from mmggem.data.loader import TrainLoader
from mmggem.evaluate import evaluate_dataset
from test_evaluate_parity import assert_same_metrics, clip_benchmark_metrics, tiny_model

ROOT = Path(__file__).resolve().parent.parent
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
IMAGES_PER_SPLIT = {"train": 4, "test": 12, "val": 2}

pytestmark = pytest.mark.skipif(not (FLICKR / "captions.csv").is_file(),
                                reason=f"Flickr8k is not at {FLICKR} (research-use data, kept out of the repository)")


@pytest.fixture(scope="module")
def few_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """A caption file with the real rows of the first few images of each split, and those rows."""
    with open(FLICKR / "captions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    wanted, chosen = dict(IMAGES_PER_SPLIT), set()
    for row in rows:
        if row["image"] not in chosen and wanted[row["split"]] > 0:
            chosen.add(row["image"])
            wanted[row["split"]] -= 1
    kept = [row for row in rows if row["image"] in chosen]
    path = tmp_path_factory.mktemp("flickr8k") / "captions.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "split"])
        writer.writeheader()
        writer.writerows(kept)
    return path, kept


def build(command: str, captions: Path, split: str, out: Path) -> int:
    return run_cli(["data", command, "--images", str(FLICKR / "images"), "--captions", str(captions),
                    "--file-column", "image", "--split-column", "split", "--split", split, "--out", str(out)])


def test_training_shards_hold_every_train_caption_once_in_rounds(few_rows: tuple[Path, list[dict[str, str]]],
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    captions, rows = few_rows
    assert build("captions", captions, "train", tmp_path / "train") == 0
    printed = capsys.readouterr().out
    train = [row for row in rows if row["split"] == "train"]
    assert f"wrote training shards: {len(train)} samples in 1 shard(s)" in printed
    assert f"skipped {IMAGES_PER_SPLIT['test'] + IMAGES_PER_SPLIT['val']} (other_split)" in printed
    loader = TrainLoader(str(tmp_path / "train" / "00000.tar"), transform=plain_transform, tokenizer=byte_tokenizer,
                         batch_size=1, num_workers=0, seed=0, resampled=False, shuffle_buffer=0, rank=0, world_size=1)
    by_image: dict[str, list[str]] = {}
    for row in train:
        by_image.setdefault(row["image"], []).append(row["caption"].strip())
    rounds = [texts[r] for r in range(5) for texts in by_image.values()]
    expected = [text.encode()[:CONTEXT].decode(errors="replace") for text in rounds]  # the test tokenizer truncates
    assert [decode_tokens(tokens)[0] for _, tokens in loader] == expected


def test_test_split_retrieval_with_five_captions_matches_clip_benchmark(few_rows: tuple[Path, list[dict[str, str]]],
                                                                        tmp_path: Path) -> None:
    captions, rows = few_rows
    root = tmp_path / "flickr8k_test"
    assert build("retrieval", captions, "test", root) == 0
    model, preprocess, tokenizer = tiny_model(0)
    ours = evaluate_dataset(model, root, preprocess, tokenizer, batch_size=8, num_workers=0, amp=False,
                            progress=False)
    reference = clip_benchmark_metrics(model, root, preprocess, tokenizer, batch_size=8, amp=False)
    assert (ours.task, ours.num_samples) == ("zeroshot_retrieval", IMAGES_PER_SPLIT["test"])
    assert_same_metrics(ours.metrics, reference)  # image-to-text: a hit when any of the 5 captions is in the top K
    from clip_benchmark.datasets.builder import build_wds_dataset

    loaded = list(build_wds_dataset("flickr8k_test", transform=None, split="test", data_dir=str(root)))
    test_rows = [row["caption"].strip() for row in rows if row["split"] == "test"]
    assert [len(texts) for _, texts in loaded] == [5] * IMAGES_PER_SPLIT["test"]
    assert [text for _, texts in loaded for text in texts] == test_rows


def test_the_recipe_trains_and_evaluates_on_flickr8k(few_rows: tuple[Path, list[dict[str, str]]],
                                                     tmp_path: Path) -> None:
    captions, _ = few_rows
    assert build("captions", captions, "train", tmp_path / "data" / "train") == 0
    assert build("retrieval", captions, "test", tmp_path / "data" / "test") == 0
    result = run_process("train", str(ROOT / "configs" / "flickr8k.yaml"), f"output_dir={tmp_path / 'run'}",
                         f"data.train={tmp_path / 'data' / 'train' / '00000.tar'}",
                         f"eval.datasets=[{tmp_path / 'data' / 'test'}]", "train.steps=2", "train.batch_size=8",
                         "train.warmup_steps=1", "data.shuffle_buffer=8", "data.workers=0", "log.progress=false",
                         timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = {key: value for record in records(tmp_path / "run") for key, value in record.items()}
    assert {f"eval/test/{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)} <= set(final)
    assert len([key for key in final if key.startswith("train/pool_p/group_")]) == 6


def test_keyword_classes_come_from_captions_of_held_out_images(tmp_path: Path) -> None:
    """tools/flickr8k_keywords.py: an image is in a class folder exactly when 3 or more of its captions name
    that class and no other class; only val and test images are used; the folder is a `data classes` input."""
    import re
    import runpy
    import subprocess
    import sys

    out = tmp_path / "keywords"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "flickr8k_keywords.py"), "--flickr8k", str(FLICKR),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    keywords = runpy.run_path(str(ROOT / "tools" / "flickr8k_keywords.py"))["KEYWORDS"]
    with open(FLICKR / "captions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    captions: dict[str, list[str]] = {}
    for row in rows:
        if row["split"] in ("val", "test"):
            captions.setdefault(row["image"], []).append(row["caption"].lower())

    def naming(words: tuple[str, ...], texts: list[str]) -> int:
        return sum(any(re.search(rf"\b{re.escape(word)}\b", text) for word in words) for text in texts)

    expected = {}
    for image, texts in captions.items():
        named = [name for name, words in keywords.items() if naming(words, texts) >= 3]
        if len(named) == 1:
            expected[image] = named[0]
    found = {link.name: folder.name for folder in out.iterdir() for link in folder.iterdir()}
    assert found == expected and len(found) > 500
    assert all((out / name / image).resolve() == (FLICKR / "images" / image).resolve() for image, name in found.items())
    assert f"{len(expected)} images from {len(captions)} in splits ['test', 'val']" in result.stdout
    assert run_cli(["data", "classes", "--images", str(out), "--out", str(tmp_path / "set")]) == 0
    assert (tmp_path / "set" / "classnames.txt").read_text().splitlines() == sorted(set(found.values()))
