"""Pretrained weights as open_clip's factory defines them: a tag's or Hub repo's preprocessing, QuickGELU,
model config and tokenizer travel with its weights into mmggem.create_model, mmggem.load and `mmggem eval`.

Every case is compared with ``open_clip.create_model_and_transforms`` itself, on a fake tag (registered in
open_clip's pretrained registry with a local file, as ``{"file": ...}`` entries are read) or a fake Hub repo
in a temporary Hugging Face cache read with ``HF_HUB_OFFLINE``: the same ``preprocess_cfg``, the same
transforms (by their repr), the same tokens and the same embeddings.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import torch
from conftest import hub_cache
from PIL import Image
from safetensors.torch import save_file

import mmggem
from mmggem.errors import UserError
from mmggem.model.clip import MODEL_CONFIG_DIR, get_tokenizer
from mmggem.evaluate import load_model
from mmggem.model.transforms import image_transform

NAME = "ViT-Ti-4-28"  # one of mmggem's configs (MODEL_CONFIG_DIR), which open_clip knows once mmggem.model.clip is imported
assert (MODEL_CONFIG_DIR / f"{NAME}.json").is_file()
REPO = "someone/tiny-squash"
TEXTS = ["a photo of colour 3", "a red square", "x"]
# what a DFN/CLIPA/laion-0.5 tag changes: none of it is open_clip's default (OpenAI mean/std, bicubic, shortest)
PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "resize_mode": "squash"}


def random_weights(model_cfg: dict, path: Path, seed: int = 0) -> Path:
    """open_clip's CLIP of ``model_cfg`` with random weights (non-zero everywhere), saved as safetensors."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def fake_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A pretrained tag of NAME trained with QuickGELU and another preprocessing, its weights a local file."""
    weights = random_weights({**open_clip.get_model_config(NAME), "quick_gelu": True}, tmp_path / "tag.safetensors")
    tags = {"faketag": {"file": str(weights), **PREPROCESS, "quick_gelu": True}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, NAME, tags)
    return "faketag"


@pytest.fixture
def fake_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A plain open_clip Hub repo in a temporary cache: its own model config (another context length and
    width than NAME's) and preprocessing; returns the cache folder."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model_cfg = copy.deepcopy(open_clip.get_model_config(NAME))
    model_cfg["text_cfg"].update(context_length=24, width=32, heads=2)
    files = tmp_path / "repo"
    files.mkdir()
    (files / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS}))
    random_weights(model_cfg, files / "open_clip_model.safetensors", seed=1)
    hub_cache(tmp_path / "cache", REPO, files)
    return tmp_path / "cache"


def images() -> torch.Tensor:
    """Two pictures that are not square, so that the resize mode and interpolation change the pixels."""
    pictures = [Image.fromarray((torch.rand(40, 23, 3) * 255).byte().numpy()) for _ in range(2)]
    return pictures


def as_json(value: dict) -> dict:
    return json.loads(json.dumps(value))


def assert_same_as_open_clip(model: torch.nn.Module, preprocess, tokenizer, reference: torch.nn.Module,
                             reference_preprocess, reference_tokenizer) -> None:
    """The same preprocessing config and transforms, tokens and image and text embeddings."""
    assert as_json(model.visual.preprocess_cfg) == as_json(reference.visual.preprocess_cfg)  # a saved one has lists
    assert repr(preprocess) == repr(reference_preprocess)
    if hasattr(model, "mmggem_spec"):  # mmggem's training transform too
        assert repr(image_transform(model, is_train=True)) == repr(open_clip.transform.image_transform_v2(
            open_clip.transform.PreprocessCfg(**reference.visual.preprocess_cfg), is_train=True))
    tokens = tokenizer(TEXTS)
    assert torch.equal(tokens, reference_tokenizer(TEXTS))
    pixels = torch.stack([preprocess(image) for image in images()])
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), reference.encode_image(pixels))
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens))


def test_a_tag_brings_its_preprocessing_and_quick_gelu(fake_tag: str, tmp_path: Path) -> None:
    reference, _, reference_preprocess = open_clip.create_model_and_transforms(NAME, pretrained=fake_tag,
                                                                               force_quick_gelu=True)
    assert reference.visual.preprocess_cfg["resize_mode"] == "squash"
    model = mmggem.create_model(NAME, pooling="cls", pretrained=fake_tag)
    assert model.mmggem_spec.model_cfg["quick_gelu"] is True
    assert_same_as_open_clip(model, image_transform(model, is_train=False), get_tokenizer(model),
                             reference, reference_preprocess, open_clip.get_tokenizer(NAME))
    assert_saved_as_it_was(model, reference, tmp_path / "saved")


def assert_saved_as_it_was(model: torch.nn.Module, reference: torch.nn.Module, folder: Path) -> None:
    """Saved, the model loads with the same preprocessing in mmggem and in open_clip (``local-dir:``)."""
    folder = mmggem.save_model(model, folder)
    in_open_clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert as_json(in_open_clip.visual.preprocess_cfg) == as_json(reference.visual.preprocess_cfg)
    assert_same_as_open_clip(*mmggem.load(folder), in_open_clip, preprocess,
                             open_clip.get_tokenizer(f"local-dir:{folder}"))


