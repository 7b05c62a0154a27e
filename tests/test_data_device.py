"""uint8 batches from the workers, normalised on the device: the same values as open_clip's transform."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms as T

import mmggem
from data_fixtures import noise
from mmggem.data.device import DeviceNormalizer, split_transform, to_device
from mmggem.model.clip import image_transform


@pytest.mark.parametrize("is_train", [True, False])
def test_uint8_transform_then_device_normalisation_equals_open_clips_transform(is_train: bool) -> None:
    full = image_transform(mmggem.create_model("ViT-Ti-4-28", pooling="ggem"), is_train=is_train)
    uint8, normalization = split_transform(full)
    normalizer = DeviceNormalizer(normalization, "cpu")
    for seed in range(4):
        image = noise(seed, size=40)
        torch.manual_seed(seed)
        expected = full(image)
        torch.manual_seed(seed)
        small = uint8(image)
        assert small.dtype == torch.uint8 and small.shape == expected.shape
        images, tokens = to_device(small[None], torch.zeros(1, 5, dtype=torch.long), torch.device("cpu"), normalizer)
        assert torch.equal(images[0], expected) and tokens.shape == (1, 5)


def test_a_transform_without_a_final_normalize_is_refused() -> None:
    with pytest.raises(ValueError, match="ToTensor and Normalize"):
        split_transform(T.Compose([T.Resize(8), T.ToTensor()]))
    with pytest.raises(ValueError, match="ToTensor and Normalize"):
        split_transform(T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,)), T.RandomErasing()]))


def test_the_normalizer_takes_only_uint8_batches() -> None:
    normalizer = DeviceNormalizer(split_transform(T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)]))[1],
                                  "cpu")
    with pytest.raises(TypeError, match="uint8"):
        normalizer(torch.zeros(1, 3, 2, 2))
    out = normalizer(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(out, torch.full_like(out, 2.0))
