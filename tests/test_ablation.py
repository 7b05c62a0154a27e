"""`mmggem ablate`: every pooling x seed trained, evaluated and tabulated."""
import csv
import json
import math
import os
import statistics
from pathlib import Path
from typing import Sequence

import subprocess

import pytest
import torch
import yaml
from conftest import run_cli

from mmggem.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_ablation_tabulates_mean_and_std_over_seeds(train_shards: str, small_eval_sets: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    zeroshot, retrieval = small_eval_sets
    out = tmp_path / "ablation"
    result = run_cli("ablate", str(ROOT / "configs" / "demo.yaml"), "--poolings", "avg", "--seeds", "2",
                     "--variant", "ggem-signed=ggem model.pooling_kwargs.negatives=signed",
                     "--output-dir", str(out), "--parallel", "2", "--baseline", "avg",
                     f"data.train={train_shards}", f"eval.datasets=[{zeroshot}, {retrieval}]",
                     "train.steps=3", "train.batch_size=16", "train.warmup_steps=1", "data.workers=0",
                     "train.threads=1", "eval.batch_size=500", "log.tags=[demo]", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "ablation.csv")))
    assert {(r["pooling"], r["metric"]) for r in rows} == {
        (p, m) for p in ("avg", "ggem-signed")
        for m in ("zeroshot/acc1", "retrieval/image_retrieval_recall@1", "retrieval/text_retrieval_recall@1")}
    for row in rows:
        runs = [out / row["pooling"] / f"seed_{s}" / "results.jsonl" for s in (0, 1)]
        values = [json.loads(p.read_text().splitlines()[-1])[f"eval/{row['metric']}"] for p in runs]
        assert abs(float(row["mean"]) - statistics.fmean(values)) < 1e-6
        assert abs(float(row["std"]) - statistics.stdev(values)) < 1e-6 and row["seeds"] == "2"
        if row["pooling"] == "ggem-signed":
            base = [out / "avg" / f"seed_{s}" / "results.jsonl" for s in (0, 1)]
            base_values = [json.loads(p.read_text().splitlines()[-1])[f"eval/{row['metric']}"] for p in base]
            diffs = [v - b for v, b in zip(values, base_values)]
            assert row["baseline"] == "avg" and row["paired_seeds"] == "2"
            assert abs(float(row["diff_mean"]) - statistics.fmean(diffs)) < 1e-6
        else:
            assert row["diff_mean"] == ""
    assert "| ggem-signed |" in (out / "ablation.md").read_text()
    assert "Difference to avg, paired by seed" in (out / "ablation.md").read_text()
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    variant = yaml.safe_load((out / "ggem-signed" / "seed_1" / "config.yaml").read_text())
    assert (variant["seed"], variant["model"]["pooling"], variant["model"]["pooling_kwargs"]) == (
        1, "ggem", {"negatives": "signed"})
    assert yaml.safe_load((out / "avg" / "seed_0" / "config.yaml").read_text())["model"]["pooling_kwargs"] == {}
    # on the dashboard (these keys reach wandb as tests/test_dashboards.py shows): named <pooling>-s<seed>,
    # grouped under the ablation, tagged with the pooling
    for pooling in ("avg", "ggem-signed"):
        for seed in (0, 1):
            log = yaml.safe_load((out / pooling / f"seed_{seed}" / "config.yaml").read_text())["log"]
            expected = (f"{pooling}-s{seed}", "ablation", ["demo", pooling])
            assert (log["run_name"], log["group"], log["tags"]) == expected
    final = json.loads((out / "avg" / "seed_0" / "results.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(final["val/loss"])  # CLIP's loss on the retrieval set's pairs


T_975 = {1: 12.7062, 2: 4.3027}  # Student's t, 97.5% quantile, by degrees of freedom (any statistics table)
T_80 = {2: 1.0607}  # Student's t, 80% quantile


def finished_run(out: Path, pooling: str, seed: int, recall: float, exponents: tuple[float, ...] = ()) -> None:
    """A run folder as `mmggem train` leaves it, as far as the summary reads it: ``exponents`` are the
    pooler's p per group at step 10 (p starts at 3)."""
    run = out / pooling / f"seed_{seed}"
    (run / "final").mkdir(parents=True)
    (run / "final" / "open_clip_config.json").write_text("{}")
    p_logs = [{"step": step, **{f"train/pool_p/group_{g}": 3 + (p - 3) * step / 10 for g, p in enumerate(exponents)}}
              for step in (5, 10)]
    lines = [{"train/loss": 1.0}, *(p_logs if exponents else []), {"eval/flickr/text_retrieval_recall@1": recall}]
    (run / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def log(out: Path, pooling: str, seed: int, record: dict[str, float]) -> None:
    """Append ``record`` to a finished run's results, as a later logged step."""
    with open(out / pooling / f"seed_{seed}" / "results.jsonl", "a") as results:
        results.write(json.dumps(record) + "\n")


def summarised(out: Path, arms: list[str], seeds: int,
               baselines: Sequence[str] = ()) -> dict[tuple[str, str, str], dict]:
    """Write the summary of the finished runs of ``arms`` under ``out``; its CSV rows by (pooling, metric, baseline)."""
    from mmggem.experiments.ablation import Arm, plan_runs
    from mmggem.experiments.summary import write_summary

    write_summary([r for r in plan_runs(out, [Arm(a, a) for a in arms], seeds) if r.finished], out, baselines)
    return {(r["pooling"], r["metric"], r["baseline"]): r for r in csv.DictReader(open(out / "ablation.csv"))}


def test_report_shows_missing_values_single_seeds_and_nan_values_as_such(tmp_path: Path) -> None:
    for seed, recall in enumerate((0.20, 0.30, math.nan)):  # seed 2 diverged
        finished_run(tmp_path, "avg", seed, recall)
    for seed, recall in enumerate((0.25, 0.36, 0.40)):
        finished_run(tmp_path, "gem", seed, recall)
        log(tmp_path, "gem", seed, {"eval/coco/text_retrieval_recall@1": 0.1 * (seed + 1)})  # only gem has coco
    finished_run(tmp_path, "ggem", 0, 0.50)
    rows = summarised(tmp_path, ["avg", "gem", "ggem"], 3, ["avg"])

    fields = ("mean", "std", "seeds", "diff_mean", "paired_seeds")
    flickr, coco = "flickr/text_retrieval_recall@1", "coco/text_retrieval_recall@1"
    assert [rows["avg", flickr, ""][f] for f in fields[:3]] == ["0.250000", f"{statistics.stdev([0.2, 0.3]):.6f}", "2"]
    assert [rows["avg", coco, ""][f] for f in fields] == ["", "", "0", "", ""]  # no value: empty, as no difference is
    assert [rows["ggem", flickr, "avg"][f] for f in fields] == ["0.500000", "nan", "1", "0.300000", "1"]
    assert [rows["ggem", coco, "avg"][f] for f in fields] == ["", "", "0", "", ""]
    assert [rows["gem", flickr, "avg"][f] for f in fields[2:]] == ["3", "0.055000", "2"]  # seed 2 of avg is NaN
    assert [rows["gem", coco, "avg"][f] for f in fields] == ["0.200000", "0.100000", "3", "", ""]
    markdown = (tmp_path / "ablation.md").read_text()
    assert ("**NaN, left out of every mean, spread and difference below: avg seed 2 "
            "flickr/text_retrieval_recall@1.**") in markdown
    assert "| avg | - | 25.00 ± 7.07 (n=2) |" in markdown and "| ggem | - | 50.00 ± - (n=1) |" in markdown
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_an_arm_without_a_common_seed_names_each_baseline_it_is_not_paired_with(tmp_path: Path) -> None:
    finished_run(tmp_path, "avg", 0, 0.20)
    finished_run(tmp_path, "max", 0, 0.30)
    finished_run(tmp_path, "gem", 1, 0.40)  # no seed in common with either baseline
    rows = summarised(tmp_path, ["avg", "max", "gem"], 2, ["avg", "max"])
    assert [(pooling, baseline, row["diff_mean"]) for (pooling, _, baseline), row in rows.items()] == [
        ("avg", "", ""), ("avg", "max", "-0.100000"), ("max", "avg", "0.100000"), ("max", "", ""),
        ("gem", "avg", ""), ("gem", "max", "")]


def test_report_files_are_replaced_whole_never_rewritten_in_place(tmp_path: Path) -> None:
    """A reader that opened the old files (a hard link here) keeps them whole while the report is written
    anew: each new file is written beside its target and renamed into place."""
    finished_run(tmp_path, "gem", 0, 0.20, (3.5,))
    finished_run(tmp_path, "gem", 1, 0.30, (3.6,))
    summarised(tmp_path, ["gem"], 2)
    names = ("ablation.md", "ablation.csv", "ablation.png", "ablation_p.png")
    before = {name: (tmp_path / name).read_bytes() for name in names}
    for name in names:
        os.link(tmp_path / name, tmp_path / f"reader-{name}")
    log(tmp_path, "gem", 1, {"step": 20, "train/pool_p/group_0": 4.0, "eval/flickr/text_retrieval_recall@1": 0.5})
    summarised(tmp_path, ["gem"], 2)
    for name in names:
        assert (tmp_path / name).read_bytes() != before[name], name  # the new report
        assert (tmp_path / f"reader-{name}").read_bytes() == before[name], name  # the old file, untouched
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_paired_differences_to_each_baseline_with_intervals_and_notes(tmp_path: Path) -> None:
    from mmggem.experiments.ablation import Arm, plan_runs
    from mmggem.experiments.summary import write_summary

    base = {0: 0.10, 1: 0.30, 2: 0.20}  # large seed noise, shared by the pooling it is paired with
    values = {"avg": base, "ggem": {s: v + d for (s, v), d in zip(base.items(), (0.020, 0.021, 0.022))},
              "max": {s: v + d for (s, v), d in zip(base.items(), (-0.01, 0.02, 0.0))}, "gem": {0: 0.13}}
    for pooling, by_seed in values.items():
        for seed, recall in by_seed.items():
            finished_run(tmp_path, pooling, seed, recall, {"ggem": (2.5 + seed, 1.0 + seed), "gem": (2.0,)}.get(pooling, ()))
    runs = [r for r in plan_runs(tmp_path, [Arm(p, p) for p in values], 3) if r.finished]
    summary = write_summary(runs, tmp_path, baselines=["avg", "max"])

    rows = list(csv.DictReader(open(tmp_path / "ablation.csv")))
    assert [(r["pooling"], r["baseline"]) for r in rows] == [
        ("avg", ""), ("avg", "max"), ("ggem", "avg"), ("ggem", "max"), ("max", "avg"), ("max", ""),
        ("gem", "avg"), ("gem", "max")]
    by_pair = {(r["pooling"], r["baseline"]): r for r in rows}
    ggem, max_, gem = by_pair["ggem", "avg"], by_pair["max", "avg"], by_pair["gem", "avg"]
    half = T_975[2] * statistics.stdev([0.020, 0.021, 0.022]) / 3**0.5
    assert abs(float(ggem["diff_mean"]) - 0.021) < 1e-9 and ggem["paired_seeds"] == "3"
    assert abs(float(ggem["diff_low"]) - (0.021 - half)) < 1e-5 and abs(float(ggem["diff_high"]) - (0.021 + half)) < 1e-5
    assert float(max_["diff_low"]) < 0 < float(max_["diff_high"])
    # the smallest difference 3 seeds of this spread would detect: 80% power at the 95% level
    detectable = (T_975[2] + T_80[2]) * statistics.stdev([0.020, 0.021, 0.022]) / 3**0.5
    assert abs(float(ggem["diff_detectable"]) - detectable) < 1e-5
    assert gem["paired_seeds"] == "1" and gem["diff_low"] == "nan" and by_pair["avg", ""]["diff_mean"] == ""
    ggem_vs_max = [0.020 + 0.01, 0.021 - 0.02, 0.022 - 0.0]
    assert abs(float(by_pair["ggem", "max"]["diff_mean"]) - statistics.fmean(ggem_vs_max)) < 1e-6
    assert abs(float(by_pair["avg", "max"]["diff_mean"]) + statistics.fmean([-0.01, 0.02, 0.0])) < 1e-6
    markdown = (tmp_path / "ablation.md").read_text()
    assert "+2.10 [+1.85, +2.35] (n=3)" in markdown
    assert "max vs avg, flickr/text_retrieval_recall@1: the 95% interval includes 0" in markdown
    assert "ggem vs avg" not in markdown  # no note for a difference the interval resolves
    assert "gem vs avg, flickr/text_retrieval_recall@1: one paired seed" in markdown
    assert markdown.index("Difference to avg, paired") < markdown.index("Difference to max, paired")
    assert "Smallest difference to avg these seeds could detect" in markdown
    assert f"| ggem | {100 * detectable:.2f} |" in markdown and "| gem | - |" in markdown
    assert "ggem vs max, flickr/text_retrieval_recall@1: the 95% interval includes 0" in markdown
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    # the learned exponents: only ggem logged them; the last value per group and seed, and their course
    assert list(summary.exponents) == [("ggem", 0), ("ggem", 1), ("ggem", 2), ("gem", 0)]
    assert summary.exponents["ggem", 1].steps.tolist() == [5, 10]
    assert summary.exponents["ggem", 1].p.tolist() == [[3.25, 2.5], [3.5, 2.0]]
    assert "| ggem | 2 | 4.500 | 3.000 |" in markdown and "| gem | 0 | 2.000 |  |" in markdown
    assert "| avg | 0 |" not in markdown
    assert (tmp_path / "ablation_p.png").read_bytes()[:4] == b"\x89PNG"


def test_unresolved_differences_get_one_note_per_arm_and_kind() -> None:
    from mmggem.experiments.paired import paired_difference, plain_notes

    base = {0: 0.10, 1: 0.30, 2: 0.20}
    differences = {
        "R@1": paired_difference({s: v + d for (s, v), d in zip(base.items(), (0.01, -0.01, 0.02))}, base),
        "R@5": paired_difference({s: v + d for (s, v), d in zip(base.items(), (0.00, 0.03, -0.02))}, base),
        "R@10": paired_difference({s: v + 0.05 + s / 1000 for s, v in base.items()}, base),  # resolved
        "acc1": paired_difference({0: 0.5}, {0: 0.4, 1: 0.3}),
        "acc5": paired_difference({}, base),
    }
    assert plain_notes("ggem", "gem", differences) == [
        "ggem vs gem, acc1: one paired seed gives no interval; run more seeds before reading anything into the "
        "difference.",
        "ggem vs gem, R@1, R@5: the 95% intervals include 0, so these 3 seeds cannot tell ggem from gem on these "
        "metrics (the difference may be seed noise)."]
    assert plain_notes("ggem", "gem", {"R@10": differences["R@10"]}) == []


def test_summary_tabulates_the_metrics_asked_for(tmp_path: Path) -> None:
    from mmggem.experiments.ablation import Arm, plan_runs
    from mmggem.experiments.summary import write_summary

    finished_run(tmp_path, "avg", 0, 0.25)
    runs = [r for r in plan_runs(tmp_path, [Arm("avg", "avg")], 1) if r.finished]
    write_summary(runs, tmp_path, metrics=["text_retrieval_recall@1"])
    assert [r["metric"] for r in csv.DictReader(open(tmp_path / "ablation.csv"))] == ["flickr/text_retrieval_recall@1"]
    assert not (tmp_path / "ablation_p.png").exists()  # avg learns no exponent
    with pytest.raises(UserError, match="acc5"):
        write_summary(runs, tmp_path, metrics=["acc5"])


def test_columns_go_set_by_set_with_metrics_in_the_order_asked() -> None:
    from mmggem.experiments.summary import summary_columns

    logged = {f"eval/test/image_retrieval_recall@{k}": 0.1 for k in (10, 5, 1)}
    logged |= {"eval/keywords/acc1": 0.2, "eval/test/loss": 1.0}
    asked = ["image_retrieval_recall@1", "image_retrieval_recall@5", "image_retrieval_recall@10", "acc1"]
    assert summary_columns([logged], asked) == [
        "eval/keywords/acc1", *(f"eval/test/image_retrieval_recall@{k}" for k in (1, 5, 10))]


def test_report_tabulates_the_finished_runs_and_names_the_others(tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    finished_run(out, "gem", 0, 0.20, (3.5,))
    finished_run(out, "gem", 1, 0.30, (3.6,))
    finished_run(out, "ggem", 0, 0.25, (3.2, 2.8))
    (out / "ggem" / "seed_1" / "checkpoints").mkdir(parents=True)  # cut short

    def report(*args: str) -> subprocess.CompletedProcess:
        return run_cli("ablate", str(ROOT / "configs" / "demo.yaml"), "--report", "--seeds", "2",
                       "--output-dir", str(out), "--metrics", "text_retrieval_recall@1", *args)

    result = report("--poolings", "gem,ggem", "--baseline", "gem")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    markdown = (out / "ablation.md").read_text()
    assert markdown.startswith("**Interim: 3 of 4 planned runs finished; not yet ggem seed 1. ")
    assert "| gem | 25.00 ± 7.07 (n=2) |" in markdown and "| ggem | 25.00 ± - (n=1) |" in markdown  # no spread
    assert "| ggem | +5.00 (n=1, no interval) |" in markdown  # paired on seed 0, the one pair there is
    assert not (out / "ggem" / "seed_1" / "results.jsonl").exists()  # --report trains nothing
    assert (out / "ablation_p.png").is_file() and markdown in result.stdout
    # once every planned run has finished, the same command writes whole tables
    (out / "ggem" / "seed_1" / "checkpoints").rmdir()
    finished_run(out, "ggem", 1, 0.40, (3.1, 2.9))
    assert report("--poolings", "gem,ggem", "--baseline", "gem").returncode == 0
    markdown = (out / "ablation.md").read_text()
    assert "Interim" not in markdown and "| ggem | +7.50 [-24.27, +39.27] (n=2) |" in markdown
    # a baseline with no finished run, and an ablation with none at all, are refused by name
    result = report("--poolings", "gem,ggem,avg", "--baseline", "avg")
    assert result.returncode == 1 and "baseline avg has no finished run" in result.stderr
    result = report("--poolings", "avg")
    assert result.returncode == 1 and f"no run under {out} has finished yet" in result.stderr
    assert run_cli("ablate", str(ROOT / "configs" / "demo.yaml"), "--report", "--dry-run").returncode == 2


def test_ablation_refuses_unknown_poolings_bad_variants_and_baselines(tmp_path: Path) -> None:
    def ablate(*args: str) -> subprocess.CompletedProcess:
        return run_cli("ablate", str(ROOT / "configs" / "demo.yaml"), "--output-dir", str(tmp_path), *args)

    result = ablate("--poolings", "avg,median")
    assert result.returncode == 2 and "median" in result.stderr
    result = ablate("--poolings", "avg,ggem", "--baseline", "gem")
    assert result.returncode == 2 and "--baseline gem is not among the arms avg,ggem" in result.stderr
    result = ablate("--poolings", "avg", "--variant", "fancy=median model.final_ln_after_pool=true")
    assert result.returncode == 2 and "--variant 'fancy=median" in result.stderr
    result = ablate("--poolings", "avg,ggem", "--variant", "ggem=gem model.final_ln_after_pool=true")
    assert result.returncode == 2 and "ggem given twice" in result.stderr
    result = ablate("--poolings", "avg", "--variant", "ggem-x=ggem model.pooling_kwargs.negatives=sign")
    assert result.returncode != 0 and "negatives" in result.stderr and "sign" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before any run started


def test_same_seed_runs_share_all_but_the_pooler_and_draw_the_same_data(train_shards: str) -> None:
    """The trainer's order: set_seed, model_from_config, set_seed(device_specific), then the loader and its
    random augmentation. attn draws random weights, ggem none: the strongest pair to compare."""
    from accelerate.utils import set_seed

    from mmggem.config.run import load_config
    from mmggem.data.loader import TrainLoader
    from mmggem.model.clip import get_tokenizer, image_transform
    from mmggem.config.model import model_from_config

    def first_draws(pooling: str) -> tuple[dict, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        cfg = load_config(ROOT / "configs" / "demo.yaml", [f"model.pooling={pooling}", "seed=3",
                                                           "data.augment={scale: [0.5, 1.0]}"])
        set_seed(cfg.seed)
        model = model_from_config(cfg)
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
