"""The two-tower model: every pooling trains, saves and loads; parity with open_clip."""
import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

import mmggem
from mmggem.model.clip import CONFIG_FILE, WEIGHTS_FILE, get_tokenizer
from mmggem.model.pooling import POOLER_NAMES

NAME = "ViT-Ti-4-28"


def batch(size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(size, 3, 28, 28, generator=generator)
    tokens = open_clip.get_tokenizer(NAME)([f"a photo of item {i}" for i in range(size)])
    return images, tokens


@pytest.mark.parametrize("pooling", POOLER_NAMES)
def test_forward_and_backward_of_a_whole_model(pooling: str) -> None:
    torch.manual_seed(0)
    model = mmggem.create_model(NAME, pooling=pooling)
    images, tokens = batch()
    image_features, text_features, logit_scale = model(images, tokens)
    assert image_features.shape == text_features.shape == (3, 128)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    loss = -(image_features @ text_features.T * logit_scale).log_softmax(dim=-1).diag().mean()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["visual.conv1.weight"].abs().sum() > 0
    if pooling in ("gem", "ggem"):
        assert grads["visual.pooler.p"].abs().sum() > 0


@pytest.mark.parametrize("pooling", ["ggem", "attn", "cls"])
def test_save_then_load_gives_identical_outputs(tmp_path: Path, pooling: str) -> None:
    model = mmggem.create_model(NAME, pooling=pooling, pooling_kwargs={"p_init": 2.0} if pooling == "ggem" else None)
    with torch.no_grad():  # make the saved state differ from a fresh model's
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.eval()
    folder = mmggem.save_model(model, tmp_path / "model")
    loaded, preprocess, tokenizer = mmggem.load(folder)
    images, tokens = batch()
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
    assert torch.equal(tokenizer(["a photo"]), get_tokenizer(model)(["a photo"]))
    assert preprocess.transforms[0].size == 28
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["mmggem"]["pooling"] == pooling and config["model_cfg"]["vision_cfg"]["width"] == 192
    assert set(load_file(str(folder / WEIGHTS_FILE))) == set(model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind


def test_save_replaces_an_existing_model(tmp_path: Path) -> None:
    first, second = mmggem.create_model(NAME, pooling="avg"), mmggem.create_model(NAME, pooling="max")
    mmggem.save_model(first, tmp_path / "m")
    mmggem.save_model(second, tmp_path / "m")
    assert mmggem.load(tmp_path / "m")[0].mmggem_spec.pooling == "max"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_load_reports_missing_or_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        mmggem.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {}}))  # open_clip's own
    with pytest.raises(ValueError, match="plain open_clip model .* pretrained=WEIGHTS"):
        mmggem.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"mmggem": {}}))
    with pytest.raises(ValueError, match="not written by mmggem.save_model"):
        mmggem.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"mmggem": ')  # cut short
    with pytest.raises(ValueError, match=f"{CONFIG_FILE}: not readable JSON"):
        mmggem.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("[]")
    with pytest.raises(ValueError, match=f"{CONFIG_FILE}: holds a JSON list"):
        mmggem.load(tmp_path)


def open_clip_twin(pool_type: str, final_ln_after_pool: bool = False) -> torch.nn.Module:
    cfg = open_clip.get_model_config(NAME)
    cfg["vision_cfg"].update(pool_type=pool_type, final_ln_after_pool=final_ln_after_pool)
    torch.manual_seed(1)
    return open_clip.CLIP(**cfg).eval()


@pytest.mark.parametrize(
    ("pooling", "pool_type", "final_ln_after_pool"),
    [("cls", "tok", False), ("avg", "avg", False), ("avg", "avg", True)],
)
def test_open_clip_weights_give_open_clip_embeddings(
    tmp_path: Path, pooling: str, pool_type: str, final_ln_after_pool: bool
) -> None:
    reference = open_clip_twin(pool_type, final_ln_after_pool)
    checkpoint = tmp_path / "open_clip.pt"
    torch.save({"state_dict": reference.state_dict()}, checkpoint)
    model = mmggem.create_model(
        NAME, pooling=pooling, pretrained=checkpoint, vision_cfg={"final_ln_after_pool": final_ln_after_pool}
    ).eval()
    images, tokens = batch()
    with torch.no_grad():
        assert (model.encode_image(images) - reference.encode_image(images)).abs().max() <= 1e-5
        assert torch.equal(model.encode_text(tokens), reference.encode_text(tokens))


