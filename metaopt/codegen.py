"""A family's ``update``, traced with its derived tangents and written as a C rule for the native driver.

Any elementwise family then runs as MADA's hand-written kernel does (``metaopt.kernels``): one
threaded pass for the hyper-gradient's dot products and one that reads each element's gradient,
parameter and state once and writes the parameter, the state and the tangents, with nothing
gathered and no graph compiler.

How: ``trace`` runs ``metaopt.paths.rules.derived_rule`` (the family's ``update`` and one
``torch.func.jvp`` per learned coefficient, exactly what the compiled path runs) under
``make_fx`` on fake tensors, decomposed to core aten ops. ``emit`` then writes one C statement
per node of that graph. A node is a *scalar* (0-d: the coefficients, the step count, lr, the
constants and what is computed from them alone) or a *vector* (the element's). Scalars are
computed once per piece, before the loop; vectors inside ``#pragma omp simd``.

The trace proves elementwise-ness rather than trusting ``Family.elementwise``: only pointwise
ops (``_POINTWISE``) and shape ops that keep one element per coordinate are written; anything
else (a reduction, indexing, randomness, a host read such as ``.item()``) raises ``NotDerivable``
naming the op, and the engine takes the compiled path instead.

Semantics follow torch's CPU kernels: each op computes in its type-promoted dtype (a float32
vector times a float64 0-d tensor computes in float32, as TensorIterator does), Python
constants round to that dtype first, ``pow`` with the exponents torch special-cases (2, 3,
0.5, -0.5, -1, -2) is the same multiplications and roots, ``maximum``/``minimum``/``clamp``
propagate NaN, ``sign`` of NaN is 0. Built without ``-ffast-math`` and without FMA contraction
(``metaopt.kernels``), each elementary operation rounds as torch's does; transcendental
functions come from libm, within an ulp of torch's.

That holds for the update and the new state. The tangents, which only the hyper-gradient reads,
are cheaper: each jvp is traced with a tangent for its coefficient alone, so that the terms of
the other inputs' (zero) tangents are never written, as the generic path's reverse mode never
computes them; a division that feeds only tangents multiplies by the divisor's reciprocal, taken
once for every coefficient (an ulp or so from the quotient, and the same 0, ±inf and NaN).

``lr``, the coefficients and the step count are read from memory on every step, and so are the
family's float hyperparameters (``eps``, ``weight_decay`` …): one kernel serves every group and
every value a schedule gives them. They enter the trace as float64 0-d tensors, so that
arithmetic among them is in double as Python's; a rule that branches on one in Python cannot be
traced that way, and then gets them as constants in the source (as ``torch.compile`` specializes
on Python floats), one kernel per set of values. Other hyperparameters (ints, bools) are always
constants.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx

from . import kernels

Tensor = torch.Tensor

#: libmvec for the libm calls; no partial-redundancy elimination: gcc's PRE makes a value that
#: two selects share conditional, and the loop then stays scalar ("control flow in loop")
BUILD_FLAGS = (*kernels.VECTOR_MATH_FLAGS, "-fno-tree-pre")
_LOCAL = re.compile(r"\bv\d+\b")  # a C local of the written rule
#: the length the rule is traced at; any shape other than () or (N,) in the trace is refused
N = 8
_C_TYPE = {torch.float32: "float", torch.float64: "double", torch.bool: "int", torch.int64: "int64_t",
           torch.int32: "int32_t"}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


class NotDerivable(Exception):
    """The family's rule cannot be written as C here; the message says which op or value, and why."""


@dataclass(frozen=True)
class WrittenSource:
    """A generated C rule: its text and the hyperparameters it holds as constants (the rest it reads)."""

    text: str
    constants: tuple[str, ...]


# -- C forms of the pointwise ops ----------------------------------------------------------
def _lit(value, dtype: torch.dtype) -> str:
    """A Python number as a C literal of ``dtype``, rounded as torch rounds a scalar into that dtype."""
    if dtype == torch.bool:
        return "1" if value else "0"
    if not dtype.is_floating_point:
        return f"(({_C_TYPE[dtype]}){int(value)})"
    value = float(value)
    if math.isnan(value):
        text = "NAN"
    elif math.isinf(value):
        text = "INFINITY" if value > 0 else "(-INFINITY)"
    else:
        text = value.hex()
    return f"(({_C_TYPE[dtype]}){text})"


