"""The typed run config: YAML + dotted overrides, and errors that name the key."""
from pathlib import Path

import pytest

from mmggem.config import ConfigError, load_config, parse_duration, save_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_every_shipped_config_loads() -> None:
    names = sorted(str(path.relative_to(CONFIGS)) for path in CONFIGS.rglob("*.yaml"))
    assert {"demo.yaml", "ablation/cls.yaml", "ablation/ggem.yaml"} <= set(names)
    for path in CONFIGS.rglob("*.yaml"):
        cfg = load_config(path)
        assert cfg.train.steps >= 1 and cfg.model.pooling


def test_dotted_overrides_are_typed_and_win(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "demo.yaml", ["train.lr=3e-4", "train.steps=7", "model.pooling=avg",
                                              "eval.datasets=[a, b]", "train.grad_clip=null", "output_dir=x"])
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 7 and cfg.model.pooling == "avg"
    assert cfg.eval.datasets == ["a", "b"] and cfg.train.grad_clip is None and cfg.output_dir == "x"
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", r"unknown key train\.lrr; allowed under 'train': .*\blr\b"),
        ("nonsense=1", r"unknown key nonsense"),
        ("train.steps=many", r"train\.steps: expected int, got 'many'"),
        ("train.steps=1.5", r"train\.steps: expected int"),
        ("train.precision=fp8", r"train\.precision: expected one of 'no', 'bf16', 'fp16', got 'fp8'"),
        ("log.wandb=cloud", r"log\.wandb: expected one of 'off', 'offline', 'online'"),
        ("model.pooling=median", r"model\.pooling: 'median' is not one of cls, avg, max, gem, ggem, attn"),
        ("train.batch_size=0", r"train\.batch_size: must be >= 1"),
        ("train.lr=-1", r"train\.lr: must be > 0"),
        ("train.stop_at_step=5000", r"train\.stop_at_step: must be between 1 and train\.steps"),
        ("train.time_limit=soon", r"train\.time_limit: 'soon' is not a duration"),
        ("train.accum_steps=3", r"train\.accum_steps: 3 must divide train\.batch_size"),
        ("data.train=", r"data\.train: a shard pattern is required"),
        ("train", r"not of the form key=value"),
        ("train.steps.x=1", r"train\.steps.*not a section|expected a mapping"),
    ],
)
def test_bad_values_fail_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "demo.yaml", [override])


def test_missing_and_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)


def test_durations() -> None:
    assert parse_duration("3h50m") == 3 * 3600 + 50 * 60
    assert parse_duration("90s") == 90 and parse_duration("1d") == 86400


def test_base_files_are_read_first_and_overridden(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "ablation" / "gem.yaml")
    assert cfg.model.pooling == "gem" and cfg.model.name == "ViT-B-16" and cfg.train.lr == 1e-3
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
