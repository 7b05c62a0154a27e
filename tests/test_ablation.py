"""`mmggem ablate`: every pooling x seed trained, evaluated and tabulated."""
import csv
import json
import statistics
from pathlib import Path

import torch
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_ablation_tabulates_mean_and_std_over_seeds(train_shards: str, small_eval_sets: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    zeroshot, retrieval = small_eval_sets
    out = tmp_path / "ablation"
    result = run_cli("ablate", str(ROOT / "configs" / "demo.yaml"), "--poolings", "avg,ggem", "--seeds", "2",
                     "--output-dir", str(out), "--parallel", "2",
                     f"data.train={train_shards}", f"eval.datasets=[{zeroshot}, {retrieval}]",
                     "train.steps=3", "train.batch_size=16", "train.warmup_steps=1", "data.workers=0",
                     "train.threads=1", "eval.batch_size=500", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert {(r["pooling"], r["metric"]) for r in rows} == {
        (p, m) for p in ("avg", "ggem")
        for m in ("zeroshot/acc1", "retrieval/image_retrieval_recall@1", "retrieval/text_retrieval_recall@1")}
    for row in rows:
        runs = [out / row["pooling"] / f"seed_{s}" / "results.jsonl" for s in (0, 1)]
        values = [json.loads(p.read_text().splitlines()[-1])[f"eval/{row['metric']}"] for p in runs]
        assert abs(float(row["mean"]) - statistics.fmean(values)) < 1e-6
        assert abs(float(row["std"]) - statistics.stdev(values)) < 1e-6 and row["seeds"] == "2"
    assert "| ggem |" in (out / "ablation.md").read_text()
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert "seed: 1\n" in (out / "ggem" / "seed_1" / "config.yaml").read_text()


def test_ablation_refuses_unknown_poolings(tmp_path: Path) -> None:
    result = run_cli("ablate", str(ROOT / "configs" / "demo.yaml"), "--poolings", "avg,median",
                     "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "median" in result.stderr


def test_same_seed_runs_share_all_but_the_pooler_and_draw_the_same_data(train_shards: str) -> None:
    """The trainer's order: set_seed, build_model, set_seed(device_specific), then the loader and its
    random augmentation. attn draws random weights, ggem none: the strongest pair to compare."""
    from accelerate.utils import set_seed

    from mmggem.config import load_config
    from mmggem.data.loader import TrainLoader
    from mmggem.model import get_tokenizer, image_transform
    from mmggem.train import build_model

    def first_draws(pooling: str) -> tuple[dict, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        cfg = load_config(ROOT / "configs" / "demo.yaml", [f"model.pooling={pooling}", "seed=3",
                                                           "data.augment={scale: [0.5, 1.0]}"])
        set_seed(cfg.seed)
        model = build_model(cfg)
        after_model = torch.get_rng_state()
        set_seed(cfg.seed)  # the trainer's set_seed(seed, device_specific=True) on process 0
        loader = TrainLoader(train_shards, transform=image_transform(model, is_train=True, augment=cfg.data.augment),
                             tokenizer=get_tokenizer(model), batch_size=8, num_workers=0, seed=cfg.seed,
                             resampled=False, shuffle_buffer=64, rank=0, world_size=1)
        weights = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.pooler.")}
        return weights, after_model, next(iter(loader))

    weights, rng, (images, texts) = first_draws("attn")
    other_weights, other_rng, (other_images, other_texts) = first_draws("ggem")
    assert weights.keys() == other_weights.keys()
    assert all(torch.equal(weights[k], other_weights[k]) for k in weights)
    assert torch.equal(rng, other_rng)  # whatever the trainer draws after the model starts from the same state
    assert torch.equal(images, other_images) and torch.equal(texts, other_texts)
