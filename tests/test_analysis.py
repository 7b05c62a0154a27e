"""mmggem.experiments.analysis against direct computations, on the model `mmggem demo` trains in the tests."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmggem
from mmggem.experiments import analysis
from mmggem.data.fashion_mnist import CLASSNAMES, ZEROSHOT_TEMPLATES, load_splits

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def trained(demo_run: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The trained model, the model inputs of 48 held-out images, and their tokens from one forward pass."""
    model, preprocess, _ = mmggem.load(demo_run / "run" / "final")
    batch = analysis.model_inputs(load_splits().test_images[::31][:48], preprocess)
    with torch.inference_mode():
        _, tokens = model.visual.forward_with_tokens(batch)
    return model, batch, tokens


def write_log(folder: Path, records: list[dict]) -> Path:
    (folder / "results.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


# --- finding a run and reading its log ------------------------------------------------------------------


def test_find_run_dir_accepts_run_and_demo_folders(demo_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = (demo_run / "run").resolve()
    assert analysis.find_run_dir(demo_run / "run") == run
    assert analysis.find_run_dir(demo_run) == run  # an `mmggem demo --output-dir` folder
    monkeypatch.setenv("MMGGEM_RUN_DIR", str(demo_run))
    assert analysis.find_run_dir() == run
    monkeypatch.chdir(demo_run / "data" / "zeroshot")  # a relative path is found from a folder above
    assert analysis.find_run_dir("run") == run


def test_find_run_dir_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MMGGEM_RUN_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"runs/demo.*final.*MMGGEM_RUN_DIR"):
        analysis.find_run_dir()


def test_p_trajectory_has_every_logged_step(demo_run: Path, trained) -> None:
    records = [json.loads(line) for line in (demo_run / "run" / "results.jsonl").read_text().splitlines()]
    logged = [record for record in records if "train/loss" in record]
    trajectory = analysis.p_trajectory(analysis.read_records(demo_run / "run"))
    assert trajectory.steps.tolist() == [record["step"] for record in logged]
    assert trajectory.p.tolist() == [[record[f"train/pool_p/group_{g}"] for g in range(6)] for record in logged]
    model = trained[0]  # the last logged step is the last step: its p are the final model's
    assert np.allclose(trajectory.p[-1], model.visual.pooler.p.detach().clamp(min=1.0).numpy())


def test_p_trajectory_orders_groups_by_number(tmp_path: Path) -> None:
    record = {"step": 3, **{f"train/pool_p/group_{g}": float(g) for g in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)}}
    trajectory = analysis.p_trajectory(analysis.read_records(write_log(tmp_path, [record, {"step": 3, "eval/x": 1}])))
    assert trajectory.steps.tolist() == [3] and trajectory.p.tolist() == [[float(g) for g in range(11)]]


def test_p_trajectory_rejects_runs_without_exponents(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no record has train/pool_p"):
        analysis.p_trajectory([{"step": 1, "train/loss": 2.0}])
    with pytest.raises(ValueError, match="not groups 0..G-1"):
        analysis.p_trajectory([{"step": 1, "train/pool_p/group_0": 3.0, "train/pool_p/group_2": 3.0}])
    with pytest.raises(ValueError, match="not groups 0..G-1"):
        analysis.p_trajectory([{"step": 1, "train/pool_p/group_0": 3.0},
                               {"step": 2, "train/pool_p/group_0": 3.0, "train/pool_p/group_1": 3.0}])


def test_read_records_names_the_bad_line_and_drops_a_last_one_cut_short(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "results.jsonl").write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"results.jsonl, line 2"):
        analysis.read_records(tmp_path)
    (tmp_path / "results.jsonl").write_text('{"step": 1}\n{"step": 2, "train/lo')  # a kill mid-append
    assert analysis.read_records(tmp_path) == [{"step": 1}]
    assert "results.jsonl, line 2: a record cut short" in caplog.text
    with pytest.raises(FileNotFoundError, match="results.jsonl is missing"):
        analysis.read_records(tmp_path / "nowhere")


# --- encoding ---------------------------------------------------------------------------------------------


def test_encoders_match_the_model(demo_run: Path, trained) -> None:
    model, batch, _ = trained
    _, _, tokenizer = mmggem.load(demo_run / "run" / "final")
    with torch.inference_mode():
        direct_images = F.normalize(model.encode_image(batch), dim=-1)
        direct_texts = F.normalize(model.encode_text(tokenizer(["a sneaker.", "a bag."])), dim=-1)
    assert torch.allclose(analysis.encode_images(model, batch, batch_size=20), direct_images, atol=1e-5)
    assert torch.allclose(analysis.encode_captions(model, tokenizer, ["a sneaker.", "a bag."]), direct_texts, atol=1e-5)


def test_zeroshot_classifier_is_the_mean_template_embedding(demo_run: Path, trained) -> None:
    model = trained[0]
    _, _, tokenizer = mmggem.load(demo_run / "run" / "final")
    classifier = analysis.zeroshot_classifier(model, tokenizer, CLASSNAMES, ZEROSHOT_TEMPLATES)
    assert classifier.shape == (model.text_projection.shape[1], len(CLASSNAMES))
    with torch.inference_mode():
        for k in (0, 7, 9):
            texts = [template.format(c=CLASSNAMES[k]) for template in ZEROSHOT_TEMPLATES]
            mean = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).mean(dim=0)
            assert torch.allclose(classifier[:, k], mean / mean.norm(), atol=1e-5)


