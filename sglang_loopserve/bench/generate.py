"""Write the benchmark's data sets in the published layout: one JSONL file per data set.

    python -m sglang_loopserve.bench.generate --out benchmarks/data --n 10 --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import datasets, published


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_loopserve.bench.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for <dataset>.jsonl")
    p.add_argument("--datasets", nargs="+", default=list(datasets.DATASETS), choices=datasets.DATASETS)
    p.add_argument("--n", type=int, default=10, help="conversations per data set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0,
                   help="context per turn relative to ~2K/2K/3K tokens (4: a 32K-context model)")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be >= 1")
    if not a.scale > 0:
        p.error("--scale must be > 0")
    for name in a.datasets:
        path = published.write(datasets.build(name, a.n, seed=a.seed, scale=a.scale), a.out / f"{name}.jsonl")
        print(f"{path}: {a.n} conversations x 3 turns x {len(published.POSITIONS)} positions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
