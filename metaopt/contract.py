"""The family contract, held by the engine.

A family author writes ``init`` and ``update`` (`metaopt.Family`); the engine derives everything
else from them, which it can only do right when the two keep the contract. Here are the checks
the engine runs by itself, so that a rule that breaks it is refused before it can give wrong
numbers, with one error ([`FamilyContractError`][metaopt.FamilyContractError]) that names the
family, the function, what was found and the fix — the same on every path and in every mode,
since it runs before a path is involved:

* ``check_declaration``: what the class declares (space, hyperparameters, the two functions);
* ``contract_probe``: once per param group when the optimizer is made (and for a group added
  later; ``probe_group``), the rule on a few-element probe in the group's precision and device;
* ``first_step``: each kind of parameter's first real step, on meta tensors of its real shape
  (no memory, no arithmetic). After that no step pays anything.

``host_reads_forbidden`` is the guard the probe runs the rule under: anything that reads a
tensor value on the host inside it raises [`HostReadError`][metaopt.contract.HostReadError].
[`metaopt.check_family`][metaopt.check_family] (``metaopt check``) runs these and much more.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import math
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .sharding import local, shard_key
from .types import compute_dtype

Tensor = torch.Tensor

__all__ = ["FamilyContractError", "HostReadError", "check_declaration", "contract_probe", "first_step",
           "host_reads_forbidden", "probe_group"]


class FamilyContractError(ValueError):
    """A family's rule breaks the contract of [`Family`][metaopt.Family].

    Raised when an optimizer is made (a probe of a few elements), on a parameter's first step,
    or by [`check_family`][metaopt.check_family]; the same check on every path and in every
    mode, before anything is changed.

    Attributes:
        family: the family's name.
        rule: where: ``"init"``, ``"update"`` or ``"elementwise"`` (the class attribute).
        found: what was found.
        fix: how to fix it.
    """

    def __init__(self, family: str, rule: str, found: str, fix: str) -> None:
        self.family, self.rule, self.found, self.fix = family, rule, found, fix
        super().__init__(f"metaopt: family {family!r} breaks the contract in {rule}: {found}\n  fix: {fix}")


# -- host reads ---------------------------------------------------------------------------------


class HostReadError(RuntimeError):
    """A tensor value was read on the host where nothing may be (see `host_reads_forbidden`)."""


_aten = torch.ops.aten
# ops whose result (or its shape) depends on tensor values, so the host has to wait for them
_VALUE_DEPENDENT = {
    _aten._local_scalar_dense,  # item/bool/float/int/index, also when called from C++
    _aten.item,
    _aten.is_nonzero,
    _aten.nonzero,  # also torch.where(c), argwhere, nonzero(as_tuple=True)
    _aten.nonzero_numpy,
    _aten.equal,
    _aten.allclose,
    _aten.masked_select,
    _aten._unique,
    _aten._unique2,
    _aten.unique_dim,
    _aten.unique_consecutive,
    _aten.unique_dim_consecutive,
    _aten.bincount,  # output length is max(x) + 1
}
_INDEX = {_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_}
_MASK_DTYPES = (torch.bool, torch.uint8)
# Tensor methods that hand a value (or the whole tensor) to Python
_READ_METHODS = {
    "item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__", "__index__", "__complex__",
    "__format__", "__repr__", "__str__", "cpu",
}


def _is_host(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


class _HostReadOps(TorchDispatchMode):
    """Every aten op that reads tensor values on the host or copies device -> host, also from C++."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        why = None
        if packet in _VALUE_DEPENDENT:
            why = "its result depends on tensor values"
        elif packet in _INDEX and any(
            isinstance(i, Tensor) and i.dtype in _MASK_DTYPES for i in (args[1] or ())
        ):
            why = "a boolean-mask index calls nonzero"
        elif func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            why = "repeats given as a tensor without output_size"
        elif packet is _aten.histc and _arg(args, kwargs, 2, "min", 0) == _arg(args, kwargs, 3, "max", 0):
            why = "histc without a range reads min/max"
        elif packet is _aten._to_copy and _is_host(kwargs.get("device")) and not _is_host(args[0].device):
            why = "a device -> host copy"
        elif packet is _aten.copy_ and _is_host(args[0].device) and not _is_host(args[1].device):
            why = "a device -> host copy"
        if why is not None:
            raise HostReadError(f"a tensor value was read on the host: {func} ({why})")
        return func(*args, **kwargs)