def _binary(op: str) -> Callable:
    return lambda a, b: f"({a} {op} {b})"


_FLOAT_FN = {  # libm's name per dtype: (float32, float64)
    "sqrt": ("sqrtf", "sqrt"), "exp": ("expf", "exp"), "log": ("logf", "log"), "log1p": ("log1pf", "log1p"),
    "expm1": ("expm1f", "expm1"), "tanh": ("tanhf", "tanh"), "sin": ("sinf", "sin"), "cos": ("cosf", "cos"),
    "abs": ("fabsf", "fabs"), "floor": ("floorf", "floor"), "ceil": ("ceilf", "ceil"), "trunc": ("truncf", "trunc"),
    "round": ("nearbyintf", "nearbyint"), "pow": ("powf", "pow"), "erf": ("erff", "erf"), "atan": ("atanf", "atan"),
    "log2": ("log2f", "log2"), "exp2": ("exp2f", "exp2"), "fmod": ("fmodf", "fmod"), "atan2": ("atan2f", "atan2"),
}


#: libm functions glibc's libmvec has vector forms of: since 2.22, and since 2.35
_MVEC_222 = {"sin", "cos", "exp", "log", "pow"}
_MVEC_235 = {"atan", "atan2", "erf", "exp2", "expm1", "log1p", "log2", "tanh"}


def _fn(name: str, dtype: torch.dtype, used: set[str]) -> str:
    """The libm function ``name`` for ``dtype``, noted in ``used``."""
    if dtype not in _SUFFIX:
        raise NotDerivable(f"{name} of a {dtype} value")
    used.add(name)
    return _FLOAT_FN[name][dtype == torch.float64]


def _vector_math_declarations(used: set[str]) -> str:
    """The libm functions the rule calls, declared with their libmvec vector forms (METAOPT_MVEC builds)."""
    lines = ["#if defined(METAOPT_MVEC) && defined(__GLIBC__) && (defined(__x86_64__) || defined(__aarch64__))",
             '#define METAOPT_SIMD __attribute__((__simd__("notinbranch")))']
    for names, guard in ((_MVEC_222, None), (_MVEC_235, "__GLIBC__ > 2 || __GLIBC_MINOR__ >= 35")):
        chosen = sorted(used & names)
        if not chosen:
            continue
        if guard:
            lines.append(f"#if {guard}")
        for n in chosen:
            arity = 2 if n in ("pow", "atan2") else 1
            for c_type, c_name in (("float", _FLOAT_FN[n][0]), ("double", _FLOAT_FN[n][1])):
                lines.append(f"METAOPT_SIMD {c_type} {c_name}({', '.join([c_type] * arity)});")
        if guard:
            lines.append("#endif")
    lines.append("#endif")
    return "\n".join(lines)


def _nan_max(a: str, b: str, greater: bool) -> str:
    """torch.maximum/minimum: NaN if either is NaN."""
    op = ">" if greater else "<"
    return f"(({a} != {a}) ? {a} : (({b} != {b}) ? {b} : (({a} {op} {b}) ? {a} : {b})))"


def _pow(a: str, b: Any, dtype: torch.dtype, exponent_is_scalar: bool, used: set[str]) -> str:
    """torch.pow: the exponents its CPU kernel special-cases as multiplications and roots, else libm."""
    if exponent_is_scalar and isinstance(b, (int, float)) and dtype.is_floating_point:
        e = float(b)
        one = _lit(1, dtype)
        special = {2.0: f"({a} * {a})", 3.0: f"({a} * {a} * {a})", 0.5: f"{_fn('sqrt', dtype, used)}({a})",
                   -0.5: f"({one} / {_fn('sqrt', dtype, used)}({a}))", -1.0: f"({one} / {a})",
                   -2.0: f"({one} / ({a} * {a}))", 1.0: f"({a})"}
        if e in special:
            return special[e]
        return f"{_fn('pow', dtype, used)}({a}, {_lit(e, dtype)})"
    return f"{_fn('pow', dtype, used)}({a}, {b if isinstance(b, str) else _lit(b, dtype)})"


#: op name -> its C form of the operands (each already in the op's compute dtype)
_ARITH: dict[str, Callable[..., str]] = {
    "add": _binary("+"), "sub": _binary("-"), "mul": _binary("*"), "div": _binary("/"),
    "neg": lambda a: f"(-{a})", "reciprocal": lambda a: f"(1 / {a})",
}
_COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_UNARY_FN = ("sqrt", "exp", "log", "log1p", "expm1", "tanh", "sin", "cos", "abs", "floor", "ceil", "trunc", "round",
             "erf", "atan", "log2", "exp2")
