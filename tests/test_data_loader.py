"""The training loader on real tar shards: bad samples, epoch/resampled modes, determinism, exact resume."""
from __future__ import annotations

import json
import os
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import (
    byte_tokenizer, caption_shards, decode_tokens, image_bytes, noise, plain_transform, solid, transform, write_tar,
)
from mmggem.data.loader import TrainLoader, parse_spec


def make_loader(spec: str, **overrides) -> TrainLoader:
    options = dict(transform=transform(), tokenizer=byte_tokenizer, batch_size=4, num_workers=0, seed=0,
                   resampled=False, shuffle_buffer=8, rank=0, world_size=1)
    options.update(overrides)
    return TrainLoader(spec, **options)


def captions_of(batches) -> list[list[str]]:
    return [decode_tokens(tokens) for _, tokens in batches]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (images_a, tokens_a), (images_b, tokens_b) in zip(a, b):
        assert torch.equal(tokens_a, tokens_b)
        assert torch.equal(images_a, images_b)


# --- bad input -----------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (cheap to make, refused before decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def bad_and_odd_samples() -> tuple[list[dict], dict[str, int], dict[str, tuple]]:
    """Every bad case (with the skip reason it must count under) and every odd-but-usable image
    (with the RGB colour it must decode to), ending with a plain good sample."""
    red = solid((255, 0, 0))
    truncated_png = image_bytes(noise(1, size=64))
    transparent = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    palette = red.convert("P", palette=Image.ADAPTIVE, colors=4)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    sixteen_bit = Image.fromarray(np.full((16, 16), 0x8000, dtype=np.uint16))
    bad = [
        ({"png": b"this is not an image", "txt": "corrupt"}, "corrupt_image"),
        ({"png": truncated_png[: len(truncated_png) // 2], "txt": "truncated image"}, "corrupt_image"),
        ({"png": png_header_only(30_000, 30_000), "txt": "too large"}, "image_too_large"),
        ({"png": image_bytes(red)}, "no_caption"),
        ({"txt": "no image at all"}, "no_image"),
        ({"bmp": image_bytes(red, "BMP"), "txt": "unsupported extension"}, "no_image"),
        ({"png": image_bytes(red), "txt": "   \n"}, "empty_caption"),
        ({"png": image_bytes(red), "txt": b"caf\xe9 latin-1"}, "caption_not_utf8"),
    ]
    odd = {
        "cmyk jpeg": ({"jpg": image_bytes(cmyk, "JPEG")}, (255, 0, 0)),
        "16-bit png": ({"png": image_bytes(sixteen_bit)}, (128, 128, 128)),
        "palette png": ({"png": image_bytes(palette)}, (255, 0, 0)),
        "transparent rgba": ({"png": image_bytes(transparent)}, (255, 255, 255)),
        "one pixel": ({"webp": image_bytes(Image.new("RGB", (1, 1), (0, 0, 255)), "WEBP")}, (0, 0, 255)),
        "huge caption": ({"jpeg": image_bytes(solid((0, 255, 0)), "JPEG")}, (0, 255, 0)),
        "good": ({"png": image_bytes(solid((10, 20, 30)))}, (10, 20, 30)),
    }
    samples = [dict(fields, __key__=f"bad{i:03d}") for i, (fields, _) in enumerate(bad)]
    for i, (name, (fields, _)) in enumerate(odd.items()):
        caption = name + " " + "x" * 1_000_000 if name == "huge caption" else name
        samples.append(dict(fields, __key__=f"odd{i:03d}", txt=caption))
    expected_skips: dict[str, int] = {}
    for _, reason in bad:
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    return samples, expected_skips, {name: colour for name, (_, colour) in odd.items()}


def test_bad_samples_are_skipped_and_counted_odd_images_decode_correctly(tmp_path: Path) -> None:
    samples, expected_skips, colours = bad_and_odd_samples()
    shard = write_tar(tmp_path / "00000.tar", samples)
    loader = make_loader(str(shard), transform=plain_transform, batch_size=1, shuffle_buffer=0,
                         num_samples=len(colours))
    seen = {}
    for images, tokens in loader:
        name = decode_tokens(tokens)[0]
        name = "huge caption" if name.startswith("huge caption") else name
        seen[name] = tuple(int(round(v * 255)) for v in images[0, :, 0, 0].tolist())
        assert images.shape == (1, 3, 8, 8) and images.dtype == torch.float32
    assert set(seen) == set(colours)
    for name, colour in colours.items():
        assert np.allclose(seen[name], colour, atol=3), (name, seen[name], colour)
    assert loader.skipped() == expected_skips


def test_a_truncated_tar_ends_its_shard_and_is_counted(tmp_path: Path) -> None:
    shard = caption_shards(tmp_path, [3], sizes_json=False)[0]
    data = shard.read_bytes()
    cut = data.index(b"sample 2") - 600  # inside the third sample's image
    shard.write_bytes(data[:cut])
    loader = make_loader(str(shard), batch_size=1, shuffle_buffer=0, num_samples=4)
    captions = [c[0] for c in captions_of(loader)]
    assert captions == ["sample 0", "sample 1", "sample 0", "sample 1"]
    assert loader.skipped() == {"truncated_tar": 1}


def test_an_unreadable_shard_is_counted_and_the_run_goes_on(tmp_path: Path) -> None:
    caption_shards(tmp_path, [4])
    spec = f"{tmp_path}/00000.tar::pipe:cat {tmp_path}/missing.tar"
    loader = make_loader(spec, batch_size=1, shuffle_buffer=0, num_samples=8)
    assert sorted(c[0] for c in captions_of(loader)) == sorted(f"sample {i % 4}" for i in range(8))
    assert loader.skipped()["unreadable_shard"] >= 1


@pytest.mark.parametrize("resampled", [False, True])
def test_shards_without_any_usable_sample_stop_with_a_clear_error(tmp_path: Path, resampled: bool) -> None:
    write_tar(tmp_path / "00000.tar", [{"__key__": "a", "txt": "no image"}])
    write_tar(tmp_path / "00001.tar", [])
    loader = make_loader(str(tmp_path / "{00000..00001}.tar"), num_samples=8, resampled=resampled)
    with pytest.raises(RuntimeError, match="in a row|no sample in its shards"):
        next(iter(loader))


# --- specs and clear errors ----------------------------------------------------------------------


def test_a_pattern_matching_no_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="matches no file"):
        make_loader(str(tmp_path / "{00000..00003}.tar"), num_samples=10)
    caption_shards(tmp_path, [2, 2])
    with pytest.raises(ValueError, match=r"1 of 3 shards do not exist.*00002\.tar"):
        make_loader(str(tmp_path / "{00000..00002}.tar"))


def test_too_few_shards_for_epoch_mode_suggests_resampled_mode(tmp_path: Path) -> None:
    caption_shards(tmp_path, [8, 8, 8])
    spec = str(tmp_path / "{00000..00002}.tar")
    with pytest.raises(ValueError, match="use resampled mode"):
        make_loader(spec, num_workers=2, world_size=2, rank=1)
    assert make_loader(spec, num_workers=2, world_size=2, rank=1, resampled=True).batches_per_epoch == 3


def test_sample_count_comes_from_sizes_json_or_img2dataset_stats_or_must_be_given(tmp_path: Path) -> None:
    caption_shards(tmp_path / "a", [5, 7])
    caption_shards(tmp_path / "b", [9], start=100, sizes_json=False)
    assert make_loader(str(tmp_path / "a/{00000..00001}.tar")).num_samples == 12
    assert make_loader(str(tmp_path / "a/00001.tar")).num_samples == 7
    assert make_loader(str(tmp_path / "a/*.tar")).num_samples == 12
    both = f"{tmp_path}/a/{{00000..00001}}.tar::{tmp_path}/b/00000.tar"
    with pytest.raises(ValueError, match=r"no sizes.json in .*b and no img2dataset 00000_stats.json beside "
                                         r"00000.tar; set .* data.num_samples .*data.num_samples=N\)"):
        make_loader(both)
    assert make_loader(both, num_samples=21).batches_per_epoch == 5
    # img2dataset writes no sizes.json but a stats file per shard: 'successes' is what the tar holds
    stats = tmp_path / "b" / "00000_stats.json"
    stats.write_text(json.dumps({"count": 10, "successes": 9, "failed_to_download": 1, "failed_to_resize": 0}))
    assert make_loader(both).num_samples == 12 + 9
    stats.write_text(json.dumps({"count": 10}))
    with pytest.raises(ValueError, match=r"00000_stats.json: expected img2dataset's JSON with an integer 'successes'"):
        make_loader(both)


def test_a_damaged_sizes_json_is_named(tmp_path: Path) -> None:
    caption_shards(tmp_path, [5])
    sizes = tmp_path / "sizes.json"
    sizes.write_text('{"00000.tar": ')  # cut short
    with pytest.raises(ValueError, match=r"sizes.json: not readable JSON .*expected a JSON object"):
        make_loader(str(tmp_path / "00000.tar"))
    sizes.write_text(json.dumps({"00000.tar": "five"}))
    with pytest.raises(ValueError, match=r"sizes.json: the sample count of '00000.tar' is 'five', not an integer"):
        make_loader(str(tmp_path / "00000.tar"))
    sizes.write_text(json.dumps({"00000.tar": "5"}))  # open_clip reads counts with int() too
    assert make_loader(str(tmp_path / "00000.tar")).num_samples == 5


def test_weights_parse_and_steer_resampling(tmp_path: Path) -> None:
    caption_shards(tmp_path / "a", [8])
    caption_shards(tmp_path / "b", [8], start=100)
    spec = f"{tmp_path}/a/00000.tar::{tmp_path}/b/00000.tar@9"
    assert [s.weight for s in parse_spec(spec)] == [1.0, 9.0]
    with pytest.raises(ValueError, match="weights need resampled mode"):
        make_loader(spec)
    loader = make_loader(spec, resampled=True, shuffle_buffer=0)
    captions = [c for batch in captions_of(islice(loader, 50)) for c in batch]
    from_b = sum(int(c.split()[1]) >= 100 for c in captions) / len(captions)
    assert 0.75 < from_b < 1.0


def test_pipe_urls_read_the_same_samples_as_local_paths(tmp_path: Path) -> None:
    caption_shards(tmp_path, [4, 4])
    local = make_loader(str(tmp_path / "{00000..00001}.tar"), num_samples=8)
    piped = make_loader(f"pipe:cat {tmp_path}/{{00000..00001}}.tar", num_samples=8)
    assert_same_batches(list(local), list(piped))


# --- epoch mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_yield_equal_batch_counts_on_uneven_shards_and_disjoint_data(tmp_path: Path, num_workers: int) -> None:
    caption_shards(tmp_path, [13, 2, 7, 1, 9])
    spec = str(tmp_path / "{00000..00004}.tar")
    ranks = [captions_of(make_loader(spec, rank=r, world_size=2, num_workers=num_workers, batch_size=3))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 32 // (3 * 2)
    seen = [{c for batch in rank for c in batch} for rank in ranks]
    assert not seen[0] & seen[1]


def test_epochs_advance_and_reshuffle(tmp_path: Path) -> None:
    caption_shards(tmp_path, [6, 6])
    loader = make_loader(str(tmp_path / "{00000..00001}.tar"), num_samples=12)
    first, second = captions_of(loader), captions_of(loader)
    assert len(first) == len(second) == 3 and loader.epoch == 2
    assert first != second
    assert sorted(sum(first, [])) == sorted(f"sample {i}" for i in range(12))


# --- determinism and resume -------------------------------------------------------------------------


def test_same_seed_same_batches_other_seed_other_batches(tmp_path: Path) -> None:
    caption_shards(tmp_path, [10, 10])
    spec = str(tmp_path / "{00000..00001}.tar")
    assert_same_batches(list(make_loader(spec)), list(make_loader(spec)))
    assert captions_of(make_loader(spec)) != captions_of(make_loader(spec, seed=1))


def shards_with_bad_samples(directory: Path) -> str:
    """Four shards of uneven size with bad samples mixed in: positions must count them."""
    caption_shards(directory, [9, 5, 12, 7])
    bad, _, _ = bad_and_odd_samples()
    write_tar(directory / "00004.tar", bad[:5] + [{"__key__": "x", "png": image_bytes(noise(99)), "txt": "sample 99"}])
    sizes = json.loads((directory / "sizes.json").read_text())
    sizes["00004.tar"] = 6
    (directory / "sizes.json").write_text(json.dumps(sizes))
    return str(directory / "{00000..00004}.tar")


def take(loader: TrainLoader, n: int) -> list:
    """The next ``n`` batches, iterating again when an epoch ends (as a trainer does)."""
    batches: list = []
    while len(batches) < n:
        for batch in loader:
            batches.append(batch)
            if len(batches) == n:
                break
    return batches


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("resampled", [False, True])
def test_resume_mid_epoch_yields_exactly_the_next_batches(tmp_path: Path, num_workers: int, resampled: bool) -> None:
    spec = shards_with_bad_samples(tmp_path)
    options = dict(num_workers=num_workers, resampled=resampled, batch_size=3, shuffle_buffer=6)
    reference = make_loader(spec, **options)
    per_epoch = reference.batches_per_epoch  # 39 samples // 3 = 13
    expected = take(reference, per_epoch + 4)  # into the second epoch
    assert reference.skipped()  # the bad samples were met and counted
    for consumed in (5, per_epoch - 1):
        interrupted = make_loader(spec, **options)
        take(interrupted, consumed)
        state = json.loads(json.dumps(interrupted.state_dict()))
        resumed = make_loader(spec, **options, state=state)
        assert resumed.skipped() == interrupted.skipped()
        assert_same_batches(take(resumed, 3), expected[consumed:consumed + 3])
        uninterrupted = make_loader(spec, **options)
        take(uninterrupted, consumed + 3)
        assert resumed.skipped() == uninterrupted.skipped()
        assert resumed.state_dict() == uninterrupted.state_dict()


def test_a_state_from_another_setup_is_refused(tmp_path: Path) -> None:
    caption_shards(tmp_path, [6, 6])
    spec = str(tmp_path / "{00000..00001}.tar")
    loader = make_loader(spec)
    next(iter(loader))
    with pytest.raises(ValueError, match="batch_size: now 2, saved 4"):
        make_loader(spec, batch_size=2, state=loader.state_dict())


def worker_pid(image: Image.Image) -> torch.Tensor:
    """A 'transform' that returns the id of the process that ran it."""
    return torch.tensor([os.getpid()])


def test_worker_processes_persist_across_epochs(tmp_path: Path) -> None:
    caption_shards(tmp_path, [6, 6, 6, 6])
    loader = make_loader(str(tmp_path / "{00000..00003}.tar"), transform=worker_pid, num_workers=2, batch_size=3)
    pids_by_epoch = [{int(pid) for images, _ in loader for pid in images} for _ in range(3)]
    assert loader.epoch == 3
    assert len(pids_by_epoch[0]) == 2 and os.getpid() not in pids_by_epoch[0]
    assert pids_by_epoch[0] == pids_by_epoch[1] == pids_by_epoch[2]


@pytest.mark.parametrize("num_workers", [1, 3])
def test_batches_continue_across_epochs_with_uneven_worker_quotas(tmp_path: Path, num_workers: int) -> None:
    """7 batches an epoch over 3 workers: a worker process plays another logical worker each epoch, and
    every epoch equals the one a loader started fresh at that epoch yields."""
    caption_shards(tmp_path, [5] * 6)
    spec = str(tmp_path / "{00000..00005}.tar")
    loader = make_loader(spec, num_workers=num_workers, batch_size=3, num_samples=21)
    assert loader.batches_per_epoch == 7
    for _ in range(3):
        fresh = make_loader(spec, num_workers=num_workers, batch_size=3, num_samples=21,
                            state=json.loads(json.dumps(loader.state_dict())))
        epoch = captions_of(loader)
        assert len(epoch) == 7 and len(set(sum(epoch, []))) == 21
        assert epoch == captions_of(fresh)


def logged_pipe_spec(directory: Path, shards: int, log: Path) -> str:
    """A ``pipe:`` spec over ``directory``'s shards whose command notes each shard it opens in ``log``."""
    return f"pipe:sh -c 'echo {{00000..{shards - 1:05d}}} >> {log}; cat {directory}/{{00000..{shards - 1:05d}}}.tar'"


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_reads_only_the_shards_feeding_the_buffer_wherever_it_is(tmp_path: Path, resampled: bool) -> None:
    caption_shards(tmp_path / "shards", [5] * 40)
    log = tmp_path / "opened.txt"
    spec = logged_pipe_spec(tmp_path / "shards", 40, log)
    options = dict(resampled=resampled, batch_size=4, shuffle_buffer=8, num_samples=200)
    reference = make_loader(spec, **options)
    states = {}
    expected = {}
    batches = take(reference, 48)
    for consumed in (5, 45):  # 10% and 90% of the epoch's 50 batches
        loader = make_loader(spec, **options)
        take(loader, consumed)
        states[consumed] = json.loads(json.dumps(loader.state_dict()))
        expected[consumed] = batches[consumed]
    for consumed, state in states.items():
        log.write_text("")
        resumed = make_loader(spec, **options, state=state)
        assert_same_batches(take(resumed, 1), [expected[consumed]])
        opened = log.read_text().split()
        # at most one shard per buffered sample, plus the shard being read (which may hold some of them);
        # replaying from the start of the epoch would open about consumed * 4 / 5 shards (36 at 90%)
        assert 1 <= len(opened) <= options["shuffle_buffer"] + 1, (consumed, opened)
