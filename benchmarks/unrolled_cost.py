"""Cost of one unrolled hyper-step (K inner steps through higher + meta-objective + hyper-step
+ commit) next to K plain steps, MLP 784-256-256-10, batch 128, CPU.

    python benchmarks/unrolled_cost.py [--k 5] [--repeats 20] [--json out.json]

Contenders run interleaved; medians over the repeats; ratios next to absolute times. For scale,
the same measurement for torch.optim.Adam through higher.innerloop_ctx.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import higher
import torch

from metaopt import MetaOptimizer, OneStep, Unrolled
from metaopt.plugins.mada import MADA


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )


def loss_fn(net, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(net(x), y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    k = args.k
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(128, 784, generator=gen), torch.randint(0, 10, (128,), generator=gen)) for _ in range(k + 1)]

    def plain(model, opt):
        for b in batches[:k]:
            opt.zero_grad()
            loss_fn(model, b).backward()
            opt.step()

    def unrolled(model, opt):
        opt.unrolled_step(model, batches[:k], loss_fn, batches[k])

    def higher_adam(model, opt):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for b in batches[:k]:
                diffopt.step(loss_fn(fmodel, b))
            loss_fn(fmodel, batches[k]).backward()

    def make(kind):
        m = mlp()
        if kind == "adam":
            return m, torch.optim.Adam(m.parameters(), lr=1e-3)
        hg = {"fixed": None, "one-step": OneStep(), "unrolled": Unrolled(steps=k)}[kind]
        return m, MetaOptimizer(m.parameters(), MADA(), hypergrad=hg, lr=1e-3)

    contenders = {
        f"MADA unrolled hyper-step, K={k}": (unrolled, make("unrolled")),
        f"{k} MADA steps, fixed coefficients": (plain, make("fixed")),
        f"{k} MADA steps, one-step hyper-gradient": (plain, make("one-step")),
        f"Adam through higher, K={k} + meta-backward": (higher_adam, make("adam")),
        f"{k} Adam steps": (plain, make("adam")),
    }
    times = {n: [] for n in contenders}
    for i in range(args.warmup + args.repeats):
        for name, (fn, (model, opt)) in contenders.items():
            t0 = time.perf_counter()
            fn(model, opt)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    base_mada = med[f"{k} MADA steps, fixed coefficients"]
    base_adam = med[f"{k} Adam steps"]
    print(f"MLP 784-256-256-10, batch 128, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'contender':<46}{'ms':>9}{'x MADA fixed':>14}{'x Adam':>9}")
    rows = []
    for n, m in med.items():
        rows.append({"contender": n, "median_s": m, "ratio_to_mada_fixed": m / base_mada, "ratio_to_adam": m / base_adam})
        print(f"{n:<46}{m * 1e3:>9.1f}{m / base_mada:>14.2f}{m / base_adam:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "unrolled_cost", "k": k, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
