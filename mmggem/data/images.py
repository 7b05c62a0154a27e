"""Image bytes -> RGB Pillow image: the one decoding rule of training and evaluation.

Both open and fully load the bytes with Pillow. They differ on purpose in one step, the conversion
to RGB, and ``decode_image`` names which one a caller wants:

- ``exact=False`` (training): palette and grey via Pillow, CMYK via Pillow, 16-bit ('I;16', 'I') by
  keeping the high byte, and images with transparency composited on white, as a viewer shows them
  (plain conversion would expose whatever colour hides under transparent pixels, often black, and
  would turn most 16-bit images white). An image above Pillow's ``MAX_IMAGE_PIXELS`` is refused.
- ``exact=True`` (evaluation): what webdataset's ``"pil"`` image handler gives CLIP_benchmark
  (``clip_benchmark.datasets.builder.build_wds_dataset``) and what open_clip's transforms do
  (``_convert_to_rgb``): ``image.convert("RGB")``, with Pillow's own size limit. Evaluation must
  feed a model the pixels CLIP_benchmark feeds it, or its numbers would not compare with published
  ones; training has no such reference and takes the conversion that keeps the picture.

For an RGB, grey or palette image without transparency (nearly every image of a real data set) both
give the same pixels; ``tests/test_data_images.py`` shows where they part.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from .skips import skip_reason


class Skip(Exception):
    """A sample that cannot be used; ``reason`` is one of :data:`mmggem.data.skips.SKIP_REASONS`."""

    def __init__(self, reason: str):
        super().__init__(skip_reason(reason))
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB as a viewer shows it (see the module docstring)."""
    if image.mode == "RGB":
        return image
    if image.mode == "F":
        image = image.convert("L")  # clips to 0..255
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        high = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(high).convert("RGB")
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_image(data: bytes, *, exact: bool = False) -> Image.Image:
    """Decode image bytes into an RGB image.

    ``exact=False``: the training rule; raises Skip('corrupt_image' or 'image_too_large').
    ``exact=True``: CLIP_benchmark's pixels; raises whatever Pillow raises, for the caller to report.
    """
    if exact:
        with io.BytesIO(data) as stream:
            image = Image.open(stream)
            image.load()
            return image.convert("RGB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Skip("image_too_large") from None
    except Exception:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...) for bad bytes
        raise Skip("corrupt_image") from None
