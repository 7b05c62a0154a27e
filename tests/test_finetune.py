"""Fine-tuning recipes through `mmggem train` on real shards: locked towers (LiT), FLIP patch dropout,
augmentation, and pretrained weights by open_clip tag or `hf-hub:` name from a local cache."""
from __future__ import annotations

from pathlib import Path

import torch
from conftest import hub_cache, run_cli
from test_train import assert_same_run, final_weights, losses, ok, train_args

import mmggem

LOCKED_TRAINABLE = {"visual.pooler.p", "visual.proj", "text_projection", "logit_scale"}


def initial_model(folder: Path) -> Path:
    """The demo architecture's initial weights saved as an mmggem folder, to start a run from and compare with."""
    return mmggem.save_model(mmggem.create_model("ViT-Ti-4-28"), folder)


def test_locked_towers_stay_bit_identical_through_stop_resume_and_export(train_shards: str, tmp_path: Path) -> None:
    init = initial_model(tmp_path / "init")
    locks = (f"model.pretrained={init}", "model.lock_image=true", "model.lock_text=true")
    out = tmp_path / "run"
    stopped = ok(run_cli(*train_args(train_shards, out, *locks, "train.stop_at_step=4")))
    initial = mmggem.load(init)[0]
    sizes = {name: p.numel() for name, p in initial.named_parameters()}
    trained = sum(sizes[name] for name in LOCKED_TRAINABLE)  # LiT trains the pooler's p, projections, scale
    assert f"parameters: {trained:,} trained, {sum(sizes.values()) - trained:,} locked" in stopped.stdout
    ok(run_cli(*train_args(train_shards, out, *locks, "train.resume=latest")))
    assert len(losses(out)) == 8
    before = initial.state_dict()
    after = final_weights(out)
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    assert changed == LOCKED_TRAINABLE  # every locked tensor bit-identical, everything trainable learned


def test_lock_pooler_freezes_the_pooler_and_projection_too(train_shards: str, tmp_path: Path) -> None:
    init = initial_model(tmp_path / "init")
    out = tmp_path / "run"
    result = ok(run_cli(*train_args(train_shards, out, f"model.pretrained={init}", "model.lock_image=true",
                                    "model.lock_image_unlocked_groups=2", "model.lock_pooler=true",
                                    "train.steps=2")))
    assert "locked" in result.stdout
    before, after = mmggem.load(init)[0].state_dict(), final_weights(out)
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    assert "visual.pooler.p" not in changed and "visual.proj" in changed  # open_clip's last two groups: proj, block 3
    assert "visual.transformer.resblocks.3.mlp.c_fc.weight" in changed
    assert "visual.transformer.resblocks.2.mlp.c_fc.weight" not in changed


def test_patch_dropout_trains_on_half_the_patches_and_evaluates_on_all(train_shards: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ok(run_cli(*train_args(train_shards, out, "model.patch_dropout=0.5", "train.steps=2")))
    model, _, _ = mmggem.load(out / "final")
    seen = []
    model.visual.pooler.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    images = torch.randn(2, 3, 28, 28)
    model.visual(images)
    model.train()
    model.visual(images)
    assert seen == [49, 24]  # the pooler gets every patch token at evaluation, the kept half in training


def test_augmented_run_resumes_exactly(train_shards: str, tmp_path: Path) -> None:
    augment = ("data.augment={scale: [0.5, 1.0], color_jitter: [0.4, 0.4, 0.4, 0.1], color_jitter_prob: 0.8, "
               "gray_scale_prob: 0.5}", "train.steps=6")
    ok(run_cli(*train_args(train_shards, tmp_path / "plain", "train.steps=6")))
    ok(run_cli(*train_args(train_shards, tmp_path / "whole", *augment)))
    assert losses(tmp_path / "whole") != losses(tmp_path / "plain")  # the augmentation is applied
    split = tmp_path / "split"
    ok(run_cli(*train_args(train_shards, split, *augment, "train.stop_at_step=3")))
    ok(run_cli(*train_args(train_shards, split, *augment, "train.resume=latest")))
    assert_same_run(tmp_path / "whole", split)


def test_unknown_augment_key_is_a_config_error_naming_it(train_shards: str, tmp_path: Path) -> None:
    result = run_cli(*train_args(train_shards, tmp_path / "run", "data.augment.color_jiter=0.4"))
    assert result.returncode == 2 and "data.augment.color_jiter" in result.stderr


def test_hf_hub_name_loads_from_the_cache_offline(train_shards: str, tmp_path: Path) -> None:
    init = initial_model(tmp_path / "init")
    hub_cache(tmp_path / "cache", "someone/tiny-clip", init / "open_clip_model.safetensors")
    out = tmp_path / "run"
    ok(run_cli(*train_args(train_shards, out, "model.pretrained=hf-hub:someone/tiny-clip",
                           f"model.cache_dir={tmp_path / 'cache'}", "model.lock_image=true", "model.lock_text=true",
                           "train.steps=1"), HF_HUB_OFFLINE="1"))
    before, after = mmggem.load(init)[0].state_dict(), final_weights(out)
    assert torch.equal(after["visual.conv1.weight"], before["visual.conv1.weight"])


def test_missing_pretrained_tag_names_the_tag_the_cache_and_the_fix(train_shards: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = run_cli(*train_args(train_shards, tmp_path / "run", "model.name=ViT-B-32",
                                 "model.pretrained=laion2b_s34b_b79k", f"model.cache_dir={cache}"),
                     HF_HUB_OFFLINE="1")
    assert result.returncode != 0
    message = result.stderr
    assert "'laion2b_s34b_b79k'" in message and str(cache) in message, message[-2000:]
    assert "hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K open_clip_model.safetensors" in message


def test_unknown_pretrained_name_lists_the_model_tags(train_shards: str, tmp_path: Path) -> None:
    result = run_cli(*train_args(train_shards, tmp_path / "run", "model.name=ViT-B-32", "model.pretrained=laion9b"))
    assert result.returncode != 0 and "laion2b_s34b_b79k" in result.stderr and "laion9b" in result.stderr
