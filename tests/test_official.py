"""``MADA(preset="official")`` reproduces the MADA authors' released code step for step.

The reference below is written independently of metaopt, after the semantics of the authors'
code (amazon-science/mada_optimizer_search: ``gdtuo.py``, classes ``Meta``, ``SGDPerParamMo``,
``ModuleWrapper``, and the training loop of ``train.py``). It works the way theirs does:
reverse-mode autograd, with the coefficients β1, β2, β3, c, ρ, γ as leaf tensors requiring grad
and the parameters as non-leaf tensors produced by the previous update; that graph is kept for one
step, and the next ``loss.backward()`` leaves the one-step hyper-gradient in each coefficient's
``.grad``. Per iteration, in the authors' order:

1. forward/backward on the current (non-leaf) parameters, retaining their gradients;
2. hyper-step: each coefficient's grad clipped to norm 10 (``clip_grad_norm_`` on the scalar, as
   ``train.py`` does), heavy-ball SGD ``buf = μ·buf + h`` (first buf = h; μ = 0.5, 0 for γ),
   ``c ← c − lr_h·buf``, then each coefficient clamped into its box (β1 [0.01, 0.99],
   β2 [0.501, 0.99], β3 [0, 0.99], ρ, c, γ [0, 1]);
3. parameter update with the new coefficients (the MADA rule with the authors' quirks: first-sight
   state m = 0, ṽ = 1e-15, v_mean = 1e-15, n = g⊙g; the stored previous gradient is a view of
   ``param.grad`` that ``zero_grad`` clears in place, so it reads as zero; Yogi term on the
   detached ṽ_{t-1}; v_mean detached in v̂; bias correction on m and the mixed v, none on n;
   ε outside the root; Lion with fixed betas 0.95/0.98, sign taken on the updated Lion momentum);
4. ``zero_grad``: every parameter's ``.grad`` zeroed in place.

The learning rate is not learned; weight decay is 0. metaopt's ``warmup`` (no hyper-step and
momentum buffer untouched while the engine's step counter, 0 on the first ``step()``, is below
``warmup``) is modelled by skipping step 2 on the first ``warmup`` iterations.

float64, tiny MLP, four fixed batches cycled for 40 steps; after every step the parameters, all six
coefficients and the raw (unclipped) hyper-gradient are compared: max relative difference <= 1e-6.

The clip: ``torch.nn.utils.clip_grad_norm_`` scales by ``min(1, 10 / (|h| + 1e-6))``, which the
preset reproduces (``clip_style="norm"``); metaopt's default ``clip_style="value"`` clamps to
``±10`` and is checked against a reference that clamps. Both are tested with the bound active.
"""

from __future__ import annotations

import pytest
import torch
from _util import batches, loss_fn, rel_diff, tiny_mlp
from torch.func import functional_call

from metaopt import MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA

TOL = 1e-6
DT = torch.float64
NAMES = ("beta1", "beta2", "beta3", "c", "rho", "gamma")
BOXES = {
    "beta1": (0.01, 0.99),
    "beta2": (0.501, 0.99),
    "beta3": (0.0, 0.99),
    "c": (0.0, 1.0),
    "rho": (0.0, 1.0),
    "gamma": (0.0, 1.0),
}
INIT = {"beta1": 0.9, "beta2": 0.95, "beta3": 0.3, "c": 0.7, "rho": 0.6, "gamma": 0.8}
LR, EPS = 1e-2, 1e-8
LION_B1, LION_B2 = 0.95, 0.98
CLIP = 10.0
STEPS, N_BATCHES = 40, 4

AUTHORS_LR = {n: 2.5e-3 for n in NAMES}
AUTHORS_MOMENTUM = {n: 0.5 for n in NAMES} | {"gamma": 0.0}
# Large enough that every coefficient, c included (its hyper-gradient is ~1e-5 here), moves.
LARGE_LR = {"beta1": 0.05, "beta2": 0.05, "beta3": 0.05, "c": 50.0, "rho": 1.0, "gamma": 1.0}


