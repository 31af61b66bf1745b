r"""MADA: Meta-Adaptive Optimizers through hyper-gradient Descent.

Ozkara, Karakus, Raman, Diggavi, Zhou and Kveton, ICML 2024, arXiv:2401.08893.

One update rule whose coefficients interpolate between Adam, AMSGrad, Yogi, Adan, AVGrad and Lion::

    d_t    = g_t - g_{t-1}
    m̄_t    = β1 m̄_{t-1} + (1-β1) g_t
    n_t    = β3 n_{t-1} + (1-β3) d_t
    ĝ_t    = g_t + β3 d_t
    g̃²_t   = c ĝ_t² + (1-c) (v_{t-1} + ĝ_t² · sign(ĝ_t² - v_{t-1}))
    ṽ_t    = β2 ṽ_{t-1} + (1-β2) g̃²_t
    v̄_t    = max(v̄_{t-1}, ṽ_t)                  (second_moment="max", AMSGrad)
           | (ṽ_t + (t-1) v̄_{t-1}) / t           (second_moment="mean", AVGrad)
    v_t    = ρ ṽ_t + (1-ρ) v̄_t
    m̂_t    = m̄_t / (1-β1^t) + β3 n_t             (bias_correction="per_moment": β3 n_t/(1-β3^t))
    u_t    = m̂_t / (sqrt(v_t / (1-β2^t)) + ε)
    u_t    ← γ u_t + (1-γ) sign(βl1 ml_{t-1} + (1-βl1) g_t),  ml_t = βl2 ml_{t-1} + (1-βl2) g_t   (lion=True)
    θ_t    = θ_{t-1} - η_t (u_t + λ θ_{t-1})       (λ: decoupled weight decay, AdamW style)

``v_{t-1}`` in the Yogi term is the previous mixed second moment ``ρ ṽ_{t-1} + (1-ρ) v̄_{t-1}``,
re-mixed with the ρ in force (equal to the stored one whenever ρ did not move; saves a buffer).

Coefficients: β1, β2 (fixed by default), β3 ∈ [0, 0.99], c ∈ [0, 1], ρ ∈ [0, 1] (learned by
default), γ ∈ [0, 1] (with ``lion=True``). When β1/β2 are learned their boxes are the authors'
[0.01, 0.99] and [0.501, 0.99].

Named points (``MADA().at("adam")``): adam (β3=0, c=1, ρ=1), amsgrad (ρ=0, max), avgrad (ρ=0,
mean), yogi (c=0), adan (β3=0.92), lion (γ=0). Conventions of other implementations are reachable
by options: ``initial_m``/``initial_v`` start the moments at a constant (pytorch-optimizer's
Yogi starts both at 1e-6); ``initial_grad="first"`` takes g_0 = g_1 so the first difference is
zero, and ``bias_correction="per_moment"`` corrects n by 1-β3^t, both as pytorch-optimizer's Adan
(whose β2 is MADA's β3 and whose β3 is MADA's β2).

Zero-gradient coordinates (embedding rows absent from a batch) keep v = 0, where sqrt has an
infinite derivative; the rule takes sqrt through a double ``where`` so that the value is exactly
sqrt(v) (the Adam point still equals ``torch.optim.Adam``) and the tangent is 0 there instead of NaN.

Execution: ``update`` is the reference (the generic path differentiates it); ``fused_update`` is
the same rule with hand-derived tangents in torch ops; ``mada.c`` is that arithmetic in C for the
native CPU path (all but the Lion term and the official preset). Tests hold all three equal.

``preset="official"`` reproduces the authors' released code (amazon-science/mada_optimizer_search,
``gdtuo.py``, class ``Meta``, with its training script) step for step, quirks included: all six
coefficients learned in the authors' boxes; state at first sight m̄=0, ṽ=1e-15, v̄=1e-15,
n = g⊙g; the previous gradient is zero at every step (the script's ``zero_grad`` clears the
stored gradient in place before it is read, so d_t = g_t); the Yogi term uses ṽ_{t-1}; AVGrad
mean, treated as a constant in the hyper-gradient; Lion betas 0.95/0.98 with the sign taken on
0.95·ml_t + 0.05·g_t using the *updated* ml_t. Pair it with `MADA.official_hypergrad`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from metaopt.family import Betas, Family, Hyperparameters
from metaopt.hyper.one_step import OneStep
from metaopt.kernels import NativeRule
from metaopt.space import Coefficient, CoefficientSpace

_BELOW_ONE = math.nextafter(1.0, 0.0)
COEFFICIENTS = ("beta1", "beta2", "beta3", "c", "rho", "gamma")
#: the authors' boxes for β1 and β2 when they are learned
LEARNED_BETA_BOXES = {"beta1": (0.01, 0.99), "beta2": (0.501, 0.99)}


class MADAHyperparameters(Hyperparameters):
    """Per-group options: learning rate η, ε (added outside the root), decoupled weight decay λ."""

    lr: float = Field(1e-3, ge=0.0)
    eps: float = Field(1e-8, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)


class MADAOptions(BaseModel):
    """Options of the MADA family, fixed for a run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    betas: Betas | None = None  # initial β1, β2; (0.9, 0.999), official (0.9, 0.99)
    learn: tuple[str, ...] | None = None  # default: β3, c, ρ (+ γ with lion); official: all six
    second_moment: Literal["max", "mean"] | None = None
    lion: bool | None = None
    lion_betas: Betas | None = None
    bias_correction: Literal["adam", "per_moment"] = "adam"
    initial_grad: Literal["zero", "first"] = "zero"
    initial_m: float = Field(0.0, ge=0.0)
    initial_v: float | None = Field(None, ge=0.0)
    preset: Literal["default", "official"] = "default"


    @model_validator(mode="after")
    def _resolve(self) -> MADAOptions:
        official = self.preset == "official"
        fill = {
            "betas": (0.9, 0.99) if official else (0.9, 0.999),
            "second_moment": "mean" if official else "max",
            "lion": official,
            "lion_betas": (0.95, 0.98) if official else (0.9, 0.99),
            "initial_v": 1e-15 if official else 0.0,
        }
        for k, v in fill.items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        if self.learn is None:
            learn = COEFFICIENTS if official else ("beta3", "c", "rho") + (("gamma",) if self.lion else ())
            object.__setattr__(self, "learn", learn)
        names = COEFFICIENTS if self.lion else COEFFICIENTS[:-1]
        unknown = [n for n in self.learn if n not in names]
        if unknown:
            raise ValueError(f"learn names unknown coefficients {unknown}; MADA has {list(names)}")
        for i, (name, (lo, hi)) in enumerate(LEARNED_BETA_BOXES.items()):
            if name in self.learn and not lo <= self.betas[i] <= hi:
                raise ValueError(
                    f"betas[{i}]={self.betas[i]} lies outside [{lo}, {hi}], the box of a learned "
                    f"{name}; start it inside (e.g. betas=(0.9, 0.99))"
                )
        return self


