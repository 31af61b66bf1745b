"""Training-iteration cost of MADA on each execution path next to torch's Adam, small MLP.

Contenders run interleaved, one iteration each in turn, so that machine noise hits all alike;
each row reports the median over the repeats and the ratio to ``Adam(foreach=True)``.

    python benchmarks/step_cost.py                 # MLP 784-256-256-10, batch 128, CPU
    python benchmarks/step_cost.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from metaopt import MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )


CONTENDERS = {
    "Adam(foreach=True)": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    "Adam(fused=True)": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "MADA fixed (generic)": lambda p: MetaOptimizer(p, MADA(), hypergrad=None, lr=1e-3, path="generic"),
    "MADA fixed (native)": lambda p: MetaOptimizer(p, MADA(), hypergrad=None, lr=1e-3, path="native"),
    "MADA one-step (generic)": lambda p: MetaOptimizer(p, MADA(), hypergrad=OneStep(), lr=1e-3, path="generic"),
    "MADA one-step, fused eager": lambda p: MetaOptimizer(p, MADA(), hypergrad=OneStep(), lr=1e-3, path="fused"),
    "MADA one-step, compiled": lambda p: MetaOptimizer(
        p, MADA(), hypergrad=OneStep(), lr=1e-3, path="fused", compile=True),
    "MADA one-step, native (default)": lambda p: MetaOptimizer(p, MADA(), hypergrad=OneStep(), lr=1e-3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x = torch.randn(args.batch, 784)
    y = torch.randint(0, 10, (args.batch,))
    runs = {}
    for name, make in CONTENDERS.items():
        model = mlp()
        runs[name] = (model, make(model.parameters()))

    def iteration(model, opt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    times: dict[str, list[float]] = {n: [] for n in runs}
    for i in range(args.warmup + args.repeats):
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            iteration(model, opt)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["Adam(foreach=True)"])
    rows = []
    print(f"training iteration, MLP 784-256-256-10, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'contender':<32}{'ms/iter':>10}{'x Adam(foreach)':>18}")
    warnings.filterwarnings("ignore")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"contender": name, "median_s": med, "ratio_to_adam_foreach": med / base})
        print(f"{name:<32}{med * 1e3:>10.2f}{med / base:>18.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "step_cost", "batch": args.batch, "threads": torch.get_num_threads(),
                       "repeats": args.repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
