"""The generic path: the family's own ``update``, parameter by parameter.

Its tangents ∂Δ/∂c_k are derived by the engine (one reverse pass for an elementwise rule,
forward mode otherwise; ``metaopt.hyper.one_step.update_with_tangents``). Any family runs here,
on any device, sharded or not; it is the reference every other path is tested equal to.
"""

from __future__ import annotations

import torch

from ..hyper.forward import forward_update
from ..hyper.one_step import update_with_tangents
from ..types import STEP, family_state
from .base import ExecutionPath, PerTensorPlan


class GenericPath(ExecutionPath):
    """The family's ``update`` per tensor, tangents by autograd (or jvp in forward mode): any family, every mode."""

    name = "generic"

    def plan(self, groups, state):
        """A step parameter by parameter: nothing to decide beforehand."""
        return PerTensorPlan(groups, state)

    def hypergradient(self, work):
        """The hyper-gradient h from the tangents each parameter kept last step; None where none kept any."""
        return self.per_tensor_hypergradient(work.groups, work.state)

    def restore(self, groups, state) -> None:
        """After ``load_state_dict``: each parameter's tangents laid out as a step lays them out.

        One-step tangents come from one (K, *shape) tensor per parameter, tangent k at offset k·N
        of its storage; a checkpoint can bring them back in storages of their own (DCP does). The
        hyper-gradient's dot products round by their operands' alignment (BLAS), so a resumed run
        is bit-identical only with the same layout.
        """
        super().restore(groups, state)
        if self.forward is not None or not self.tangent_keys:
            return
        for st in state.values():
            if all(k in st for k in self.tangent_keys):
                stacked = torch.stack([st[k] for k in self.tangent_keys])
                st.update(zip(self.tangent_keys, stacked.unbind(0)))

    def run_rule(self, work, coefficients):
        """The family's ``update`` on each parameter with a gradient, its tangents derived and kept."""
        groups, state = work.groups, work.state
        family, learning = self.family, bool(self.learned)
        by_device: dict[tuple, tuple] = {}
        for gi, group in enumerate(groups):
            row = self.coefficient_row(coefficients, gi)
            for device, entries in self.ready_by_device(group, state, tangents=False).items():
                key = (device, gi if self.per_group else None)
                if key not in by_device:
                    c = row.to(device)
                    by_device[key] = (c, {n: c[i] for i, n in enumerate(self.names)})
                coef, coef_dict = by_device[key]
                steps = [state[p][STEP] for p, _ in entries]
                torch._foreach_add_(steps, 1)
                for (p, (loc, grad, param)), step in zip(entries, steps):
                    st = state[p]
                    fam_state = family_state(st)
                    if learning and self.forward is not None:
                        decay, state_keys = self.forward
                        delta, new_state, theta_t, state_t = forward_update(
                            family, grad, param, fam_state, coef, self.names, self.learned_index, group, step,
                            decay, [st.get(k) for k in self.tangent_keys],
                            {b: [st.get(k) for k in ks] for b, ks in state_keys.items()},
                        )
                        st.update(zip(self.tangent_keys, theta_t))
                        for b, ks in state_keys.items():
                            st.update(zip(ks, state_t[b]))
                    elif learning:
                        delta, new_state, tangent = update_with_tangents(
                            family, grad, param, fam_state, coef, self.names, self.learned_index, group, step
                        )
                        st.update(zip(self.tangent_keys, tangent.unbind(0)))
                    else:
                        delta, new_state = family.update(grad, param, fam_state, coef_dict, group, step)
                    loc.add_(delta)  # computed in the state's precision, rounded once
                    st.update(new_state)