def test_open_clip_state_dict_loads_with_only_pooler_parameters_missing() -> None:
    model = mmggem.create_model(NAME, pooling="ggem")
    result = model.load_state_dict(open_clip_twin("tok").state_dict(), strict=False)
    assert result.missing_keys == ["visual.pooler.p"] and result.unexpected_keys == []


def test_pretrained_of_another_architecture_is_refused(tmp_path: Path) -> None:
    other = mmggem.create_model("ViT-Ti-4-32", pooling="cls")
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="do not fit model 'ViT-Ti-4-28'"):
        mmggem.create_model(NAME, pretrained=tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        mmggem.create_model(NAME, pretrained=tmp_path / "nowhere.pt")


def test_pretrained_mmggem_folder_swaps_in_a_new_pooler(tmp_path: Path) -> None:
    source = mmggem.create_model(NAME, pooling="avg")
    mmggem.save_model(source, tmp_path / "avg")
    model = mmggem.create_model(NAME, pooling="ggem", pretrained=tmp_path / "avg")
    assert torch.equal(model.visual.conv1.weight, source.visual.conv1.weight)
    assert torch.all(model.visual.pooler.p == 3.0)


def test_pooled_tokens_are_returned_for_analysis() -> None:
    images, _ = batch()
    for pooling, count in (("ggem", 49), ("cls", 1)):
        model = mmggem.create_model(NAME, pooling=pooling).eval()
        embedding, tokens = model.visual.forward_with_tokens(images)
        assert tokens.shape == (3, count, 192)
        torch.testing.assert_close(embedding, model.encode_image(images))


def test_ggem_defaults_to_one_group_per_attention_head() -> None:
    model = mmggem.create_model(NAME)
    assert model.visual.pooler.groups == 6 and torch.all(model.visual.pooler.p == 3.0)


def test_any_open_clip_format_config_builds(tmp_path: Path) -> None:
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "head_width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "Custom-ViT-Test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    model = mmggem.create_model("Custom-ViT-Test")
    assert model.visual.pooler.groups == 4 and model.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 64)


def test_unknown_and_unsupported_models_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown model 'ViT-Nope'.*ViT-Ti-4-28"):
        mmggem.create_model("ViT-Nope")
    with pytest.raises(ValueError, match="no open_clip ViT image tower"):
        mmggem.create_model("RN50")


def write_tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40)
    torch.manual_seed(3)
    BertModel(config).save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "shirt", "shoe"]
    BertTokenizerFast(vocab={word: index for index, word in enumerate(words)}).save_pretrained(folder)
    return folder


def test_hugging_face_text_tower_from_config_and_from_weights(tmp_path: Path) -> None:
    from transformers import BertModel

    bert = write_tiny_bert(tmp_path / "bert")
    from_config = mmggem.create_model(NAME, text_tower={"hf_model_name": str(bert), "hf_model_pretrained": False})
    from_weights = mmggem.create_model(NAME, text_tower=str(bert))
    reference = BertModel.from_pretrained(bert).embeddings.word_embeddings.weight
    assert torch.equal(from_weights.text.transformer.embeddings.word_embeddings.weight, reference)
    assert not torch.equal(from_config.text.transformer.embeddings.word_embeddings.weight, reference)
    tokens = get_tokenizer(from_weights)(["a photo of a shirt"])
    assert tokens[0, :6].tolist() == [2, 5, 6, 7, 5, 8]
    assert from_weights.encode_text(tokens).shape == (1, 128)

    folder = mmggem.save_model(from_weights.eval(), tmp_path / "saved")
    loaded, _, tokenizer = mmggem.load(folder)
    assert torch.equal(loaded.encode_text(tokenizer(["a photo of a shoe"])), from_weights.encode_text(tokenizer(["a photo of a shoe"])))


def test_locking_a_hugging_face_text_tower_keeps_its_projection_trainable(tmp_path: Path) -> None:
    from mmggem.model.clip import lock_towers

    model = mmggem.create_model(NAME, text_tower={"hf_model_name": str(write_tiny_bert(tmp_path / "bert")),
                                                  "hf_model_pretrained": False})
    lock_towers(model, text=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad and name.startswith("text.")}
    assert trainable and all(name.startswith("text.proj") for name in trainable)
    assert all(name.startswith("visual.") or name == "logit_scale" or name in trainable
               for name, p in model.named_parameters() if p.requires_grad)


