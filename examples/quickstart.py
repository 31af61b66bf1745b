"""Quickstart: train a small classifier with MADA and watch its coefficients move.

    python examples/quickstart.py

MADA starts at the Adam point (β3=0, c=1, ρ=1) and learns β3, c, ρ by one-step hyper-gradient
descent; the same model trained with torch.optim.Adam from the same seed is shown for reference.
"""

import torch

from metaopt import MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA


def data(n=2048, seed=0):
    """Two interleaved spirals in 2-d, a classic small non-linear problem."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * torch.pi
    label = torch.randint(0, 2, (n,), generator=g)
    r = t / (3 * torch.pi)
    angle = t + label * torch.pi
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1) + 0.02 * torch.randn(n, 2, generator=g)
    return x, label


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)
    )


def train(net, opt, x, y, steps=600, batch=128, log=None):
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if log and step % 100 == 0:
            log(step, loss.item())
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(net(x), y).item()


def main():
    x, y = data()
    net = model()
    opt = MetaOptimizer(net.parameters(), MADA(), hypergrad=OneStep(), lr=1e-2)

    def log(step, loss):
        coefs = ", ".join(f"{k}={v.item():.4f}" for k, v in opt.coefficients.items() if k in opt.learned)
        print(f"step {step:4d}  loss {loss:.4f}  {coefs}")

    mada_loss = train(net, opt, x, y, log=log)
    adam_net = model()
    adam_loss = train(adam_net, torch.optim.Adam(adam_net.parameters(), lr=1e-2), x, y)
    print(f"final full-data loss: MADA {mada_loss:.4f}, Adam {adam_loss:.4f} (same seed, same batches)")
    print("learned coefficients:", {k: round(v.item(), 4) for k, v in opt.coefficients.items()})


if __name__ == "__main__":
    main()
