"""Forward-mode hyper-gradients through the optimizer state, first order.

Real-time hyper-gradients: Franceschi et al., "Forward and Reverse Gradient-Based
Hyperparameter Optimization", ICML 2017; Micaelli & Storkey, "Gradient-based Hyperparameter
Optimization Over Long Horizons", NeurIPS 2021.

The one-step mode holds the optimizer state fixed, so it cannot see that a coefficient also
moves every later moment estimate (the short-horizon bias: Wu, Ren, Liao & Grosse, ICLR 2018).
This mode carries, for each learned coefficient c_k, the tangent of the parameters and of every
state buffer that depends on the coefficients,

    T^θ_t = ∂θ_t/∂c_k,    T^s_t = ∂s_t/∂c_k,

through each step ``(Δ_t, s_t) = update(g_t, θ_{t-1}, s_{t-1}, c)``, ``θ_t = θ_{t-1} + Δ_t``:

    U^θ = λ T^θ_{t-1},   U^s = λ T^s_{t-1}                       (what is carried, decayed)
    dΔ_t = ∂Δ/∂θ·U^θ + ∂Δ/∂s·U^s + ∂Δ/∂c_k                       (one jvp of the rule)
    T^s_t = ∂s_t/∂θ·U^θ + ∂s_t/∂s·U^s + ∂s_t/∂c_k                (the same jvp)
    T^θ_t = U^θ + dΔ_t

with λ = ``decay``. Gradients count as constants (first order: the loss Hessian is dropped), so
the hyper-gradient at step t is ``h_t = ⟨g_t, T^θ_{t-1}⟩``, with the gradient step t receives
anyway. ``decay=1`` is exact: after K steps at fixed coefficients h equals the first-order
unrolled hyper-gradient over those K steps. ``decay=0`` carries nothing and is the one-step mode.
0 < λ < 1 forgets old steps geometrically.

Memory: per parameter element, K × (1 + S) buffers in the state's precision, K learned
coefficients and S the family's state buffers that depend on them (``dependent_state``);
``check_memory`` refuses a configuration that would not fit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch.func import jvp

from ..types import compute_dtype, defined_tangent, state_tangent_key, tangent_keys
from .update import HyperOptimizer

Tensor = torch.Tensor


class Forward(HyperOptimizer):
    """Forward-mode hyper-gradients through the optimizer state (see the module docstring).

    Real-time hyper-gradients (Franceschi et al., "Forward and Reverse Gradient-Based
    Hyperparameter Optimization", ICML 2017; Micaelli & Storkey, "Gradient-based Hyperparameter
    Optimization Over Long Horizons", NeurIPS 2021), first order: for each learned coefficient
    the tangents of the parameters and of every state buffer that depends on the coefficients
    are carried from step to step, so the hyper-gradient sees that a coefficient also moves
    every later moment estimate, which the one-step mode cannot (the short-horizon bias: Wu,
    Ren, Liao & Grosse, ICLR 2018). Memory: K × (1 + S) buffers per parameter element (K
    learned coefficients, S the family's state buffers that depend on them); the docs'
    Hyper-gradients page compares the modes.

    ``decay`` (λ in [0, 1]) scales what the tangents carry from one step to the next: 1 is the
    exact first-order hyper-gradient of the whole run so far, 0 the one-step mode. ``memory_fraction``:
    the share of the device's available memory the tangents may take; more is refused at
    construction with a ``MemoryError`` rather than left to swap. The other fields are the
    hyper-optimizer's, as for [`OneStep`][metaopt.OneStep].

    Keyword Args:
        decay (float): λ in [0, 1] (default 1.0): 1 is exact, 0 the one-step mode, 0 < λ < 1
            forgets old steps geometrically.
        memory_fraction (float): in (0, 1] (default 0.9), the share of a device's available
            memory the tangents may take.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) for an unknown field or a value out of its
            range. (The [`MetaOptimizer`][metaopt.MetaOptimizer] built with it raises
            ``MemoryError`` where the tangents would not fit.)
    """

    decay: float = Field(1.0, ge=0.0, le=1.0)
    memory_fraction: float = Field(0.9, gt=0.0, le=1.0)

    keeps_tangents: ClassVar[bool] = True  # of the parameters, and of the dependent state
    through_state: ClassVar[bool] = True

    @property
    def learns_in_step(self) -> bool:
        """True: ``step()`` descends ⟨g_t, T^θ_{t-1}⟩ with the gradient it receives."""
        return True

    def forward_tangents(self, family, learned: Sequence[str], group: Mapping[str, Any], dtype: torch.dtype,
                         params: Sequence[Tensor]) -> tuple[float, dict[str, tuple[str, ...]]]:
        """(``decay``, each state buffer that depends on the coefficients -> its tangent keys).

        Raises:
            MemoryError: the tangents would take more than ``memory_fraction`` of a device's
                available memory (``check_memory``).
        """
        keys = dependent_state(family, family.space.names, learned, group, dtype)
        check_memory(params, len(learned), len(keys), self.memory_fraction)
        return self.decay, state_tangent_keys(learned, keys)


def state_tangent_keys(learned: Sequence[str], state_keys: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Per state buffer, the keys of its tangents (one per learned coefficient).

    ``state["hypergrad_tangent.beta3@exp_avg"] = ∂exp_avg/∂β3``.
    """
    return {key: tuple(state_tangent_key(name, key) for name in learned) for key in state_keys}


def dependent_state(family, names: Sequence[str], learned: Sequence[str], group: Mapping[str, Any],
                    dtype: torch.dtype) -> tuple[str, ...]:
    """The family's state buffers that depend on the learned coefficients.

    They are found from the rule's structure: on a small probe, a buffer depends on them if its
    update reads a learned coefficient, the parameter (which moves with them from the first step
    on: coupled weight decay puts θ into the moments) or a buffer that does, iterated to the
    fixed point (a buffer that reads only gradients, such as Padam's moments with fixed betas and
    no coupled decay, needs no tangent).
    """
    param = torch.linspace(0.5, 1.5, 6, dtype=dtype).reshape(2, 3)
    grad = torch.linspace(-1.0, 1.0, 6, dtype=dtype).reshape(2, 3)
    state = family.init(param, grad, group)
    coef = family.space.tensors(dtype)[0]
    step = torch.tensor(1.0, dtype=dtype)
    depends: set[str] = set()
    while True:
        with torch.enable_grad():
            coeffs = {n: (coef[i].clone().requires_grad_() if n in learned else coef[i]) for i, n in enumerate(names)}
            probe = {k: (v.clone().requires_grad_() if k in depends else v) for k, v in state.items()}
            _, new_state = family.update(grad, param.clone().requires_grad_(), probe, coeffs, group, step)
        found = {k for k, v in new_state.items() if torch.is_tensor(v) and v.requires_grad}
        if found <= depends:
            return tuple(k for k in state if k in depends)
        depends |= found


def available_bytes(device: torch.device) -> int | None:
    """Memory the device has free now, in bytes.

    ``torch.cuda.mem_get_info`` on a GPU, MemAvailable of /proc/meminfo on a CPU; None where
    neither says.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = getattr(os, "sysconf_names", {}).get("SC_AVPHYS_PAGES")
    return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE") if pages is not None else None


def tangent_bytes(params: Sequence[Tensor], k: int, s: int) -> dict[torch.device, int]:
    """Bytes the forward mode's tangents take, per device, for (local) parameters.

    K × (1 + S) buffers per element in the state's precision.
    """
    need: dict[torch.device, int] = {}
    for p in params:
        size = torch.empty((), dtype=compute_dtype(p.dtype)).element_size()
        need[p.device] = need.get(p.device, 0) + k * (1 + s) * p.numel() * size
    return need


def check_memory(params, k: int, s: int, fraction: float) -> None:
    """Refuse tangents that would take more than ``fraction`` of a device's available memory.

    The refusal is a ``MemoryError`` with the numbers; the memory is ``available_bytes``'s;
    ``params``: the local tensors.
    """
    for device, need in tangent_bytes(params, k, s).items():
        free = available_bytes(device)
        if free is not None and need > fraction * free:
            raise MemoryError(
                f"metaopt.Forward needs {need / 2**20:.1f} MiB on {device} for its tangents "
                f"(K={k} learned coefficients × (1 + {s} dependent state buffers) per parameter element), "
                f"more than memory_fraction={fraction} of the {free / 2**20:.1f} MiB available; learn fewer "
                f"coefficients, or use OneStep (K buffers per element)"
            )


def forward_update(family, grad: Tensor, param: Tensor, state: dict[str, Tensor], coefficients: Tensor,
                   names: Sequence[str], learned_index: Sequence[int], group, step, decay: float,
                   theta_tangents: Sequence[Tensor | None], state_tangents: Mapping[str, Sequence[Tensor | None]]):
    """One step of the rule and the forward-mode tangents (module docstring).

    Returns ``(delta, new_state, [T^θ_t per learned coefficient], {buffer: [T^s_t per learned
    coefficient]})``. A tangent given as None (a parameter's first step) is zero.
    ``learned_index`` must not be empty (without learned coefficients the path runs the rule
    alone).
    """
    keys = list(state)
    dep = list(state_tangents)

    def rule(p, s, c):
        coeffs = {n: c[i] for i, n in enumerate(names)}
        delta, new_state = family.update(grad, p, dict(zip(keys, s)), coeffs, group, step)
        return delta, tuple(new_state[key] for key in keys)

    primals = (param, tuple(state[key] for key in keys), coefficients)
    new_theta, new_state_t = [], {key: [] for key in dep}
    for j, i in enumerate(learned_index):
        carried = theta_tangents[j]
        u_theta = torch.zeros_like(param) if carried is None else carried * decay
        u_state = tuple(
            (torch.zeros_like(state[key]) if key not in state_tangents or state_tangents[key][j] is None
             else state_tangents[key][j] * decay)
            for key in keys
        )
        e = torch.zeros_like(coefficients)
        e[i] = 1
        (delta, out_state), (d_delta, d_state) = jvp(rule, primals, (u_theta, u_state, e))
        new_theta.append(u_theta + defined_tangent(d_delta, delta))
        for key, d, value in zip(keys, d_state, out_state):
            if key in new_state_t:
                new_state_t[key].append(defined_tangent(d, value))
        new_state = dict(zip(keys, out_state))
    return delta, new_state, new_theta, new_state_t


__all__ = ["Forward", "check_memory", "dependent_state", "forward_update", "state_tangent_keys", "tangent_keys"]
