"""Head-wise dependence as an ablation metric: planted pooled outputs give their known value, and
`mmggem ablate --metrics head_dependence` tabulates it for finished runs."""
import csv
import json
from pathlib import Path

import PIL.Image
import pytest
import torch
import yaml
from conftest import run_cli

import mmggem
from mmggem.evaluate.dataset import open_eval_set, read_image
from mmggem.experiments.probes import (CACHE_FILE, attention_heads, pooled_features,
                                       run_head_dependence, set_features)
from mmggem.experiments.analysis import head_dependence

ROOT = Path(__file__).resolve().parent.parent


class Planted(torch.nn.Module):
    """A pooler whose output for image n is ``scale * signals[n, head of channel] + offset``, whatever the tokens."""

    uses_class_token = False

    def __init__(self, signals: torch.Tensor, heads: int, width: int) -> None:
        super().__init__()
        self.register_buffer("signals", signals)
        self.head_of_channel = torch.arange(width) // (width // heads)
        self.scale = torch.linspace(0.5, 2.0, width)
        self.offset = torch.linspace(-1.0, 1.0, width)
        self.seen = 0  # images pooled so far: the next batch gets the next rows of signals

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.signals[self.seen:self.seen + len(tokens)]
        self.seen += len(tokens)
        return rows[:, self.head_of_channel] * self.scale + self.offset


def exactly_uncorrelated(images: int, count: int) -> torch.Tensor:
    """``[images, count]`` centred columns with zero correlation between any two (orthonormal by QR)."""
    generator = torch.Generator().manual_seed(0)
    columns = torch.randn(images, count + 1, dtype=torch.float64, generator=generator)
    columns[:, 0] = 1.0
    return torch.linalg.qr(columns).Q[:, 1:].float()


@pytest.mark.parametrize("shared", [True, False])
def test_planted_pooled_outputs_give_their_known_dependence(shared: bool) -> None:
    model = mmggem.create_model("ViT-Ti-4-28", pooling="avg").eval()
    heads, width = attention_heads(model), model.visual.transformer.width
    images = torch.randn(40, 3, 28, 28)
    signals = exactly_uncorrelated(len(images), heads)
    if shared:  # every channel follows one signal: every pair of channels correlates fully
        signals = signals[:, :1].expand(-1, heads).contiguous()
    model.visual.pooler = Planted(signals, heads, width)
    assert heads > 1
    between = head_dependence(pooled_features(model, images), heads).between
    assert between == pytest.approx(1.0 if shared else 0.0, abs=1e-5)


def test_pooled_features_are_what_the_pooler_gives_the_projection() -> None:
    model = mmggem.create_model("ViT-Ti-4-28", pooling="ggem").eval()
    images = torch.randn(6, 3, 28, 28)
    pooled = pooled_features(model, images)
    with torch.no_grad():
        assert torch.allclose(pooled @ model.visual.proj, model.visual(images), atol=1e-5)


def finished_run(out: Path, arm: str, seed: int, *evalsets: Path) -> Path:
    run = out / arm / f"seed_{seed}"
    torch.manual_seed(seed)
    mmggem.save_model(mmggem.create_model("ViT-Ti-4-28", pooling=arm), run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"datasets": [str(e) for e in evalsets]}}))
    (run / "results.jsonl").write_text('{"eval/zeroshot/acc1": 0.5}\n')
    return run


def unbatched_dependence(run: Path, evalset: Path) -> float:
    """The head dependence of the run's final model over every image of ``evalset``, all in one batch."""
    model, preprocess, _ = mmggem.load(run / "final")
    batch = torch.stack([preprocess(read_image(s)) for s in open_eval_set(evalset).samples])
    return head_dependence(pooled_features(model.eval(), batch), attention_heads(model)).between


