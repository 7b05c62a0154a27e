"""The one decoding rule: evaluation gives CLIP_benchmark's pixels, training differs only where a viewer would."""
from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_fixtures import image_bytes, noise
from mmggem.data.images import Skip, decode_image

TRANSPARENT_RED = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
IMAGES = {
    "rgb": noise(3, size=8),
    "grey": noise(4, size=8).convert("L"),
    "palette": noise(5, size=8).convert("P", palette=Image.ADAPTIVE, colors=8),
    "transparent rgba": TRANSPARENT_RED,
    "half transparent la": Image.new("LA", (8, 8), (0, 128)),
    "16-bit": Image.fromarray(np.full((8, 8), 0x8000, dtype=np.uint16)),
}
SAME_IN_BOTH = {"rgb", "grey", "palette"}


def clip_benchmark_pixels(data: bytes) -> np.ndarray:
    """The image as CLIP_benchmark's webdataset reader decodes it (builder.build_wds_dataset's handler)."""
    handler = wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"])
    return np.asarray(handler("x.png", data))


@pytest.mark.parametrize("name", IMAGES)
def test_evaluation_decodes_as_clip_benchmark_and_training_departs_only_for_transparency_and_depth(name: str) -> None:
    data = image_bytes(IMAGES[name])
    exact, training = np.asarray(decode_image(data, exact=True)), np.asarray(decode_image(data))
    assert exact.shape == training.shape == (8, 8, 3)
    assert np.array_equal(exact, clip_benchmark_pixels(data))
    assert np.array_equal(exact, training) == (name in SAME_IN_BOTH)


def test_training_shows_transparent_pixels_on_white_where_plain_conversion_exposes_hidden_colour() -> None:
    data = image_bytes(TRANSPARENT_RED)
    assert (np.asarray(decode_image(data)) == 255).all()
    assert np.asarray(decode_image(data, exact=True))[0, 0].tolist() == [255, 0, 0]


def test_bad_bytes_are_a_counted_skip_in_training_and_pillows_error_in_evaluation() -> None:
    with pytest.raises(Skip) as skip:
        decode_image(b"not an image")
    assert skip.value.reason == "corrupt_image"
    with pytest.raises(Image.UnidentifiedImageError):
        decode_image(b"not an image", exact=True)