#: shape ops that keep one value per coordinate (their input's, possibly broadcast from a 0-d one):
#: views share their input's memory (an in-place op on one changes the others), copies do not
_VIEWS = ("alias", "view", "reshape", "_unsafe_view", "expand", "detach", "squeeze", "unsqueeze", "_reshape_alias")
_IDENTITY = _VIEWS + ("clone", "lift_fresh_copy", "contiguous", "expand_copy", "view_copy", "alias_copy")
#: ops written as one C expression rather than decomposed: ``nan_to_num`` (``defined_tangent``
#: cleans each tangent with it) decomposes into a select per replaced value, ±inf replaced by itself
_WHOLE = (torch.ops.aten.nan_to_num,)
#: checks make_fx leaves in a trace of jvp (their results are not tensors, and nothing reads them)
_IGNORED = ("is_same_size", "_has_same_storage_numel")


def _dtype(node: torch.fx.Node) -> torch.dtype:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise NotDerivable(f"{node.format_node()} does not give a tensor")
    return val.dtype


def _example(arg):
    """A stand-in for type promotion: an empty tensor of the node's rank category, or the Python number."""
    if isinstance(arg, torch.fx.Node):
        val = arg.meta["val"]
        return torch.empty(tuple(val.shape), dtype=val.dtype)
    return arg


def _compute_dtype(args) -> torch.dtype:
    tensors = [a for a in args if isinstance(a, torch.fx.Node)]
    if not tensors:
        raise NotDerivable("an op on Python numbers alone")
    probe = _example(tensors[0])
    for a in args:
        if a is tensors[0]:
            continue
        probe = torch.empty(tuple(probe.shape), dtype=torch.result_type(probe, _example(a)))
    return probe.dtype


# -- tracing --------------------------------------------------------------------------------
@functools.cache
def _decompositions() -> dict:
    """The core aten decompositions of torch, but for the ops written whole (fewer C statements)."""
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions())
    for op in _WHOLE:
        for overload in op.overloads():
            table.pop(getattr(op, overload), None)
    return table


