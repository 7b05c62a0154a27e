"""Trimmed text batches: exact where mmggem trims, refused where trimming would change the features."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import accelerate_cli, records, run_cli, write_color_shards
from test_model import write_tiny_bert
from test_train import assert_same_run, ok, train_args

import mmggem
from mmggem.train.loss import build_loss
from mmggem.model.clip import get_tokenizer
from mmggem.model.text_length import MAX_SHAPES, ROUND_TO, TrimmableCLIP, text_trim

NAME = "ViT-Ti-4-28"  # context length 32
CAPTIONS = ["a dog", "a photo of a red bus driving down a street in the rain",
            "two cats asleep on a sofa", "a shirt"]
CLOSE = {"rtol": 0, "atol": 1e-5}


def _model(**text_cfg: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return mmggem.create_model(NAME, text_cfg=text_cfg) if text_cfg else mmggem.create_model(NAME)


def test_causal_end_of_text_tower_gives_the_same_features_loss_and_gradients_trimmed() -> None:
    model = _model()
    tokens = get_tokenizer(model)(CAPTIONS)
    trim = text_trim(model)
    assert trim is not None and trim.pool == "argmax"
    short = trim(tokens)
    assert short.shape[1] == 16 < tokens.shape[1]  # longest caption: 14 tokens with start and end
    with torch.no_grad():  # the full-length path is open_clip's own
        torch.testing.assert_close(model.encode_text(short), open_clip.CLIP.encode_text(model, tokens), **CLOSE)

    images = torch.randn(len(CAPTIONS), 3, 28, 28, generator=torch.Generator().manual_seed(1))
    loss_fn = build_loss("clip")
    results = []
    for batch in (tokens, short):
        model.zero_grad()
        loss = loss_fn(*model(images, batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full_loss, full_grads), (short_loss, short_grads) = results
    torch.testing.assert_close(short_loss, full_loss, **CLOSE)
    assert short_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(short_grads[name], full_grads[name], **CLOSE, msg=name)


@pytest.mark.parametrize("text_cfg", [{"no_causal_mask": True}, {"pool_type": "last"}])
def test_towers_whose_features_read_padded_positions_keep_the_full_length(text_cfg: dict) -> None:
    model = _model(**text_cfg).eval()
    assert text_trim(model) is None
    tokens = get_tokenizer(model)(CAPTIONS)
    with torch.no_grad():  # were it trimmed anyway, the features would change
        full, cut = model.encode_text(tokens), model.encode_text(tokens[:, :16])
    assert (full - cut).abs().max() > 1e-3


def test_hugging_face_encoder_with_mask_pooling_gives_the_same_features_trimmed(tmp_path: Path) -> None:
    bert = str(write_tiny_bert(tmp_path / "bert"))
    for pooler in ("mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler"):
        torch.manual_seed(0)
        model = mmggem.create_model(NAME, text_tower={"hf_model_name": bert, "hf_pooler_type": pooler}).eval()
        tokens = get_tokenizer(model)(["a photo of a shirt", "a shoe"])
        trim = text_trim(model)
        assert trim is not None and trim.pool == "mask", pooler
        assert trim(tokens).shape[1] == 8 < tokens.shape[1]
        with torch.no_grad():
            torch.testing.assert_close(model.encode_text(trim(tokens)), model.encode_text(tokens), **CLOSE)
    torch.manual_seed(0)
    max_pooled = mmggem.create_model(NAME, text_tower={"hf_model_name": bert, "hf_pooler_type": "max_pooler"})
    assert text_trim(max_pooled) is None  # open_clip's MaxPooler takes its maximum over the padded positions


@pytest.mark.parametrize(("end", "length"), [(1, 8), (6, 8), (7, 8), (8, 16), (23, 24), (24, 32), (31, 32)])
def test_lengths_round_up_to_a_multiple_of_eight_and_stop_at_the_context(end: int, length: int) -> None:
    trim = text_trim(_model())
    tokens = torch.zeros(3, 32, dtype=torch.long)
    tokens[:, 0] = 49406
    tokens[0, 1:end] = 320
    tokens[0, end] = 49407  # the end-of-text token, the highest id: argmax pooling reads it
    tokens[1:, 1] = 49407
    assert trim.needed(tokens) == end + 1
    assert trim(tokens).shape == (3, length)
    assert trim.length(tokens[:, :12]) <= 12


def test_a_compiled_text_tower_sees_one_shape_per_multiple_of_eight() -> None:
    from torch._dynamo.utils import counters

    model = _model().eval()
    trim = text_trim(model)
    torch._dynamo.reset()
    counters.clear()
    encode = torch.compile(model.encode_text, backend="eager", dynamic=False)
    tokens = torch.zeros(2, 32, dtype=torch.long)
    with torch.no_grad():
        for end in range(32):  # every caption length the context holds
            tokens[0, end] = 49407
            encode(trim(tokens))
            tokens[0, end] = 0
    assert counters["stats"]["unique_graphs"] == 32 // ROUND_TO
    torch._dynamo.reset()


def test_under_accelerate_launch_a_compiled_model_compiles_every_trimmed_length(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``accelerate launch`` sets ACCELERATE_DYNAMO_USE_DYNAMIC=False in its child, so the model is compiled
    with dynamic=False: one graph per length, and none past dynamo's recompile limit. At context 77 every
    length a caption can have must fit under it."""
    from accelerate.utils import TorchDynamoPlugin
    from torch._dynamo.utils import counters

    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_DYNAMIC", "False")  # what the launcher gives its processes
    compile_kwargs = TorchDynamoPlugin(backend="eager").to_kwargs()  # what accelerate.prepare compiles with
    assert compile_kwargs["dynamic"] is False and MAX_SHAPES == torch._dynamo.config.recompile_limit
    model = _model(context_length=77).eval()
    trim = text_trim(model)
    torch._dynamo.reset()
    counters.clear()
    encode = torch.compile(model.encode_text, **compile_kwargs)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    lengths = set()
    with torch.no_grad():
        for end in range(77):  # every caption length the context holds
            tokens[0, end] = 49407
            lengths.add(trim(tokens).shape[1])
            encode(trim(tokens))
            tokens[0, end] = 0
    assert counters["stats"]["unique_graphs"] == len(lengths) <= MAX_SHAPES
    assert max(lengths) == 77 and min(lengths) < 77
    torch._dynamo.reset()


