"""Reddi, Kale & Kumar's counterexample, where Adam provably fails, with Adam, AMSGrad and MADA.

    python examples/reddi_counterexample.py [--steps 100000] [--out reddi.png]

The online problem of "On the Convergence of Adam and Beyond" (ICLR 2018): at step t = 1, 2, ...

    f_t(x) = 1010·x   if t mod 101 = 1,   else  −10·x,        x projected onto [−1, 1] after every step.

Over each period of 101 steps the gradients sum to 1010 − 100·10 = +10 > 0, so the best fixed
point is x = −1. With β1 = 0.9, β2 = 0.99 Adam's second moment forgets the rare large gradient
so fast that the hundred small ones, each divided by a small root, win: Adam drifts to x = +1,
the worst point. AMSGrad (max of the second moment) moves towards −1. MADA starts exactly at
Adam (β3 = 0, c = 1, ρ = 1) with the AVGrad running mean as its second-moment partner
(second_moment="mean", as in the MADA paper), learns β3, c, ρ by one-step hyper-gradients
(hyper-SGD lr 0.1, momentum 0.9, no clipping: OneStep's default clip=None, warmup 0 — the
MADA authors' setting for this toy) and pulls ρ down, away from the Adam point.

Settings from the MADA authors' script for this experiment (amazon-science/mada_optimizer_search,
amsgrad_toy.py): lr 1e-3, betas (0.9, 0.99), eps 1e-8, x_0 = 0 (their script starts every
contender at 0). Gradients are analytic, so each step sets ``x.grad`` directly: no autograd
graph, and the wall time is the optimizers' own per-step cost. The loop never reads a tensor
on the host; x_t (and MADA's ρ, β3, c) are written every ``--every`` steps into preallocated
tensors and read back at the end. Float64 by default (a one-element problem costs the same in
either dtype, and float64 keeps rounding out of the comparison); ``--dtype float32`` is there.
"""

from __future__ import annotations

import argparse
import time

import torch

from metaopt import MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA

LR, BETAS, EPS = 1e-3, (0.9, 0.99), 1e-8
MADA_RECORDED = ("rho", "beta3", "c")


def grad_at(t: int) -> float:
    """∂f_t/∂x, t counted from 1."""
    return 1010.0 if t % 101 == 1 else -10.0


def make_optimizer(name: str, x: torch.Tensor, path: str = "auto"):
    if name == "Adam":
        return torch.optim.Adam([x], lr=LR, betas=BETAS, eps=EPS)
    if name == "AMSGrad":
        return torch.optim.Adam([x], lr=LR, betas=BETAS, eps=EPS, amsgrad=True)
    if name == "MADA":
        family = MADA(second_moment="mean", betas=BETAS).at("adam")  # learns beta3, c, rho
        # path "auto": MADA's native kernel on a CPU. On a one-element parameter a step is all
        # fixed cost, which the kernel keeps small; "generic" gives the same numbers, slower.
        return MetaOptimizer([x], family, hypergrad=OneStep(lr=0.1, momentum=0.9), lr=LR, eps=EPS, path=path)
    raise ValueError(name)


@torch.no_grad()
def run(name: str, steps: int, every: int, x0: float = 0.0, dtype=torch.float64, path: str = "auto") -> dict:
    """``steps`` projected steps of one contender; x_t (and MADA's coefficients) every ``every``
    steps, index 0 holding t = 0."""
    x = torch.full((1,), x0, dtype=dtype, requires_grad=True)
    opt = make_optimizer(name, x, path)
    big, small = torch.full((1,), 1010.0, dtype=dtype), torch.full((1,), -10.0, dtype=dtype)
    n_rec = steps // every + 1
    xs = torch.empty(n_rec, dtype=dtype)
    xs[0] = x0
    coefs = torch.empty(n_rec, len(MADA_RECORDED), dtype=torch.float64) if name == "MADA" else None

    def record_coefficients(i):
        c = opt.coefficients  # 0-d tensors: stacked and stored without a host read
        coefs[i] = torch.stack([c[k] for k in MADA_RECORDED]).to(coefs)

    if coefs is not None:
        record_coefficients(0)
    start = time.perf_counter()
    for t in range(1, steps + 1):
        x.grad = big if t % 101 == 1 else small
        opt.step()
        x.clamp_(-1.0, 1.0)  # projection onto the feasible set [-1, 1]
        if t % every == 0:
            i = t // every
            xs[i] = x[0]
            if coefs is not None:
                record_coefficients(i)
    wall = time.perf_counter() - start
    out = {"name": name, "steps": torch.arange(n_rec) * every,
           "x": xs, "final_x": x.item(), "wall_s": wall, "us_per_step": wall / max(steps, 1) * 1e6}
    if coefs is not None:
        out["coefs"] = {k: coefs[:, j] for j, k in enumerate(MADA_RECORDED)}
        out["final_coefficients"] = {k: v.item() for k, v in opt.coefficients.items()}
    return out


def plot(results: list[dict], path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_x, ax_c) = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in results:
        ax_x.plot(r["steps"].numpy(), r["x"].numpy(), label=f"{r['name']} (final {r['final_x']:+.3f})")
    ax_x.axhline(-1.0, color="grey", lw=0.8, ls=":")
    ax_x.set(xlabel="step t", ylabel="x_t", ylim=(-1.1, 1.1), title="iterate (optimum x* = −1)")
    ax_x.legend()
    mada = next((r for r in results if "coefs" in r), None)
    if mada is not None:
        for k, label in zip(MADA_RECORDED, ("ρ", "β3", "c")):
            ax_c.plot(mada["steps"].numpy(), mada["coefs"][k].numpy(), label=label)
        ax_c.set(xlabel="step t", ylabel="value", ylim=(-0.05, 1.05), title="MADA's learned coefficients")
        ax_c.legend()
    fig.suptitle(f"Reddi et al. counterexample, lr {LR:g}, betas {BETAS}, {steps} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--every", type=int, default=None, help="record every N steps (default steps/1000)")
    ap.add_argument("--x0", type=float, default=0.0, help="initial x (the MADA authors' script: 0)")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--out", default="reddi.png", help="output PNG")
    ap.add_argument("--path", choices=("auto", "native", "fused", "generic"), default="auto",
                    help="MADA's execution path (same numbers; auto: native on a CPU)")
    args = ap.parse_args(argv)
    every = args.every or max(1, args.steps // 1000)
    dtype = getattr(torch, args.dtype)

    results = [run(name, args.steps, every, args.x0, dtype, args.path) for name in ("Adam", "AMSGrad", "MADA")]
    plot(results, args.out, args.steps)
    print(f"{args.steps} steps, x0 = {args.x0:g}, {args.dtype}; optimum x* = -1")
    print(f"{'contender':<9} {'final x':>9} {'wall s':>8} {'us/step':>8}")
    for r in results:
        print(f"{r['name']:<9} {r['final_x']:>+9.4f} {r['wall_s']:>8.1f} {r['us_per_step']:>8.0f}")
    mada = results[-1]
    learned = {k: round(mada["final_coefficients"][k], 4) for k in MADA_RECORDED}
    print("MADA final coefficients:", learned)
    print(f"plot written to {args.out}")
    return results


if __name__ == "__main__":
    main()
