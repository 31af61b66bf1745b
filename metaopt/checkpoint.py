"""What a [`MetaOptimizer`][metaopt.MetaOptimizer] state dict holds beyond torch's, and how it travels.

It travels through ``torch.save`` and ``torch.distributed.checkpoint`` (DCP).

The metaopt record (family, coefficient names, learned names, coefficients, last hyper-gradient,
hyper-optimizer buffers, step) lives in the **first param group**, under ``"metaopt"``: DCP's
``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups`` (a top-level entry is
dropped), and carries every key of a param group, tensors included, through ``dcp.save``,
``dcp.load`` and ``set_optimizer_state_dict``. Per-parameter state is the wrong home: the
coefficients belong to the optimizer, not to a parameter, and per-parameter state is sharded
under FSDP2.

FSDP2 keeps each rank a shard of every parameter, and the optimizer's state as plain tensors
of that shard's shape; ``sharded_state`` presents them as DTensors laid out like their
parameters, as ``torch.optim.Adam``'s state is, so that DCP saves every rank's shard (plain
tensors would count as replicated: one rank's copy kept) and can reshard them on load.
"""

from __future__ import annotations

import numbers
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .sharding import is_dtensor
from .types import STEP, compute_dtype

#: where the record sits in a state dict's first param group
KEY = "metaopt"
_FIELDS = ("family", "coefficient_names", "learned", "per_group", "coefficients", "last_hypergrad", "hyper_state",
           "step")


def pop_record(sd: dict[str, Any]) -> dict[str, Any]:
    """The metaopt record of state dict ``sd`` (a shallow copy, whose param groups are copied too), taken out of it.

    Raises ``ValueError`` naming what is missing or malformed; ``sd`` itself is not changed.
    """
    groups = [dict(g) for g in sd.get("param_groups", ())]
    sd["param_groups"] = groups
    found = [g.pop(KEY) for g in groups if KEY in g]
    if len(found) > 1:
        raise ValueError(f"corrupt metaopt state dict: {len(found)} param groups hold a '{KEY}' record, expected one")
    if not found:
        raise ValueError(
            f"not a metaopt state dict: no '{KEY}' record in its first param group (where "
            "MetaOptimizer.state_dict() keeps it, so that torch.distributed.checkpoint carries it)"
        )
    record = found[0]
    if not isinstance(record, Mapping):
        raise ValueError(f"corrupt metaopt state dict: the '{KEY}' record is a {type(record).__name__}, not a dict")
    missing = [k for k in _FIELDS if k not in record]
    if missing:
        raise ValueError(f"corrupt metaopt state dict: the '{KEY}' record lacks {missing}")
    return dict(record)


def check_record(record: Mapping[str, Any], names: list[str], learned: list[str], rows: int | None = None) -> None:
    """Refuse a record whose tensors do not fit ``names`` and ``learned`` (before anything is loaded).

    With coefficients per group, they must fit ``rows`` param groups too.
    """
    for field, n in (("coefficients", len(names)), ("last_hypergrad", len(learned))):
        value = record[field]
        shape = (n,) if rows is None else (rows, n)
        if not torch.is_tensor(value) or value.shape != shape or not value.is_floating_point():
            got = f"shape {tuple(value.shape)}, {value.dtype}" if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"corrupt metaopt state dict: '{field}' must be a float tensor of shape {shape}, got {got}")
    if not isinstance(record["hyper_state"], Mapping):
        raise ValueError("corrupt metaopt state dict: 'hyper_state' is not a dict")
    try:
        int(record["step"])
    except (TypeError, ValueError):
        raise ValueError(f"corrupt metaopt state dict: 'step' is {record['step']!r}, not a count") from None


def sharded_state(state: dict[Any, dict[str, Any]], params: list[torch.Tensor]) -> None:
    """Each sharded (DTensor) parameter's state tensors of its local shard's shape, as DTensors.

    They get the parameter's mesh and placements (no communication: they share the local
    storage).
    """
    from torch.distributed.tensor import DTensor

    for i, p in enumerate(params):
        entries = state.get(i)
        if entries is None or not is_dtensor(p):
            continue
        shard = p.to_local().shape
        for k, v in entries.items():
            if torch.is_tensor(v) and not is_dtensor(v) and v.ndim > 0 and v.shape == shard:
                entries[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                shape=p.shape, stride=p.stride())