def trace(family, names: Sequence[str], learned: Sequence[str], constants: Mapping[str, Any],
          read: Sequence[str], dtype: torch.dtype, state_keys: Sequence[str]) -> torch.fx.GraphModule:
    """``derived_rule`` as a graph of core aten ops over fake tensors of length N.

    Inputs: grad, param, the state buffers (``state_keys``' order), one 0-d tensor per
    coefficient (``names``' order), step, lr, and a float64 0-d tensor per hyperparameter in
    ``read``; ``constants``: the other hyperparameters, as Python values. Outputs: Δ, the new
    state (``state_keys``' order, None where the rule leaves a buffer), the tangents
    (``learned``'s order).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from .paths.rules import RuleSpec, derived_rule

    names, learned, state_keys = tuple(names), tuple(learned), tuple(state_keys)
    spec = RuleSpec(family, names, learned, tuple(names.index(n) for n in learned))
    nstate = len(state_keys)

    ncoef = len(names)

    def rule(grad, param, *rest):
        states, coef = rest[:nstate], list(rest[nstate:nstate + ncoef])
        step, lr, *values = rest[nstate + ncoef:]
        group = {**constants, **dict(zip(read, values)), "lr": lr}
        delta, new_state, tangents = derived_rule(spec, grad, param, dict(zip(state_keys, states)), coef, group, step,
                                                   zero_tangents=False)
        unknown = set(new_state) - set(state_keys)
        if unknown:
            raise NotDerivable(f"update returns state {sorted(unknown)} that init did not make")
        return (delta, *(new_state.get(k) for k in state_keys), *tangents)

    inputs = [torch.zeros(N, dtype=dtype) for _ in range(2 + nstate)]
    inputs += [torch.zeros((), dtype=dtype) for _ in names] + [torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)]
    inputs += [torch.zeros((), dtype=torch.float64) for _ in read]
    try:
        # not under torch.func.functionalize: it has no rule for custom autograd Functions (a
        # family's safe square root); the writer follows in-place ops instead (_Writer.node)
        graph = make_fx(rule, decomposition_table=_decompositions(), tracing_mode="fake")(*inputs)
    except NotDerivable:
        raise
    except Exception as err:  # noqa: BLE001 - a host read, data-dependent control flow, an unsupported op
        raise NotDerivable(f"tracing update failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
    graph.graph.eliminate_dead_code()
    return graph


# -- writing C ------------------------------------------------------------------------------
class _Writer:
    """One dtype's rule function from one traced graph."""

    def __init__(self, graph: torch.fx.GraphModule, dtype: torch.dtype, nstate: int, ncoef: int,
                 hp_slots: Sequence[int], exact: set[torch.fx.Node] | None = None) -> None:
        self.graph, self.dtype = graph, dtype
        self.t = _C_TYPE[dtype]
        #: the slots in the driver's ``hp`` array of lr and of the hyperparameters read at run time
        self.nstate, self.ncoef, self.hp_slots = nstate, ncoef, tuple(hp_slots)
        self.expr: dict[torch.fx.Node, str] = {}
        self.vector: dict[torch.fx.Node, bool] = {}
        self.used: set[str] = set()  # the libm functions it calls
        self.views: dict[torch.fx.Node, set] = {}  # node -> the nodes that share its memory (itself included)
        self.locals = 0  # the C locals named so far
        #: (C type, expression) -> the local already holding it. Every local is const and every
        #: expression pure, so one text is one value: update's jvp runs the primal again for each
        #: learned coefficient, and those repeats (and their scalars) are computed once
        self.named: dict[tuple[str, str], str] = {}
        #: the nodes the update and the new state are computed from, each rounded as torch's op
        #: rounds; the others feed only the tangents, which divide by a reciprocal (``pure``).
        #: None: every node exact (the first pass of ``write_rule``, which finds them)
        self.exact = exact
        self.deps: dict[str, set[str]] = {}  # local -> the locals its expression reads
        self.pre: list[str] = []  # once per piece
        self.body: list[str] = []  # once per element

    def operand(self, arg, dtype: torch.dtype) -> str:
        """``arg`` (a node or a Python number) as a C expression of ``dtype``."""
        if isinstance(arg, torch.fx.Node):
            if arg not in self.expr:
                raise NotDerivable(f"{arg.format_node()} is read but has no C value")
            e = self.expr[arg]
            return e if _dtype(arg) == dtype else f"(({_C_TYPE[dtype]}){e})"
        if isinstance(arg, (bool, int, float)):
            return _lit(arg, dtype)
        raise NotDerivable(f"an operand {arg!r} that is neither a tensor nor a number")

    def define(self, node, dtype: torch.dtype, expr: str, vector: bool) -> None:
        self.expr[node], self.vector[node] = self.temp(dtype, expr, vector), vector

    def temp(self, dtype: torch.dtype, expr: str, vector: bool) -> str:
        """A local holding ``expr``: per element (``vector``) or once per piece; its name.

        An expression already held is not computed again: its local is returned.
        """
        key = (_C_TYPE[dtype], expr)
        if key in self.named:
            return self.named[key]
        self.locals += 1
        name = self.named[key] = f"v{self.locals}"
        self.deps[name] = set(_LOCAL.findall(expr))
        (self.body if vector else self.pre).append(f"const {_C_TYPE[dtype]} {name} = {expr};")
        return name

    def placeholders(self) -> None:
        nodes = [n for n in self.graph.graph.nodes if n.op == "placeholder"]
        # each element's inputs loaded once, at the top of the loop: selects then choose between
        # registers (a select of a load is a branch to gcc, and the loop stays scalar)
        for i, node in enumerate(nodes):
            if i < 2 + self.nstate:
                memory = "G[i]" if i == 0 else "P[i]" if i == 1 else f"S{i - 2}[i]"
                name = "g" if i == 0 else "p" if i == 1 else f"s{i - 2}"
                self.body.append(f"const {self.t} {name} = {memory};")
                self.expr[node], self.vector[node] = name, True
            # the 0-d inputs read once per piece, into locals: read through pc inside the loop, gcc
            # cannot tell them from the stores and reloads them every element (the loop stays scalar)
            elif i < 2 + self.nstate + self.ncoef:
                self.define(node, self.dtype, f"pc->coef[{i - 2 - self.nstate}]", False)
            elif i == 2 + self.nstate + self.ncoef:
                self.define(node, self.dtype, "pc->step", False)
            else:  # lr in the parameters' dtype, as the compiled path hands it; the others as doubles
                slot = self.hp_slots[i - 3 - self.nstate - self.ncoef]
                self.define(node, _dtype(node), f"(({_C_TYPE[_dtype(node)]})pc->hp[{slot}])", False)

    def node(self, node) -> None:
        target = node.target
        name = target.overloadpacket.__name__ if hasattr(target, "overloadpacket") else str(target)
        if name in _IGNORED:
            return
        if name.endswith("_") and not name.startswith("_"):  # in place: a value for the mutated tensor
            self.in_place(node, name[:-1])
            return
        self.pure(node, name)
        if name in _VIEWS and isinstance(node.args[0], torch.fx.Node):
            group = self.views.setdefault(node.args[0], {node.args[0]})
            group.add(node)
            self.views[node] = group

    def in_place(self, node, name: str) -> None:
        """``a.op_(...)``: the pure op's value, which from here on every view of ``a`` holds too."""
        target = node.args[0]
        if not isinstance(target, torch.fx.Node):
            raise NotDerivable(f"{name}_ on a Python number")
        self.pure(node, name)
        if _dtype(target) != _dtype(node) or tuple(target.meta["val"].shape) != tuple(node.meta["val"].shape):
            raise NotDerivable(f"{name}_ changes a tensor's dtype or shape")
        for alias in self.views.get(target, {target}):
            self.expr[alias] = self.expr[node]
            self.vector[alias] = self.vector[alias] or self.vector[node]
        self.views[node] = self.views.get(target, {target}) | {node}

    def pure(self, node, name: str) -> None:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise NotDerivable(f"{name} gives {type(val).__name__}, not a tensor")
        if tuple(val.shape) not in ((), (N,)):
            raise NotDerivable(f"{name} makes a tensor of shape {tuple(val.shape)}: the rule is not elementwise "
                               "(each coordinate's update must depend on that coordinate alone)")
        out = val.dtype
        if out not in _C_TYPE:
            raise NotDerivable(f"{name} gives {out}")
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        vector = any(self.vector.get(a, False) for a in tensor_args) or (tuple(val.shape) == (N,) and not tensor_args)
        if any(self.vector.get(a, False) for a in tensor_args) and tuple(val.shape) != (N,):
            raise NotDerivable(f"{name} reduces the element values to one: the rule is not elementwise")
        args, kw = node.args, node.kwargs
        if name in _IDENTITY or name in ("_to_copy", "convert_element_type"):
            if isinstance(args[0], torch.fx.Node) and _dtype(args[0]) == out:  # the same value: no statement
                self.expr[node], self.vector[node] = self.expr[args[0]], self.vector[args[0]] or vector
            else:
                self.define(node, out, self.operand(args[0], out), vector)
            return
        if name == "copy":
            self.define(node, out, self.operand(args[1], out), vector)
            return
        if name in ("full", "full_like", "scalar_tensor", "fill", "zeros_like", "ones_like", "new_full", "zeros", "ones",
                    "new_zeros", "new_ones", "zero", "_efficientzerotensor"):
            value = {"zeros_like": 0, "ones_like": 1, "zeros": 0, "ones": 1, "new_zeros": 0, "new_ones": 1,
                     "zero": 0, "_efficientzerotensor": 0}.get(name)
            if value is None:
                value = args[0] if name == "scalar_tensor" else args[1] if name in ("full", "full_like", "fill") \
                    else args[2]
            if isinstance(value, torch.fx.Node):
                raise NotDerivable(f"{name} with a tensor value")
            self.define(node, out, _lit(value, out), False)
            return
        if name in _COMPARE:
            cd = _compute_dtype(args[:2])
            self.define(node, out, f"({self.operand(args[0], cd)} {_COMPARE[name]} {self.operand(args[1], cd)})", vector)
            return
        if name in ("isnan",):
            a = self.operand(args[0], _dtype(args[0]))
            self.define(node, out, f"({a} != {a})", vector)
            return
        if name in ("isinf",):
            a = self.operand(args[0], _dtype(args[0]))
            self.define(node, out, f"({_fn('abs', _dtype(args[0]), self.used)}({a}) == INFINITY)", vector)
            return
        if name in ("logical_not", "bitwise_not") and out == torch.bool:
            self.define(node, out, f"(!{self.operand(args[0], torch.bool)})", vector)
            return
        if name in ("logical_and", "logical_or", "bitwise_and", "bitwise_or", "logical_xor", "bitwise_xor") \
                and out == torch.bool:
            op = {"and": "&", "or": "|", "xor": "^"}[name.split("_")[1]]
            a, b = (f"({self.operand(x, torch.bool)} != 0)" for x in args[:2])
            self.define(node, out, f"({a} {op} {b})", vector)
            return
        if out == torch.bool and name in ("mul", "add"):  # torch: and, or
            a, b = (f"({self.operand(x, torch.bool)} != 0)" for x in args[:2])
            self.define(node, out, f"({a} {'&' if name == 'mul' else '|'} {b})", vector)
            return
        if not out.is_floating_point and name not in ("where",):
            raise NotDerivable(f"{name} on {out} values")
        if name == "where":
            self.define(node, out, f"({self.operand(args[0], torch.bool)} ? {self.operand(args[1], out)} : "
                                   f"{self.operand(args[2], out)})", vector)
            return
        if name == "div" and self.exact is not None and node not in self.exact and isinstance(args[1], torch.fx.Node) \
                and kw.get("rounding_mode") is None:
            # a tangent alone: by the divisor's reciprocal, taken once (update's jvp divides each
            # coefficient's tangent by the same denominators as the primal)
            inverse = self.temp(out, f"({_lit(1, out)} / {self.operand(args[1], out)})", self.vector[args[1]])
            self.define(node, out, f"({self.operand(args[0], out)} * {inverse})", vector)
            return
        if name in _ARITH:
            operands = [self.operand(a, out) for a in args[:2 if name in ("add", "sub", "mul", "div") else 1]]
            if name in ("add", "sub") and kw.get("alpha", 1) != 1:
                operands[1] = f"({_lit(kw['alpha'], out)} * {operands[1]})"
            if name == "div" and kw.get("rounding_mode") is not None:
                raise NotDerivable(f"div with rounding_mode={kw['rounding_mode']!r}")
            self.define(node, out, _ARITH[name](*operands), vector)
            return
        if name == "rsub":
            a, b = self.operand(args[0], out), self.operand(args[1], out)
            alpha = kw.get("alpha", 1)
            self.define(node, out, f"({b} - {a})" if alpha == 1 else f"({b} - {_lit(alpha, out)} * {a})", vector)
            return
        if name in _UNARY_FN:
            self.define(node, out, f"{_fn(name, out, self.used)}({self.operand(args[0], out)})", vector)
            return
        if name == "rsqrt":
            a = self.operand(args[0], out)
            self.define(node, out, f"({_lit(1, out)} / {_fn('sqrt', out, self.used)}({a}))", vector)
            return
        if name == "sigmoid":
            a = self.operand(args[0], out)
            self.define(node, out, f"({_lit(1, out)} / ({_lit(1, out)} + {_fn('exp', out, self.used)}(-{a})))", vector)
            return
        if name in ("sign", "sgn"):
            a = self.operand(args[0], out)
            self.define(node, out, f"(({_C_TYPE[out]})(({a} > 0) - ({a} < 0)))", vector)
            return
        if name == "nan_to_num":
            a = self.operand(args[0], out)
            info = torch.finfo(out)
            given = [*args[1:], None, None, None][:3]
            nan, posinf, neginf = (kw.get(k, v) for k, v in zip(("nan", "posinf", "neginf"), given))
            expr = a
            for value, default, test in ((neginf, info.min, f"{a} == -INFINITY"), (posinf, info.max, f"{a} == INFINITY")):
                value = default if value is None else value
                if value != (-math.inf if "-" in test else math.inf):  # ±inf for ±inf: the value itself
                    expr = f"(({test}) ? {_lit(value, out)} : {expr})"
            self.define(node, out, f"(({a} != {a}) ? {_lit(0.0 if nan is None else nan, out)} : {expr})", vector)
            return
        if name in ("maximum", "minimum", "fmax", "fmin"):
            a, b = self.operand(args[0], out), self.operand(args[1], out)
            if name in ("fmax", "fmin"):
                self.define(node, out, f"{'fmax' if name == 'fmax' else 'fmin'}{'f' if out == torch.float32 else ''}"
                                       f"({a}, {b})", vector)
            else:
                self.define(node, out, _nan_max(a, b, name == "maximum"), vector)
            return
        if name in ("clamp", "clamp_min", "clamp_max"):
            a = self.operand(args[0], out)
            lo = args[1] if name in ("clamp", "clamp_min") and len(args) > 1 else kw.get("min")
            hi = (args[2] if len(args) > 2 else kw.get("max")) if name == "clamp" else (
                args[1] if name == "clamp_max" else None)
            # torch.clamp is maximum, then minimum: NaN in the value or a bound gives NaN (each step
            # a statement of its own: nested, gcc did not if-convert the selects)
            expr = a
            if lo is not None:
                expr = self.temp(out, _nan_max(expr, self.operand(lo, out), True), vector)
            if hi is not None:
                expr = _nan_max(expr, self.operand(hi, out), False)
            self.define(node, out, expr, vector)
            return
        if name == "pow":
            base, exponent = args[0], args[1]
            scalar_exponent = not isinstance(exponent, torch.fx.Node)
            self.define(node, out, _pow(self.operand(base, out), exponent if scalar_exponent
                                        else self.operand(exponent, out), out, scalar_exponent, self.used), vector)
            return
        if name in ("fmod", "atan2"):
            self.define(node, out, f"{_fn(name, out, self.used)}({self.operand(args[0], out)}, {self.operand(args[1], out)})",
                        vector)
            return
        raise NotDerivable(f"torch.ops.aten.{name} has no C form here (only pointwise ops are written)")

    def write(self, suffix: str) -> str:
        self.placeholders()
        nodes = list(self.graph.graph.nodes)
        out_node = next((n for n in nodes if n.op == "output"), None)
        outputs = list(out_node.args[0])
        delta, new_state, tangents = outputs[0], outputs[1:1 + self.nstate], outputs[1 + self.nstate:]
        for node in nodes:
            if node.op == "call_function":
                self.node(node)
            elif node.op not in ("output", "placeholder"):
                raise NotDerivable(f"a graph node of kind {node.op}")
        stores = []
        pd = self.dtype
        if not isinstance(delta, torch.fx.Node) or _dtype(delta) not in _SUFFIX:
            raise NotDerivable("update's Δ is not a floating-point tensor")
        cd = _add_dtype(pd, delta)
        stores.append(f"P[i] = ({self.t})({self.operand_of_param(cd)} + {self.operand(delta, cd)});")
        for k, value in enumerate(new_state):
            if value is not None:
                stores.append(f"S{k}[i] = {self.operand(value, pd)};")
        self.exact_locals = self.closure(_LOCAL.findall(" ".join(stores)))
        for j, value in enumerate(tangents):
            stores.append(f"T{j}[i] = {self.operand(value, pd)};")
        t = self.t
        decl = [f"{t} *restrict P = pc->param;", f"const {t} *restrict G = pc->grad;"]
        decl += [f"{t} *restrict S{k} = pc->state[{k}];" for k in range(self.nstate)]
        decl += [f"{t} *restrict T{j} = pc->tangent[{j}];" for j in range(len(tangents))]
        lines = [f"static void metaopt_rule_{suffix}(const metaopt_piece_{suffix} *pc)", "{"]
        lines += ["    " + s for s in decl + self.pre]
        lines += ["    _Pragma(\"omp simd\")", "    for (int64_t i = 0; i < pc->n; ++i) {"]
        lines += ["        " + s for s in self.body + stores]
        lines += ["    }", "}"]
        return "\n".join(lines)

    def closure(self, names) -> set[str]:
        """``names`` and every local they are computed from."""
        seen: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.deps.get(name, ()))
        return seen

    def operand_of_param(self, dtype: torch.dtype) -> str:
        return "p" if dtype == self.dtype else f"(({_C_TYPE[dtype]})p)"