def _arg(args, kwargs, i, name, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


class _HostReadMethods(TorchFunctionMode):
    """The Tensor methods that give a value to Python (``item``, ``if t:``, ``float(t)``, ...).

    On a CPU tensor some of them return without any aten op, so the dispatch mode alone would
    miss them. ``t.to("cpu")`` (the device named by a string) counts as a move to the host;
    ``t.to(other.device)`` does not (the engine moves shared tensors that way, device to device).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READ_METHODS and args and isinstance(args[0], Tensor):
            raise HostReadError(f"a tensor value was read on the host: Tensor.{name}")
        if name == "to" and args and isinstance(args[0], Tensor):
            device = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(device, str) and torch.device(device).type == "cpu":
                raise HostReadError("a tensor value was read on the host: Tensor.to('cpu')")
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_reads_forbidden() -> Iterator[None]:
    """While active, anything that reads a tensor value on the host raises ``HostReadError``.

    ``item``, ``bool`` (``if t:``), ``float``, ``int``, indexing with a tensor, ``tolist``,
    ``numpy``, formatting, ``cpu()``, ``to("cpu")``, and the ops whose result depends on values
    (``nonzero``, ``torch.where(c)``, boolean-mask indexing, ``equal``, ``allclose``, ``unique``,
    ``bincount``, ...) and device -> host copies. A step that would synchronise with the device
    fails loudly, also on a CPU. Thread-local (torch's function and dispatch modes); nests.

    Raises:
        HostReadError: from the body, at the read.
    """
    with _HostReadMethods(), _HostReadOps():
        yield


# -- the contract -------------------------------------------------------------------------------


def _shape(t) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" if isinstance(t, Tensor) else type(t).__name__


def _where_in_user_code(err: BaseException, family) -> str:
    """' (at FILE:LINE: code)': the innermost frame of the family's own module, where there is one."""
    module = type(family).__module__
    path = getattr(__import__("sys").modules.get(module), "__file__", None)
    frames = traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if path is not None and f.filename == path]
    if not mine:
        return ""
    f = mine[-1]
    code = (f.line or linecache.getline(f.filename, f.lineno)).strip()
    return f" (at {f.filename}:{f.lineno}: {code})"


#: the arguments the engine passes to a family's functions, in order
_ARGUMENTS = {"init": ("param", "grad", "group"), "update": ("grad", "param", "state", "coefficients", "group", "step")}
_WHAT = {"param": "the parameter", "grad": "the gradient", "state": "the state", "coefficients": "the coefficients",
         "group": "the param group", "step": "the step count"}


def _signature_problem(fn: Callable, expected: tuple[str, ...]) -> str:
    """What is wrong with ``fn``'s signature for ``expected`` positional arguments ('' when nothing).

    The engine passes them by position, so a function that names them in another order (init
    takes the parameter first, update the gradient) would run with the two swapped, silently.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]  # without self
    except (TypeError, ValueError):  # a builtin or a callable without a signature: nothing to compare
        return ""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [q for q in params if q.kind in kinds]
    if not any(q.kind == inspect.Parameter.VAR_POSITIONAL for q in params):
        required = [q for q in positional if q.default is inspect.Parameter.empty]
        if len(positional) < len(expected) or len(required) > len(expected):
            got = "(self" + "".join(f", {q.name}" for q in positional) + ")"
            return f"{got} takes {len(positional)} argument{'s' if len(positional) != 1 else ''}, but the engine passes {len(expected)}"
    for i, q in enumerate(positional[: len(expected)]):
        if q.name in expected and q.name != expected[i]:
            return (f"'s argument {i + 1} is named {q.name!r}, but the engine passes {_WHAT[expected[i]]} there "
                    f"({_WHAT[q.name]} is argument {expected.index(q.name) + 1})")
    return ""


def check_declaration(family) -> None:
    """What a family declares, before its rule runs: name, space, hyperparameters, the two functions.

    Raises:
        FamilyContractError: naming what is missing or of the wrong type, and the fix.
    """
    from .family import Family, Hyperparameters
    from .space import CoefficientSpace

    cls = type(family)
    name = getattr(family, "name", cls.__name__)

    def fail(found: str, fix: str) -> FamilyContractError:
        return FamilyContractError(str(name), cls.__name__, found, fix)

    if not isinstance(name, str) or not name:
        raise fail(f"name is {name!r}, not a string", "set a class attribute name = 'my_family'")
    space = getattr(family, "space", None)
    if space is None:
        raise fail("it has no coefficient space (self.space)",
                   "set self.space = CoefficientSpace(name=Coefficient(init=..., low=..., high=...)) in __init__")
    if not isinstance(space, CoefficientSpace):
        example = ("CoefficientSpace(" + ", ".join(f"{k}=..." for k in space) + ")"
                   if isinstance(space, Mapping) else "CoefficientSpace(name=Coefficient(init=..., low=..., high=...))")
        raise fail(f"space is a {type(space).__name__}, not a metaopt.CoefficientSpace",
                   f"wrap it: self.space = {example} (a mapping works as CoefficientSpace(your_dict))")
    hp = getattr(family, "hyperparameters", None)
    if not (isinstance(hp, type) and issubclass(hp, Hyperparameters)):
        raise fail(f"hyperparameters is {hp!r}, not a subclass of metaopt.Hyperparameters",
                   "class MyHyperparameters(metaopt.Hyperparameters): eps: float = 1e-8; then "
                   "hyperparameters = MyHyperparameters (a class, not an instance)")
    for fn in ("init", "update"):
        if getattr(cls, fn, None) is getattr(Family, fn):
            raise fail(f"it does not define {fn}", f"write {fn} (docs: Define a family)")
        problem = _signature_problem(getattr(cls, fn), _ARGUMENTS[fn])
        if problem:
            raise fail(f"{fn}{problem}", f"write def {fn}(self, {', '.join(_ARGUMENTS[fn])}) "
                       f"(init takes ({', '.join(_ARGUMENTS['init'])}); update takes the gradient first)")
    if not isinstance(getattr(family, "elementwise", False), bool):
        raise fail(f"elementwise is {family.elementwise!r}, not True or False",
                   "elementwise = True only when coordinate i of delta depends on coordinate i alone")
    if (family.fused_update is None) != (family.fused_scalars is None):
        raise fail("it defines only one of fused_scalars and fused_update", "write both, or neither")
    for point, values in dict(getattr(family, "points", {}) or {}).items():
        unknown = [k for k in values if k not in space]
        if unknown:
            raise fail(f"point {point!r} names {unknown}, which the space does not have (it has {list(space.names)})",
                       "name only the space's coefficients in points")


@dataclass
class _Probe:
    """What a rule is tried on: a parameter, its gradient, its group, the coefficients."""

    family: Any
    group: dict
    dtype: torch.dtype
    device: torch.device
    names: tuple[str, ...]
    learned: tuple[str, ...]
    values: Tensor  # every coefficient, in the space's order

    def fail(self, rule: str, found: str, fix: str) -> FamilyContractError:
        return FamilyContractError(self.family.name, f"{type(self.family).__name__}.{rule}", found, fix)

    def coefficients(self, values: Tensor | None = None) -> dict[str, Tensor]:
        """Every coefficient as a 0-d tensor of its own (so a change to one is told apart)."""
        values = self.values if values is None else values
        return {n: values[i].clone() for i, n in enumerate(self.names)}

    def call_init(self, param: Tensor, grad: Tensor) -> dict[str, Tensor]:
        try:
            with host_reads_forbidden():
                state = self.family.init(param, grad, self.group)
        except HostReadError as err:
            raise self.fail("init", f"it reads a tensor value on the host ({err}){_where_in_user_code(err, self.family)}",
                            _HOST_FIX) from err
        except Exception as err:
            raise self.fail("init", f"it raised {type(err).__name__}: {err}{_where_in_user_code(err, self.family)} "
                            f"(on a parameter of shape {_shape(param)})",
                            "make init work on any parameter's shape and dtype: build the state from "
                            "torch.zeros_like(param) and the like") from err
        if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
            raise self.fail("init", f"it returned {type(state).__name__}, not a dict of name -> tensor",
                            "return a dict, e.g. {'exp_avg': torch.zeros_like(param)} ({} for no state)")
        bad = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
        if bad:
            k, v = next(iter(bad.items()))
            raise self.fail("init", f"state[{k!r}] is {type(v).__name__}, not a tensor",
                            f"keep every buffer as a tensor (torch.zeros_like(param), torch.zeros((), ...)); "
                            f"the engine keeps the step count itself (the `step` argument of update)")
        for k, v in state.items():
            if v.device != param.device:
                raise self.fail("init", f"state[{k!r}] is on {v.device}, its parameter on {param.device}",
                                "make the state on the parameter's device (torch.zeros_like(param), device=param.device)")
        return dict(state)

    def call_update(self, grad: Tensor, param: Tensor, state: dict[str, Tensor], coefficients: Mapping[str, Tensor],
                    step: Tensor, *, check_inputs: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """``update`` once, its result's form checked; with ``check_inputs`` also no host read and no input changed."""
        inputs = {"grad": grad, "param": param, **{f"state[{k!r}]": v for k, v in state.items()},
                  **{f"coefficients[{k!r}]": v for k, v in coefficients.items()}, "step": step}
        before = {k: (v._version, v.detach().clone()) for k, v in inputs.items()} if check_inputs else {}
        guard = host_reads_forbidden() if check_inputs else contextlib.nullcontext()
        try:
            with guard:
                out = self.family.update(grad, param, dict(state), dict(coefficients), self.group, step)
        except HostReadError as err:
            raise self.fail("update", f"it reads a tensor value on the host ({err}){_where_in_user_code(err, self.family)}",
                            _HOST_FIX) from err
        except FamilyContractError:
            raise
        except Exception as err:
            odd = [f"{k} {_shape(v)}" for k, v in state.items() if v.shape != param.shape]
            hint = (f"; the state init returned has {', '.join(odd)}, not the parameter's shape {tuple(param.shape)}"
                    if odd else "")
            raise self.fail("update", f"it raised {type(err).__name__}: {err}{_where_in_user_code(err, self.family)} "
                            f"(parameter {_shape(param)}, state {_describe(state)}){hint}",
                            "check the shapes of the state init returns against the arithmetic in update"
                            if odd else "update must run on any parameter's shape, with coefficients that are 0-d "
                            "tensors or, on the elementwise path, tensors of the parameter's shape") from err
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            what = f"a {type(out).__name__}" + (f" of {len(out)} items" if isinstance(out, (tuple, list)) else "")
            if isinstance(out, Tensor):
                what = f"a Tensor {_shape(out)}"
            raise self.fail("update", f"it returned {what}, not the pair (delta, new_state)",
                            "return (delta, new_state): the parameter change (learning rate included) and a dict of "
                            "the new state ({} for no state)")
        delta, new_state = out
        for k, (version, value) in before.items():
            now = inputs[k]
            if now._version != version or not _same(now, value):
                raise self.fail("update", f"it changed its input {k} in place",
                                "write update with out-of-place ops (m = b1 * state['m'] + ..., not "
                                "state['m'].mul_(b1)): the engine differentiates it and replays it (forward mode, "
                                "unrolled, finite differences) from the same inputs")
        if not isinstance(delta, Tensor):
            raise self.fail("update", f"delta is {type(delta).__name__}, not a tensor",
                            "return delta as a tensor of the parameter's shape")
        if delta.shape != param.shape:
            raise self.fail("update", f"delta has shape {tuple(delta.shape)}, its parameter {tuple(param.shape)}; "
                            "a delta that only broadcasts would be added to every element",
                            "return a delta of exactly the parameter's shape (e.g. multiply a per-tensor scalar by "
                            "torch.ones_like(param), or reduce nothing you do not mean to)")
        if delta.dtype != param.dtype:
            raise self.fail("update", f"delta is {str(delta.dtype).removeprefix('torch.')}, its parameter "
                            f"{str(param.dtype).removeprefix('torch.')}",
                            "compute delta in the parameter's dtype (a torch.tensor(...) or torch.zeros(...) without "
                            "dtype= makes float32; use *_like(param) or dtype=param.dtype)")
        if not isinstance(new_state, Mapping):
            raise self.fail("update", f"new_state is {type(new_state).__name__}, not a dict",
                            "return the new state as a dict with init's keys")
        if set(new_state) != set(state):
            missing, extra = sorted(set(state) - set(new_state)), sorted(set(new_state) - set(state))
            found = "; ".join(s for s in (f"missing {missing}" if missing else "",
                                          f"not made by init {extra}" if extra else "") if s)
            raise self.fail("update", f"new_state's keys differ from init's ({found})",
                            "return every buffer init makes, and only those (an unchanged buffer as it came in)")
        for k, v in new_state.items():
            old = state[k]
            if not isinstance(v, Tensor) or v.shape != old.shape or v.dtype != old.dtype or v.device != old.device:
                raise self.fail("update", f"new_state[{k!r}] is {_shape(v)}, init made it {_shape(old)}",
                                "keep each buffer's shape and dtype from step to step (the engine stores them in "
                                "place, and a flat buffer would spread a wrong shape silently)")
        return delta, dict(new_state)


_HOST_FIX = ("write the rule in tensor ops only: torch.where(c > 0.5, a, b) instead of `if c > 0.5:`, and "
             "coefficient tensors in the arithmetic instead of float(c) or c.item(); a read on the host "
             "synchronises every step with the device, and a compiled or differentiated rule would see a constant "
             "(a hyper-gradient of 0)")


def _same(a: Tensor, b: Tensor) -> bool:
    a = a.detach()
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _describe(state: Mapping[str, Tensor]) -> str:
    return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in state.items()) + "}"