def test_open_clip_models_loaded_for_evaluation_trim_too(tmp_path: Path) -> None:
    from mmggem.evaluate import load_model

    torch.manual_seed(0)
    reference = open_clip.create_model(NAME)
    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": reference.state_dict()}, weights)
    loaded = load_model(f"open_clip:{NAME}", str(weights))
    assert isinstance(loaded.model, TrimmableCLIP) and text_trim(loaded.model) is not None
    tokens = loaded.tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_text(text_trim(loaded.model)(tokens)),
                                   reference.eval().encode_text(tokens), **CLOSE)


def test_two_processes_trimming_to_different_lengths_train_as_at_full_length(tmp_path: Path) -> None:
    """One shard of short captions, one of long: each rank reads one of them every epoch, so at every
    step one rank trims to 8 positions and the other to 24; the run equals the untrimmed one."""
    def caption(shard: int, label: int) -> str:
        return f"a photo of colour {label}" + (" on a wide plain under a grey sky at dusk in winter" if shard else "")

    shards = write_color_shards(tmp_path / "shards", shards=2, caption=caption)
    runs = {}
    for trim in ("true", "false"):
        runs[trim] = tmp_path / f"trim-{trim}"
        ok(accelerate_cli(*train_args(shards, runs[trim], "train.steps=6", "data.resampled=false",
                                      f"model.trim_text={trim}")))
    assert_same_run(runs["false"], runs["true"])
    widths = {trim: {record["data/text_tokens"] for record in records(run)} for trim, run in runs.items()}
    assert widths == {"true": {24}, "false": {32}}  # rank 0 logs; its captions end before position 24, not 8


def test_a_run_whose_tower_cannot_be_trimmed_says_so_once_and_keeps_the_context(train_shards: str,
                                                                                 tmp_path: Path) -> None:
    from mmggem.model.text_length import NOT_TRIMMED

    folder = tmp_path / "no-causal-mask"
    folder.mkdir()
    model_cfg = open_clip.get_model_config(NAME)
    model_cfg["text_cfg"]["no_causal_mask"] = True  # every position sees the padding after it
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    runs = {}
    for name in (f"local-dir:{folder}", NAME):
        runs[name] = tmp_path / name.replace("/", "_")
        result = ok(run_cli(*train_args(train_shards, runs[name], "train.steps=2", f"model.name={name}")))
        assert result.stdout.count(NOT_TRIMMED) == (name != NAME)
    assert [r["data/text_tokens"] for r in records(runs[f"local-dir:{folder}"])] == [32, 32]
    assert [r["data/text_tokens"] for r in records(runs[NAME])] == [8, 8]  # "a photo of colour N": 7 tokens