def _add_dtype(param_dtype: torch.dtype, delta) -> torch.dtype:
    val = delta.meta["val"]
    return torch.result_type(torch.empty(N, dtype=param_dtype), torch.empty(tuple(val.shape), dtype=val.dtype))


def derive_source(family, names: Sequence[str], learned: Sequence[str], hp: Mapping[str, Any],
                  state_keys: Sequence[str]) -> WrittenSource:
    """The C source of ``family``'s rule with the tangents of ``learned``, for float32 and float64.

    ``hp``: every hyperparameter of the group. Its float ones other than lr are read at run
    time where the rule can be traced so, else they are constants (module docstring).

    Raises:
        NotDerivable: the rule is not pointwise, reads a value on the host, or uses an op
            that has no C form here; the message names it.
    """
    fields = list(family.hyperparameters.model_fields)
    floats = tuple(f for f in fields if f != "lr" and family.hyperparameters.model_fields[f].annotation is float)
    try:
        return _source(family, names, learned, hp, state_keys, fields, floats)
    except NotDerivable:
        if not floats:
            raise
        return _source(family, names, learned, hp, state_keys, fields, ())


def _source(family, names, learned, hp, state_keys, fields, read) -> WrittenSource:
    constants = {k: hp[k] for k in fields if k != "lr" and k not in read}
    slots = [fields.index("lr"), *(fields.index(k) for k in read)]
    used: set[str] = set()
    parts = [f"/* generated by metaopt.codegen from {type(family).__module__}.{type(family).__qualname__}.update:"
             f" coefficients {tuple(names)}, tangents of {tuple(learned)}, state {tuple(state_keys)}, hyperparameters"
             f" read at run time {('lr', *read)}, constants {constants} */"]
    for dtype, suffix in _SUFFIX.items():
        graph = trace(family, names, learned, constants, read, dtype, state_keys)
        parts.append(write_rule(graph, dtype, suffix, len(state_keys), len(names), slots, used))
    parts.insert(1, _vector_math_declarations(used))
    return WrittenSource("\n\n".join(parts) + "\n", tuple(constants))


