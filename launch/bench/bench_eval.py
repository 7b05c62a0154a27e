"""Zero-shot classification speed: mmggem against CLIP_benchmark, same model, set and settings, in one run.

Both evaluate the same model object on the same CLIP_benchmark-layout set with the
same batch size, loader workers, torch threads and precision; the runs alternate
(mmggem, CLIP_benchmark, mmggem, ...) and each is timed end to end, from the set's
folder to the metrics (reading, decoding, text and image encoding, metrics). The
script prints images/s of each (median over repeats), their ratio, and whether the
metrics agree.

Without ``--dataset`` it writes 2,000 28x28 PNG images of the embedded Fashion-MNIST
subset as a CLIP_benchmark set in a temporary folder.

    python launch/bench/bench_eval.py --model ViT-Ti-4-32 --images 2000 --batch-size 64 --workers 1 --threads 2
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import webdataset as wds

import mmggem
from mmggem.data.fashion_mnist import load_splits
from mmggem.evaluate import evaluate_dataset, load_model
from mmggem.evaluate.dataset import open_eval_set
from mmggem.evaluate.metadata import FASHION_MNIST_CLASSNAMES, FASHION_MNIST_TEMPLATES
from mmggem.model.clip import get_tokenizer, image_transform


def write_fashion_mnist_set(root: Path, count: int, per_shard: int = 1000) -> Path:
    """``count`` Fashion-MNIST images (train split first, then test) as PNGs in CLIP_benchmark's layout."""
    splits = load_splits()
    images = np.concatenate([splits.train_images, splits.test_images])[:count]
    labels = np.concatenate([splits.train_labels, splits.test_labels])[:count]
    (root / "test").mkdir(parents=True)
    nshards = 0
    for start in range(0, len(images), per_shard):
        with wds.TarWriter(str(root / "test" / f"{nshards}.tar")) as writer:
            for i in range(start, min(start + per_shard, len(images))):
                buffer = io.BytesIO()
                PIL.Image.fromarray(images[i]).save(buffer, format="PNG")
                writer.write({"__key__": f"s{i:07d}", "png": buffer.getvalue(), "cls": int(labels[i])})
        nshards += 1
    (root / "test" / "nshards.txt").write_text(f"{nshards}\n")
    (root / "dataset_type.txt").write_text("classification\n")
    (root / "classnames.txt").write_text("".join(f"{name}\n" for name in FASHION_MNIST_CLASSNAMES))
    (root / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in FASHION_MNIST_TEMPLATES))
    return root


def run_mmggem(model: torch.nn.Module, root: Path, preprocess: Callable, tokenizer: Callable,
               args: argparse.Namespace) -> dict[str, float]:
    return evaluate_dataset(model, root, preprocess, tokenizer, batch_size=args.batch_size, num_workers=args.workers,
                            device="cpu", amp=args.amp, progress=False).metrics


def run_clip_benchmark(model: torch.nn.Module, root: Path, preprocess: Callable, tokenizer: Callable,
                       args: argparse.Namespace) -> dict[str, float]:
    """CLIP_benchmark's path for a ``wds/`` set, as its CLI takes it (``build_wds_dataset``, batched loader)."""
    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.metrics import zeroshot_classification

    dataset = build_wds_dataset(root.name, transform=preprocess, split="test", data_dir=str(root))
    loader = torch.utils.data.DataLoader(dataset.batched(args.batch_size), batch_size=None, shuffle=False,
                                         num_workers=args.workers)
    return zeroshot_classification.evaluate(model, loader, tokenizer, dataset.classes, dataset.templates, "cpu",
                                            amp=args.amp)


def timed(run: Callable[..., dict[str, float]], *run_args: Any) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    metrics = run(*run_args)
    return time.perf_counter() - start, metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-Ti-4-32", help="mmggem.create_model name (random weights)")
    parser.add_argument("--pooling", default="ggem")
    parser.add_argument("--checkpoint", help="evaluate this checkpoint instead (anything mmggem eval takes)")
    parser.add_argument("--pretrained", help="open_clip checkpoint file for --checkpoint open_clip:NAME")
    parser.add_argument("--dataset", type=Path, help="a CLIP_benchmark classification set (default: Fashion-MNIST)")
    parser.add_argument("--images", type=int, default=2000, help="images in the default set")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU) for both")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.checkpoint:
        loaded = load_model(args.checkpoint, args.pretrained)
        model, preprocess, tokenizer, name = loaded.model, loaded.preprocess, loaded.tokenizer, loaded.model_name
    else:
        torch.manual_seed(0)
        model = mmggem.create_model(args.model, pooling=args.pooling).eval()
        preprocess, tokenizer, name = image_transform(model, is_train=False), get_tokenizer(model), args.model
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dataset or write_fashion_mnist_set(Path(tmp) / "fashion_mnist", args.images)
        images = len(open_eval_set(root).samples)
        times: dict[str, list[float]] = {"mmggem": [], "clip_benchmark": []}
        results = {}
        for _ in range(args.repeats):
            for label, run in (("mmggem", run_mmggem), ("clip_benchmark", run_clip_benchmark)):
                seconds, results[label] = timed(run, model, root, preprocess, tokenizer, args)
                times[label].append(seconds)
    rates = {label: images / statistics.median(seconds) for label, seconds in times.items()}
    print(f"model {name}, {images} images from {args.dataset or 'Fashion-MNIST (PNG, 28x28)'}, batch "
          f"{args.batch_size}, {args.workers} worker(s), {args.threads} thread(s), amp {args.amp}, "
          f"median of {args.repeats}")
    for label, rate in rates.items():
        runs = ", ".join(f"{s:.2f}" for s in times[label])
        print(f"  {label:15s} {rate:8.1f} images/s   (runs: {runs} s)")
    print(f"  ratio mmggem / clip_benchmark: {rates['mmggem'] / rates['clip_benchmark']:.2f}x")
    ours, reference = results["mmggem"], results["clip_benchmark"]
    same = all(abs(ours[key] - reference[key]) <= 1e-6 for key in ours) and set(ours) <= set(reference)
    print(f"  metrics agree: {same}  mmggem {ours}  clip_benchmark {reference}")


if __name__ == "__main__":
    main()