def local_value(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A loaded state tensor as the optimizer keeps it.

    A DTensor laid out like ``param``'s shard (resharded where DCP loaded it otherwise), as that
    local shard.
    """
    if not is_dtensor(value):
        return value
    if is_dtensor(param) and tuple(value.placements) != tuple(param.placements):
        value = value.redistribute(param.device_mesh, param.placements)
    return value.to_local() if is_dtensor(param) else value.full_tensor()


def loaded_state(saved: Mapping[Any, Any], ids: Sequence[Any], params: Sequence[torch.Tensor],
                 step_dtype: torch.dtype) -> tuple[defaultdict, list[tuple[dict, str, torch.Tensor]]]:
    """An optimizer's state made from a state dict's ``state``; the optimizer itself is not touched.

    Each entry of parameter id ``ids[i]`` becomes ``params[i]``'s: its step count a 0-d tensor
    in ``step_dtype`` (a Python number too, as other tools and converters write it, like torch's
    optimizers take it), every other floating tensor in the compute precision on the parameter's local
    device (``local_value``). Entries under keys that are no parameter's id are kept as they
    are, as torch keeps them.

    Returns:
        (the state, what of it still shares tensors with ``saved``: (entries, key, tensor)
            triples for ``own_copies``).

    Raises:
        ValueError: a step count that is neither a tensor of one value nor a real number.
    """
    by_id = dict(zip(ids, params))
    state: defaultdict = defaultdict(dict)
    shared = []
    for pid, entries in saved.items():
        param = by_id.get(pid)
        if param is None:
            state[pid] = entries
            continue
        loc = param.to_local() if is_dtensor(param) else param
        work = compute_dtype(loc.dtype)
        converted = state[param]
        for key, value in entries.items():
            if key == STEP:
                value = _step_count(value, pid)
            if not torch.is_tensor(value):
                converted[key] = value
                continue
            dtype = step_dtype if key == STEP else (work if value.is_floating_point() else value.dtype)
            mine = local_value(value, param).to(device=loc.device, dtype=dtype)
            if key == STEP:
                mine = mine.reshape(())
            converted[key] = mine
            if _same_memory(mine, value):
                shared.append((converted, key, mine))
    return state, shared


def _step_count(value: Any, pid: Any) -> Any:
    """A saved step count as a tensor of one value (a Python number made one)."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"corrupt state dict: parameter {pid}'s step is a tensor of shape {tuple(value.shape)}, "
                             "not one count")
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise ValueError(f"corrupt state dict: parameter {pid}'s step is {value!r}, not a count")


def _same_memory(mine: torch.Tensor, saved: torch.Tensor) -> bool:
    saved = saved.to_local() if is_dtensor(saved) else saved
    return mine.device == saved.device and mine.untyped_storage().data_ptr() == saved.untyped_storage().data_ptr()


def own_copies(shared: Sequence[tuple[dict, str, torch.Tensor]]) -> None:
    """Give each loaded state entry that still shares a state dict's tensor a copy of its own.

    So that steps change the optimizer's state, never the state dict (nor another optimizer
    loaded from it). Those a path has gathered into its flat buffers are copies already. The
    copy is of the whole storage, the entry a view of it at the same offset and strides, as
    ``torch.load`` lays it out: a BLAS dot product adds in another order at another alignment,
    and a resumed run would then differ from an uninterrupted one in the last bits.
    """
    copies: dict[int, torch.UntypedStorage] = {}
    for entries, key, tensor in shared:
        if entries.get(key) is not tensor:
            continue
        storage = tensor.untyped_storage()
        mine = copies.get(storage.data_ptr())
        if mine is None:
            mine = copies[storage.data_ptr()] = storage.clone()
        entries[key] = tensor.new_empty(0).set_(mine, tensor.storage_offset(), tensor.shape, tensor.stride())


def creating_state_for_dcp() -> bool:
    """Whether this step is the one ``torch.distributed.checkpoint.state_dict`` runs only to create state.

    DCP runs it on an optimizer without state, with zero gradients and lr 0.
    """
    module = sys.modules.get("torch.distributed.checkpoint.state_dict")
    target = getattr(getattr(module, "_init_optim_state", None), "__code__", None)
    if target is None:
        return False
    frame = sys._getframe(1)
    for _ in range(12):  # the step, torch's wrappers around it (no_grad, profiling hooks), DCP
        if frame is None:
            return False
        if frame.f_code is target:
            return True
        frame = frame.f_back
    return False
