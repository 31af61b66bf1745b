"""A straightforward per-tensor autograd MADA in the style of the authors' released code — the
baseline users have today, for the benchmarks only.

As in their gdtuo wrapper, the coefficients are leaf tensors and each step builds the new
parameters θ_t = θ_{t-1}.detach() − η·u(c) as non-leaf tensors whose graph to c stays alive
until the next backward, which then deposits the one-step hyper-gradient in c.grad; the model is
run functionally on those tensors. Default MADA rule (β3, c, ρ learned, running max),
hyper-SGD lr 2.5e-3 with momentum 0.5.
"""

from __future__ import annotations

import torch
from torch.func import functional_call


class AuthorsStyleMADA:
    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, eps: float = 1e-8,
                 hyper_lr: float = 2.5e-3, momentum: float = 0.5) -> None:
        self.model, self.lr, self.eps, self.hyper_lr, self.momentum = model, lr, eps, hyper_lr, momentum
        self.params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        init = {"beta1": 0.9, "beta2": 0.999, "beta3": 0.0, "c": 1.0, "rho": 1.0}
        self.coef = {k: torch.tensor(v, requires_grad=k in ("beta3", "c", "rho")) for k, v in init.items()}
        self.box = {"beta3": (0.0, 0.99), "c": (0.0, 1.0), "rho": (0.0, 1.0)}
        self.buf = {k: torch.zeros(()) for k in self.box}
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.t = 0

    def loss(self, *inputs):
        for p in self.params.values():
            if p.grad_fn is not None:
                p.retain_grad()
        return functional_call(self.model, self.params, inputs)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def step(self) -> None:
        self.t += 1
        with torch.no_grad():  # hyper-step first, as the authors do; the clamp becomes clamp_
            for k, (lo, hi) in self.box.items():
                c = self.coef[k]
                if c.grad is not None:
                    self.buf[k] = self.momentum * self.buf[k] + c.grad
                    c -= self.hyper_lr * self.buf[k]
                    c.clamp_(lo, hi)
                    c.grad = None
        b1, b2, b3, cc, rho = (self.coef[k] for k in ("beta1", "beta2", "beta3", "c", "rho"))
        t = self.t
        for name, p in self.params.items():
            g = p.grad.detach()
            s = self.state.setdefault(name, {k: torch.zeros_like(g) for k in ("m", "n", "v", "vmax", "g")})
            d = g - s["g"]
            m = b1 * s["m"] + (1 - b1) * g
            n = b3 * s["n"] + (1 - b3) * d
            g_hat = g + b3 * d
            v_prev = rho * s["v"] + (1 - rho) * s["vmax"]
            g_tilde = cc * g_hat**2 + (1 - cc) * (v_prev + g_hat**2 * torch.sign(g_hat**2 - v_prev))
            v_ema = b2 * s["v"] + (1 - b2) * g_tilde
            vmax = torch.maximum(s["vmax"], v_ema)
            v = rho * v_ema + (1 - rho) * vmax
            u = (m / (1 - b1**t) + b3 * n) / ((v / (1 - b2**t) + 1e-30) ** 0.5 + self.eps)
            self.params[name] = p.detach() - self.lr * u
            s.update(m=m.detach(), n=n.detach(), v=v_ema.detach(), vmax=vmax.detach(), g=g.clone())

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values())
