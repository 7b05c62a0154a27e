"""GGeM's cost in whole training runs: `mmggem train` with pooling ``avg`` against ``ggem``, alternating.

Each run is a separate `mmggem train` process with the settings of ``bench_train.py`` (same options,
same synthetic shards when ``--shards`` is not given); throughput is the steady state of the logging
windows after ``--warmup`` steps. Windows vary by several percent within one run on a shared CPU, so
this bounds GGeM's cost coarsely; ``bench_ggem_step.py`` resolves it finer, in one process.

    python launch/bench/bench_ggem_runs.py --steps 60 --warmup 20 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    add_run_arguments, alternate, check_run_arguments, device_name, load_average, prepare_shards, run_header,
    run_mmggem,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    args = check_run_arguments(parser, parser.parse_args(argv))
    device = device_name(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_ggem_runs_", dir=args.work_dir) as tmp:
        prepare_shards(args, Path(tmp))
        print(f"load average before: {load_average()} on {os.cpu_count()} CPUs; device {device}", flush=True)
        rates = alternate(args, Path(tmp), {pooling: lambda d, p=pooling: run_mmggem(args, d, p)
                                            for pooling in ("avg", "ggem")}, "pooling")
    print("\n" + run_header(args, device))
    for pooling, runs in rates.items():
        print(f"mmggem train ({pooling}): {max(runs):8.1f} samples/s best, {statistics.mean(runs):.1f} mean "
              f"(runs: {', '.join(f'{r:.1f}' for r in runs)})")
    best = {pooling: max(runs) for pooling, runs in rates.items()}
    mean = {pooling: statistics.mean(runs) for pooling, runs in rates.items()}
    print(f"ggem step-time overhead: {100 * (best['avg'] / best['ggem'] - 1):+.2f}% best against best, "
          f"{100 * (mean['avg'] / mean['ggem'] - 1):+.2f}% mean against mean")


if __name__ == "__main__":
    main()
