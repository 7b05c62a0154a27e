"""Training-loader throughput: mmggem's TrainLoader against open_clip's get_wds_dataset, in one run.

Both read the same shards with the same number of workers, batch size, shuffle-buffer size, the same
open_clip training transform (``image_transform(SIZE, is_train=True)``) and the same open_clip
tokenizer, in epoch mode. mmggem's side works as its trainer does: the workers hand over uint8
batches and the main process converts and normalises them (on the device; here the CPU, inside the
timed loop), where open_clip's workers hand over normalised float32 batches. Each side runs in its
own process, one after the other, and reports samples/s over ``--batches`` batches after ``--warmup``
batches (the warm-up covers worker start and the shuffle buffer filling). open_clip_train needs
webdataset 0.2.86 and pandas, so its side runs under ``--peer-python``, the python of its own
virtual environment (docs/benchmarks.md, "The peers' environments", says how to make it). This same file is the
peer's entry point (``--side open_clip``); that side imports nothing from mmggem or benchlib.

    python launch/bench/bench_loader.py --peer-python PEER_VENV/bin/python
    python launch/bench/bench_loader.py --peer-python PEER_VENV/bin/python \
        --shards 'demo-data/train/{00000..00006}.tar' --image-size 28

Without ``--shards`` it first writes synthetic shards (smooth 256x256 JPEG photos, ~10 KB each,
captions of 8-20 words) into a temporary directory with mmggem's shard writer (``benchlib``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHUFFLE_BUFFER = 5000  # open_clip_train's sample shuffle buffer (_SAMPLE_SHUFFLE_SIZE); benchlib's, unimported here


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python",
                        help="python of the open_clip_train environment (see docs/benchmarks.md, \"The peers' environments\")")
    parser.add_argument("--shards", help="shard spec to read (default: synthetic shards made first)")
    parser.add_argument("--num-samples", type=int, help="samples in --shards when there is no sizes.json")
    parser.add_argument("--image-size", type=int, default=224, help="transform output size (default: 224)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10, help="batches before timing starts")
    parser.add_argument("--batches", type=int, default=100, help="batches timed")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side (best and median shown)")
    parser.add_argument("--tokenizer", default="ViT-B-32", help="open_clip model name whose tokenizer is used")
    parser.add_argument("--synthetic-shards", type=int, default=8)
    parser.add_argument("--synthetic-per-shard", type=int, default=1000)
    parser.add_argument("--side", choices=["both", "mmggem", "open_clip"], default="both", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side == "both" and args.peer_python is None:
        parser.error("--peer-python is required: the python of open_clip_train's own environment")
    return args


def timed(batches, warmup: int, count: int, finish=None) -> dict:
    """Samples/s over ``count`` batches after ``warmup`` batches of an iterable of (images, tokens).

    ``finish`` (images -> images) runs on each batch in the timed loop, as the trainer's step would.
    """
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    start, samples = time.perf_counter(), 0
    for _ in range(count):
        images, tokens = next(iterator)
        if finish is not None:
            images = finish(images)
        samples += images.shape[0]
    seconds = time.perf_counter() - start
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
            "shape": list(images.shape), "tokens": list(tokens.shape)}


def run_mmggem(args: argparse.Namespace) -> dict:
    import open_clip

    from mmggem.data.device import DeviceNormalizer, split_transform
    from mmggem.data.loader import TrainLoader

    uint8, normalization = split_transform(open_clip.image_transform(args.image_size, is_train=True))
    loader = TrainLoader(args.shards, transform=uint8, tokenizer=open_clip.get_tokenizer(args.tokenizer),
                         batch_size=args.batch_size, num_workers=args.workers, seed=0, resampled=False,
                         shuffle_buffer=SHUFFLE_BUFFER, rank=0, world_size=1, num_samples=args.num_samples)
    return timed(loader, args.warmup, args.batches, finish=DeviceNormalizer(normalization, "cpu"))


def run_open_clip(args: argparse.Namespace) -> dict:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    options = argparse.Namespace(
        train_data=args.shards, val_data=None, train_num_samples=args.num_samples, dataset_resampled=False,
        train_data_upsampling_factors=None, seed=0, batch_size=args.batch_size, workers=args.workers, world_size=1)
    data = get_wds_dataset(options, open_clip.image_transform(args.image_size, is_train=True), is_train=True,
                           epoch=0, tokenizer=open_clip.get_tokenizer(args.tokenizer))
    return timed(data.dataloader, args.warmup, args.batches)


def side_command(args: argparse.Namespace, side: str) -> list[str]:
    python = args.peer_python if side == "open_clip" else sys.executable
    command = [python, __file__, "--side", side, "--shards", args.shards, "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--warmup", str(args.warmup),
               "--batches", str(args.batches), "--tokenizer", args.tokenizer]
    return command + (["--num-samples", str(args.num_samples)] if args.num_samples else [])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side != "both":
        print(json.dumps((run_mmggem if args.side == "mmggem" else run_open_clip)(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        if args.shards is None:
            count = f"{args.synthetic_shards} x {args.synthetic_per_shard}"
            print(f"writing {count} synthetic samples to {tmp}", flush=True)
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from benchlib import write_synthetic_shards

            args.shards = write_synthetic_shards(Path(tmp), args.synthetic_shards * args.synthetic_per_shard,
                                                 args.synthetic_per_shard, size=256)
        results: dict[str, list[dict]] = {"mmggem": [], "open_clip": []}
        for repeat in range(args.repeats):
            for side in results:
                output = subprocess.run(side_command(args, side), check=True, capture_output=True, text=True).stdout
                results[side].append(json.loads(output.strip().splitlines()[-1]))
                print(f"run {repeat + 1} {side}: {results[side][-1]['samples_per_s']:.1f} samples/s", flush=True)
    best = {side: max(r["samples_per_s"] for r in runs) for side, runs in results.items()}
    median = {side: statistics.median(r["samples_per_s"] for r in runs) for side, runs in results.items()}
    print(f"shards {args.shards}, batch {args.batch_size}, workers {args.workers}, transform {args.image_size}px, "
          f"{args.batches} batches timed after {args.warmup}, shuffle buffer {SHUFFLE_BUFFER}, "
          f"{args.repeats} runs each")
    print(f"{'samples/s':27s} {'best':>8s} {'median':>8s}")
    print(f"{'mmggem TrainLoader':27s} {best['mmggem']:8.1f} {median['mmggem']:8.1f}")
    print(f"{'open_clip get_wds_dataset':27s} {best['open_clip']:8.1f} {median['open_clip']:8.1f}")
    print(f"{'ratio mmggem / open_clip':27s} {best['mmggem'] / best['open_clip']:8.2f} "
          f"{median['mmggem'] / median['open_clip']:8.2f}")


if __name__ == "__main__":
    main()
