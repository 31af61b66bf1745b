r"""Padam: partially adaptive momentum estimation, with its exponent p learned.

Chen and Gu, "Closing the Generalization Gap of Adaptive Gradient Methods in Training Deep
Neural Networks", 2018 (IJCAI 2020), arXiv:1806.06763.

The paper's Algorithm 1 (no bias correction), with ε added for safety::

    m_t = β1 m_{t-1} + (1-β1) g_t
    v_t = β2 v_{t-1} + (1-β2) g_t²
    v̂_t = max(v̂_{t-1}, v_t)                      (amsgrad=True; False: v̂_t = v_t)
    θ_t = θ_{t-1} - η m_t / (v̂_t^p + ε)

p ∈ [0, 1/2] is the learned coefficient (default start 1/8, the paper's recommendation): p = 1/2
is AMSGrad, p → 0 SGD with (EMA) momentum. g_t includes coupled L2 weight decay λθ_{t-1} unless
``decoupled_weight_decay`` (then θ_t = θ_{t-1} - η(u_t + λθ_{t-1}), AdamW style).

Conventions of other implementations, by options:

* ``bias_correction="code"``: the step is η·sqrt(1-β2^t)/(1-β1^t)·m_t/D for every p, as in the
  authors' released code (uclaml/Padam) and pytorch-optimizer's ``PAdam``;
  ``"adam"``: u = (m_t/(1-β1^t)) / D(v̂_t/(1-β2^t)), Adam's corrections on both moments;
  ``"none"`` (default): the paper's algorithm.
* ``eps_placement="root"``: D = (sqrt(v̂) + ε)^{2p}, as in the authors' code and pytorch-optimizer;
  ``"outside"`` (default): D = v̂^p + ε.
* ``amsgrad=False``: no running maximum (pytorch-optimizer's ``PAdam`` has none).

So ``Padam(amsgrad=False, bias_correction="code", eps_placement="root")`` is pytorch-optimizer's
``PAdam(partial=p)``, ``Padam(bias_correction="code", eps_placement="root")`` the authors' code,
and ``Padam(bias_correction="adam").at("amsgrad")`` is ``torch.optim.Adam(amsgrad=True)``.

Named points: ``amsgrad`` (p = 1/2), ``padam`` (p = 1/8), ``sgd_momentum`` (p = 0: D = 1 + ε,
or 1 with ``eps_placement="root"``).

Zero-gradient coordinates (embedding rows absent from a batch) keep v̂ = 0, where x^p has an
infinite derivative in x and ∂(x^p)/∂p = x^p log x is 0·(-inf). The power is taken through a
double ``where``: its value is exactly ``torch.pow`` where the base is positive and 0^p (0, or 1
at p = 0) where it is 0, and every derivative there is 0, so tangents stay finite. Where the
denominator is 0 (only with ε = 0) the update is 0 rather than 0/0.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from metaopt.family import Betas, Family, Hyperparameters
from metaopt.space import Coefficient, CoefficientSpace

P_MAX = 0.5


class PadamHyperparameters(Hyperparameters):
    """Per-group options: learning rate η (the paper uses 0.1), ε, weight decay λ."""

    lr: float = Field(0.1, ge=0.0)
    eps: float = Field(1e-8, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)


class PadamOptions(BaseModel):
    """Options of the Padam family, fixed for a run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p: float = Field(0.125, ge=0.0, le=P_MAX)  # initial exponent
    learn: bool = True
    betas: Betas = (0.9, 0.999)
    amsgrad: bool = True
    bias_correction: Literal["none", "code", "adam"] = "none"
    eps_placement: Literal["outside", "root"] = "outside"
    decoupled_weight_decay: bool = False



def _pow(x: torch.Tensor, e) -> torch.Tensor:
    """x**e for x >= 0, with derivatives 0 at x == 0 in both x and e.

    ``torch.pow`` where x > 0, 0**e (1 if e == 0 else 0) where x == 0 (the masked base is 1,
    whose log is 0).
    """
    pos = x > 0
    inner = torch.pow(torch.where(pos, x, torch.ones_like(x)), e)
    at_zero = (e == 0).to(x.dtype) if torch.is_tensor(e) else float(e == 0)
    return torch.where(pos, inner, at_zero)