def write_rule(graph, dtype: torch.dtype, suffix: str, nstate: int, ncoef: int, slots: Sequence[int],
               used: set[str]) -> str:
    """One dtype's C rule from ``graph``; the libm functions it calls are added to ``used``.

    Written twice: the first time every op rounds as torch's, and tells which values the update
    and the new state are computed from (each learned coefficient's jvp computes them again, and
    only the written text shows the copies to be one value). The second time, a division that
    feeds the tangents alone multiplies by its divisor's reciprocal, taken once for all of them.
    """
    first = _Writer(graph, dtype, nstate, ncoef, slots)
    first.write(suffix)
    exact = {node for node, expr in first.expr.items() if expr in first.exact_locals}
    writer = _Writer(graph, dtype, nstate, ncoef, slots, exact)
    text = writer.write(suffix)
    used |= writer.used
    return text


def state_keys_of(family, hp: Mapping[str, Any], dtype: torch.dtype) -> tuple[str, ...]:
    """The family's state buffers, from ``init`` on an example parameter; each must be one per coordinate.

    Raises:
        NotDerivable: a buffer of another shape or dtype than the parameter's.
    """
    param, grad = torch.zeros(N, dtype=dtype), torch.zeros(N, dtype=dtype)
    state = family.init(param, grad, {**hp, "lr": torch.zeros((), dtype=dtype)})
    for k, v in state.items():
        if not torch.is_tensor(v) or tuple(v.shape) != (N,) or v.dtype != dtype:
            raise NotDerivable(f"init's state {k!r} is not one {dtype} value per coordinate of the parameter")
    return tuple(state)


