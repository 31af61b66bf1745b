r"""Hypergradient descent on the learning rate: SGD-HD and Adam-HD.

Baydin, Cornish, Martínez Rubio, Schmidt and Wood, "Online Learning Rate Adaptation with
Hypergradient Descent", ICLR 2018, arXiv:1703.04782.

Each family has one learned coefficient, the learning rate α, and a fixed base rule u_t::

    SGD-HD    u_t = g_t
    Adam-HD   m_t = β1 m_{t-1} + (1-β1) g_t,   v_t = β2 v_{t-1} + (1-β2) g_t²
              u_t = m̂_t / (sqrt(v̂_t) + ε),     m̂_t = m_t/(1-β1^t),  v̂_t = v_t/(1-β2^t)
    step      θ_t = θ_{t-1} - η_t α_t u_t        (η_t: the group's ``lr``, default 1)

with g_t = ∇f(θ_{t-1}) (+ λθ_{t-1} with coupled L2 ``weight_decay``, as ``torch.optim.SGD/Adam``).
The paper moves α by plain gradient descent on the loss just reached:

    α_t = α_{t-1} - β ∂f(θ_{t-1})/∂α_{t-1} = α_{t-1} + β η_{t-1} g_t·u_{t-1}

which is exactly the engine's one-step hyper-gradient h = ⟨g_t, ∂θ_{t-1}/∂α⟩ = -η_{t-1}⟨g_t, u_{t-1}⟩
followed by one hyper-SGD step (lr β, no momentum, no clipping, no warm-up): use
``hypergrad=SGDHD.paper_hypergrad()``. As in the paper, α is updated with the new gradient
*before* the parameter step, and the dot product runs over all parameters at once.

The group's ``lr`` η is a dimensionless multiplier on α, default 1.0, so that α *is* the
learning rate; leave it at 1 for the paper's algorithm. A ``torch.optim.lr_scheduler`` then
shapes the learned rate: the step taken is η_t·α_t, and the hyper-gradient carries the η of the
step it differentiates (α_t = α_{t-1} + β η_{t-1} g_t·u_{t-1}). Do not pass a learning rate as
``lr=``: pass it as ``alpha=`` (its initial value).

α lies in the box [0, ``alpha_max``] (default 1.0); the paper has no box, the bound only guards
against a run-away rate. With β = 0 (or ``hypergrad=None``) SGD-HD is ``torch.optim.SGD(lr=α)``
and Adam-HD is ``torch.optim.Adam(lr=α)``.

Two differences from the authors' released code (gbaydin/hypergradient-descent), on purpose:
that code updates α once per parameter tensor, inside the loop over tensors, and its Adam puts
ε outside the *uncorrected* root (step size α·sqrt(1-β2^t)/(1-β1^t)); here α is updated once per
step with the dot product over every parameter, as the paper writes it, and Adam-HD follows
``torch.optim.Adam``. The hyper-gradient dots the tangent with ``.grad``: with ``weight_decay``
it is the hyper-gradient of the unregularised loss (put the penalty in the loss to include it).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from metaopt.family import Betas, Family, Hyperparameters
from metaopt.hyper.one_step import OneStep
from metaopt.space import Coefficient, CoefficientSpace


class HDHyperparameters(Hyperparameters):
    """Per-group options: ``lr`` multiplies α (default 1: α is the learning rate).

    Coupled L2 ``weight_decay`` as in ``torch.optim.SGD``.
    """

    lr: float = Field(1.0, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)


class AdamHDHyperparameters(HDHyperparameters):
    """Adds Adam's ε (outside the bias-corrected root, as ``torch.optim.Adam``)."""

    eps: float = Field(1e-8, ge=0.0)


class HDOptions(BaseModel):
    """Options of SGD-HD: α's initial value, its upper bound, and whether it is learned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(1e-3, ge=0.0)  # α_0; the paper's experiments start at 1e-3
    alpha_max: float = Field(1.0, gt=0.0)
    learn: bool = True

    @model_validator(mode="after")
    def _alpha_in_box(self):
        if self.alpha > self.alpha_max:
            raise ValueError(f"alpha={self.alpha} exceeds alpha_max={self.alpha_max}")
        return self


class AdamHDOptions(HDOptions):
    """Options of Adam-HD: adds Adam's ``betas``."""

    betas: Betas = (0.9, 0.999)



