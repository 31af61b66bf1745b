"""Per-parameter state as the execution paths keep it.

It is started at a parameter's first step, and for the fast paths gathered per param group into
flat buckets.

A ``FlatBucket`` holds one param group's state on one device in one flat buffer per state
key, and makes each parameter's entries views into those buffers, so that ``opt.state``,
``state_dict`` and the per-tensor code see per-parameter tensors while a fast path makes one pass
over the whole group. ``Buckets`` is the set of them an optimizer keeps, by (param group
index, device): which is still intact, which group may start as one, building and dropping them.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .contract import first_step
from .types import STEP, Tensor, compute_dtype, is_parameter_tangent_key


def start_state(family, state: dict[str, Tensor], grad: Tensor, param: Tensor, group: Mapping[str, Any],
                step_dtype: torch.dtype, tangents: Sequence[str] = (), checked: set | None = None) -> None:
    """A parameter's state at first sight (the family's buffers and step 0), and zero tangent buffers.

    The zero tangent buffers go under the keys ``tangents`` where none are kept (a fast path
    updates them in place). ``checked``: the (group, shape, dtype, device) kinds whose first step
    was already held to the family's contract (``metaopt.contract.first_step``, on meta tensors);
    a new kind is checked and added. Nothing is checked once a parameter has state.
    """
    if STEP not in state:
        if checked is not None:
            key = (id(group), tuple(param.shape), param.dtype, param.device)
            if key not in checked:
                first_step(family, group, param, step_dtype)
                checked.add(key)
        state.update(family.init(param, grad, group))
        state[STEP] = torch.zeros((), dtype=step_dtype, device=param.device)
    for key in tangents:
        if key not in state:
            state[key] = torch.zeros_like(param)


class FlatBucket:
    """The parameters of one param group on one device, their state in one flat buffer per key.

    Each parameter's state entries (its step count too) become views into the flat buffers.
    Built only when every parameter's step count is known equal (fresh state, or checked after
    ``load_state_dict``), and dropped as soon as a parameter is left out of a step (its step
    count then differs). ``cache`` is for what a path derives from the bucket's fixed layout
    (the native path's pointer arrays); it is not pickled.
    """

    def __init__(self, params: list[Tensor], states: list[dict[str, Tensor]], keys: list[str]) -> None:
        self.params = params
        numels = [p.numel() for p in params]
        ref = params[0]
        self.flat: dict[str, Tensor] = {}
        self.views: dict[str, list[Tensor]] = {}
        # One buffer per tangent, not one (K, N) matrix: inductor writes a matrix output in a
        # loop of its own that recomputes the whole rule per row (measured 8x slower).
        for key in keys:
            buf = torch.empty(sum(numels), dtype=states[0][key].dtype, device=ref.device)
            views = []
            for p, st, part in zip(params, states, buf.split(numels)):
                part.copy_(st[key].reshape(-1))
                st[key] = part.view(p.shape)
                views.append(st[key])
            self.flat[key], self.views[key] = buf, views
        # the step counts too, so that one add counts a step for the whole group
        self.step = torch.stack([st[STEP] for st in states])
        for i, st in enumerate(states):
            st[STEP] = self.step[i]
        self.views[STEP] = [st[STEP] for st in states]
        # the parameters' tangents (the hyper-gradient's); a forward mode's state tangents are
        # among ``flat`` under their own keys
        self.tangents = [self.flat[k] for k in keys if is_parameter_tangent_key(k)]
        self.numels = numels
        self.cache: dict[Any, Any] = {}
        self.grad = self.delta = None  # the torch-ops workspace, made on first use

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "cache": {}}  # C arrays and the like: rebuilt on use

    def intact(self, params: Sequence[Tensor], states: Sequence[Mapping[str, Tensor]]) -> bool:
        """The same parameters, each state entry still the bucket's view (nothing replaced)."""
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return False
        return all(all(map(operator.is_, [st.get(k) for st in states], views)) for k, views in self.views.items())

    def _workspace(self) -> None:
        # the group's gradient, gathered, and the update a compiled rule writes (one buffer for
        # both computes wrong results: inductor does not order aliased I/O); the native path
        # reads gradients in place and writes parameters directly, so it needs neither
        ref, numels = self.params[0], self.numels
        self.grad = torch.empty(sum(numels), dtype=compute_dtype(ref.dtype), device=ref.device)
        self.grad_views = [d.view(p.shape) for p, d in zip(self.params, self.grad.split(numels))]
        self.delta = torch.empty_like(self.grad)
        self.delta_views = [d.view(p.shape) for p, d in zip(self.params, self.delta.split(numels))]

    def workspace_bytes(self) -> int:
        """Bytes of the gradient and update workspace (0 before first use)."""
        return 0 if self.grad is None else 2 * self.grad.numel() * self.grad.element_size()

    def gather_grads(self) -> Tensor:
        """The group's current gradients, copied (and cast) into the flat workspace."""
        if self.grad is None:
            self._workspace()
        torch._foreach_copy_(self.grad_views, [p.grad for p in self.params])
        return self.grad


class Buckets:
    """An optimizer's flat buckets, by (param group index, device), in the order they were made."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[int, torch.device], FlatBucket] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def items(self):
        """((param group index, device), bucket) pairs, in the order the buckets were made."""
        return self._by_key.items()

    def values(self):
        """The buckets, in the order they were made."""
        return self._by_key.values()

    def __iter__(self) -> Iterator[tuple[int, torch.device]]:
        return iter(self._by_key)

    def get(self, gi: int, device) -> FlatBucket | None:
        """Param group ``gi``'s bucket on ``device``, intact or not; None where there is none."""
        return self._by_key.get((gi, device))

    def drop(self, gi: int, device) -> None:
        """Forget param group ``gi``'s bucket on ``device`` (its state stays, as per-tensor tensors)."""
        self._by_key.pop((gi, device), None)

    def clear(self) -> None:
        """Forget every bucket."""
        self._by_key.clear()

    def intact(self, gi: int, params: Sequence[Tensor], state, device) -> FlatBucket | None:
        """The group's bucket, if it still holds every parameter's state."""
        bucket = self._by_key.get((gi, device))
        if bucket is not None and bucket.intact(params, [state[p] for p in params]):
            return bucket
        return None

    def starts(self, gi: int, params: Sequence[Tensor], state, device) -> bool:
        """No bucket yet and no state: the group starts now, and can start as one bucket."""
        return (gi, device) not in self._by_key and not any(state[p] for p in params)

    def make(self, gi: int, device, params: list[Tensor], states: list[dict[str, Tensor]]) -> FlatBucket | None:
        """Gather the started state of a group's parameters into a bucket.

        None where they do not fit one (dtypes or layouts differ, the family's state keys do, or
        a state entry is not of its parameter's shape — a per-tensor scalar, say, which a flat
        buffer would silently spread over every element).
        """
        keys = [k for k in states[0] if k != STEP]
        same = all(p.dtype == params[0].dtype and p.is_contiguous() for p in params) and all(
            list(k for k in st if k != STEP) == keys and all(st[k].shape == p.shape for k in keys)
            for p, st in zip(params, states)
        )
        if not same:
            return None
        bucket = self._by_key[(gi, device)] = FlatBucket(params, states, keys)
        bucket.group_index = gi  # its group's row of per-group coefficients
        return bucket

    def restore(self, groups, state) -> None:
        """After ``load_state_dict``: a bucket for every group (per device) whose parameters all have state.

        Those whose state has one step count, as a run that never stopped would have.
        """
        self.clear()
        for gi, group in enumerate(groups):
            by_device: dict[torch.device, list[Tensor]] = {}
            for p in group["params"]:
                by_device.setdefault(p.device, []).append(p)
            for device, params in by_device.items():
                states = [state.get(p, {}) for p in params]
                if len(params) == len(group["params"]) and all(STEP in st for st in states):
                    if len({float(st[STEP]) for st in states}) == 1:
                        self.make(gi, device, params, states)