def test_model_inputs_are_rgb_preprocessed_images(demo_run: Path) -> None:
    _, preprocess, _ = mmggem.load(demo_run / "run" / "final")
    images = load_splits().test_images[:3]
    batch = analysis.model_inputs(images, preprocess)
    assert batch.shape == (3, 3, 28, 28)
    normalize = preprocess.transforms[-1]
    pixels = batch * torch.tensor(normalize.std).view(3, 1, 1) + torch.tensor(normalize.mean).view(3, 1, 1)
    grey = torch.from_numpy(images / 255.0).float()[:, None].expand(-1, 3, -1, -1)  # grey -> equal RGB channels
    assert torch.allclose(pixels, grey, atol=1e-5)


# --- tokens and pooling -------------------------------------------------------------------------------------


def test_patch_tokens_are_what_the_pooler_pools(trained) -> None:
    model, batch, tokens = trained
    batched = analysis.patch_tokens(model, batch, batch_size=20)
    assert batched.shape == (48, 49, 192) and torch.allclose(batched, tokens, atol=1e-5)
    with torch.inference_mode():
        embedding = model.encode_image(batch)
    pooled = analysis.pool_compare(model.visual.pooler, batched)[analysis.LEARNED]
    assert torch.allclose(pooled @ model.visual.proj, embedding, atol=1e-4)


def test_pool_compare_matches_the_power_mean(trained) -> None:
    model, _, tokens = trained
    pooler = model.visual.pooler
    pooled = analysis.pool_compare(pooler, tokens)
    x = tokens.double().clamp(min=pooler.eps).numpy()  # [N, T, C]
    p = np.repeat(pooler.p.detach().double().clamp(min=1.0).numpy(), 192 // pooler.groups)  # per channel
    assert np.allclose(pooled[analysis.GAP].numpy(), tokens.double().mean(dim=1).numpy(), atol=1e-5)
    assert np.allclose(pooled[analysis.CLAMPED].numpy(), x.mean(axis=1), atol=1e-5)
    assert np.allclose(pooled[analysis.LEARNED].numpy(), (x**p).mean(axis=1) ** (1 / p), rtol=1e-4, atol=1e-5)
    assert not torch.equal(pooler.p, torch.ones_like(pooler.p))  # the model's own pooler is left as it was


def test_group_values_are_the_groups_channels(trained) -> None:
    pooled = analysis.pool_compare(trained[0].visual.pooler, trained[2])[analysis.LEARNED]
    values = analysis.group_values(pooled, 6)
    assert values.shape == (6, 48 * 32)
    for g in range(6):
        assert np.array_equal(np.sort(values[g]), np.sort(pooled[:, 32 * g:32 * (g + 1)].numpy().ravel()))
    with pytest.raises(ValueError, match="192 channels do not split into 5"):
        analysis.group_values(pooled, 5)


# --- head-wise dependence ----------------------------------------------------------------------------------------


def test_head_dependence_matches_pairwise_correlations(trained) -> None:
    pooled = analysis.pool_compare(trained[0].visual.pooler, trained[2])[analysis.GAP][:, :48]  # 4 groups of 12
    pooled[:, 5] = 0.25  # a channel that does not vary: no correlation, left out
    dependence = analysis.head_dependence(pooled, groups=4)
    values = pooled.double().numpy()
    kept = [c for c in range(48) if c != 5]
    between, within, block = [], [], {}
    for i in kept:
        for j in kept:
            if i == j:
                continue
            r = abs(np.corrcoef(values[:, i], values[:, j])[0, 1])
            block.setdefault((i // 12, j // 12), []).append(r)
            (within if i // 12 == j // 12 else between).append(r)
    assert dependence.constant_channels == 1
    assert dependence.between == pytest.approx(np.mean(between), abs=1e-9)
    assert dependence.within == pytest.approx(np.mean(within), abs=1e-9)
    assert np.allclose(dependence.matrix, [[np.mean(block[g, h]) for h in range(4)] for g in range(4)], atol=1e-9)


def test_head_dependence_tells_grouped_from_independent_channels() -> None:
    generator = torch.Generator().manual_seed(0)
    factors = torch.randn(4000, 4, 1, generator=generator)  # one shared factor per group
    channels = (factors + torch.randn(4000, 4, 8, generator=generator)).reshape(4000, 32)
    dependence = analysis.head_dependence(channels, groups=4)
    assert dependence.within == pytest.approx(0.5, abs=0.03)  # corr = var(factor) / (var(factor) + var(noise))
    assert dependence.between < 0.03  # independent groups
    assert math.isclose(np.diag(dependence.matrix).mean(), dependence.within, abs_tol=1e-9)


def test_head_dependence_rejects_unusable_input() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        analysis.head_dependence(torch.randn(2, 8), groups=2)
    with pytest.raises(ValueError, match="only 0 of 8 pooled channels vary"):
        analysis.head_dependence(torch.ones(10, 8), groups=2)
    with pytest.raises(ValueError, match="8 channels do not split into 3"):
        analysis.head_dependence(torch.randn(10, 8), groups=3)


def test_ggem_pooler_names_another_pooling() -> None:
    assert isinstance(analysis.ggem_pooler(mmggem.create_model("ViT-Ti-4-28")), torch.nn.Module)
    with pytest.raises(ValueError, match="pools with 'avg', not ggem"):
        analysis.ggem_pooler(mmggem.create_model("ViT-Ti-4-28", pooling="avg"))


def test_image_grid_titles_every_image() -> None:
    images = load_splits().test_images[:5]
    figure = analysis.image_grid(images, [f"image {i}" for i in range(5)], columns=3, colors=["red"] * 5)
    titled = [axis.get_title() for axis in figure.axes if axis.images]
    assert titled == [f"image {i}" for i in range(5)] and len(figure.axes) == 6
    with pytest.raises(ValueError, match="5 images but 4 titles"):
        analysis.image_grid(images, ["a"] * 4)