def probe_tensors(shape: tuple[int, ...], dtype: torch.dtype, device, seed: int) -> tuple[Tensor, Tensor]:
    """A parameter and a gradient for a probe: no zeros, no ties, signs mixed."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    param = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).reshape(shape)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64).reshape(shape)
    grad = sign * (torch.rand(n, generator=gen, dtype=torch.float64) + 0.25).reshape(shape)
    return param.to(dtype=dtype, device=device), grad.to(dtype=dtype, device=device)


def contract_probe(family, group: Mapping[str, Any], dtype: torch.dtype, device, values: Tensor,
                   learned: Sequence[str], through_state: bool = False) -> bool:
    """Try ``family``'s rule on a few elements; raise where it breaks the contract.

    Checks: ``init`` returns a dict of tensors on the parameter's device; ``update`` returns
    ``(delta, new_state)``, delta of the parameter's shape and dtype, the new state with init's
    keys, shapes and dtypes; it changes none of its inputs and reads no tensor on the host; each
    learned coefficient reaches delta differentiably (or, with ``through_state``, the new state); and with ``elementwise = True``, coordinate i of delta and of the
    state depends on coordinate i of every input only, whatever the parameter's shape.

    Args:
        family: the family.
        group: a param group's hyperparameters (``"params"`` is ignored).
        dtype: the rule's precision (the group's compute dtype).
        device: the group's device.
        values: every coefficient's value, in the space's order (1-d).
        learned: the coefficients the optimizer learns.
        through_state: the hyper-gradient follows the coefficients through the state
            (``HyperOptimizer.through_state``: ``Forward``, ``Unrolled``).

    Returns:
        Whether reverse mode through the rule gives NaN at coordinates whose gradient is always
        0 (``sqrt(v)`` at v = 0): the unrolled mode then hands the coefficients to the rule per
        coordinate, to set those to 0 (`_nan_at_zero_gradient`).

    Raises:
        FamilyContractError: the first break found.
    """
    device = torch.device(device)
    hp = {k: v for k, v in group.items() if k != "params"}
    names = tuple(family.space.names)
    coef = values.detach().to(device=device, dtype=dtype if dtype.is_floating_point else torch.float64)
    coef_dtype = torch.promote_types(coef.dtype, torch.float32)
    probe = _Probe(family, hp, dtype, device, names, tuple(learned), coef.to(coef_dtype))
    param, grad1 = probe_tensors((2, 3), dtype, device, seed=1)
    _, grad2 = probe_tensors((2, 3), dtype, device, seed=2)
    one = torch.ones((), dtype=coef_dtype, device=device)
    state0 = probe.call_init(param, grad1)
    delta1, state1 = probe.call_update(grad1, param, state0, probe.coefficients(), one)
    probe.call_update(grad2, param + delta1, state1, probe.coefficients(), one + 1)
    _reaches(probe, grad2, param + delta1, state1, one + 1, through_state)
    if family.elementwise:
        interior = _interior(family, probe.values)
        _elementwise(probe, grad2, param + delta1, state1, one + 1, interior)
    return _nan_at_zero_gradient(probe, param, grad1, grad2, one)


def check_sharding(family, group: Mapping[str, Any]) -> None:
    """Refuse a rule that mixes coordinates on a parameter split across processes (FSDP2).

    The paths run a sharded parameter's rule on its local shard, which is exact only when
    coordinate i of Δ depends on coordinate i alone (``elementwise``); a norm or a mean over the
    tensor would be taken over one shard, and every number would be quietly wrong.
    """
    if family.elementwise:
        return
    for i, p in enumerate(group["params"]):
        key = shard_key(p)
        if key is not None and any(key[0].size(d) > 1 for d in key[1]):
            mesh, dims = key
            ways = math.prod(mesh.size(d) for d in dims)
            raise FamilyContractError(
                family.name, type(family).__name__,
                f"its rule mixes coordinates (elementwise = False), and parameter {i} of shape {tuple(p.shape)} is "
                f"sharded {ways} ways (FSDP2): update would see one shard of it, not the tensor",
                "shard nothing (DDP: a replica per process), or write a rule that is elementwise and set "
                "elementwise = True")


def probe_group(family, group: Mapping[str, Any], values: Tensor, learned: Sequence[str],
                through_state: bool) -> bool:
    """``contract_probe`` in each precision and device of param group ``group``'s parameters.

    ``values``: every coefficient's value (1-d; the first group's row with coefficients per
    group). Returns whether reverse mode through the rule gives NaN at coordinates whose
    gradient is always 0, in any of them.
    """
    check_sharding(family, group)
    kinds = {(compute_dtype(local(p).dtype), local(p).device) for p in group["params"]}
    nan = False
    for dtype, device in sorted(kinds, key=str):
        nan = contract_probe(family, group, dtype, device, values, learned, through_state) or nan
    return nan


def _nan_at_zero_gradient(probe: _Probe, param, grad1, grad2, one) -> bool:
    """Whether reverse mode through the rule gives NaN at coordinates whose gradient is always 0.

    ``sqrt(v)`` there has an infinite derivative times a cotangent or a ∂v/∂c of 0. The engine's
    tangents are cleaned of it on every path (``metaopt.types.defined_tangent``); the unrolled
    mode, whose reverse pass runs through the rule into the gradients and the state as well as
    the coefficients, needs to know beforehand (``metaopt.hyper.unrolled``). Asked at the
    coefficients' values and inside their boxes, of every input's cotangent.
    """
    if not probe.learned:
        return False
    dead = torch.zeros_like(grad1)
    dead.reshape(-1)[:3] = 1.0
    g1 = grad1 * dead
    for values in (probe.values, _interior(probe.family, probe.values)):
        with torch.enable_grad():
            coefficients = probe.coefficients(values)
            leaves = [coefficients[n].requires_grad_() for n in probe.learned]
            state = probe.call_init(param, g1)
            delta, state = probe.call_update(g1, param, state, coefficients, one, check_inputs=False)
            inputs = [(grad2 * dead).requires_grad_(), (param + delta.detach()).requires_grad_()]
            state = {k: v.detach().requires_grad_() for k, v in state.items()}
            out, new_state = probe.call_update(inputs[0], inputs[1], state, coefficients, one + 1,
                                               check_inputs=False)
            outputs = [o for o in (out, *new_state.values()) if o.requires_grad]
            if not outputs:
                continue
            grads = torch.autograd.grad([o.sum() for o in outputs], [*leaves, *inputs, *state.values()],
                                        allow_unused=True)
        if any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
            return True
    return False


def _interior(family, values: Tensor) -> Tensor:
    """The coefficients moved off their boxes' edges, where a degenerate value could hide a term."""
    out = values.clone()
    for i, c in enumerate(family.space.root.values()):
        if c.high > c.low:
            out[i] = c.low + 0.37 * (c.high - c.low)
    return out