def native_rule(family, names: Sequence[str], learned: Sequence[str], hp: Mapping[str, Any],
                dtype: torch.dtype = torch.float32) -> tuple[kernels.NativeRule, tuple[str, ...]]:
    """A ``NativeRule`` whose source is ``family``'s derived rule, written into the kernel cache.

    ``hp``: the group's hyperparameters. Returns the rule and the hyperparameters its source
    holds as constants (a group with other values of those needs another kernel).

    Raises:
        NotDerivable: see ``derive_source``.
    """
    hp = {k: hp[k] for k in family.hyperparameters.model_fields}
    keys = state_keys_of(family, hp, dtype)
    for what, count in (("state buffers", len(keys)), ("learned coefficients", len(learned))):
        if count > kernels.MAX_BUFFERS:
            raise NotDerivable(f"{count} {what}: a native kernel holds at most {kernels.MAX_BUFFERS} "
                               "(METAOPT_MAX_BUFFERS in metaopt/csrc/native.h)")
    source = derive_source(family, names, learned, hp, keys)
    digest = hashlib.sha256(source.text.encode()).hexdigest()[:20]
    path = kernels.cache_dir() / "derived" / f"{family.name}-{digest}.c"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{digest}.tmp")
        tmp.write_text(source.text)
        tmp.replace(path)  # atomic: a concurrent process sees all of it or none
    return kernels.NativeRule(path, keys, flags=BUILD_FLAGS), source.constants
