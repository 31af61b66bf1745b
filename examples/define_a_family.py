"""Define your own family: a line from SGD with momentum to Adam, its position λ learned.

    python examples/define_a_family.py [--steps 200]

The whole job of a family author is the class below: a coefficient space (λ learned in [0, 1],
β1 fixed), per-group hyperparameters (a pydantic model), ``init`` and ``update`` written with
out-of-place torch ops, named points (with the reference optimizer of one of them), and
``elementwise = True`` because coordinate i of the update depends on coordinate i only. The
engine derives the hyper-gradient ∂L/∂λ from ``update`` itself; nothing else is written by hand.
``metaopt check examples/define_a_family.py:SGDToAdam`` tests all of it.

It is then trained on a badly scaled least-squares problem (feature scales from 1 down to 0.01)
starting at the SGD-with-momentum end, λ = 0, with one-step hyper-gradients (hyper-SGD lr 0.2,
momentum 0.9): λ climbs to the Adam end within about 80 steps and the loss reaches Adam's, where
SGD with momentum at the same lr is still 600× higher. Both ends with λ fixed are printed too.
"""

from __future__ import annotations

import argparse

import torch
from pydantic import Field

from metaopt import Coefficient, CoefficientSpace, Family, Hyperparameters, MetaOptimizer, OneStep


class SGDAdamHyperparameters(Hyperparameters):
    """Per-param-group options (``lr`` is inherited): Adam's β2 and ε."""

    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, ge=0.0)


class SGDToAdam(Family):
    """Momentum with a learned degree of adaptivity λ: SGD with momentum at λ=0, Adam at λ=1.

        m_t = β1 m_{t-1} + (1-β1) g_t            v_t = β2 v_{t-1} + (1-β2) g_t²
        m̂_t = m_t / (1-β1^t)                     v̂_t = v_t / (1-β2^t)
        θ_t = θ_{t-1} − η m̂_t / (λ·sqrt(v̂_t) + (1−λ) + ε)
    """

    name = "sgd_to_adam"
    hyperparameters = SGDAdamHyperparameters
    elementwise = True  # coordinate i of the update depends on coordinate i only
    points = {"sgdm": {"lam": 0.0}, "adam": {"lam": 1.0}}

    def __init__(self, lam: float = 0.0, beta1: float = 0.9):
        self.space = CoefficientSpace(
            lam=Coefficient(init=lam, low=0.0, high=1.0),  # learned (the default)
            beta1=Coefficient(init=beta1, low=0.0, high=0.99, learned=False),
        )

    @property
    def references(self):
        """The λ = 1 point is torch.optim.Adam: `metaopt check` holds it equal."""
        beta1 = self.space["beta1"].init
        return {"adam": lambda params, lr, beta2, eps: torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps)}

    def init(self, param, grad, group):
        return {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}

    def update(self, grad, param, state, coefficients, group, step):
        lam, b1, b2 = coefficients["lam"], coefficients["beta1"], group["beta2"]
        m = b1 * state["exp_avg"] + (1 - b1) * grad  # out of place: the engine differentiates it
        v = b2 * state["exp_avg_sq"] + (1 - b2) * grad * grad
        m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
        denom = lam * torch.sqrt(v_hat) + (1 - lam) + group["eps"]
        return -group["lr"] * m_hat / denom, {"exp_avg": m, "exp_avg_sq": v}


# --- using it --------------------------------------------------------------------------------
def problem(n: int = 512, d: int = 16, seed: int = 0):
    """Least squares whose features span scales 1 … 0.01: SGD's one learning rate fits the large
    ones and crawls on the small ones."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d)
    x = torch.randn(n, d, generator=g) * scales
    w_true = torch.randn(d, 1, generator=g)
    y = x @ w_true + 0.01 * torch.randn(n, 1, generator=g)
    return x, y


def train(family: Family, steps: int, hypergrad=OneStep(lr=0.2, momentum=0.9), lr: float = 0.05):
    x, y = problem()
    w = torch.zeros(x.shape[1], 1, requires_grad=True)
    opt = MetaOptimizer([w], family, hypergrad=hypergrad, lr=lr)
    loss_fn = lambda: torch.nn.functional.mse_loss(x @ w, y)  # noqa: E731
    first = loss_fn().item()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        return opt, first, loss_fn().item()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="a family between SGD with momentum and Adam")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    # A 512×16 problem: extra threads only add synchronisation (on a busy 2-core machine two
    # threads made this run ~30× slower than one).
    torch.set_num_threads(1)

    family = SGDToAdam().at("sgdm")
    print(family.describe())
    start = {k: round(v.init, 4) for k, v in family.space.root.items()}
    opt, before, after = train(family, args.steps)
    learned = {k: round(v.item(), 4) for k, v in opt.coefficients.items()}
    print(f"learning λ : loss {before:.4g} -> {after:.4g}   coefficients {start} -> {learned}")
    for point in ("sgdm", "adam"):  # the two ends, λ fixed, for reference
        _, _, fixed = train(SGDToAdam().at(point), args.steps, hypergrad=None)
        print(f"fixed {point:<5}: loss {before:.4g} -> {fixed:.4g}")
    return {"start": start, "learned": learned, "loss_before": before, "loss_after": after}


if __name__ == "__main__":
    main()
