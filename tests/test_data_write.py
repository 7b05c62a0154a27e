"""Writing shards and eval sets, and CLIP_benchmark interop in both directions."""
from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_fixtures import image_bytes, noise, solid, write_tar
from mmggem.data import fashion_mnist as demo
from mmggem.data import formats
from mmggem.data.captions import build_from_captions, read_caption_rows
from mmggem.data.write import (
    ClassSample, EncodedImage, RetrievalSample, build_classification_set, write_classification_set, write_retrieval_set,
)
from mmggem.evaluate.dataset import open_eval_set


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


# --- our sets load in CLIP_benchmark --------------------------------------------------------------------


def clip_benchmark_load(root: Path):
    from clip_benchmark.datasets.builder import build_wds_dataset

    return build_wds_dataset("mine", transform=as_array, split="test", data_dir=str(root))


def test_a_classification_set_we_write_loads_in_clip_benchmark(tmp_path: Path) -> None:
    images = [noise(i) for i in range(7)]
    labels = [0, 2, 1, 2, 0, 1, 2]
    samples = [ClassSample(EncodedImage("png", image_bytes(im)), y) for im, y in zip(images, labels)]
    (tmp_path / "set").mkdir()
    counts = write_classification_set(tmp_path / "set", samples, ["cat", "dog", "golden retriever"],
                                      ["a photo of a {c}.", "a {c}."], samples_per_shard=3)
    assert counts == {"0.tar": 3, "1.tar": 3, "2.tar": 1}
    dataset = clip_benchmark_load(tmp_path / "set")
    assert dataset.classes == ["cat", "dog", "golden retriever"]
    assert dataset.templates == ["a photo of a {c}.", "a {c}."]
    loaded = list(dataset)
    assert [int(label) for _, label in loaded] == labels
    for (array, _), image in zip(loaded, images):
        assert np.array_equal(array, as_array(image))


def test_a_retrieval_set_we_write_loads_in_clip_benchmark(tmp_path: Path) -> None:
    captions = [["a red square", "red!"], ["a caption with\na newline"], ["one", "two", "three"]]
    images = [solid((255, 0, 0)), noise(1), noise(2)]
    samples = [RetrievalSample(EncodedImage("png", image_bytes(im)), c) for im, c in zip(images, captions)]
    (tmp_path / "set").mkdir()
    write_retrieval_set(tmp_path / "set", samples)
    loaded = list(clip_benchmark_load(tmp_path / "set"))
    assert [texts for _, texts in loaded] == [["a red square", "red!"], [r"a caption with\na newline"],
                                                ["one", "two", "three"]]
    for (array, _), image in zip(loaded, images):
        assert np.array_equal(array, as_array(image))


# --- CLIP_benchmark's published sets load in mmggem ----------------------------------------------------------


