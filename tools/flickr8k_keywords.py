"""A zero-shot classification set from held-out Flickr8k images, labelled by what their captions say.

Flickr8k has no class labels, only five human captions per image. An image gets a class when at least
``--min-captions`` of its captions name the class by one of its keywords (whole words, case-folded) and
no other class reaches that count; images that name none or several classes are left out and counted.
The labels come from people describing the photo, not from the model, and the images come from splits
the recipe never trains on (``val`` and ``test`` by default), so a model's accuracy on the set is an
honest zero-shot figure, if a noisy one: a caption may name a dog in the background.

The script writes one sub-folder of symbolic links per class; ``mmggem data classes`` turns that
folder into a CLIP_benchmark-layout set:

    python tools/flickr8k_keywords.py --flickr8k flickr8k --out flickr8k-keywords
    mmggem data classes --images flickr8k-keywords --out flickr8k-data/keywords
"""
from __future__ import annotations

import argparse
import csv
import re
from collections import Counter, defaultdict
from pathlib import Path

KEYWORDS: dict[str, tuple[str, ...]] = {
    "dog": ("dog", "dogs", "puppy", "puppies"),
    "bicycle": ("bike", "bikes", "bicycle", "bicycles", "biker", "bikers", "cyclist", "bmx"),
    "snow": ("snow", "snowy", "ski", "skier", "skiing", "snowboard", "snowboarder"),
    "beach": ("beach", "ocean", "waves", "wave", "surf", "surfer", "surfing", "sea"),
    "horse": ("horse", "horses"),
    "car": ("car", "cars", "truck"),
    "football": ("football",),
    "basketball": ("basketball",),
    "soccer": ("soccer",),
    "skateboard": ("skateboard", "skateboarder", "skateboarding", "skater"),
    "swimming pool": ("pool",),
    "boat": ("boat", "boats", "kayak", "canoe"),
    "rock climbing": ("climbs", "climbing", "climber"),
    "motorcycle": ("motorcycle", "motorbike", "dirt bike"),
}
"""Class name -> the caption words that name it. Classes are things a 64 px photo can show."""


def label(captions: list[str], min_captions: int) -> str | None | tuple[str, ...]:
    """The one class named by at least ``min_captions`` captions, None for no class, or the tuple of
    every class that reached the count when there are several."""
    patterns = {name: re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b") for name, words in KEYWORDS.items()}
    named = tuple(name for name, pattern in patterns.items()
                  if sum(bool(pattern.search(caption.lower())) for caption in captions) >= min_captions)
    if not named:
        return None
    return named[0] if len(named) == 1 else named


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flickr8k", type=Path, required=True, help="folder with images/ and captions.csv")
    parser.add_argument("--out", type=Path, required=True, help="new folder: one sub-folder of links per class")
    parser.add_argument("--splits", default="val,test", help="comma-separated splits to draw images from")
    parser.add_argument("--min-captions", type=int, default=3, help="captions (of 5) that must name the class")
    args = parser.parse_args()
    splits = set(args.splits.split(","))
    captions: dict[str, list[str]] = defaultdict(list)
    with open(args.flickr8k / "captions.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] in splits:
                captions[row["image"]].append(row["caption"])
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: choose a new folder")
    counts: Counter[str] = Counter()
    unlabelled = ambiguous = 0
    for image, texts in sorted(captions.items()):
        found = label(texts, args.min_captions)
        if found is None:
            unlabelled += 1
        elif isinstance(found, tuple):
            ambiguous += 1
        else:
            folder = args.out / found
            folder.mkdir(parents=True, exist_ok=True)
            (folder / image).symlink_to((args.flickr8k / "images" / image).resolve())
            counts[found] += 1
    print(f"{sum(counts.values())} images from {len(captions)} in splits {sorted(splits)}: "
          + ", ".join(f"{name} {n}" for name, n in sorted(counts.items())))
    print(f"left out: {unlabelled} naming no class, {ambiguous} naming several")


if __name__ == "__main__":
    main()
