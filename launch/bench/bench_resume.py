"""Time to the first batch after resuming the training loader at 10%, 50% and 90% of an epoch.

Builds a synthetic set of many small shards (default 400 x 100 samples of 32 px PNGs with
captions), runs one pass of the loader per mode (epoch and resampled), saving its state at each
position as the trainer's checkpoint would, then builds a fresh loader from each state and times
its first batch (worker start, re-reading the shards that feed the shuffle buffers, decoding one
batch), best of ``--repeats``. A resume whose cost grew with the position would show a 90%/10%
ratio near 9; bounded by the shards in the buffers, it stays near 1.

    python launch/bench/bench_resume.py
    python launch/bench/bench_resume.py --shards 400 --per-shard 100 --workers 2 --shuffle-buffer 1000
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

POSITIONS = (0.1, 0.5, 0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=400)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def make_shards(directory: Path, shards: int, per_shard: int, size: int) -> str:
    """Small noise PNGs with short captions, written with mmggem's shard writer (with sizes.json)."""
    import numpy as np
    from PIL import Image

    from mmggem.data.write import EncodedImage, TrainingSample, write_training_shards

    rng = np.random.default_rng(0)

    def samples():
        for index in range(shards * per_shard):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
            yield TrainingSample(EncodedImage("png", buffer.getvalue()), f"sample {index}")

    write_training_shards(directory, samples(), per_shard)
    return str(directory / f"{{00000..{shards - 1:05d}}}.tar")


def build_loader(spec: str, args: argparse.Namespace, resampled: bool, state: dict | None = None):
    import open_clip

    from mmggem.data.device import split_transform
    from mmggem.data.loader import TrainLoader

    uint8, _ = split_transform(open_clip.image_transform(args.image_size, is_train=True))
    return TrainLoader(spec, transform=uint8, tokenizer=open_clip.get_tokenizer("ViT-B-32"),
                       batch_size=args.batch_size, num_workers=args.workers, seed=0, resampled=resampled,
                       shuffle_buffer=args.shuffle_buffer, rank=0, world_size=1, state=state)


def states_at(spec: str, args: argparse.Namespace, resampled: bool) -> tuple[dict[float, dict], int]:
    """The loader's state after 10%, 50% and 90% of the epoch's batches, from one pass."""
    loader = build_loader(spec, args, resampled)
    wanted = {round(loader.batches_per_epoch * f): f for f in POSITIONS}
    states, consumed = {}, 0
    for _ in loader:
        consumed += 1
        if consumed in wanted:
            states[wanted[consumed]] = json.loads(json.dumps(loader.state_dict()))
        if consumed == max(wanted):
            break
    return states, loader.batches_per_epoch


def first_batch_seconds(spec: str, args: argparse.Namespace, resampled: bool, state: dict | None) -> float:
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        next(iter(build_loader(spec, args, resampled, state)))
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_resume_") as tmp:
        print(f"writing {args.shards} shards x {args.per_shard} samples ({args.image_size} px PNG)", flush=True)
        spec = make_shards(Path(tmp), args.shards, args.per_shard, args.image_size)
        print(f"batch {args.batch_size}, {args.workers} workers, shuffle buffer {args.shuffle_buffer} per worker; "
              f"first batch after a resume, best of {args.repeats}")
        for resampled in (False, True):
            mode = "resampled" if resampled else "epoch"
            states, per_epoch = states_at(spec, args, resampled)
            times = {0.0: first_batch_seconds(spec, args, resampled, None)}
            times.update({f: first_batch_seconds(spec, args, resampled, states[f]) for f in POSITIONS})
            cells = "  ".join(f"{int(f * 100):>2d}%: {seconds:6.3f} s" for f, seconds in times.items())
            print(f"{mode:9s} ({per_epoch} batches/epoch)  {cells}  90%/10%: {times[0.9] / times[0.1]:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
