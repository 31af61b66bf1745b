"""What a step of metaopt.Forward costs next to OneStep on the generic path (MADA, learning β3,
c, ρ: 3 jvps of the rule per parameter against one reverse pass), Adam(fused=True) alongside.

    python benchmarks/forward_cost.py [--repeats 10]

Two 1024×1024 fp32 parameters, gradients given, contenders interleaved, medians over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from metaopt import Forward, MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1024, 1024)) for _ in range(2)]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    opts = {
        "Adam(fused)": torch.optim.Adam(params, lr=1e-3, fused=True),
        "MADA OneStep, generic": MetaOptimizer(params, MADA(), hypergrad=OneStep(), path="generic", lr=1e-3),
        "MADA Forward, generic": MetaOptimizer(params, MADA(), hypergrad=Forward(), lr=1e-3),
    }
    times = {k: [] for k in opts}
    for r in range(args.repeats + 2):
        for k, opt in opts.items():
            for p, g in zip(params, grads):
                p.grad = g
            t0 = time.perf_counter()
            opt.step()
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["MADA OneStep, generic"])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:24s} {m * 1e3:8.1f} ms  {m / base:6.2f}x OneStep")


if __name__ == "__main__":
    main()