def test_sets_in_clip_benchmarks_published_layout_load_in_mmggem(tmp_path: Path) -> None:
    # As clip_benchmark.webdataset_builder exports (and the sets on the Hub are): lossless webp, "s%07d"
    # keys, cls as ASCII digits, no dataset_type.txt for classification.
    classification = tmp_path / "wds_cifar_like"
    (classification / "test").mkdir(parents=True)
    images = [noise(i) for i in range(5)]
    labels = [3, 0, 1, 3, 2]
    for shard, indices in enumerate([range(0, 3), range(3, 5)]):
        with wds.TarWriter(str(classification / "test" / f"{shard}.tar")) as sink:
            for i in indices:
                webp = io.BytesIO()
                images[i].save(webp, format="webp", lossless=True)
                sink.write({"__key__": "s%07d" % i, "webp": webp.getvalue(), "cls": labels[i]})
    (classification / "test" / "nshards.txt").write_text("2\n")
    (classification / "classnames.txt").write_text("airplane\nbird\ncat\ndog\n")
    (classification / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of the {c}.\n")

    retrieval = tmp_path / "wds_coco_like"
    (retrieval / "test").mkdir(parents=True)
    write_tar(retrieval / "test" / "0.tar", [
        {"__key__": "s0000000", "jpg": image_bytes(solid((0, 0, 255)), "JPEG"), "txt": "a blue square\nblue"},
        {"__key__": "s0000001", "jpg": image_bytes(solid((0, 255, 0)), "JPEG"), "txt": "green"},
    ])
    (retrieval / "test" / "nshards.txt").write_text("1\n")
    (retrieval / "dataset_type.txt").write_text("retrieval\n")

    loaded = open_eval_set(classification)
    assert loaded.dataset_type == formats.CLASSIFICATION == formats.read_dataset_type(classification)
    assert [s.label for s in loaded.samples] == labels
    assert loaded.classnames == ["airplane", "bird", "cat", "dog"]
    assert loaded.templates == ["a photo of a {c}.", "art of the {c}."]
    loaded = open_eval_set(retrieval)
    assert loaded.dataset_type == formats.RETRIEVAL
    assert [list(s.captions) for s in loaded.samples] == [["a blue square", "blue"], ["green"]]


# --- builders from folders and caption files ---------------------------------------------------------------


def test_caption_files_in_csv_tsv_and_jsonl_give_the_same_rows(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text('file,caption\na.png,"a cat, sitting"\nb.png,a dog\n')
    (tmp_path / "c.tsv").write_text("file\tcaption\na.png\ta cat, sitting\nb.png\ta dog\n")
    (tmp_path / "c.jsonl").write_text('{"file": "a.png", "caption": "a cat, sitting"}\n\n'
                                      '{"file": "b.png", "caption": ["a dog"]}\n')
    rows = [[(r.file, r.caption) for r in read_caption_rows(tmp_path / f"c.{ext}")] for ext in ("csv", "tsv", "jsonl")]
    assert rows[0] == rows[1] == rows[2] == [("a.png", "a cat, sitting"), ("b.png", "a dog")]
    (tmp_path / "d.csv").write_text("image,text\na.png,x\n")
    assert [(r.file, r.caption) for r in read_caption_rows(tmp_path / "d.csv", "image", "text")] == [("a.png", "x")]
    with pytest.raises(ValueError, match=r"d\.csv: header has columns \['image', 'text'\], missing \['file', 'capt"):
        read_caption_rows(tmp_path / "d.csv")
    (tmp_path / "e.jsonl").write_text('{"file": "a.png", "caption": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"e\.jsonl:2: not a JSON object"):
        read_caption_rows(tmp_path / "e.jsonl")
    (tmp_path / "f.txt").write_text("a.png x\n")
    with pytest.raises(ValueError, match=r"must end in one of \.csv, \.tsv, \.jsonl"):
        read_caption_rows(tmp_path / "f.txt")


def test_images_keep_their_bytes_or_become_png_and_bad_inputs_are_reported(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    jpeg = image_bytes(noise(1), "JPEG")
    (images / "photo.jpeg").write_bytes(jpeg)
    Image.new("RGB", (4, 4), (9, 8, 7)).save(images / "sub" / "drawing.bmp")
    (images / "misnamed.jpg").write_bytes(image_bytes(noise(2), "PNG"))
    (images / "broken.png").write_bytes(b"not a png")
    (images / "unlisted.png").write_bytes(image_bytes(noise(3)))
    (tmp_path / "captions.csv").write_text(
        "file,caption\nphoto.jpeg,a photo\nsub/drawing.bmp,a drawing\nmisnamed.jpg,really a png\n"
        "broken.png,broken\ngone.png,missing\nphoto.jpeg,  \nphoto.jpeg,the photo again\n")
    report = build_from_captions(images, tmp_path / "captions.csv", tmp_path / "out", layout="training",
                                 samples_per_shard=2, progress=False)
    assert (report.samples, report.shards) == (4, 2)
    assert report.skipped_by_reason() == {"corrupt_image": 1, "missing_file": 1, "empty_caption": 1,
                                          "no_caption_row": 1}
    assert {s.item for s in report.skipped} == {"broken.png", "gone.png", "photo.jpeg (line 7)", "unlisted.png"}
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2}
    # in rounds: every image with its first caption, then the photo with its second
    assert tar_members(tmp_path / "out" / "00000.tar") == [
        "000000000.jpg", "000000000.json", "000000000.txt", "000000001.json", "000000001.png", "000000001.txt"]
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert tar.extractfile("000000000.jpg").read() == jpeg
        assert tar.extractfile("000000000.txt").read() == b"a photo"
        assert (pixels(tar.extractfile("000000001.png").read()) == (9, 8, 7)).all()  # the BMP, re-encoded
    with tarfile.open(tmp_path / "out" / "00001.tar") as tar:
        assert "000000002.png" in tar.getnames()  # misnamed.jpg is a PNG and stored as one
        assert tar.extractfile("000000003.jpg").read() == jpeg
        assert tar.extractfile("000000003.txt").read() == b"the photo again"


def test_output_is_atomic_and_never_overwritten_by_accident(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(image_bytes(noise(0)))
    (tmp_path / "ok.csv").write_text("file,caption\na.png,fine\n")
    (tmp_path / "bad.csv").write_text("file,caption\ngone.png,nothing usable\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="is not empty"):
        build_from_captions(images, tmp_path / "ok.csv", out, layout="training", progress=False)
    with pytest.raises(ValueError, match="no usable"):
        build_from_captions(images, tmp_path / "bad.csv", out, layout="training", overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "images", "ok.csv", "out"]
    build_from_captions(images, tmp_path / "ok.csv", out, layout="training", overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "sizes.json"]
    first = (out / "00000.tar").read_bytes()
    build_from_captions(images, tmp_path / "ok.csv", out, layout="training", overwrite=True, progress=False)
    assert (out / "00000.tar").read_bytes() == first  # same input, byte-identical shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "images", "ok.csv", "out"]


def test_class_folders_give_sorted_labels_and_templates_must_name_the_class(tmp_path: Path) -> None:
    for name, colour in [("zebra", (0, 0, 0)), ("golden_retriever", (200, 150, 0))]:
        (tmp_path / "images" / name).mkdir(parents=True)
        (tmp_path / "images" / name / "1.png").write_bytes(image_bytes(solid(colour)))
    (tmp_path / "images" / "stray.png").write_bytes(image_bytes(solid((1, 1, 1))))
    with pytest.raises(ValueError, match=r"zero-shot templates: line 2 template 'a photo' has no \{c\}"):
        build_classification_set(tmp_path / "images", tmp_path / "out", templates=["a {c}", "a photo"], progress=False)
    assert not (tmp_path / "out").exists()
    report = build_classification_set(tmp_path / "images", tmp_path / "out", progress=False)
    assert report.skipped_by_reason() == {"not_in_class_folder": 1}
    loaded = open_eval_set(tmp_path / "out")
    assert loaded.classnames == ["golden retriever", "zebra"]
    assert loaded.templates == list(formats.DEFAULT_TEMPLATES)
    assert [s.label for s in loaded.samples] == [0, 1]


# --- the embedded demo data ---------------------------------------------------------------------------------


def test_the_embedded_asset_is_small_licensed_balanced_and_disjoint() -> None:
    assert demo.ASSET.stat().st_size <= 4 * 2**20
    assert "Zalando" in (demo.ASSET.parent / "LICENSE").read_text()
    with np.load(demo.ASSET) as arrays:
        train_source, test_source = arrays["train_source_index"], arrays["test_source_index"]
    splits = demo.load_splits()
    assert splits.train_images.shape == (7000, 28, 28) and splits.test_images.shape == (1500, 28, 28)
    assert np.bincount(splits.train_labels).tolist() == [700] * 10
    assert np.bincount(splits.test_labels).tolist() == [150] * 10
    assert not set(train_source.tolist()) & set(test_source.tolist())


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_build_asset_splits_each_class_in_file_order(tmp_path: Path) -> None:
    labels = np.array([i % 10 for i in range(50)], dtype=np.uint8)  # 5 images per class
    images = np.arange(50, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 3), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    path = demo.build_asset(tmp_path, tmp_path / "asset.npz", train_per_class=3, test_per_class=2)
    with np.load(path) as arrays:
        assert arrays["train_source_index"].tolist() == list(range(30))
        assert arrays["test_source_index"].tolist() == list(range(30, 50))
        assert arrays["test_images"][:, 0, 0].tolist() == list(range(30, 50))
        assert arrays["train_labels"].tolist() == labels[:30].tolist()
    with pytest.raises(ValueError, match="fewer than 6"):
        demo.build_asset(tmp_path, tmp_path / "too_many.npz", train_per_class=3, test_per_class=3)


def test_captions_name_the_class_and_say_what_the_pixels_show() -> None:
    splits = demo.load_splits()
    images, labels = splits.test_images[:300], splits.test_labels[:300]
    thresholds = demo.class_thresholds(demo.measure(splits.train_images), splits.train_labels)
    captions = demo.captions(images, labels, thresholds, per_image=2)
    assert captions == demo.captions(images, labels, thresholds, per_image=2)  # deterministic
    measures = demo.measure(images)
    checked = 0
    for i, (label, pair) in enumerate(zip(labels, captions)):
        assert pair[0] != pair[1]
        for caption in pair:
            assert any(synonym in caption for synonym in demo.SYNONYMS[label])
            for name, low, high in demo.ATTRIBUTES:
                value, (q33, q67) = measures[name][i], thresholds[name][label]
                assert (f" {low}" in caption or f"{low} " in caption) == (value < q33)
                assert (f" {high}" in caption or f"{high} " in caption) == (value > q67)
                checked += 1
    assert checked == 300 * 2 * 4
    dark = [demo.measure(images[i:i + 1])["tone"][0] for i, pair in enumerate(captions) if " dark " in pair[0]]
    light = [demo.measure(images[i:i + 1])["tone"][0] for i, pair in enumerate(captions) if " light " in pair[0]]
    assert np.mean(dark) < np.mean(light)


def test_the_formats_module_imports_without_torch() -> None:
    # formats is imported by light code paths (CLI parsing, evaluation metadata): it stays dependency-free.
    code = "import sys, mmggem.data.formats; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