def test_quick_gelu_is_what_the_tag_needs_and_a_config_against_it_is_refused(fake_tag: str) -> None:
    without, _, _ = open_clip.create_model_and_transforms(NAME, pretrained=fake_tag)  # open_clip only warns
    model = mmggem.create_model(NAME, pooling="cls", pretrained=fake_tag)
    tokens = get_tokenizer(model)(TEXTS)
    with torch.no_grad():
        assert not torch.allclose(model.encode_text(tokens), without.eval().encode_text(tokens))
    with pytest.raises(UserError) as refused:
        mmggem.create_model(NAME, pretrained=fake_tag, quick_gelu=False)
    assert str(refused.value) == (
        f"pretrained tag 'faketag' of '{NAME}' was trained with quick_gelu=True, but the model config sets "
        f"quick_gelu=False: drop that setting (the tag's applies), or use open_clip's config '{NAME}-quickgelu'")


def test_a_hub_repo_brings_its_config_preprocessing_and_tokenizer(fake_repo: Path, tmp_path: Path) -> None:
    name = f"hf-hub:{REPO}"
    reference, _, reference_preprocess = open_clip.create_model_and_transforms(name, cache_dir=str(fake_repo))
    reference_tokenizer = open_clip.get_tokenizer(name, cache_dir=str(fake_repo))
    model = mmggem.create_model(NAME, pooling="cls", pretrained=name, cache_dir=fake_repo)
    assert model.mmggem_spec.model_cfg["text_cfg"]["context_length"] == 24
    assert_same_as_open_clip(model, image_transform(model, is_train=False), get_tokenizer(model),
                             reference, reference_preprocess, reference_tokenizer)
    assert_saved_as_it_was(model, reference, tmp_path / "saved")


def test_eval_of_open_clip_name_with_a_hub_repo_or_a_tag_is_open_clips_own(fake_repo: Path, fake_tag: str) -> None:
    name = f"hf-hub:{REPO}"
    reference, _, reference_preprocess = open_clip.create_model_and_transforms(name, cache_dir=str(fake_repo))
    loaded = load_model(f"open_clip:{NAME}", name, str(fake_repo))
    assert_same_as_open_clip(loaded.model, loaded.preprocess, loaded.tokenizer, reference, reference_preprocess,
                             open_clip.get_tokenizer(name, cache_dir=str(fake_repo)))
    via_checkpoint = load_model(name, None, str(fake_repo))
    assert repr(via_checkpoint.preprocess) == repr(loaded.preprocess)

    reference, _, reference_preprocess = open_clip.create_model_and_transforms(NAME, pretrained=fake_tag,
                                                                               force_quick_gelu=True)
    loaded = load_model(f"open_clip:{NAME}", fake_tag)
    assert_same_as_open_clip(loaded.model, loaded.preprocess, loaded.tokenizer, reference, reference_preprocess,
                             open_clip.get_tokenizer(NAME))


def test_a_checkpoint_of_a_run_from_a_tag_loads_into_the_tags_model(fake_tag: str, tmp_path: Path) -> None:
    """Evaluation and export rebuild a checkpoint's model from the run config without the pretrained
    weights; the tag's activation and preprocessing must still be there, or the checkpoint's own
    weights would run in another model."""
    from mmggem.config.run import load_config
    from mmggem.config.model import model_from_config

    cfg = load_config(None, ["data.train=x.tar", f"model.name={NAME}", f"model.pretrained={fake_tag}"])
    trained, shell = model_from_config(cfg), model_from_config(cfg, load_pretrained=False)
    assert shell.mmggem_spec.model_cfg == trained.mmggem_spec.model_cfg
    assert shell.mmggem_spec.preprocess_cfg == trained.mmggem_spec.preprocess_cfg
    assert trained.mmggem_spec.preprocess_cfg["resize_mode"] == "squash"
    shell.load_state_dict(trained.state_dict())
    tokens = get_tokenizer(trained)(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(shell.eval().encode_text(tokens), trained.eval().encode_text(tokens))


def test_a_saved_folder_brings_the_config_it_was_trained_with(tmp_path: Path) -> None:
    """Starting from a saved mmggem model (as model.pretrained or ``hf-hub:`` of its upload) keeps its
    activation and final LayerNorm placement: they change the features but not a weight's shape, so a
    model built from the named config instead would load the weights silently and compute others."""
    torch.manual_seed(0)
    trained = mmggem.create_model(NAME, pooling="gem", quick_gelu=True, vision_cfg={"final_ln_after_pool": True})
    folder = mmggem.save_model(trained, tmp_path / "saved")
    started = mmggem.create_model(NAME, pooling="gem", pretrained=folder)
    assert started.mmggem_spec.model_cfg["quick_gelu"] is True
    assert started.mmggem_spec.model_cfg["vision_cfg"]["final_ln_after_pool"] is True
    tokens = get_tokenizer(trained)(TEXTS)
    pixels = torch.rand(2, 3, 28, 28)
    trained.eval(), started.eval()
    with torch.no_grad():
        torch.testing.assert_close(started.encode_text(tokens), trained.encode_text(tokens))
        torch.testing.assert_close(started.encode_image(pixels), trained.encode_image(pixels))


def test_an_open_clip_local_dir_folder_brings_its_config_as_open_clip_reads_it(fake_repo: Path,
                                                                               tmp_path: Path) -> None:
    folder = tmp_path / "repo"  # the fake repo's files: open_clip's local-dir layout
    reference, _, reference_preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model = mmggem.create_model(NAME, pooling="cls", pretrained=folder)
    assert model.mmggem_spec.model_cfg["text_cfg"]["context_length"] == 24
    assert_same_as_open_clip(model, image_transform(model, is_train=False), get_tokenizer(model), reference,
                             reference_preprocess, open_clip.get_tokenizer(f"local-dir:{folder}"))
