"""Approximate (elastic) resume in one process: what the rest of the epoch holds after the setup changed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_fixtures import caption_shards, plain_transform
from mmggem.data import elastic
from mmggem.errors import UserError
from test_data_loader import captions_of, make_loader, take

PER_SHARD = 5
OLD = dict(world_size=2, batch_size=2, shuffle_buffer=0, transform=plain_transform)  # one worker per rank
NEW = dict(world_size=1, num_workers=2, batch_size=3, shuffle_buffer=0, transform=plain_transform)


def saved_states(spec: str, consumed: int, resampled: bool = False) -> tuple[list[dict], set[str]]:
    """Both old ranks' states after ``consumed`` batches each (as JSON), and the captions they yielded."""
    states, seen = [], set()
    for rank in range(2):
        loader = make_loader(spec, rank=rank, resampled=resampled, **OLD)
        seen.update(caption for batch in captions_of(take(loader, consumed)) for caption in batch)
        states.append(json.loads(json.dumps(loader.state_dict())))
    return states, seen


def shard_of(caption: str) -> int:
    return int(caption.split()[1]) // PER_SHARD


@pytest.fixture
def spec(tmp_path: Path) -> str:
    caption_shards(tmp_path, [PER_SHARD] * 8)  # 40 samples: 10 batches of 2 on each of 2 old ranks
    return str(tmp_path / "{00000..00007}.tar")


def test_epoch_mode_continues_with_the_samples_left_from_the_shards_not_read_to_the_end(spec: str) -> None:
    saved, seen = saved_states(spec, consumed=4)  # 8 samples a rank: its first shard and 3 of its second
    read_out = {shard for shard in range(8) if all(f"sample {shard * PER_SHARD + i}" in seen for i in range(5))}
    assert len(read_out) == 2
    loader = make_loader(spec, **NEW)
    warning = loader.resume_approximately(saved)
    left = (40 - 2 * 4 * 2) // 3
    assert f"epoch 0 continues for its remaining {left} batches with the 6 of 8 shards" in warning
    rest = [caption for batch in captions_of(loader) for caption in batch]
    assert len(rest) == left * 3 and len(set(rest)) == len(rest) and loader.epoch == 1
    assert not {shard_of(caption) for caption in rest} & read_out
    fresh = make_loader(spec, **NEW)
    captions_of(fresh)
    assert captions_of(loader) == captions_of(fresh)  # the next epoch is a whole one, as if never interrupted


def test_resampled_mode_continues_for_the_batches_left_from_fresh_streams(spec: str) -> None:
    saved, seen = saved_states(spec, consumed=4, resampled=True)
    loader = make_loader(spec, resampled=True, **NEW)
    left = (40 - 2 * 4 * 2) // 3
    assert f"epoch 0 continues for its remaining {left} batches from fresh shard streams" in \
        loader.resume_approximately(saved)
    fresh = make_loader(spec, resampled=True, **NEW)
    per_epoch = fresh.batches_per_epoch
    rest = captions_of(take(loader, left))
    assert loader.epoch == 1
    assert rest != captions_of(take(fresh, left))  # salted: not the streams a fresh run of this setup draws
    take(fresh, per_epoch - left)
    assert captions_of(take(loader, per_epoch)) == captions_of(take(fresh, per_epoch))


def test_too_few_samples_left_for_a_new_batch_start_the_next_epoch(spec: str) -> None:
    saved, _ = saved_states(spec, consumed=9)  # 4 samples left, batches of 5 now
    loader = make_loader(spec, **{**NEW, "batch_size": 5})
    assert "the rest of epoch 0 is skipped, epoch 1 starts now" in loader.resume_approximately(saved)
    assert loader.epoch == 1
    fresh = make_loader(spec, **{**NEW, "batch_size": 5})
    captions_of(fresh)
    assert captions_of(loader) == captions_of(fresh)


def test_old_skip_counts_are_carried_once_by_rank_zero(spec: str) -> None:
    saved, _ = saved_states(spec, consumed=2)
    saved[0]["workers"][0]["skipped"] = {"no_caption": 2}
    saved[1]["skipped_before"] = {"corrupt_image": 1}
    ranks = [make_loader(spec, **{**NEW, "world_size": 2, "num_workers": 0, "rank": rank}) for rank in (0, 1)]
    for loader in ranks:
        loader.resume_approximately(saved)
    assert [loader.skipped() for loader in ranks] == [{"no_caption": 2, "corrupt_image": 1}, {}]


def test_another_shard_list_is_refused_unless_accepted(spec: str, tmp_path: Path) -> None:
    saved, _ = saved_states(spec, consumed=4)
    fewer = str(tmp_path / "{00000..00006}.tar")
    with pytest.raises(UserError, match=r"lists other shards than the checkpoint's run: now 7 .* then 8"):
        make_loader(fewer, num_samples=35, **NEW).resume_approximately(saved)
    setup = make_loader(fewer, num_samples=35, **NEW).setup
    resumed = elastic.resume_approximately(saved, setup, accept_changed_shards=True)
    assert resumed.state.override is not None and resumed.state.override.urls == setup.urls  # dealt from all 7
    assert "with the 7 of 7 shards" in resumed.warning


def test_one_process_checkpoint_continues_on_two_ranks_with_the_shards_not_read_to_the_end(spec: str) -> None:
    """The other way round (1 -> 2 processes), whose end-to-end test (test_train.py) runs in resampled mode."""
    old = make_loader(spec, **{**OLD, "world_size": 1})  # one rank with one worker
    seen = {caption for batch in captions_of(take(old, 4)) for caption in batch}  # its first shard, 3 of the next
    saved = [json.loads(json.dumps(old.state_dict()))]
    read_out = {shard for shard in range(8) if all(f"sample {shard * PER_SHARD + i}" in seen for i in range(5))}
    assert len(seen) == 8 and len(read_out) == 1
    new = {**NEW, "world_size": 2, "num_workers": 1}
    ranks = [make_loader(spec, **new, rank=rank) for rank in (0, 1)]
    left = (40 - 4 * 2) // (3 * 2)  # batches per rank
    for loader in ranks:
        assert f"epoch 0 continues for its remaining {left} batches with the {8 - len(read_out)} of 8 shards" in \
            loader.resume_approximately(saved)
    rests = [captions_of(loader) for loader in ranks]
    assert [len(rest) for rest in rests] == [left, left] and all(loader.epoch == 1 for loader in ranks)
    dealt = [caption for rest in rests for batch in rest for caption in batch]
    assert len(dealt) == len(set(dealt)) == 2 * left * 3  # the ranks share no sample
    assert not {shard_of(caption) for caption in dealt} & read_out
    fresh = [make_loader(spec, **new, rank=rank) for rank in (0, 1)]
    for loader, again in zip(ranks, fresh):
        captions_of(again)
        assert captions_of(loader) == captions_of(again)  # epoch 1 is a whole one, as if never interrupted