class AuthorsReference:
    """MADA by reverse-mode autograd, with per-coefficient momentum SGD on the coefficients, after
    the authors' code. The model's parameters are a dict of tensors used through functional_call
    (the authors swap non-leaf tensors into the module's ``_parameters``; same effect)."""

    def __init__(self, module, hyper_lr, hyper_mom, warmup, clip_mode="norm", loss_scale=1.0):
        self.module = module
        self.params = {k: v.detach().clone() for k, v in module.named_parameters()}
        self.coef = {n: torch.tensor(INIT[n], dtype=DT, requires_grad=True) for n in NAMES}
        self.hyper_lr, self.hyper_mom, self.warmup = hyper_lr, hyper_mom, warmup
        self.clip_mode, self.loss_scale = clip_mode, loss_scale
        self.buf: dict[str, torch.Tensor] = {}
        self.cache: dict[str, dict[str, torch.Tensor]] = {}
        self.raw_h: dict[str, torch.Tensor] = {}
        self.t = 0  # parameter updates done (the authors' num_stepments)
        self.iteration = 0  # train_step calls before this one (the engine's meta step counter)

    def train_step(self, xy):
        # begin(): the parameters require grad and keep it although they are not leaves.
        for p in self.params.values():
            p.requires_grad_()
            p.retain_grad()
        for c in self.coef.values():
            c.grad = None
        model = lambda x: functional_call(self.module, self.params, (x,))  # noqa: E731
        loss = self.loss_scale * loss_fn(model, xy)
        # Reaches the coefficients through the previous update's graph: c.grad = h.
        loss.backward()
        for n, c in self.coef.items():
            if c.grad is None:  # first step: the loss does not depend on the coefficients yet
                c.grad = torch.zeros_like(c)
            self.raw_h[n] = c.grad.detach().clone()
        if self.iteration >= self.warmup:
            self._hyper_step()
        self._update()
        self.iteration += 1

    def _hyper_step(self):
        new = {}
        for n in NAMES:
            c = self.coef[n]
            if self.clip_mode == "norm":  # train.py: clip_grad_norm_(coefficient, 10.0)
                torch.nn.utils.clip_grad_norm_(c, CLIP)
            else:  # the idealised |h| <= 10
                c.grad.clamp_(-CLIP, CLIP)
            h = c.grad.detach()
            mu = self.hyper_mom[n]
            if mu != 0.0:
                buf = h.clone() if n not in self.buf else self.buf[n] * mu + h
                self.buf[n] = buf
            else:
                buf = h
            low, high = BOXES[n]
            value = (c.detach() - self.hyper_lr[n] * buf).clamp(low, high)
            new[n] = value.clone().requires_grad_()
        self.coef = new

    def _update(self):
        self.t += 1
        t = float(self.t)
        b1, b2, b3, cc, rho, gamma = (self.coef[n] for n in NAMES)
        new_params = {}
        for name, p in self.params.items():
            g = p.grad.detach()  # a view of p.grad: zero_grad below clears it in place
            if name not in self.cache:
                self.cache[name] = {
                    "m": torch.zeros_like(g),
                    "v": torch.zeros_like(g) + 1e-15,
                    "v_mean": torch.zeros_like(g) + 1e-15,
                    "n": g * g,
                    "g": torch.zeros_like(g),
                    "m_lion": torch.zeros_like(g),
                }
            s = self.cache[name]
            g_prev = s["g"].detach()
            g_hat = g + b3 * (g - g_prev)
            v_old = s["v"].detach()
            g_hat_sq = g_hat * g_hat
            yogi = v_old + g_hat_sq * torch.sign(g_hat_sq - v_old)
            g_tilde_sq = cc * g_hat_sq + (1 - cc) * yogi
            # g is cloned where autograd would save it, since zero_grad clears its storage.
            s["m"] = b1 * s["m"].detach() + (1.0 - b1) * g.clone()
            s["v"] = b2 * v_old + (1.0 - b2) * g_tilde_sq
            s["n"] = b3 * s["n"].detach() + (1.0 - b3) * (g - g_prev)
            s["g"] = g
            s["m_lion"] = LION_B2 * s["m_lion"].detach() + (1.0 - LION_B2) * g
            u_lion = LION_B1 * s["m_lion"] + (1.0 - LION_B1) * g
            s["v_mean"] = (s["v"] + (t - 1) * s["v_mean"].detach()) / t
            m_hat = s["m"] / (1.0 - b1**t)
            v_hat = (rho * s["v"] + (1 - rho) * s["v_mean"].detach()) / (1.0 - b2**t)
            adaptive = (m_hat + b3 * s["n"]) / (v_hat**0.5 + EPS)
            dparam = gamma * adaptive + (1 - gamma) * torch.sign(u_lion)
            new_params[name] = p.detach() - dparam * LR
        # zero_grad(): the gradients of the parameters just used are zeroed in place, and with
        # them the stored "previous gradient" views.
        for p in self.params.values():
            p.grad.detach_()
            p.grad.zero_()
        self.params = new_params


