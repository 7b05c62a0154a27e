"""One tar rule: training, evaluation and webdataset's own pipeline see the same samples in a shard."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from data_fixtures import byte_tokenizer, decode_tokens, image_bytes, noise, plain_transform
from mmggem.data.loader import TrainLoader
from mmggem.errors import UserError
from mmggem.evaluate.dataset import open_eval_set


def write_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in this order (webdataset's TarWriter cannot write odd names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, index: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image_bytes(noise(index))), (f"{key}.txt", f"caption {index}".encode())]


def eval_set(root: Path, members: list[tuple[str, bytes]]) -> Path:
    write_members(root / "test" / "0.tar", members)
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def training_captions(shard: Path, count: int) -> tuple[list[str], dict[str, int]]:
    loader = TrainLoader(str(shard), transform=plain_transform, tokenizer=byte_tokenizer, batch_size=1,
                         num_workers=0, seed=0, resampled=False, shuffle_buffer=0, rank=0, world_size=1,
                         num_samples=count)
    return [decode_tokens(tokens)[0] for _, tokens in loader], loader.skipped()


def webdataset_samples(shard: Path) -> list[dict]:
    return list(wds.WebDataset(str(shard), shardshuffle=False))


def test_metadata_in_a_sub_folder_and_dotted_folders_group_the_same_everywhere(tmp_path: Path) -> None:
    members = [("__meta__", b"{}"), *sample("plain", 0), *sample("a/__x__/b", 1), *sample("v1.2/img7", 2),
               ("__meta2__/info.json", b"{}"), *sample("c.d/e.f/g", 3)]
    root = eval_set(tmp_path / "set", members)
    shard = root / "test" / "0.tar"

    reference = webdataset_samples(shard)
    assert [s["__key__"] for s in reference] == ["plain", "a/__x__/b", "v1.2/img7", "c.d/e.f/g"]
    captions = sorted(s["txt"].decode() for s in reference)

    trained, skipped = training_captions(shard, 4)
    assert sorted(trained) == captions and skipped == {}
    evaluated = open_eval_set(root)
    assert [s.key for s in evaluated.samples] == [s["__key__"] for s in reference]
    assert sorted(c for s in evaluated.samples for c in s.captions) == captions


def test_a_duplicated_extension_is_a_counted_skip_in_training_and_an_error_in_evaluation(tmp_path: Path) -> None:
    members = [*sample("first", 0), *sample("twice", 1), ("twice.PNG", image_bytes(noise(9))), *sample("last", 2)]
    root = eval_set(tmp_path / "set", members)
    shard = root / "test" / "0.tar"

    with pytest.raises(ValueError, match="duplicate file name"):
        webdataset_samples(shard)
    trained, skipped = training_captions(shard, 2)
    assert sorted(trained) == ["caption 0", "caption 2"] and skipped == {"duplicate_member": 1}
    with pytest.raises(UserError, match=r"0\.tar: sample 'twice' has two members with the extension of 'twice\.PNG'"):
        open_eval_set(root)


def test_a_resume_inside_a_shard_counts_its_skips_once(tmp_path: Path) -> None:
    """Resuming re-reads the part of the shard read before the checkpoint: its skips were counted then."""
    members = [*sample("first", 0), *sample("twice", 1), ("twice.PNG", image_bytes(noise(9))),
               *sample("third", 2), *sample("fourth", 3), *sample("fifth", 4)]
    shard = write_members(tmp_path / "0.tar", members)
    options = dict(transform=plain_transform, tokenizer=byte_tokenizer, batch_size=1, num_workers=0, seed=0,
                   resampled=False, shuffle_buffer=0, rank=0, world_size=1, num_samples=4)
    interrupted = TrainLoader(str(shard), **options)
    batches = iter(interrupted)
    read = [decode_tokens(next(batches)[1])[0] for _ in range(2)]
    assert read == ["caption 0", "caption 2"] and interrupted.skipped() == {"duplicate_member": 1}
    resumed = TrainLoader(str(shard), **options, state=interrupted.state_dict())
    assert resumed.skipped() == {"duplicate_member": 1}
    assert [decode_tokens(tokens)[0] for _, tokens in resumed] == ["caption 3", "caption 4"]
    assert resumed.skipped() == {"duplicate_member": 1}
