"""Building a zero-shot classifier: mmggem's ``build_classifier`` against CLIP_benchmark's
``zero_shot_classifier``, on the same model, class names and templates, in one run.

The classes are the first ``--classes`` of ImageNet-1k and the templates its 80 (CLIP_benchmark's
lists, as mmggem's built-in ones). CLIP_benchmark encodes each class's prompts as one batch at the
full context length; mmggem encodes all prompts in batches of ``--batch-size``, each trimmed to its
longest prompt (``mmggem.model.text_length``), as ``mmggem eval`` does. The two are run alternately
``--repeats`` times each; the script prints the median seconds of each, their ratio, and the largest
difference between the two classifiers (the same numbers, up to fp32 rounding). fp32 on the CPU,
with the fp32 2048-square matmul rate of this machine beside it.

    python launch/bench/bench_zeroshot_classifier.py --classes 25
    python launch/bench/bench_zeroshot_classifier.py --model ViT-Ti-4-28 --classes 1000
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mfu import matmul_rate  # noqa: E402

import mmggem  # noqa: E402
from mmggem.evaluate.dataset import Processes  # noqa: E402
from mmggem.evaluate.encode import Encoding  # noqa: E402
from mmggem.evaluate.metadata import ClassMetadata, builtin_metadata  # noqa: E402
from mmggem.evaluate.zeroshot import build_classifier  # noqa: E402
from mmggem.model.clip import get_tokenizer  # noqa: E402
from mmggem.model.text_length import text_trim, trimming  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="an mmggem or open_clip model config")
    parser.add_argument("--classes", type=int, default=1000, help="the first N ImageNet-1k classes")
    parser.add_argument("--batch-size", type=int, default=256, help="mmggem's text batch size")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the median is compared")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    imagenet = builtin_metadata("imagenet1k")
    metadata = ClassMetadata(imagenet.classnames[:args.classes], imagenet.templates)
    torch.manual_seed(0)
    model = mmggem.create_model(args.model, pooling="cls").eval()
    tokenizer = get_tokenizer(model)
    encoding = Encoding(device=torch.device("cpu"), amp=False, batch_size=args.batch_size, num_workers=0,
                        progress=False)
    sides = {
        "mmggem": lambda: build_classifier(model, trimming(tokenizer, text_trim(model)), metadata, Processes(),
                                           encoding),
        "clip_benchmark": lambda: zero_shot_classifier(model, tokenizer, list(metadata.classnames),
                                                       list(metadata.templates), "cpu", amp=False),
    }
    prompts = len(metadata.classnames) * len(metadata.templates)
    print(f"{args.model}, {len(metadata.classnames)} classes x {len(metadata.templates)} templates = {prompts} "
          f"prompts, fp32, {args.threads} threads; fp32 2048-square matmul "
          f"{matmul_rate('cpu', 'fp32', 2048) / 1e9:.0f} GFLOP/s", flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    classifiers = {}
    for repeat in range(args.repeats):
        for name, build in (sides.items() if repeat % 2 == 0 else list(sides.items())[::-1]):
            start = time.perf_counter()
            classifiers[name] = build().float()
            seconds[name].append(time.perf_counter() - start)
            print(f"  {name}: {seconds[name][-1]:.1f} s", flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    difference = (classifiers["mmggem"] - classifiers["clip_benchmark"]).abs().max().item()
    print(f"mmggem {median['mmggem']:.1f} s ({prompts / median['mmggem']:.0f} prompts/s), clip_benchmark "
          f"{median['clip_benchmark']:.1f} s ({prompts / median['clip_benchmark']:.0f} prompts/s): "
          f"{median['clip_benchmark'] / median['mmggem']:.2f}x; classifiers differ by at most {difference:.1e}")


if __name__ == "__main__":
    main()
