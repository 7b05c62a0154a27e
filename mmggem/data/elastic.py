"""Approximate (elastic) resume: where a loader of a new setup continues an epoch saved by another one.

An exact resume needs the same world size, workers, batch size and shards. When they changed, the
epoch and the skip counts carry over and the rest of the epoch is the samples it had left, in
batches of the new shape: in epoch mode drawn from the shards no old worker had started, re-dealt
to the new workers; in resampled mode from fresh streams. :func:`resume_approximately` computes
that position from the saved states alone: no sample is read.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from ..errors import UserError
from .schedule import EpochOverride, Schedule, Setup, ShardSequence
from .state import LoaderState, check_version


@dataclass(frozen=True)
class ApproximateResume:
    """The position a loader of the new setup starts from, and the warning that tells the user what it lost."""

    state: LoaderState
    warning: str


def resume_approximately(saved: list[dict[str, Any]], setup: Setup,
                         accept_changed_shards: bool = False) -> ApproximateResume:
    """Continue the saved epoch (``saved``: every old rank's state JSON) with the new ``setup``.

    A shard list other than the saved one is a UserError unless ``accept_changed_shards``; then the
    rest of the epoch is dealt from the new list. Only rank 0 carries the old skip counts, so that a
    sum over the new ranks counts each once.
    """
    for state in saved:
        check_version(state)
    old = saved[0]["layout"]
    urls = setup.urls
    changed_shards = old["shards_digest"] != setup.digest
    if changed_shards and not accept_changed_shards:
        same_ends = (old["shards"], old["first_shard"], old["last_shard"]) == (len(urls), urls[0], urls[-1])
        raise UserError(
            f"data.train lists other shards than the checkpoint's run: now {len(urls)} "
            f"({urls[0]} .. {urls[-1]}), then {old['shards']} ({old['first_shard']} .. "
            f"{old['last_shard']}){', the same ends with others between' if same_ends else ''}; set "
            "data.accept_changed_shards=true to continue with the new list (approximate resume)")
    epoch = int(saved[0]["epoch"])
    consumed = sum(int(state["batches"]) for state in saved) * old["batch_size"]
    epoch_samples = (saved[0]["epoch_batches"] or old["batches_per_epoch"]) * old["batch_size"] * len(saved)
    left = max(0, epoch_samples - consumed) // (setup.batch_size * setup.world_size)
    unstarted: tuple[str, ...] | None = None
    if not setup.resampled:
        finished = set() if changed_shards else finished_shards(saved, setup)
        unstarted = tuple(url for url in urls if url not in finished)
        if len(unstarted) < setup.world_size * setup.workers:
            left = 0
    skipped: Counter = Counter()
    if setup.rank == 0:
        for state in saved:
            skipped.update(state["skipped_before"])
            for worker in state["workers"]:
                skipped.update(worker["skipped"])
    was = (f"world_size {old['world_size']}, {old['workers']} workers, batch_size {old['batch_size']}, "
           f"{old['shards']} shards")
    now = f"world_size {setup.world_size}, {setup.workers} workers, batch_size {setup.batch_size}, {len(urls)} shards"
    header = (f"resuming approximately: the checkpoint was written with {was}, this run has {now}. The model, "
              "optimizer, scheduler and step are restored exactly; the data position is not: ")
    if left < 1:
        return ApproximateResume(LoaderState.start(epoch + 1, setup.workers, skipped),
                                 header + f"the rest of epoch {epoch} is skipped, epoch {epoch + 1} starts now.")
    state = LoaderState.start(epoch, setup.workers, skipped)
    state.override = EpochOverride(epoch, left, unstarted, max(int(s["salt"]) for s in saved) + 1)
    if unstarted is None:
        return ApproximateResume(
            state, header + f"epoch {epoch} continues for its remaining {left} batches from fresh shard streams.")
    return ApproximateResume(state, header + (
        f"epoch {epoch} continues for its remaining {left} batches with the {len(unstarted)} of {len(urls)} shards "
        "no worker had started, re-dealt to the new workers (samples in the old shuffle buffers and in shards "
        "being read may be missed or repeated this epoch)."))


def finished_shards(saved: list[dict[str, Any]], setup: Setup) -> set[str]:
    """Epoch mode: the shards the saved ranks' workers had read to the end in the saved epoch.

    The saved layouts name the old setups, read in epoch mode over ``setup``'s shards (the caller checked
    they are the saved ones).
    """
    finished: set[str] = set()
    for data in saved:
        state = LoaderState.from_json(data)
        old = replace(Setup.from_layout(data["layout"], setup.urls, setup.weights), resampled=False)
        schedule = Schedule(old, state.override)
        for worker, position in enumerate(state.workers):
            if position.reader is None:
                continue
            pass_index, shard_index, _ = position.reader.position
            sequence = ShardSequence(schedule, state.epoch, worker)
            done = len(sequence.shards) if pass_index > 0 else shard_index
            finished.update(sequence.url(0, index) for index in range(done))
    return finished