def test_set_features_decode_and_encode_one_batch_at_a_time(small_eval_sets: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    zeroshot, _ = small_eval_sets
    model, preprocess, _ = mmggem.load(finished_run(tmp_path, "ggem", 0, zeroshot) / "final")
    evalset = open_eval_set(zeroshot)
    decoded = 0

    def counted(image: PIL.Image.Image) -> torch.Tensor:
        nonlocal decoded
        decoded += 1
        return preprocess(image)

    held: list[int] = []  # images decoded when each forward starts: a batch more than the last, not the set
    model.visual.register_forward_pre_hook(lambda module, args: held.append(decoded))
    features = set_features(model.eval(), counted, evalset, batch_size=32)
    images = len(evalset.samples)
    assert held == [min(start + 32, images) for start in range(0, images, 32)] and images > 64
    everything = torch.stack([preprocess(read_image(s)) for s in evalset.samples])
    assert torch.allclose(features, pooled_features(model, everything), atol=1e-5)


def test_head_dependence_is_measured_again_when_its_model_or_eval_sets_change(small_eval_sets: tuple[Path, Path],
                                                                              tmp_path: Path) -> None:
    zeroshot, retrieval = small_eval_sets
    run = finished_run(tmp_path, "ggem", 0, zeroshot)
    key, cache = "eval/zeroshot/head_dependence", run / CACHE_FILE
    cache.write_text(json.dumps({key: 9.0}))  # what the older version kept: the values alone
    assert run_head_dependence(run)[key] == pytest.approx(unbatched_dependence(run, zeroshot), abs=1e-6)

    def plant(value: float) -> None:  # a value no model gives: read back only from the cache
        kept = json.loads(cache.read_text())
        cache.write_text(json.dumps(kept | {"values": {**kept["values"], key: value}}))

    plant(9.0)
    assert run_head_dependence(run) == {key: 9.0}  # the cache of the same model and sets is read
    torch.manual_seed(1)  # retrained: another final model of the same size
    mmggem.save_model(mmggem.create_model("ViT-Ti-4-28", pooling="ggem"), run / "final")
    assert run_head_dependence(run)[key] == pytest.approx(unbatched_dependence(run, zeroshot), abs=1e-6)
    plant(9.0)
    (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"datasets": [str(zeroshot), str(retrieval)]}}))
    values = run_head_dependence(run)
    assert values == pytest.approx({key: unbatched_dependence(run, zeroshot),
                                    "eval/retrieval/head_dependence": unbatched_dependence(run, retrieval)}, abs=1e-6)


def test_ablate_tabulates_head_dependence_paired_by_seed(small_eval_sets: tuple[Path, Path], tmp_path: Path) -> None:
    zeroshot, _ = small_eval_sets
    out = tmp_path / "ablation"
    runs = {(arm, seed): finished_run(out, arm, seed, zeroshot) for arm in ("gem", "ggem") for seed in (0, 1)}
    result = run_cli("ablate", str(ROOT / "configs" / "demo.yaml"), "--poolings", "gem,ggem", "--seeds", "2",
                     "--output-dir", str(out), "--baseline", "gem", "--metrics", "acc1,head_dependence",
                     f"eval.datasets=[{zeroshot}]", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    expected = {}
    for (arm, seed), run in runs.items():
        expected[arm, seed] = unbatched_dependence(run, zeroshot)
        assert (run / CACHE_FILE).is_file()
    rows = {(r["pooling"], r["metric"]): r for r in csv.DictReader(open(out / "ablation.csv"))}
    gem, ggem = rows["gem", "zeroshot/head_dependence"], rows["ggem", "zeroshot/head_dependence"]
    assert float(gem["mean"]) == pytest.approx((expected["gem", 0] + expected["gem", 1]) / 2, abs=1e-6)
    diffs = [expected["ggem", s] - expected["gem", s] for s in (0, 1)]
    assert float(ggem["diff_mean"]) == pytest.approx(sum(diffs) / 2, abs=1e-6)
    assert ggem["paired_seeds"] == "2"
    assert "head_dependence: the mean absolute correlation" in (out / "ablation.md").read_text()
