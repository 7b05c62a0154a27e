"""The typed run config: YAML + dotted overrides, and errors that name the key."""
import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest
import yaml

from conftest import run_cli
from mmggem.cli import main as cli_main
from mmggem.config.run import ConfigError, RunConfig, load_config, parse_duration, save_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def literal_options(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for each value of each Literal-typed option, found by walking the config dataclasses."""
    found = []
    for name, annotation in get_type_hints(cls).items():
        if dataclasses.is_dataclass(annotation):
            found += literal_options(annotation, f"{prefix}{name}.")
            continue
        members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
        found += [(prefix + name, value) for member in members if get_origin(member) is Literal
                  for value in get_args(member)]
    return found


def get(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def unquoted_yaml(tmp_path: Path, key: str, text: str) -> Path:
    """A config file that starts from configs/demo.yaml and sets ``key`` to ``text`` written without quotes."""
    *sections, leaf = key.split(".")
    lines = [f"base: {CONFIGS / 'demo.yaml'}"]
    lines += [f"{'  ' * depth}{section}:" for depth, section in enumerate(sections)]
    lines.append(f"{'  ' * len(sections)}{leaf}: {text}")
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


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
        ("train.precision=fp8", r"train\.precision: expected one of 'no', 'bf16', 'fp16' or NoneType, got 'fp8'"),
        ("log.wandb=cloud", r"log\.wandb: expected one of 'off', 'offline', 'online'"),
        ("model.pooling=median", r"model\.pooling: 'median' is not one of cls, avg, max, gem, ggem, attn"),
        ("model.pooling_kwargs={negatives: sign}", r"model\.pooling_kwargs: negatives must be one of clamp, signed"),
        ("model.pooling_kwargs={p_init: 0}", r"model\.pooling_kwargs: p_init must be a positive number"),
        ("model.pooling_kwargs={colour: red}", r"model\.pooling_kwargs: invalid options for pooling 'ggem'.*colour"),
        ("train.batch_size=0", r"train\.batch_size: must be >= 1"),
        ("train.lr=-1", r"train\.lr: must be > 0"),
        ("train.stop_at_step=5000", r"train\.stop_at_step: must be between 1 and train\.steps"),
        ("train.time_limit=soon", r"train\.time_limit: 'soon' is not a duration"),
        ("train.accum_steps=3", r"train\.accum_steps: 3 must divide train\.batch_size"),
        ("data.train=", r"data\.train: a shard pattern is required"),
        ("train.betas=[0.9, 2]", r"train\.betas: expected two numbers in \[0, 1\), got \[0\.9, 2\]"),
        ("train.betas=[0.9]", r"train\.betas: expected two numbers"),
        ("train.weight_decay=-0.1", r"train\.weight_decay: must be >= 0, got -0\.1"),
        ("data.workers=-1", r"data\.workers: must be >= 0"),
        ("train.min_lr_ratio=2", r"train\.min_lr_ratio: must be between 0 and 1, got 2\.0"),
        ("train", r"not of the form key=value"),
        ("train.steps.x=1", r"train\.steps.*not a section|expected a mapping"),
        ("model.patch_dropout=1", r"model\.patch_dropout: must be in \[0, 1\), got 1\.0"),
        ("model.lock_image_unlocked_groups=2", r"model\.lock_image_unlocked_groups is set but model\.lock_image"),
        ("model.lock_pooler=true", r"model\.lock_pooler .* set model\.lock_image or model\.lock_text"),
        ("data.augment={ratio: [0.75, 1.33]}", r"data\.augment\.ratio: only timm's transform reads it"),
        ("data.augment={color_jitter: 0.4}", r"data\.augment\.color_jitter: .*color_jitter_prob"),
        ("data.augment={use_timm: true, re_prob: 0.25}", r"data\.augment\.re_prob: random erasing"),
        ("data.augment={use_timm: true, gray_scale_prob: 0.2}", r"data\.augment\.gray_scale_prob: .*timm path"),
        ("data.augment={color_jitter: 0.4, color_jitter_prob: 0.8}", r"color_jitter_prob needs .* four numbers"),
        ("data.augment={use_timm: true, interpolation: nearest}", r"data\.augment\.interpolation: one of"),
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


def test_the_walk_finds_the_documented_literal_options() -> None:
    options = literal_options()
    assert {("log.wandb", "off"), ("train.precision", "no"), ("train.loss", "siglip")} <= set(options)


@pytest.mark.parametrize("word", ["null", "none", "~"])
def test_precision_is_unset_by_default_and_by_a_null_word(tmp_path: Path, word: str) -> None:
    """Unset (None) lets the launcher decide (mmggem.train.precision); ``no`` is kept as fp32, not read as false."""
    assert load_config(CONFIGS / "demo.yaml").train.precision is None
    assert load_config(CONFIGS / "demo.yaml", [f"train.precision={word}"]).train.precision is None
    assert load_config(unquoted_yaml(tmp_path, "train.precision", word)).train.precision is None
    assert load_config(CONFIGS / "demo.yaml", ["train.precision=no"]).train.precision == "no"


@pytest.mark.parametrize(("key", "value"), literal_options())
def test_every_literal_value_works_on_the_command_line_and_unquoted_in_yaml(tmp_path: Path, key: str,
                                                                            value: Any) -> None:
    assert get(load_config(CONFIGS / "demo.yaml", [f"{key}={value}"]), key) == value
    assert get(load_config(unquoted_yaml(tmp_path, key, str(value))), key) == value


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("log.run_name", "yes", "yes"),
        ("log.run_name", "on", "on"),
        ("log.run_name", "y", "y"),
        ("log.run_name", "2024-01-01", "2024-01-01"),
        ("log.project", "1.50", "1.50"),
        ("log.project", "null", "null"),
        ("train.resume", "", ""),
        ("train.grad_clip", "none", None),
        ("train.grad_clip", "None", None),
        ("train.grad_clip", "null", None),
        ("train.grad_clip", "~", None),
        ("train.stop_at_step", "none", None),
        ("data.num_samples", "none", None),
        ("train.threads", "NULL", None),
        ("train.threads", "2", 2),
        ("log.progress", "off", False),
        ("log.progress", "yes", True),
        ("train.betas", "[0.8, 0.9]", [0.8, 0.9]),
        ("eval.datasets", "[on, 2024-01-01]", [True, "2024-01-01"]),
    ],
)
def test_words_yaml_reads_otherwise_follow_the_type_of_the_key(tmp_path: Path, key: str, text: str,
                                                               expected: Any) -> None:
    """A string option keeps the text typed; an optional number takes none/null; a bool takes on/off/yes/no."""
    assert get(load_config(CONFIGS / "demo.yaml", [f"{key}={text}"]), key) == expected
    assert get(load_config(unquoted_yaml(tmp_path, key, text)), key) == expected


@pytest.mark.parametrize(("override", "message"), [
    ("train.steps=off", r"train\.steps: expected int, got 'off'"),
    ("train.grad_clip=never", r"train\.grad_clip: expected float or NoneType, got 'never'"),
    ("log.wandb=yes", r"log\.wandb: expected one of 'off', 'offline', 'online', got 'yes'"),
    ("train=off", r"train: expected a mapping, got 'off'"),
])
def test_a_misread_word_is_named_as_typed(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "demo.yaml", [override])


def test_the_train_command_takes_the_documented_words() -> None:
    """`mmggem train ... log.wandb=off train.precision=no` gets past every value check to the empty data.train."""
    result = run_cli("train", str(CONFIGS / "demo.yaml"), "log.wandb=off", "train.precision=no", "data.train=")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("mmggem train: error: data.train: a shard pattern is required, "
                                     "e.g. /data/cc3m/{00000..00331}.tar")


def test_string_overrides_keep_braces_hashes_and_colons_as_typed(capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   train_shards: str, tmp_path: Path) -> None:
    """A shard pattern relative to the working directory starts with a brace, which YAML would read as a mapping;
    ``#`` would start a YAML comment and ``: `` a mapping. A string option takes the text after ``=`` as typed."""
    monkeypatch.chdir(Path(train_shards).parent)
    pattern = Path(train_shards).name
    assert pattern.startswith("{")
    code = cli_main(["train", "--dry-run", str(CONFIGS / "demo.yaml"), f"data.train={pattern}", "log.run_name=ggem #3",
                     "log.notes=lr sweep: 1e-3", "log.wandb=off", "log.group='a: b'", "model.pretrained=''",
                     "eval.datasets=[]", f"output_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.partition("\n\n")[0])
    assert resolved["data"]["train"] == pattern and f"  {pattern}: 4 shard(s)" in out.splitlines()
    assert resolved["log"] == {**resolved["log"], "run_name": "ggem #3", "notes": "lr sweep: 1e-3", "wandb": "off",
                               "group": "a: b"}  # a value wholly in quotes is one YAML string, as in a file
    assert resolved["model"]["pretrained"] == ""
    assert code == 0, out


@pytest.mark.parametrize(("override", "expected"), [
    ("eval.datasets=[/data/a, /data/b", "write a list as [a, b]"),
    ("model.pooling_kwargs={groups: 12", "write a mapping as {key: value}"),
    ("train.steps=[1", "expected int"),
])
def test_a_value_yaml_cannot_read_is_one_line_naming_the_key_exit_2(capsys: pytest.CaptureFixture, override: str,
                                                                     expected: str) -> None:
    key, _, value = override.partition("=")
    code = cli_main(["train", "--dry-run", str(CONFIGS / "demo.yaml"), override])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.out
    [line] = captured.err.splitlines()
    assert line.startswith(f"mmggem train: error: {key}: {value!r} is not valid YAML (") and expected in line


def test_checking_pooler_options_leaves_the_random_stream_alone() -> None:
    """The config builds the pooler once to check its options; attn draws weights, which must not
    shift what a seeded run draws afterwards."""
    import torch

    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    load_config(CONFIGS / "demo.yaml", ["model.pooling=attn"])
    assert torch.equal(torch.rand(4), expected)