def _reaches(probe: _Probe, grad, param, state, step, through_state: bool) -> None:
    """Each learned coefficient reaches delta (or, ``through_state``, the state) differentiably."""
    if not probe.learned:
        return
    with torch.enable_grad():
        coefficients = probe.coefficients()
        leaves = [coefficients[n].requires_grad_() for n in probe.learned]
        delta, new_state = probe.call_update(grad, param, state, coefficients, step, check_inputs=False)

        def reached(outputs) -> list[bool]:
            outputs = [o for o in outputs if o.requires_grad]
            if not outputs:
                return [False] * len(leaves)
            grads = torch.autograd.grad([o.sum() for o in outputs], leaves, allow_unused=True, retain_graph=True)
            return [g is not None for g in grads]  # None: not in the graph (a 0 may still be reached)

        in_delta = reached([delta])
        in_state = reached(list(new_state.values()))
    for name, to_delta, to_state in zip(probe.learned, in_delta, in_state):
        if to_delta or (to_state and through_state):
            continue
        if to_state:
            raise probe.fail(
                "update", f"the learned coefficient {name!r} reaches only the new state, not delta: its one-step "
                "hyper-gradient ⟨g, ∂delta/∂c⟩ is 0 at every step",
                "learn it with metaopt.Forward(...) (its tangents go through the state) or Unrolled, or keep it fixed "
                "(Coefficient(..., learned=False))")
        raise probe.fail(
            "update", f"the learned coefficient {name!r} does not reach delta differentiably: update drops it "
            "(.detach(), float(c), torch.tensor(c), a Python branch on it) or does not use it, so its hyper-gradient "
            "would be 0 on the compiled path, in forward mode and unrolled",
            f"use coefficients[{name!r}] in torch ops (torch.where for a branch); if the rule does not depend on it, "
            "keep it fixed: Coefficient(..., learned=False)")


