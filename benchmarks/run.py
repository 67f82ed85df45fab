"""``make bench``: run every ``benchmarks/bench_*.py`` module's ``main(args)`` and print its table.

Each benchmark measures its candidates side by side in one process and reports ratios, since
absolute seconds on shared 2-core machines are noisy. ``--gpu`` adds the GPU-sized cases.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpu", action="store_true", help="also run the GPU benchmarks (GPT-2 XL / GPT-J sized random models)")
    parser.add_argument("--only", default=None, help="run only benchmarks whose module name contains this")
    parser.add_argument("--out", default="outputs/bench", help="directory for the json results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    for name in names:
        if args.only and args.only not in name:
            continue
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(args)


if __name__ == "__main__":
    main()
