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
from .types import STEP, Tensor, is_parameter_tangent_key


def start_state(family, state: dict[str, Tensor], grad: Tensor, param: Tensor, group: Mapping[str, Any],
                step_dtype: torch.dtype, tangents: Sequence[str], checked: set) -> None:
    """A parameter's state at first sight (the family's buffers and step 0), and zero tangent buffers.

    The zero tangent buffers go under the keys ``tangents`` where none are kept (a fast path
    updates them in place). ``checked``: the (group, shape, dtype, device) kinds whose first step
    was already held to the family's contract (``metaopt.contract.first_step``, on meta tensors);
    a new kind is checked and added. Nothing is checked once a parameter has state.
    """
    if STEP not in state:
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

    A bucket that ``owns`` its parameters also holds them and their gradients in one flat buffer
    each: every parameter's ``.data`` and ``.grad`` are views into those, as in DDP's
    ``gradient_as_bucket_view`` and FSDP's flat parameter, so that a fast path reads and writes
    the group in place, with no gathering of gradients or parameters and no scattering of
    updates. Autograd accumulates into a gradient view in place; a gradient that arrives as a
    tensor of its own (after ``model.zero_grad()``, or from a wrapper that keeps gradients
    elsewhere) is copied in by ``take_grads`` and the view put back. A parameter whose storage
    was replaced (``p.data = ...``, ``model.to(...)`` after a step) breaks the bucket: its group
    runs parameter by parameter from then on, writing into whatever storage the parameter has.
    """

    def __init__(self, params: list[Tensor], states: list[dict[str, Tensor]], keys: list[str],
                 owns: bool = False) -> None:
        self.params = params
        numels = [p.numel() for p in params]
        ref = params[0]
        self.flat: dict[str, Tensor] = {}
        self.views: dict[str, list[Tensor]] = {}
        # One buffer per tangent, not one (K, N) matrix: inductor writes a matrix output in a
        # loop of its own that recomputes the whole rule per row.
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
        self.param = self.grad = None
        self.grad_views: list[Tensor] = []
        if owns:
            self.own()

    def own(self) -> None:
        """Move the parameters and their gradients into flat buffers, each ``.data``/``.grad`` a view."""
        params, numels = self.params, self.numels
        ref = params[0]
        self.param = torch.empty(sum(numels), dtype=ref.dtype, device=ref.device)
        self.grad = torch.zeros_like(self.param)
        param_views = [v.view(p.shape) for p, v in zip(params, self.param.split(numels))]
        self.grad_views = [v.view(p.shape) for p, v in zip(params, self.grad.split(numels))]
        for p, pv, gv in zip(params, param_views, self.grad_views):
            pv.copy_(p.detach())
            p.data = pv
            if p.grad is not None:
                gv.copy_(p.grad)
                p.grad = gv
        self._addresses = [v.data_ptr() for v in param_views]
        self._grad_addresses = [v.data_ptr() for v in self.grad_views]

    @property
    def owns(self) -> bool:
        """Whether the bucket holds its parameters and gradients in flat buffers."""
        return self.param is not None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "cache": {}}  # C arrays and the like: rebuilt on use

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._view_again()
        if self.owns:  # a copy (deepcopy, pickle) gets parameters of its own: hold them again
            self.own()

    def _view_again(self) -> None:
        """Make the state entries views into the flat buffers again where a copy separated them.

        Plain ``pickle`` copies each view's storage on its own (``torch.save`` and ``deepcopy``
        keep views); the entries are the state dict's own tensor objects, so they are re-pointed
        in place (``set_``), holding the same values.
        """
        layout = [(self.flat[k], self.views[k], self.numels) for k in self.flat]
        layout.append((self.step, self.views[STEP], [1] * len(self.views[STEP])))
        for buf, views, numels in layout:
            storage, offset = buf.untyped_storage(), buf.storage_offset()
            for view, n in zip(views, numels):
                if view.untyped_storage().data_ptr() != storage.data_ptr():
                    view.set_(storage, offset, view.shape, view.stride())
                offset += n

    def intact(self, params: Sequence[Tensor], states: Sequence[Mapping[str, Tensor]]) -> bool:
        """The same parameters in their flat storage, each state entry still the bucket's view (nothing replaced)."""
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return False
        if self.owns and [p.data_ptr() for p in params] != self._addresses:
            return False  # a parameter's storage was replaced: the step must write into the new one
        return all(all(map(operator.is_, [st.get(k) for st in states], views)) for k, views in self.views.items())

    def take_grads(self) -> Tensor:
        """The group's flat gradient: gradients that arrived as tensors of their own copied in, the views put back.

        Host-side metadata only (each gradient's address), no device read.
        """
        for p, gv, address in zip(self.params, self.grad_views, self._grad_addresses):
            if p.grad.data_ptr() != address:
                gv.copy_(p.grad)
                p.grad = gv
        return self.grad

    def zero_grad(self) -> bool:
        """Zero the flat gradient in place, the views kept; False (nothing done) where a gradient is not a view."""
        if not self.owns or any(p.grad is None or p.grad.data_ptr() != a
                                for p, a in zip(self.params, self._grad_addresses)):
            return False
        self.grad.zero_()
        return True


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

    def make(self, gi: int, device, params: list[Tensor], states: list[dict[str, Tensor]],
             owns: bool = False) -> FlatBucket | None:
        """Gather the started state of a group's parameters into a bucket (``owns``: their storage too).

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
        bucket = self._by_key[(gi, device)] = FlatBucket(params, states, keys, owns)
        bucket.group_index = gi  # its group's row of per-group coefficients
        return bucket

    def restore(self, groups, state, owns: bool = False) -> None:
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
                        self.make(gi, device, params, states, owns)
