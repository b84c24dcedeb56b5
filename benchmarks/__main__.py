"""``python -m benchmarks``: every benchmark in turn, then one line of the headline ratios.

The headline of each ratio is the first case (by default the demo teacher cnn_small on Fashion-MNIST); the tables
above it give every case. ``--quick`` runs a tiny size (the smoke test); the other options go to every benchmark.
"""
from __future__ import annotations

import sys
import time

from . import cmi, common, kd, loop, mcmi

#: (module, its headline ratios' keys) in the order they run
BENCHMARKS = (loop, mcmi, cmi, kd)
HEADLINE = ("loop/limit", "loop/usual", "mcmi/mll", "cmi/infer")


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    for module in BENCHMARKS:
        if hasattr(module, "add_options"):
            module.add_options(p)
    args = p.parse_args(argv)
    start = time.perf_counter()
    ratios: dict = {}
    for module in BENCHMARKS:
        module_args, device = common.setup(args, **module.DEFAULTS)
        ratios.update(module.run(module_args, device))
        print(flush=True)
    print(f"(all benchmarks: {time.perf_counter() - start:.0f} s)")
    print(common.ratio_line({k: ratios.get(k) for k in HEADLINE}), flush=True)
    return ratios


if __name__ == "__main__":
    main(sys.argv[1:])