class _SafeSqrt(torch.autograd.Function):
    """The square root of x >= 0 whose derivative at 0 is 0 rather than inf.

    So that 0·inf never makes NaN; one op forward, in reverse mode, forward mode and under vmap
    alike.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sqrt(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        return _over_twice(grad, ctx.saved_tensors[0])

    @staticmethod
    def jvp(ctx, tangent):
        return _over_twice(tangent, ctx.saved_tensors[0])


def _over_twice(t: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Compute t / (2·root) where root > 0, else 0 (the inner where keeps even a second derivative finite)."""
    pos = root > 0
    return torch.where(pos, t / (2 * torch.where(pos, root, torch.ones_like(root))), torch.zeros_like(t))


_safe_sqrt = _SafeSqrt.apply


class MADA(Family):
    """MADA (Ozkara et al., ICML 2024): Adam, AMSGrad, Yogi, Adan, AVGrad and Lion in one rule."""

    name = "mada"
    hyperparameters = MADAHyperparameters
    elementwise = True

    def __init__(self, **options: Any) -> None:
        self.options = o = MADAOptions(**options)
        learned = set(o.learn)
        b1, b2 = o.betas

        def coef(init: float, low: float, high: float, name: str) -> Coefficient:
            return Coefficient(init=init, low=low, high=high, learned=name in learned)

        space = {
            name: coef(b, *(LEARNED_BETA_BOXES[name] if name in learned else (0.0, _BELOW_ONE)), name)
            for name, b in (("beta1", b1), ("beta2", b2))
        }
        space |= {
            "beta3": coef(0.0, 0.0, 0.99, "beta3"),
            "c": coef(1.0, 0.0, 1.0, "c"),
            "rho": coef(1.0, 0.0, 1.0, "rho"),
        }
        if o.lion:
            space["gamma"] = coef(1.0, 0.0, 1.0, "gamma")
        self.space = CoefficientSpace(space)
        adam = {"beta3": 0.0, "c": 1.0, "rho": 1.0} | ({"gamma": 1.0} if o.lion else {})
        self.points = {
            "adam": adam,
            "amsgrad" if o.second_moment == "max" else "avgrad": adam | {"rho": 0.0},
            "yogi": adam | {"c": 0.0},
            "adan": adam | {"beta3": 0.92},
        }
        if o.lion:
            self.points["lion"] = adam | {"gamma": 0.0}
        self._vbar = "max_exp_avg_sq" if o.second_moment == "max" else "mean_exp_avg_sq"

    @property
    def references(self) -> dict[str, Any]:
        """Reference optimizers of MADA's points, where this configuration's conventions match theirs.

        ``adam`` and ``amsgrad`` are ``torch.optim.AdamW`` (MADA's weight decay is decoupled);
        ``yogi``, ``adan`` and ``lion`` are pytorch-optimizer's ``Yogi``, ``Adan`` and ``Lion``
        with the options that make their conventions MADA's (see the module docstring), when
        pytorch-optimizer is installed. `metaopt.check_family` holds each point equal to its
        reference.
        """
        o = self.options
        if o.preset == "official":
            return {}
        b1, b2 = o.betas
        plain = o.initial_m == 0.0 and o.initial_v == 0.0
        refs: dict[str, Any] = {}
        if plain:
            refs["adam"] = lambda params, lr, eps, weight_decay: torch.optim.AdamW(
                params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
            if o.second_moment == "max":
                refs["amsgrad"] = lambda params, lr, eps, weight_decay: torch.optim.AdamW(
                    params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, amsgrad=True)
        try:
            import pytorch_optimizer
        except ImportError:  # a dev dependency: without it these points have no reference here
            return refs

        def undecayed(weight_decay):
            if weight_decay:
                raise NotImplementedError("its weight decay convention is not MADA's; compare at weight_decay=0")

        if o.initial_m == o.initial_v and o.initial_v > 0:
            def yogi(params, lr, eps, weight_decay):
                undecayed(weight_decay)
                return pytorch_optimizer.Yogi(params, lr=lr, betas=(b1, b2), eps=eps, initial_accumulator=o.initial_v)

            refs["yogi"] = yogi
        if plain and o.initial_grad == "first" and o.bias_correction == "per_moment":
            beta3 = self.points["adan"]["beta3"]

            def adan(params, lr, eps, weight_decay):
                undecayed(weight_decay)
                return pytorch_optimizer.Adan(params, lr=lr, betas=(b1, beta3, b2), eps=eps)

            refs["adan"] = adan
        if o.lion:
            refs["lion"] = lambda params, lr, weight_decay: pytorch_optimizer.Lion(
                params, lr=lr, betas=o.lion_betas, weight_decay=weight_decay)
        return refs

    def default_hypergrad(self) -> OneStep:
        """MADA's default hyper-optimizer, chosen by the MADA-vs-Adam study (docs/study.md).

        One-step SGD, lr 2.5e-3, heavy-ball momentum 0.5, with the authors' stabilisers: the
        coefficients frozen for the first 50 steps and each hyper-gradient clipped to norm 10
        (Ozkara et al., ICML 2024). On the default job it (with AVGrad) was the study's best MADA
        setting, ahead of the plain ``OneStep()`` (no warm-up, no clip); docs/study.md has the
        numbers.

        Returns:
            ``OneStep(warmup=50, clip=10.0, clip_style="norm")``.
        """
        return OneStep(warmup=50, clip=10.0, clip_style="norm")

    @staticmethod
    def official_hypergrad(warmup: int = 0) -> OneStep:
        """The authors' hyper-optimizer.

        Per-coefficient SGD, lr 2.5e-3, heavy-ball momentum 0.5 (0 for γ), each hyper-gradient
        clipped to norm 10 by ``clip_grad_norm_``'s formula, coefficients frozen for ``warmup``
        steps.
        """
        return OneStep(lr=2.5e-3, momentum={"gamma": 0.0}, clip=10.0, clip_style="norm", warmup=warmup)

    def init(self, param, grad, group):
        """The moment buffers of a parameter at its first step (the options say which and how they start)."""
        o = self.options
        official = o.preset == "official"
        state = {
            "exp_avg": torch.full_like(param, o.initial_m),
            "exp_avg_diff": grad * grad if official else torch.zeros_like(param),
            "exp_avg_sq": torch.full_like(param, o.initial_v),
            self._vbar: torch.full_like(param, o.initial_v),
        }
        if not official:
            state["prev_grad"] = grad.clone() if o.initial_grad == "first" else torch.zeros_like(param)
        if o.lion:
            state["lion_exp_avg"] = torch.zeros_like(param)
        return state

    def update(self, grad, param, state, coefficients, group, step):
        """One step of the rule in the module docstring: (Δ, the new buffers)."""
        # lerp(a, b, w) = w·b + (1-w)·a: each EMA and mix below is one op, not three.
        o = self.options
        official = o.preset == "official"
        b1, b2, b3 = coefficients["beta1"], coefficients["beta2"], coefficients["beta3"]
        c, rho = coefficients["c"], coefficients["rho"]
        g = grad
        d = g if official else g - state["prev_grad"]
        m = torch.lerp(g, state["exp_avg"], b1)
        n = torch.lerp(d, state["exp_avg_diff"], b3)
        g_hat = torch.addcmul(g, d, b3)
        g_hat_sq = g_hat * g_hat
        v_ema_prev, vbar_prev = state["exp_avg_sq"], state[self._vbar]
        v_prev = v_ema_prev if official else torch.lerp(vbar_prev, v_ema_prev, rho)
        yogi = torch.addcmul(v_prev, g_hat_sq, torch.sign(g_hat_sq - v_prev))
        v_ema = torch.lerp(torch.lerp(yogi, g_hat_sq, c), v_ema_prev, b2)
        if o.second_moment == "max":
            vbar = torch.maximum(vbar_prev, v_ema)
        else:
            vbar = torch.lerp(vbar_prev, v_ema, 1 / step)  # running mean over steps 1..t
        v = torch.lerp(vbar.detach() if official else vbar, v_ema, rho)
        n_weight = b3 / (1 - b3**step) if o.bias_correction == "per_moment" else b3
        m_hat = torch.addcmul(m / (1 - b1**step), n, n_weight)
        u = m_hat / (_safe_sqrt(v / (1 - b2**step)) + group["eps"])
        new = {"exp_avg": m, "exp_avg_diff": n, "exp_avg_sq": v_ema, self._vbar: vbar}
        if not official:
            new["prev_grad"] = g.clone()
        if o.lion:
            lb1, lb2 = o.lion_betas
            ml_prev = state["lion_exp_avg"]
            ml = torch.lerp(g, ml_prev, lb2)
            u_lion = torch.lerp(g, ml if official else ml_prev, lb1)
            u = torch.lerp(torch.sign(u_lion), u, coefficients["gamma"])
            new["lion_exp_avg"] = ml
        if group["weight_decay"] != 0.0:
            u = torch.add(u, param, alpha=group["weight_decay"])
        return -group["lr"] * u, new

    def native_rule(self, learned):
        """The C kernel ``mada.c``, the C form of `fused_update`.

        For the default preset without the Lion term (other configurations take the fused or
        generic path).
        """
        o = self.options
        if o.lion or o.preset == "official":
            return None
        slots = [learned.index(k) if k in learned else -1 for k in COEFFICIENTS[:5]]
        return NativeRule(
            source=Path(__file__).with_name("mada.c"),
            state_keys=("exp_avg", "exp_avg_diff", "exp_avg_sq", self._vbar, "prev_grad"),
            options=(int(o.second_moment == "mean"), int(o.bias_correction == "per_moment"), *slots),
        )

    def fused_scalars(self, coefficients, group, step, learned):
        """The 0-d part of the fast path (bias corrections and their derivatives).

        Computed once per parameter outside the elementwise kernel.
        """
        b1, b2, b3 = coefficients["beta1"], coefficients["beta2"], coefficients["beta3"]
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        sc = {
            "b1": b1, "b2": b2, "b3": b3, "c": coefficients["c"], "rho": coefficients["rho"],
            "inv_bc1": 1 / bc1, "inv_bc2": 1 / bc2, "inv_step": 1 / step, "neg_lr": -group["lr"],
            "eps": group["eps"], "wd": group["weight_decay"],
        }
        if self.options.bias_correction == "per_moment":
            bc3 = 1 - b3**step
            sc["n_weight"] = b3 / bc3
            sc["dn_weight"] = 1 / bc3 + b3 * step * b3 ** (step - 1) / (bc3 * bc3)  # ∂(β3/bc3)/∂β3
        else:
            sc["n_weight"], sc["dn_weight"] = b3, 1.0
        if "beta1" in learned:
            sc["dinv_bc1"] = step * b1 ** (step - 1) / (bc1 * bc1)  # ∂(1/bc1)/∂β1
        if "beta2" in learned:
            sc["dinv_bc2"] = step * b2 ** (step - 1) / (bc2 * bc2)
        if self.options.lion:
            sc["gamma"] = coefficients["gamma"]
        return sc

    def fused_update(self, grad, param, state, sc, learned):
        """The rule and its tangents ∂delta/∂c_k for ``learned``, derived by hand (forward mode).

        Plain elementwise arithmetic: one fused kernel under ``torch.compile``. ``sc`` comes
        from `fused_scalars`. Tested equal to `update` differentiated by the engine.
        Returns (delta, new_state, [∂delta/∂c_k for k in learned]).
        """
        o = self.options
        official = o.preset == "official"
        b1, b2, b3, c, rho = sc["b1"], sc["b2"], sc["b3"], sc["c"], sc["rho"]
        L = set(learned)
        g = grad
        d = g if official else g - state["prev_grad"]
        m0, n0, v0, vb0 = state["exp_avg"], state["exp_avg_diff"], state["exp_avg_sq"], state[self._vbar]
        # EMAs and mixes as torch.lerp, as in `update`: the form b + (1-w)(a-b) for w >= 0.5
        # keeps float32 exact where a + w(b-a) would cancel (ṽ's β2 = 0.999 lost 3 digits)
        m = torch.lerp(g, m0, b1)
        n = torch.lerp(d, n0, b3)
        gh = g + b3 * d
        gh2 = gh * gh
        vp = v0 if official else torch.lerp(vb0, v0, rho)  # previous mixed second moment
        sgn = torch.sign(gh2 - vp)
        yogi = vp + gh2 * sgn
        gts = torch.lerp(yogi, gh2, c)
        ve = torch.lerp(gts, v0, b2)
        if o.second_moment == "max":
            vbar = torch.maximum(vb0, ve)
        else:
            vbar = torch.lerp(vb0, ve, sc["inv_step"])
        v = torch.lerp(vbar, ve, rho)
        mh = m * sc["inv_bc1"] + n * sc["n_weight"]
        root = torch.sqrt(v * sc["inv_bc2"])
        inv_denom = 1 / (root + sc["eps"])
        u = mh * inv_denom
        new = {"exp_avg": m, "exp_avg_diff": n, "exp_avg_sq": ve, self._vbar: vbar}
        if not official:
            new["prev_grad"] = g.clone()

        # tangents, coefficient by coefficient, following the lines above
        t_v = {}  # ∂ṽ/∂k
        if "beta3" in L:  # ∂(ĝ²)/∂β3 = 2ĝd, through c·ĝ² + (1-c)·ĝ²·sign
            t_v["beta3"] = (1 - b2) * (2 * gh * d * (sgn + c * (1 - sgn)))
        if "c" in L:
            t_v["c"] = (1 - b2) * (gh2 - yogi)
        if "rho" in L and not official:  # ∂v_{t-1}/∂ρ = ṽ0 - v̄0 inside the Yogi term
            t_v["rho"] = (1 - b2) * (1 - c) * (v0 - vb0)
        if "beta2" in L:
            t_v["beta2"] = v0 - gts
        if official or not t_v:
            t_vbar = {}  # nothing to carry, or the authors' detached mean
        elif o.second_moment == "max":
            # torch.maximum's derivative: 1 where ṽ wins, 1/2 at a tie
            w = (ve > vb0).to(ve.dtype) + 0.5 * (ve == vb0).to(ve.dtype)
            t_vbar = {k: w * t for k, t in t_v.items()}
        else:
            t_vbar = {k: t * sc["inv_step"] for k, t in t_v.items()}
        t_vh = {}  # ∂v̂/∂k
        for k, t in t_v.items():
            mixed = torch.lerp(t_vbar[k], t, rho) if k in t_vbar else rho * t
            t_vh[k] = mixed
        if "rho" in L:
            t_vh["rho"] = t_vh["rho"] + (ve - vbar) if "rho" in t_vh else ve - vbar
        t_vh = {k: t * sc["inv_bc2"] for k, t in t_vh.items()}
        if "beta2" in L:
            t_vh["beta2"] = t_vh["beta2"] + v * sc["dinv_bc2"]
        t_mh = {}  # ∂m̂/∂k
        if "beta1" in L:
            t_mh["beta1"] = (m0 - g) * sc["inv_bc1"] + m * sc["dinv_bc1"]
        if "beta3" in L:
            t_mh["beta3"] = n * sc["dn_weight"] + sc["n_weight"] * (n0 - d)
        # ∂sqrt(v̂) = ∂v̂ / (2 sqrt(v̂)), and 0 where v̂ = 0 (zero-gradient coordinates)
        if t_vh:
            half_inv_root = 0.5 / torch.where(root > 0, root, torch.full_like(root, float("inf")))
        t_u = {}
        for k in learned:
            if k == "gamma":
                continue
            num = t_mh.get(k)
            if k in t_vh:
                dr = u * t_vh[k] * half_inv_root
                num = -dr if num is None else num - dr
            t_u[k] = num * inv_denom if num is not None else torch.zeros_like(u)
        if o.lion:
            lb1, lb2 = o.lion_betas
            gamma = sc["gamma"]
            ml_prev = state["lion_exp_avg"]
            ml = torch.lerp(g, ml_prev, lb2)
            s_lion = torch.sign(torch.lerp(g, ml if official else ml_prev, lb1))
            t_u = {k: gamma * t for k, t in t_u.items()}
            if "gamma" in L:
                t_u["gamma"] = u - s_lion
            u = torch.lerp(s_lion, u, gamma)
            new["lion_exp_avg"] = ml
        if sc["wd"] != 0.0:
            u = u + sc["wd"] * param
        neg_lr = sc["neg_lr"]
        return neg_lr * u, new, [neg_lr * t_u[k] for k in learned]

