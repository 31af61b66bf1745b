"""One-step vs unrolled hyper-gradients on the same model, batches and starting point.

    python examples/one_step_vs_unrolled.py [--steps 400]

Each mode trains the spiral classifier of quickstart.py with MADA from the Adam point for the
same number of parameter updates:

* one-step: h = <g_{t+1}, dθ_t/dc> from the next training gradient, a hyper-step every step;
* unrolled K: every K updates, h = d L_val(θ_K(c)) / dc through K differentiable steps
  (higher), a validation batch as meta-objective, then the K steps are committed.

Each run happens in its own process so that its peak memory (max RSS) is its own.
"""

import argparse
import multiprocessing as mp
import resource
import time

import torch
from quickstart import data, model

from metaopt import MetaOptimizer, OneStep, Unrolled
from metaopt.plugins.mada import MADA


def loss_fn(net, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(net(x), y)


def run(mode: str, steps: int, queue) -> None:
    torch.manual_seed(0)
    x, y = data()
    n_val = len(x) // 5
    (xv, yv), (xt, yt) = (x[:n_val], y[:n_val]), (x[n_val:], y[n_val:])
    g = torch.Generator().manual_seed(1)

    def batch(xs, ys, size=128):
        idx = torch.randint(0, len(xs), (size,), generator=g)
        return xs[idx], ys[idx]

    net = model()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "one-step":
        opt = MetaOptimizer(net.parameters(), MADA(), hypergrad=OneStep(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(net, batch(xt, yt)).backward()
            opt.step()
    else:
        k = int(mode.split("=")[1])
        opt = MetaOptimizer(net.parameters(), MADA(), hypergrad=Unrolled(steps=k), lr=1e-2)
        for _ in range(steps // k):
            opt.unrolled_step(net, [batch(xt, yt) for _ in range(k)], loss_fn, meta_batch=batch(xv, yv))
    wall = time.perf_counter() - t0
    with torch.no_grad():
        val = loss_fn(net, (xv, yv)).item()
    coefs = {k: round(v.item(), 4) for k, v in opt.coefficients.items() if k in opt.learned}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((mode, val, coefs, wall, peak / 1024, (peak - rss0) / 1024))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400, help="parameter updates per mode")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for mode in ("one-step", "unrolled K=1", "unrolled K=4"):
        q = ctx.Queue()
        p = ctx.Process(target=run, args=(mode, args.steps, q))
        p.start()
        rows.append(q.get())
        p.join()
    print(f"{args.steps} parameter updates each, MADA from the Adam point, same data and seed")
    print(f"{'mode':<14}{'val loss':>10}{'wall s':>9}{'peak RSS MB':>13}{'(+ training)':>14}  coefficients")
    for mode, val, coefs, wall, peak, grew in rows:
        print(f"{mode:<14}{val:>10.4f}{wall:>9.1f}{peak:>13.0f}{grew:>14.1f}  {coefs}")


if __name__ == "__main__":
    main()