def _root(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x >= 0, exact in value, with derivative 0 instead of inf at x = 0.

    It matters only when something differentiates through v, e.g. second-order unrolled
    hyper-gradients.
    """
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


class _HD(Family):
    elementwise = True
    options_model: type[HDOptions] = HDOptions
    #: β of the paper's experiments, the default of `paper_hypergrad`
    paper_beta: float = 1e-3

    def __init__(self, **options: Any) -> None:
        self.options = o = self.options_model(**options)
        self.space = CoefficientSpace(
            alpha=Coefficient(init=o.alpha, low=0.0, high=o.alpha_max, learned=o.learn)
        )

    @classmethod
    def paper_hypergrad(cls, beta: float | None = None) -> OneStep:
        """The paper's hyper-step α ← α - β h: plain SGD on α (no momentum, clipping or warm-up).

        β defaults to the value of the paper's experiments (1e-3 for SGD-HD, 1e-7 for Adam-HD).

        Args:
            beta: the hypergradient learning rate β; None (default) takes the paper's.

        Returns:
            ``OneStep(lr=β, momentum=0.0)``, to pass as ``hypergrad=``.
        """
        return OneStep(lr=cls.paper_beta if beta is None else beta, momentum=0.0)

    def default_hypergrad(self) -> OneStep:
        """The paper's hyper-step (`paper_hypergrad`), the hyper-optimizer used when none is given.

        The engine's default (lr 2.5e-3, momentum 0.5, tuned for MADA's unit-scale coefficients)
        would move a learning rate orders of magnitude too fast.

        Returns:
            ``paper_hypergrad()``: plain SGD on α with the paper's β.
        """
        return self.paper_hypergrad()

    def _direction(self, grad, state, group, step):
        raise NotImplementedError

    def update(self, grad, param, state, coefficients, group, step):
        g = grad
        if group["weight_decay"] != 0.0:
            g = torch.add(g, param, alpha=group["weight_decay"])
        u, new = self._direction(g, state, group, step)
        return -group["lr"] * coefficients["alpha"] * u, new


class SGDHD(_HD):
    """SGD-HD (Baydin et al., ICLR 2018): SGD whose learning rate α descends its hyper-gradient.

    Baydin, Cornish, Martínez Rubio, Schmidt and Wood, "Online Learning Rate Adaptation with
    Hypergradient Descent", ICLR 2018, arXiv:1703.04782. One learned coefficient, the learning
    rate α in [0, ``alpha_max``]; the step is θ_t = θ_{t-1} - η_t α_t g_t, with g_t including
    coupled L2 ``weight_decay``. For the paper's algorithm leave the group's ``lr`` η at 1 and
    pass ``hypergrad=SGDHD.paper_hypergrad()`` (also the default). With β = 0 (or
    ``hypergrad=None``) it is ``torch.optim.SGD(lr=α)``.

    Per-group hyperparameters (keyword arguments of the optimizer): ``lr`` (η, a dimensionless
    multiplier on α, default 1.0) and ``weight_decay`` (default 0).

    Args:
        **options: the family's options ([`HDOptions`][plugins.hd.HDOptions]): ``alpha``, α's
            initial value (default 1e-3, as in the paper's experiments; pass a learning rate
            here, not as ``lr=``); ``alpha_max``, the upper end of α's box (default 1.0; the
            paper has none, it guards against a run-away rate); ``learn``, whether α is learned
            (default True).

    Raises:
        pydantic.ValidationError: (a ``ValueError``) for an unknown option, a value out of
            range, or ``alpha`` above ``alpha_max``.
    """

    name = "sgd_hd"
    hyperparameters = HDHyperparameters

    def init(self, param, grad, group):
        """SGD-HD's state at first sight: none.

        Args:
            param (torch.Tensor): the parameter.
            grad (torch.Tensor): its first gradient.
            group (dict[str, Any]): its param group.

        Returns:
            (dict[str, torch.Tensor]): an empty dict.
        """
        return {}  # SGD keeps no state; the engine keeps the tangent -η g_{t-1}

    def _direction(self, g, state, group, step):
        return g, {}


class AdamHD(_HD):
    """Adam-HD (Baydin et al., ICLR 2018): Adam whose learning rate α descends its hyper-gradient.

    Baydin, Cornish, Martínez Rubio, Schmidt and Wood, "Online Learning Rate Adaptation with
    Hypergradient Descent", ICLR 2018, arXiv:1703.04782. One learned coefficient, the learning
    rate α in [0, ``alpha_max``]; the step is θ_t = θ_{t-1} - η_t α_t m̂_t / (sqrt(v̂_t) + ε), as
    ``torch.optim.Adam`` (ε outside the bias-corrected root, coupled L2 ``weight_decay``). For
    the paper's algorithm leave the group's ``lr`` η at 1 and pass
    ``hypergrad=AdamHD.paper_hypergrad()`` (also the default; β = 1e-7). With β = 0 (or
    ``hypergrad=None``) it is ``torch.optim.Adam(lr=α)``.

    Per-group hyperparameters (keyword arguments of the optimizer): ``lr`` (η, a dimensionless
    multiplier on α, default 1.0), ``weight_decay`` (default 0) and ``eps`` (ε, default 1e-8).

    Args:
        **options: the family's options ([`AdamHDOptions`][plugins.hd.AdamHDOptions]):
            ``alpha``, α's initial value (default 1e-3); ``alpha_max``, the upper end of α's box
            (default 1.0); ``learn``, whether α is learned (default True); ``betas``, Adam's
            (β1, β2), each in [0, 1) (default (0.9, 0.999)).

    Raises:
        pydantic.ValidationError: (a ``ValueError``) for an unknown option, a value out of
            range, or ``alpha`` above ``alpha_max``.
    """

    name = "adam_hd"
    hyperparameters = AdamHDHyperparameters
    options_model = AdamHDOptions
    paper_beta = 1e-7

    def init(self, param, grad, group):
        """Adam-HD's state at first sight: both moments at zero.

        Args:
            param (torch.Tensor): the parameter.
            grad (torch.Tensor): its first gradient.
            group (dict[str, Any]): its param group.

        Returns:
            (dict[str, torch.Tensor]): ``exp_avg`` and ``exp_avg_sq``, zeros of the parameter's
                shape.
        """
        return {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}

    def _direction(self, g, state, group, step):
        b1, b2 = self.options.betas
        m = torch.lerp(g, state["exp_avg"], b1)  # b1·m + (1-b1)·g
        v = torch.lerp(g * g, state["exp_avg_sq"], b2)
        u = (m / (1 - b1**step)) / (_root(v / (1 - b2**step)) + group["eps"])
        return u, {"exp_avg": m, "exp_avg_sq": v}