def _elementwise(probe: _Probe, grad, param, state, step, values: Tensor) -> None:
    """``elementwise = True`` holds: no coordinate of delta or the state sees another's inputs, at any shape."""
    fam = type(probe.family).__name__
    fix = ("set elementwise = False (the engine then uses forward mode, exact for any rule), or make the rule "
           "per coordinate")
    coef = probe.coefficients(values)
    shaped = {k: v for k, v in state.items() if v.shape == param.shape}
    # 1. coordinate i of every output depends on coordinate i of every input only (a Jacobian on a
    #    3-element slice; the learned coefficients as full-size leaves, as the generic path feeds them)
    n = 3
    g3, p3 = grad.reshape(-1)[:n].clone(), param.reshape(-1)[:n].clone()
    s3 = {k: v.reshape(-1)[:n].clone() for k, v in shaped.items()}
    if len(s3) == len(state):  # per-tensor buffers (a norm, a count) cannot be sliced
        with torch.enable_grad():
            leaves = {"grad": g3.requires_grad_(), "param": p3.requires_grad_(),
                      **{f"state[{k!r}]": v.requires_grad_() for k, v in s3.items()}}
            full = {k: torch.empty_like(p3).copy_(coef[k]).requires_grad_() for k in probe.learned}
            leaves.update({f"coefficient {k!r}": v for k, v in full.items()})
            c3 = {**coef, **full}
            delta, new_state = probe.call_update(g3, p3, {k: s3[k] for k in state}, c3, step, check_inputs=False)
            outs = {"delta": delta, **{f"new_state[{k!r}]": v for k, v in new_state.items()}}
            names, tensors = list(leaves), list(leaves.values())
            for out_name, out in outs.items():
                if not out.requires_grad:
                    continue
                for i in range(n):
                    grads = torch.autograd.grad(out.reshape(-1)[i], tensors, allow_unused=True, retain_graph=True)
                    for in_name, gi in zip(names, grads):
                        if gi is None:
                            continue
                        off = torch.cat([gi[:i], gi[i + 1:]])
                        # NaN is no evidence of coupling: the zero cotangent of another coordinate
                        # times an elementwise op's undefined slope there (sqrt or log of a negative)
                        coupled = (off != 0) & ~off.isnan()
                        if bool(coupled.any()):
                            j = [x for x in range(n) if x != i][int(coupled.to(torch.int8).argmax())]
                            raise probe.fail(
                                "elementwise", f"{fam}.elementwise is True, but {out_name}[{i}] depends on "
                                f"{in_name}[{j}] (∂/∂ = {off[int(coupled.to(torch.int8).argmax())]:.3g}): the rule "
                                "mixes coordinates (a norm, a mean, a reduction over the tensor), and the engine's "
                                "one reverse pass and flat buckets would give wrong hyper-gradients", fix)
    # 2. the same numbers for 0-d and full-size coefficients, for the parameter's shape and flat,
    #    and for a slice of it: the fast paths concatenate a group's parameters into one vector
    base_delta, base_state = probe.call_update(grad, param, state, coef, step, check_inputs=False)
    full = {k: torch.empty_like(param).copy_(v) for k, v in coef.items()}
    tries = {"coefficients given as tensors of the parameter's shape": (grad, param, state, full, None)}
    if len(shaped) == len(state):
        flat = {k: v.reshape(-1) for k, v in state.items()}
        tries["the parameter flattened to 1-d"] = (grad.reshape(-1), param.reshape(-1), flat, coef, "flat")
        tries["the first 3 of its 6 elements alone"] = (
            grad.reshape(-1)[:3], param.reshape(-1)[:3], {k: v[:3] for k, v in flat.items()}, coef, "slice")
    tol = 1e-10 if probe.dtype == torch.float64 else 1e-5
    for what, (g, p, s, c, kind) in tries.items():
        d, st = probe.call_update(g, p, s, c, step, check_inputs=False)
        want_d = base_delta.reshape(-1)[:3] if kind == "slice" else base_delta.reshape(d.shape)
        pairs = [("delta", d, want_d)] + [
            (f"new_state[{k!r}]", st[k], (base_state[k].reshape(-1)[:3] if kind == "slice" else base_state[k].reshape(st[k].shape)))
            for k in st]
        for label, got, want in pairs:
            if got.shape != want.shape or not bool(torch.isclose(got, want, rtol=tol, atol=tol * 1e-3, equal_nan=True).all()):
                raise probe.fail(
                    "elementwise", f"{fam}.elementwise is True, but {label} changes with {what}: the rule depends on "
                    "the tensor's shape or size, or reduces over the coefficients (sum, mean), which an elementwise "
                    "rule may not, since the engine runs it on flat vectors of a whole param group", fix)