def run_lockstep(hypergrad, hyper_lr, warmup, clip_mode="norm", loss_scale=1.0):
    """Train the reference and metaopt side by side; check every step; return the reference's
    coefficient history, its largest raw hyper-gradient, and the final model of each side."""
    data = batches(N_BATCHES)
    ref = AuthorsReference(
        tiny_mlp(0), hyper_lr, AUTHORS_MOMENTUM, warmup, clip_mode=clip_mode, loss_scale=loss_scale
    )
    module = tiny_mlp(0)
    family = MADA(preset="official", betas=(INIT["beta1"], INIT["beta2"])).with_coefficients(
        beta3=INIT["beta3"], c=INIT["c"], rho=INIT["rho"], gamma=INIT["gamma"]
    )
    opt = MetaOptimizer(module.parameters(), family, hypergrad=hypergrad, lr=LR, eps=EPS)
    assert opt.learned == NAMES

    history, h_max = [], 0.0
    for i in range(STEPS):
        xy = data[i % N_BATCHES]
        ref.train_step(xy)
        opt.zero_grad()
        (loss_scale * loss_fn(module, xy)).backward()
        opt.step()

        # The raw hyper-gradient (before the clip). Components analytically zero (β1 on the
        # first update, whose bias-corrected m does not depend on β1) are compared at 1e-6 of
        # the largest component, not of themselves.
        ours_h = opt.last_hypergrad
        scale = max(abs(ref.raw_h[n].item()) for n in NAMES)
        h_max = max(h_max, scale)
        for n in NAMES:
            want = ref.raw_h[n].item()
            err = abs(ours_h[n].item() - want)
            bound = TOL * max(abs(want), 1e-6 * scale)
            assert err <= bound, ("hypergrad", i, n, ours_h[n].item(), want)

        ours_c = opt.coefficients
        for n in NAMES:
            want = ref.coef[n].detach()
            d = rel_diff(ours_c[n], want)
            assert d <= TOL, ("coefficient", i, n, ours_c[n].item(), want.item(), d)
        for name, p in module.named_parameters():
            d = rel_diff(p.detach(), ref.params[name].detach())
            assert d <= TOL, ("parameter", i, name, d)
        history.append({n: ref.coef[n].item() for n in NAMES})
    return history, h_max, ref, module


def assert_moved(history, names, module):
    for n in names:
        assert abs(history[-1][n] - INIT[n]) > 1e-4, (n, history[-1][n])
    start = tiny_mlp(0).parameters()
    moved = max(rel_diff(q.detach(), p.detach()) for p, q in zip(start, module.parameters()))
    assert moved > 1e-2, moved


CASES = {
    # The authors' hyper-optimizer exactly; in this problem c, ρ, γ get hyper-gradients too small
    # for lr 2.5e-3 to move them by 1e-4 in 40 steps, so only β1, β2, β3 are required to move.
    "authors-hypergrad": (lambda w: MADA.official_hypergrad(warmup=w), AUTHORS_LR, NAMES[:3]),
    "large-hyper-lr": (
        lambda w: OneStep(lr=LARGE_LR, momentum={"gamma": 0.0}, clip=CLIP, warmup=w),
        LARGE_LR,
        NAMES,
    ),
}


@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_official_preset_matches_authors_code(case, warmup):
    make_hypergrad, hyper_lr, must_move = CASES[case]
    history, h_max, _, module = run_lockstep(make_hypergrad(warmup), hyper_lr, warmup)
    assert h_max < CLIP  # the clip never acts here, so both clip formulas agree exactly
    for i in range(warmup):  # frozen during warmup
        assert history[i] == INIT, (i, history[i])
    if warmup:
        assert history[warmup] != INIT
    assert_moved(history, must_move, module)


def test_official_preset_matches_with_active_clip():
    """Loss ×1000 so that hyper-gradients reach ~200 and the clip to 10 acts (coefficients also
    hit the boxes: β1 and β2 their upper bound 0.99, β3 its lower bound 0). The reference clips
    with the authors' literal ``clip_grad_norm_``."""
    history, h_max, _, module = run_lockstep(
        MADA.official_hypergrad(), AUTHORS_LR, 0, clip_mode="norm", loss_scale=1000.0
    )
    assert h_max > 10 * CLIP
    hit = {n for n in NAMES for rec in history if rec[n] in BOXES[n]}
    assert {"beta1", "beta2", "beta3"} <= hit, hit
    assert_moved(history, NAMES, module)


def test_value_clip_matches_a_clamping_reference_with_active_clip():
    hypergrad = OneStep(lr=AUTHORS_LR, momentum={"gamma": 0.0}, clip=CLIP, clip_style="value")
    history, h_max, _, module = run_lockstep(hypergrad, AUTHORS_LR, 0, clip_mode="clamp", loss_scale=1000.0)
    assert h_max > 10 * CLIP
    assert_moved(history, NAMES, module)
