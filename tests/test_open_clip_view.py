"""A saved folder loaded by open_clip itself: the same model for cls and avg, a refusal naming mmggem otherwise."""
from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import PYTHON, cpu_env, hub_cache
from test_model import NAME, batch, register, write_tiny_bert

import mmggem
from mmggem.model.clip import CONFIG_FILE
from mmggem.model.pooling import POOLER_NAMES


def trained_like(pooling: str, **kwargs) -> torch.nn.Module:
    """A model whose weights are not the initial ones (so every parameter, the pooler's too, must travel)."""
    torch.manual_seed(1)
    model = mmggem.create_model(NAME, pooling=pooling, **kwargs)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def open_clip_embeddings(folder: Path, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(texts)
    with torch.no_grad():
        return model.eval().encode_image(images), model.encode_text(tokens)


def assert_same_embeddings(model: torch.nn.Module, folder: Path) -> None:
    images, _ = batch()
    texts = ["a photo of a shirt", "a shoe", "a photo"]
    theirs_image, theirs_text = open_clip_embeddings(folder, images, texts)
    with torch.no_grad():
        ours_image, ours_text = model.encode_image(images), model.encode_text(mmggem.model.clip.get_tokenizer(model)(texts))
    torch.testing.assert_close(theirs_image, ours_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs_text, ours_text, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pooling", POOLER_NAMES)
def test_open_clip_builds_the_same_model_or_refuses_naming_mmggem(pooling: str, tmp_path: Path) -> None:
    model = trained_like(pooling)
    folder = mmggem.save_model(model, tmp_path / "model")
    if pooling in ("cls", "avg"):
        assert_same_embeddings(model, folder)
    else:
        with pytest.raises(TypeError, match=rf"needs mmggem: .* {pooling} pooling.*mmggem\.load\(folder\)"):
            open_clip.create_model_and_transforms(f"local-dir:{folder}")
    loaded = mmggem.load(folder)[0]
    images, _ = batch()
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))


def test_final_layer_norm_after_pooling_travels_to_open_clip(tmp_path: Path) -> None:
    model = trained_like("avg", vision_cfg={"final_ln_after_pool": True})
    assert_same_embeddings(model, mmggem.save_model(model, tmp_path / "model"))


def test_a_folder_saved_before_the_open_clip_view_still_loads(tmp_path: Path) -> None:
    model = trained_like("ggem")
    folder = mmggem.save_model(model, tmp_path / "model")
    config = json.loads((folder / CONFIG_FILE).read_text())  # the layout of earlier versions: one model_cfg
    config["model_cfg"] = config["mmggem"].pop("model_cfg")
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    images, _ = batch()
    assert torch.equal(mmggem.load(folder)[0].encode_image(images), model.encode_image(images))


def test_a_text_tower_from_a_local_folder_is_refused_by_open_clip_and_loads_in_mmggem(tmp_path: Path) -> None:
    bert = write_tiny_bert(tmp_path / "bert")
    model = trained_like("cls", text_tower=str(bert))
    folder = mmggem.save_model(model, tmp_path / "model")
    with pytest.raises(TypeError, match=r"needs mmggem: .*text tower came from the local folder .*mmggem\.load"):
        open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokens = mmggem.model.clip.get_tokenizer(model)(["a photo of a shirt"])
    assert torch.equal(mmggem.load(folder)[0].encode_text(tokens), model.encode_text(tokens))


HUB_TEXT_TOWER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import mmggem, test_open_clip_view as t
    model = t.trained_like("avg", text_tower="someone/tiny-bert")
    t.assert_same_embeddings(model, mmggem.save_model(model, Path(sys.argv[1])))
    again = mmggem.load(sys.argv[1])[0]  # its tower now reads the folder; the Hub id it came from travels on
    t.assert_same_embeddings(again, mmggem.save_model(again, Path(sys.argv[1] + "-again")))
""")


def test_a_text_tower_from_the_hub_gives_open_clip_the_same_embeddings(tmp_path: Path) -> None:
    # open_clip rebuilds the tower from its Hub id, found in huggingface_hub's cache (read at import: a new process)
    hub_cache(tmp_path / "hub", "someone/tiny-bert", write_tiny_bert(tmp_path / "bert"))
    result = subprocess.run([PYTHON, "-c", HUB_TEXT_TOWER, str(tmp_path / "model")], capture_output=True, text=True,
                            cwd=Path(__file__).parent, timeout=300,
                            env=cpu_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
                                        PYTHONPATH=f"{Path(__file__).parent}:{Path(__file__).parents[1]}"))
    assert result.returncode == 0, result.stderr[-3000:]
    for folder in ("model", "model-again"):
        config = json.loads((tmp_path / folder / CONFIG_FILE).read_text())
        assert config["model_cfg"]["text_cfg"]["hf_model_name"] == "someone/tiny-bert"


def write_word_tokenizer(folder: Path) -> Path:
    """A Hugging Face tokenizer trained here on a few captions (a word-level vocabulary), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["a photo of a red square", "a blue circle on a photo"],
                                  trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="[EOS]").save_pretrained(folder)
    return folder


def test_a_hugging_face_tokenizer_beside_open_clips_text_transformer_travels_with_the_folder(tmp_path: Path) -> None:
    """CLIPA / MetaCLIP-2 worldwide style: text_cfg.hf_tokenizer_name without hf_model_name."""
    tokenizer = write_word_tokenizer(tmp_path / "tokenizer")
    name = register(tmp_path, "Tiny-OwnText-HFTokenizer", {"context_length": 10, "vocab_size": 16,
                                                           "hf_tokenizer_name": str(tokenizer)})
    captions = ["a red photo", "a blue circle on a square", "unknown words here"]
    expected = open_clip.get_tokenizer(name)(captions)
    assert expected.shape == (3, 10) and len(expected.unique()) > 4
    folder = mmggem.save_model(mmggem.create_model(name, pooling="cls"), tmp_path / "saved")
    shutil.rmtree(tokenizer)  # the folder must not need it
    loaded_tokens = mmggem.load(folder)[2](captions)
    assert torch.equal(loaded_tokens, expected)
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{folder}")(captions), expected)