def test_an_open_clip_tag_resolves_to_its_file_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmggem.model.clip import resolve_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    path = resolve_pretrained("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path).weights
    assert path.read_bytes() == b"weights"


def test_locked_text_tower_leaves_its_last_layers_trainable() -> None:
    from mmggem.model.clip import lock_towers

    model = mmggem.create_model(NAME)
    lock_towers(model, text=True, text_unlocked_layers=2)  # open_clip's groups: the projection, the last block
    trainable = {name.split(".")[0] + "." + name.split(".")[2] if name.startswith("transformer.") else name
                 for name, p in model.named_parameters() if p.requires_grad and not name.startswith("visual.")}
    assert trainable == {"transformer.2", "ln_final.weight", "ln_final.bias", "text_projection", "logit_scale"}


# captions that tokenizer options change: punctuation, casing, spacing, non-ASCII, and longer than any context
CAPTIONS = ["A Photo of a SHIRT!", "shoe, shoe... & shirt? (a photo)", "  a\tphoto \n of  a shoe ",
            "café naïve résumé — Ünïcödé 東京 😀", "a photo of a shirt " * 40]


def bpe_tokenizer_models() -> list[str]:
    """open_clip model names whose tokenizer is open_clip's own BPE (no download): no Hugging Face
    tokenizer in the config and no SigLIP name (open_clip picks a SentencePiece tokenizer by name)."""
    return [name for name in open_clip.list_models()
            if not open_clip.get_model_config(name)["text_cfg"].get("hf_tokenizer_name")
            and "siglip" not in name.lower()]


def test_tokens_equal_open_clips_for_every_model_mmggem_builds() -> None:
    accepted = []
    for name in bpe_tokenizer_models():
        try:
            with torch.device("meta"):  # the config is what matters; no weights are allocated
                model = mmggem.create_model(name)
        except ValueError:  # a timm, ResNet or CoCa image tower: mmggem refuses the model
            continue
        assert torch.equal(get_tokenizer(model)(CAPTIONS), open_clip.get_tokenizer(name)(CAPTIONS)), name
        accepted.append(name)
    assert {NAME, "ViT-B-16", "ViT-L-14", "ViT-bigG-14"} <= set(accepted) and len(accepted) >= 30


def register(tmp_path: Path, name: str, text_cfg: dict) -> str:
    """An open_clip-format model config named ``name`` with ``text_cfg``, registered with open_clip."""
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 28, "layers": 1, "width": 64, "head_width": 32,
                                           "patch_size": 14},
           "text_cfg": {"width": 32, "heads": 2, "layers": 1, **text_cfg}}
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return name


def test_tokenizer_options_of_the_model_config_are_applied(tmp_path: Path) -> None:
    """``tokenizer_kwargs`` (open_clip's CLIPA and worldwide configs have them) and the context length
    reach the tokenizer, for open_clip's BPE and for a Hugging Face tokenizer from a local folder, in the
    model as built and as saved and loaded."""
    bert = write_tiny_bert(tmp_path / "bert")
    bpe = register(tmp_path, "Tiny-BPE-Canonical", {"context_length": 12, "vocab_size": 49408,
                                                    "tokenizer_kwargs": {"clean": "canonicalize"}})
    hf = register(tmp_path, "Tiny-HF-StripSep", {
        "context_length": 12, "hf_model_name": str(bert), "hf_tokenizer_name": str(bert),
        "hf_model_pretrained": False, "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
        "tokenizer_kwargs": {"strip_sep_token": True, "clean": "canonicalize"}})
    plain = {bpe: open_clip.SimpleTokenizer(context_length=12),
             hf: open_clip.tokenizer.HFTokenizer(str(bert), context_length=12)}
    for name in (bpe, hf):
        expected = open_clip.get_tokenizer(name)(CAPTIONS)
        assert expected.shape == (len(CAPTIONS), 12)
        assert not torch.equal(expected, plain[name](CAPTIONS))  # the options change these captions' tokens
        model = mmggem.create_model(name)
        assert torch.equal(get_tokenizer(model)(CAPTIONS), expected), name
        folder = mmggem.save_model(model, tmp_path / name)
        assert torch.equal(mmggem.load(folder)[2](CAPTIONS), expected), name
        assert torch.equal(open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS), expected), name