def first_step(family, group: Mapping[str, Any], param: Tensor, coef_dtype: torch.dtype) -> None:
    """The contract at a parameter's real shape and dtype: init's state and update's result.

    On meta tensors, which have shapes and dtypes but no storage: nothing is computed and nothing
    is read. Where the rule cannot run on meta tensors (an op without a meta kernel), it is tried
    on real tensors of the parameter's shape instead.

    Args:
        family: the family.
        group: the parameter's param group.
        param: the parameter as the rule sees it (its local shard, in the compute precision);
            only its shape, dtype and device are used.
        coef_dtype: the coefficients' (and step counts') dtype.

    Raises:
        FamilyContractError: delta or the new state of the wrong shape or dtype, or the rule
            raising, at this shape.
    """
    hp = {k: v for k, v in group.items() if k != "params"}
    names = tuple(family.space.names)
    meta = torch.device("meta")
    probe = _Probe(family, hp, param.dtype, meta, names, (), torch.zeros(len(names), dtype=coef_dtype, device=meta))
    try:
        _first_step_on(probe, param.shape, param.dtype, meta, coef_dtype)
    except FamilyContractError as err:
        cause = err.__cause__
        if not isinstance(cause, (NotImplementedError, RuntimeError)) or "meta" not in str(cause).lower():
            raise
        values = family.space.tensors(coef_dtype, param.device)[0]
        real = _Probe(family, hp, param.dtype, param.device, names, (), values)
        _first_step_on(real, param.shape, param.dtype, param.device, coef_dtype)


def _first_step_on(probe: _Probe, shape, dtype, device, coef_dtype) -> None:
    p = torch.zeros(shape, dtype=dtype, device=device)
    g = torch.zeros(shape, dtype=dtype, device=device)
    state = probe.call_init(p, g)
    step = torch.ones((), dtype=coef_dtype, device=device)
    probe.call_update(g, p, state, probe.coefficients(), step, check_inputs=False)