class Padam(Family):
    """Padam (Chen & Gu, 2018): m / v̂^p, its partially adaptive exponent p learned.

    Chen and Gu, "Closing the Generalization Gap of Adaptive Gradient Methods in Training Deep
    Neural Networks", 2018, arXiv:1806.06763; Chen et al., IJCAI 2020. The paper's Algorithm 1
    (no bias correction), with ε added: θ_t = θ_{t-1} - η m_t / (v̂_t^p + ε), v̂_t the running
    maximum of v_t (``amsgrad=True``). One learned coefficient, the exponent p ∈ [0, 1/2]:
    p = 1/2 is AMSGrad, p → 0 SGD with (EMA) momentum. Named points: ``amsgrad`` (p = 1/2),
    ``padam`` (p = 1/8), ``sgd_momentum`` (p = 0).

    Per-group hyperparameters (keyword arguments of the optimizer): ``lr`` (η, default 0.1, as
    in the paper), ``eps`` (ε, default 1e-8) and ``weight_decay`` (λ, default 0).

    Args:
        **options: the family's options ([`PadamOptions`][plugins.padam.PadamOptions]): ``p``,
            the initial exponent in [0, 0.5] (default 0.125, the paper's recommendation);
            ``learn``, whether p is learned (default True); ``betas`` (default (0.9, 0.999));
            ``amsgrad`` (default True; False: no running maximum); ``bias_correction``:
            ``"none"`` (default, the paper's), ``"code"`` (the authors' code and
            pytorch-optimizer's ``PAdam``) or ``"adam"``; ``eps_placement``: ``"outside"``
            (default, D = v̂^p + ε) or ``"root"`` (D = (sqrt(v̂) + ε)^{2p}); and
            ``decoupled_weight_decay`` (default False: coupled L2; True: AdamW style).

    Raises:
        pydantic.ValidationError: (a ``ValueError``) for an unknown option or a value out of
            range.
    """

    name = "padam"
    hyperparameters = PadamHyperparameters
    elementwise = True
    points = {"amsgrad": {"p": 0.5}, "padam": {"p": 0.125}, "sgd_momentum": {"p": 0.0}}

    def __init__(self, **options: Any) -> None:
        self.options = o = PadamOptions(**options)
        self.space = CoefficientSpace(p=Coefficient(init=o.p, low=0.0, high=P_MAX, learned=o.learn))

    def init(self, param, grad, group):
        """Padam's state at first sight: the moments (and, with ``amsgrad``, their maximum) at zero.

        Args:
            param (torch.Tensor): the parameter.
            grad (torch.Tensor): its first gradient.
            group (dict[str, Any]): its param group.

        Returns:
            (dict[str, torch.Tensor]): ``exp_avg``, ``exp_avg_sq`` and, with ``amsgrad``,
                ``max_exp_avg_sq``, zeros of the parameter's shape.
        """
        state = {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
        if self.options.amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(param)
        return state

    def update(self, grad, param, state, coefficients, group, step):
        """Padam's rule (the module docstring gives it, with the options' conventions).

        Args:
            grad (torch.Tensor): the gradient g_t.
            param (torch.Tensor): the parameter θ_{t-1}.
            state (dict[str, torch.Tensor]): the state from the last step.
            coefficients (Mapping[str, torch.Tensor]): ``{"p": ...}``, the exponent.
            group (dict[str, Any]): the param group (``lr``, ``eps``, ``weight_decay``).
            step (torch.Tensor): t, a 0-d tensor (1 on the first update).

        Returns:
            (tuple[torch.Tensor, dict[str, torch.Tensor]]): ``(delta, new_state)``, the
                parameter change -η u_t and the new moments.
        """
        o = self.options
        b1, b2 = o.betas
        p, eps, wd = coefficients["p"], group["eps"], group["weight_decay"]
        g = grad
        if wd != 0.0 and not o.decoupled_weight_decay:
            g = torch.add(g, param, alpha=wd)
        m = torch.lerp(g, state["exp_avg"], b1)  # b1·m + (1-b1)·g
        v = torch.lerp(g * g, state["exp_avg_sq"], b2)
        new = {"exp_avg": m, "exp_avg_sq": v}
        v_hat = v
        if o.amsgrad:
            v_hat = new["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], v)
        if o.bias_correction == "adam":
            m, v_hat = m / (1 - b1**step), v_hat / (1 - b2**step)
        if o.eps_placement == "outside":
            denom = _pow(v_hat, p) + eps
        else:
            denom = _pow(_pow(v_hat, 0.5) + eps, 2 * p)
        nonzero = denom > 0
        u = torch.where(nonzero, m / torch.where(nonzero, denom, torch.ones_like(denom)), torch.zeros_like(m))
        if o.bias_correction == "code":
            u = u * ((1 - b2**step).sqrt() / (1 - b1**step))
        if wd != 0.0 and o.decoupled_weight_decay:
            u = torch.add(u, param, alpha=wd)
        return -group["lr"] * u, new
