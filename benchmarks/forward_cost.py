"""What a step of metaopt.Forward costs next to OneStep (MADA, learning β3, c, ρ), eagerly on
the generic path (3 jvps of the rule per parameter) and compiled over a flat bucket (the compiled
path: one graph for the rule and its parameter and state tangents), with Adam(fused=True) and
MADA OneStep on the path the engine picks alongside.

    python benchmarks/forward_cost.py [--shapes gpt|two-big] [--repeats 10] [--json FILE]

``gpt``: the default job's GPT (4 layers, 128 wide: 809,856 parameters in 50 tensors);
``two-big``: two 1024×1024 parameters. fp32, gradients given, contenders interleaved, medians
over repeats after warm-up steps (the compiled path compiles in its first steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from compare_commits import cpu  # the CPU's model, vector width and cores, as every benchmark names it

from metaopt import Forward, MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA

warnings.filterwarnings("ignore")


def shapes(kind: str) -> list[torch.Size]:
    if kind == "two-big":
        return [torch.Size([1024, 1024])] * 2
    from metaopt.jobs.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    return [p.shape for p in model.parameters()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=("gpt", "two-big"), default="gpt")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu(),
           "capability": torch.backends.cpu.get_cpu_capability(), "shapes": args.shapes}
    print(env)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes(args.shapes)]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    opts = {
        "Adam(fused)": torch.optim.Adam(params, lr=1e-3, fused=True),
        "MADA OneStep, auto": MetaOptimizer(params, MADA(), hypergrad=OneStep(), lr=1e-3, compile=True),
        "MADA OneStep, generic": MetaOptimizer(params, MADA(), hypergrad=OneStep(), path="generic", lr=1e-3),
        "MADA Forward, generic": MetaOptimizer(params, MADA(), hypergrad=Forward(), lr=1e-3),
        "MADA Forward, compiled": MetaOptimizer(params, MADA(), hypergrad=Forward(), lr=1e-3, compile=True),
    }
    paths = {k: getattr(o, "path", "torch") for k, o in opts.items()}
    times = {k: [] for k in opts}
    for r in range(args.repeats + args.warmup):
        for k, opt in opts.items():
            for p, g in zip(params, grads):
                p.grad = g
            t0 = time.perf_counter()
            opt.step()
            if r >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["MADA OneStep, generic"])
    adam = statistics.median(times["Adam(fused)"])
    rows = {}
    for k, v in times.items():
        m = statistics.median(v)
        rows[k] = {"path": paths[k], "median_ms": m * 1e3, "x_onestep_generic": m / base, "x_adam_fused": m / adam}
        print(f"{k:24s} {paths[k]:9s} {m * 1e3:8.2f} ms  {m / base:6.2f}x OneStep generic  {m / adam:6.2f}x Adam(fused)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
