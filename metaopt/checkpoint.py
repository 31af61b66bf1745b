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

``state_dict_of`` and ``load_into`` are [`MetaOptimizer`][metaopt.MetaOptimizer]'s
``state_dict`` and ``load_state_dict``; ``placeholder_step`` is its side of DCP's state-making
step.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .groups import tensor_lr
from .paths.base import views
from .sharding import is_dtensor
from .state import Buckets, start_state
from .types import STEP, compute_dtype

#: where the record sits in a state dict's first param group
KEY = "metaopt"
_FIELDS = ("family", "coefficient_names", "learned", "per_group", "coefficients", "last_hypergrad", "hyper_state",
           "step")


def state_dict_of(opt) -> dict[str, Any]:
    """``opt.state_dict()`` (``opt`` a MetaOptimizer): torch's, with the record and sharded state.

    torch's state-dict hooks run around all of it: a post-hook sees (and may change or replace)
    the whole dict, record included.
    """
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    with _hooks_held(opt, "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks"):
        sd = torch.optim.Optimizer.state_dict(opt)
    ids = {i for g in sd["param_groups"] for i in g["params"]}
    # the fast paths look up every parameter's state, which leaves an empty entry behind
    sd["state"] = {k: v for k, v in sd["state"].items() if k not in ids or v}
    sd["param_groups"][0][KEY] = {
        "family": opt.family.name,
        "coefficient_names": list(opt.family.space.names),
        "learned": list(opt._learned),
        "per_group": opt.per_group,
        **opt._hyper.saved(),
        "step": opt._meta_step,
    }
    params = [p for g in opt.param_groups for p in g["params"]]
    if any(is_dtensor(p) for p in params):
        sharded_state(sd["state"], params)
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, sd)
        if result is not None:
            sd = result
    return sd


def load_into(opt, state_dict: Mapping[str, Any]) -> None:
    """``opt.load_state_dict(state_dict)`` (``opt`` a MetaOptimizer): everything checked and converted, then loaded at once.

    torch's load-state-dict pre-hooks see the whole dict first (and may replace it), its
    post-hooks the loaded optimizer.
    """
    sd = dict(state_dict)
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, sd)
        if result is not None:
            sd = dict(result)
    meta = pop_record(sd)
    names, learned = list(opt.family.space.names), list(opt._learned)
    if meta["family"] != opt.family.name or list(meta["coefficient_names"]) != names:
        raise ValueError(
            f"state dict is for family {meta['family']!r} with coefficients "
            f"{meta['coefficient_names']}, this optimizer runs {opt.family.name!r} with {names}"
        )
    if list(meta["learned"]) != learned:
        raise ValueError(f"state dict learns {meta['learned']}, this optimizer learns {learned}")
    if bool(meta["per_group"]) != opt.per_group:
        mode = {True: "per_group", False: "shared"}
        raise ValueError(
            f"state dict has coefficients={mode[bool(meta['per_group'])]!r}, this optimizer "
            f"coefficients={mode[opt.per_group]!r}"
        )
    check_record(meta, names, learned, len(sd["param_groups"]) if opt.per_group else None)
    hyper = opt._hyper.restored(meta)

    # torch's checks and param groups: the saved values, this optimizer's parameters
    saved_groups = copy.deepcopy(sd["param_groups"])  # the optimizer's own (a tensor lr too)
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(opt.param_groups, saved_groups)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
    groups = []
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if torch.is_tensor(saved.get("lr")):
            saved["lr"] = tensor_lr(saved["lr"], group["params"], f"param group {gi}'s lr")
        groups.append({**saved, "params": group["params"],
                       **({"param_names": group["param_names"]} if "param_names" in group
                          and "param_names" not in saved else {})})
    # the state converted (torch would cast floating state to its parameter's dtype; it lives
    # in the compute precision, fp32 for bf16/fp16 parameters, on the parameter's local device)
    state, shared = loaded_state(
        sd.get("state", {}), [i for g in saved_groups for i in g["params"]],
        [p for g in opt.param_groups for p in g["params"]], hyper.coefficients.dtype,
    )
    # what the path derives from the state (flat buckets copy it), into a set of its own until
    # it all worked; then what still shares the state dict's tensors gets a copy
    path = opt._path
    buckets, path.buckets = path.buckets, Buckets()
    try:
        path.restore(groups, state)
        own_copies(shared)
    except BaseException:
        path.buckets = buckets
        raise
    # nothing below can fail: the load happens here, at once
    opt.param_groups = groups
    opt.state = state
    opt._hyper = hyper
    opt._meta_step = int(meta["step"])
    opt._placeholder_state = False
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


@contextlib.contextmanager
def _hooks_held(opt: torch.optim.Optimizer, *names: str) -> Iterator[None]:
    """The hooks under ``names`` set aside while torch's own method runs.

    The MetaOptimizer function around it runs them itself, so that they see its whole result.
    """
    held = {n: opt.__dict__[n] for n in names}
    try:
        opt.__dict__.update({n: OrderedDict() for n in names})
        yield
    finally:
        opt.__dict__.update(held)


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
    storage). Each entry is a new dict: torch's ``state_dict`` hands out the optimizer's own
    per-parameter dicts, and the optimizer must keep its local tensors (a DTensor of an unevenly
    sharded parameter cannot even be flattened).
    """
    from torch.distributed.tensor import DTensor

    for i, p in enumerate(params):
        entries = state.get(i)
        if entries is None or not is_dtensor(p):
            continue
        shard = p.to_local().shape
        state[i] = {
            k: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
            if torch.is_tensor(v) and not is_dtensor(v) and v.ndim > 0 and v.shape == shard else v
            for k, v in entries.items()
        }


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


def placeholder_step(opt) -> bool:
    """A step's dealings with DCP's placeholder state, before anything else (``opt`` a MetaOptimizer).

    ``torch.distributed.checkpoint.state_dict`` runs a step with zero gradients and lr 0 on an
    optimizer without state, only to create state to load into: that step makes every
    parameter's state as a first step would start it (tangents included, so that a load into it
    misses nothing) and nothing else — no step counted, no coefficient or hyper-optimizer buffer
    moved — and True says so. A real step that comes before any load starts the state afresh
    from its own gradients (a family's ``init`` may read them).

    Returns:
        Whether this was DCP's step (the step does nothing more).
    """
    if not opt.state and _creating_state_for_dcp():
        path = opt._path
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    _, grad, param = views(p)
                    start_state(opt.family, opt.state[p], grad, param, group, path.dtype, path.all_tangent_keys,
                                path.first_steps)
        opt._placeholder_state = True
        return True
    if opt._placeholder_state:  # made for DCP, never loaded into: start from this step
        opt.state.clear()
        opt._path.buckets.clear()
        opt._placeholder_state = False
    return False


def _creating_state_for_dcp() -> bool:
    """Whether the step under way is the one ``torch.distributed.checkpoint.state_dict`` runs only to create state."""
    module = sys.modules.get("torch.distributed.checkpoint.state_dict")
    target = getattr(getattr(module, "_init_optim_state", None), "__code__", None)
    if target is None:
        return False
    frame = sys._getframe(2)  # the step (this is called from placeholder_step)
    for _ in range(12):  # the step, torch's wrappers around it (no_grad, profiling hooks), DCP
        if frame is None:
            return False
        if frame.f_code is target:
            return True
        frame = frame.f_back
    return False
