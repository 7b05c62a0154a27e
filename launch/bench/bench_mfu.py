"""Model FLOPs utilisation: the FLOPs of one training step of a model, and the peak to take them against.

The FLOPs of one forward and backward of one training batch (image and text towers and the loss, at
``--batch-size``) are counted by torch's ``FlopCounterMode`` on the meta device (so attention counts
the same whichever kernel a device would pick). On CUDA the peak is the datasheet's dense figure for
``torch.cuda.get_device_name()`` (bf16, or TF32 for fp32: both trainers allow TF32 matmuls), or where
the name is not in the table the rate of a large matrix product measured on the GPU; on CPU it is the
rate of an fp32 matrix product measured on this machine with ``--threads`` threads (the machine rate
to state beside CPU figures). MFU is samples/s x FLOPs per sample / peak; ``bench_train.py`` prints
it beside its throughput. Run alone, this prints the FLOPs, the peak and the arithmetic limit::

    python launch/bench/bench_mfu.py --model ViT-B-16 --batch-size 256
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import add_run_arguments, format_rate, seconds, write_config  # noqa: E402

# Dense (no 2:4 sparsity) peak TFLOP/s of NVIDIA's datasheets, by a pattern of the lower-cased
# torch.cuda.get_device_name() (the first that matches); "tf32" is what fp32 matmuls reach with TF32
# allowed. H100 SXM reports itself as "NVIDIA H100 80GB HBM3". NVIDIA publishes no A10G datasheet:
# its figures are the ones AWS quotes for it, lower than the A10's on tensor cores.
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"h100.*nvl", "H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"h100.*pcie", "H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"gh200", "GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"h100", "H100 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"h200.*nvl", "H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"h200", "H200 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"a100", "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"a10g", "A10G", {"bf16": 70.0, "tf32": 35.0, "fp32": 35.0}),
    (r"\ba10\b", "A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\ba40\b", "A40", {"bf16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    (r"l40s", "L40S", {"bf16": 366.0, "tf32": 183.0, "fp32": 91.6}),
    (r"\bl40\b", "L40", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bl4\b", "L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
)


@dataclass(frozen=True)
class Peak:
    """The FLOP/s that MFU is taken against, and where the figure comes from."""

    flops: float
    source: str


def count_train_flops(args: argparse.Namespace, work: Path, pooling: str = "cls") -> int:
    """FLOPs of one forward and backward of one training batch (both towers and the loss), by FlopCounterMode.

    Model and batch live on the meta device, where only shapes flow: a ViT-B/16 batch of 256 is
    counted in a second on any machine, and attention counts as its two matrix products whichever
    kernel a device would run (torch's fused CPU attention has no FLOP formula and would count as 0).
    FlopCounterMode counts matrix products and convolutions, which the poolers ``cls``, ``avg`` and
    ``ggem`` leave the same (GGeM, elementwise only, also switches autocast off, which the meta
    device does not support), so the ``cls`` count is every one's.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmggem.config.run import load_config
    from mmggem.train.loss import build_loss
    from mmggem.model.clip import get_tokenizer
    from mmggem.config.model import model_from_config

    cfg = load_config(write_config(args, work / f"flops-{pooling}", pooling))
    with torch.device("meta"):
        model = model_from_config(cfg)
    size = model.visual.image_size[0]
    images = torch.empty(args.batch_size, 3, size, size, device="meta")
    texts = get_tokenizer(model)([f"a photo of item {i}" for i in range(args.batch_size)]).to("meta")
    counter = FlopCounterMode(display=False)
    with counter:
        build_loss(cfg.train.loss)(*model(images, texts)).backward()
    return counter.get_total_flops()


def matmul_rate(device: str, precision: str, size: int, rounds: int = 5, per_round: int = 2) -> float:
    """FLOP/s of ``size``-square matrix products of random ``precision`` matrices: the best of ``rounds``."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    out = torch.mm(a, b)  # warm-up

    def products() -> None:
        for _ in range(per_round):
            torch.mm(a, b, out=out)

    best = min(seconds(products, device) for _ in range(rounds))
    return 2 * size ** 3 * per_round / best


def table_peak(device_name: str, kind: str) -> tuple[str, float] | None:
    """The chip and its dense ``kind`` peak FLOP/s for a CUDA device name, from PEAK_TFLOPS; None if absent."""
    for pattern, chip, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name.lower()):
            return chip, peaks[kind] * 1e12
    return None


def cuda_peak(precision: str) -> Peak:
    """This GPU's datasheet peak (bf16, or TF32 for fp32), else a measured 8192-square matrix product."""
    import torch

    name, kind = torch.cuda.get_device_name(), "bf16" if precision == "bf16" else "tf32"
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as both trainers have it
    try:
        measured = matmul_rate("cuda", precision, 8192, per_round=10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
        torch.cuda.empty_cache()
    what = f"an 8192-square {kind} matrix product measured on the GPU, {format_rate(measured)}"
    found = table_peak(name, kind)
    if found is None:
        return Peak(measured, f"{what} ({name!r} is not in the datasheet table)")
    chip, flops = found
    return Peak(flops, f"datasheet dense {kind} peak of the {chip} ({name!r}); {what}")


def cpu_peak(precision: str, threads: int) -> Peak:
    """The rate of a 2048-square matrix product on this machine's CPU with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    return Peak(matmul_rate("cpu", precision, 2048),
                f"a 2048-square {precision} matrix product measured on this machine, {threads} threads")


def device_peak(args: argparse.Namespace) -> Peak:
    """The peak of ``--device`` at ``--precision``."""
    return cuda_peak(args.precision) if args.device == "cuda" else cpu_peak(args.precision, args.threads)


def mfu(samples_per_s: float, flops_per_sample: float, peak: Peak) -> float:
    """Model FLOPs utilisation, a fraction."""
    return samples_per_s * flops_per_sample / peak.flops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    args.shards = args.shards or "unused"  # the run config needs one; counting FLOPs reads no data
    with tempfile.TemporaryDirectory(prefix="bench_mfu_", dir=args.work_dir) as work:
        flops = count_train_flops(args, Path(work)) / args.batch_size
    peak = device_peak(args)
    print(f"{args.model}, batch {args.batch_size}, {args.precision}: {flops / 1e9:.3f} GFLOP per sample "
          f"(torch FlopCounterMode, forward and backward of image and text towers and loss), "
          f"{flops * args.batch_size / 1e9:.1f} GFLOP per step")
    print(f"peak {format_rate(peak.flops)}: {peak.source}; arithmetic limit {peak.flops / flops:.1f} samples/s")


if __name__ == "__main__":
    main()
