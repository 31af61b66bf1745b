"""Execution paths: one module each, one interface, picked once per optimizer.

The interface is ``metaopt.paths.base.ExecutionPath``; ``select_path`` picks the path and says why.

* ``metaopt.paths.generic`` — the family's ``update`` per tensor, tangents by autograd: any
  family, any device, every mode; the reference the others are tested equal to.
* ``metaopt.paths.bucketed`` — one path over flat buckets that hold a group's parameters,
  gradients and state, filled with a rule object (``metaopt.paths.rules``): "fused" runs the
  family's hand-derived ``fused_update``, eager or compiled (``compile=True``); "compiled" runs
  any family's ``update`` with tangents derived automatically (forward mode), compiled.
* ``metaopt.paths.native`` — a C kernel on CPU threads: the family's own, or one written from its
  ``update`` (``metaopt.codegen``) for a family without a fused rule under ``compile=True``; the
  eager fused or the compiled path for the steps it cannot take.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .. import kernels
from ..sharding import is_dtensor
from .base import ExecutionPath
from .bucketed import BucketedPath, compiled_path, fused_path
from .generic import GenericPath
from .native import NativePath, refusal, written_kernel

#: each path's name -> what builds it from (family, names, learned, dtype, device, compile=,
#: forward=, per_group=)
PATHS: dict[str, Callable[..., ExecutionPath]] = {
    "generic": GenericPath, "fused": fused_path, "compiled": compiled_path, "native": NativePath,
}

__all__ = [
    "PATHS", "BucketedPath", "ExecutionPath", "GenericPath", "NativePath", "PathChoice", "runnable_instead", "select_path",
]


class PathChoice(NamedTuple):
    """The path ``select_path`` picked (a key of ``PATHS``) and the reason, as ``opt.path_reason`` shows it."""

    name: str
    reason: str


def select_path(family, learned, params, dtype, *, requested: str = "auto", compile: bool = False,
                unrolled: bool = False, forward: bool = False, groups=()) -> PathChoice:
    """The path an optimizer runs, and why.

    ``learned``: the coefficients it keeps tangents for; ``params``: all its parameters;
    ``dtype``: the coefficients'. An explicit ``requested`` path that cannot serve this
    optimizer raises ValueError naming why; one that could, were a C compiler working
    (``metaopt.kernels.load`` warns), falls back as "auto" would. ``forward``: forward-mode
    hyper-gradients ([`Forward`][metaopt.Forward]), which run on the generic path, or compiled
    (``compile=True`` or ``path="compiled"``) on the compiled path. ``groups``: the param groups,
    whose hyperparameters a C kernel derived from ``update`` is written for.
    """
    if requested not in ("auto", *PATHS):
        raise ValueError(f"path must be 'auto' or one of {sorted(PATHS)}, got {requested!r}")
    mode = "Unrolled" if unrolled else "one-step or fixed"
    fusable = family.fused_update is not None and family.fused_scalars is not None and not unrolled
    if requested in ("fused", "native") and unrolled:
        raise ValueError(
            f"path={requested!r} runs one-step or fixed modes only, not Unrolled: unrolled hyper-gradients run "
            f"through higher on {family.name}'s update (path='generic', or leave path='auto')"
        )
    if requested == "fused" and not fusable:
        raise ValueError(
            f"path='fused' runs a family's hand-derived rule (fused_scalars and fused_update); {family.name} has "
            "none. Use compile=True (the compiled path derives it from update), or write the two methods "
            "(docs: Define a family, Fast paths)"
        )
    if requested == "native" and not unrolled and not forward and (
            not fusable or family.native_rule(tuple(learned)) is None):
        unfit = derived_unfit(family, learned, params, dtype, groups, vector_only=False)  # asked for: even scalar
        if unfit:
            raise ValueError(
                f"path='native' runs a C kernel: the family's own (Family.native_rule), or one written from its "
                f"update; {family.name} has no kernel of its own for this configuration, and {unfit}. Use "
                "compile=True or path='compiled' for a compiled rule derived from update, or path='auto'"
            )
        return PathChoice("native", f"asked for (path='native'): a C kernel written from {family.name}'s update "
                          "(metaopt.codegen)")
    if requested == "compiled" and unrolled:
        raise ValueError(
            f"path='compiled' needs a one-step or fixed mode; unrolled hyper-gradients run through higher "
            f"on {family.name}'s update (the generic path)"
        )
    if forward:  # metaopt.Forward: state tangents, which the fused rules and C kernels do not carry
        if requested in ("fused", "native"):
            raise ValueError(
                f"metaopt.Forward runs on the generic or the compiled path (the family's update, tangents by "
                f"jvp); path={requested!r} cannot carry its state tangents"
            )
        if requested == "compiled" or (requested == "auto" and compile):
            return PathChoice("compiled", "forward-mode hyper-gradients (metaopt.Forward): the family's update, "
                              "parameter and state tangents by jvp, compiled"
                              + (" (asked for)" if requested == "compiled" else ""))
        return PathChoice("generic", "forward-mode hyper-gradients (metaopt.Forward), compile off: the family's "
                          "update, tangents by jvp, eagerly" + (" (asked for)" if requested == "generic" else ""))
    if requested == "generic":
        return PathChoice("generic", "asked for (path='generic')")
    if requested == "fused":
        return PathChoice("fused", f"asked for (path='fused'){', compiled' if compile else ', eager'}")
    if requested == "compiled":
        return PathChoice("compiled", "asked for (path='compiled'): the family's update, tangents derived and compiled")
    if unrolled:
        return PathChoice("generic", "unrolled hyper-gradients run through higher on the family's update")
    if not fusable:
        if compile:
            unfit = derived_unfit(family, learned, params, dtype, groups)
            if not unfit:
                return PathChoice("native", f"compile=True and {family.name} has no fused rule: a C kernel written "
                                  "from its update, tangents derived (metaopt.codegen)")
            return PathChoice("compiled", f"compile=True and {family.name} has no fused rule: its update, "
                              f"tangents derived automatically, compiled ({unfit})")
        return PathChoice("generic", f"{family.name} has no fused rule and compile is off")
    unfit = native_unfit(family, learned, params, dtype)
    if unfit and requested == "native":
        raise ValueError(f"path='native' does not apply: {unfit}")
    if not unfit:
        kernel = kernels.load(family.native_rule(learned).source)
        if kernel is not None and kernel.vectorized is False and compile and requested != "native":
            # A scalar build (its object code has no packed square root) is slower than the compiled
            # fused rule (docs: performance, "Execution paths"); without compile it still beats
            # the eager paths, so it stays.
            unfit = f"the C kernel built here is scalar ({kernel.path.name}: no packed instructions)"
        elif kernel is not None:
            return PathChoice("native", f"{family.name}'s C kernel applies ({dtype}, CPU) and builds here"
                              + (", vectorized" if kernel.vectorized else "")
                              + (" (asked for)" if requested == "native" else ""))
        else:
            unfit = "no C compiler works here"
    if compile:
        if family.native_rule(tuple(learned)) is None and kernels.enabled():
            # no kernel of its own for this configuration (MADA's Lion term, its official preset):
            # one written from update outruns the compiled fused rule (docs: performance)
            written = derived_unfit(family, learned, params, dtype, groups)
            if not written:
                return PathChoice("native", f"compile=True and {family.name} has no C kernel of its own for this "
                                  "configuration: a C kernel written from its update (metaopt.codegen)")
            unfit = f"{unfit}; a C kernel written from its update: {written}"
        return PathChoice("fused", f"compile=True and {family.name} has a fused rule; native: {unfit}")
    # Eagerly, the fused rule's tangent arithmetic costs more than the generic path's one reverse
    # pass (measured: benchmarks/step_cost.py, mada_cost.py); compiled, it is one graph.
    return PathChoice("generic", f"native: {unfit}; without compile the generic path is faster than the eager fused rule")


def runnable_instead(path: ExecutionPath, compile: bool) -> tuple[ExecutionPath, str]:
    """A path that runs here in place of an unpickled one that cannot (a C kernel that does not build), and why.

    The path "auto" would take without the kernel, over the same buckets.
    """
    name = "fused" if compile else "generic"
    other = PATHS[name](path.family, path.names, path.learned, path.dtype, path.device, compile=compile,
                        forward=path.forward, per_group=path.per_group)
    other.buckets = path.buckets
    if name == "fused":  # the native path's buckets hold state only; the fused path's hold the parameters too
        for bucket in other.buckets.values():
            if not bucket.owns:
                bucket.own()
    return other, f"unpickled where the native kernel does not build; {name} as 'auto' would take"


def derived_unfit(family, learned, params, dtype, groups, vector_only: bool = True) -> str | None:
    """Why no C kernel written from ``family.update`` can run this optimizer (None: one can).

    ``vector_only``: a kernel that built as scalar code does not count (it is slower than the
    compiled path).
    """
    unfit = cpu_unfit(params, dtype)
    if unfit:
        return unfit
    if not family.elementwise:
        return f"{family.name} is not elementwise (Family.elementwise)"
    for group in groups or [family.hyperparameters().model_dump()]:
        rule, _, kernel = written_kernel(family, family.space.names, tuple(learned), group, dtype)
        if rule is None:
            why = refusal(family, family.space.names, tuple(learned), group, dtype)
            return f"its update cannot be written as C here: {why}"
        if kernel is None:
            return "the C kernel written from its update does not build here (see the warning)"
        if vector_only and kernel.vectorized is False:
            return f"the C kernel written from its update built as scalar code here ({kernel.path.name})"
    return None


def native_unfit(family, learned, params, dtype) -> str | None:
    """Why the native path cannot run this optimizer with the family's own kernel (None: it can)."""
    if not kernels.enabled():
        return "METAOPT_NATIVE is off"
    if family.native_rule(learned) is None or family.native_rule(()) is None:
        return f"{family.name} has no native kernel for this configuration"
    if max(len(family.native_rule(learned).state_keys), len(learned)) > kernels.MAX_BUFFERS:
        return f"its kernel needs more than {kernels.MAX_BUFFERS} state or tangent buffers (METAOPT_MAX_BUFFERS)"
    return cpu_unfit(params, dtype)


def cpu_unfit(params, dtype) -> str | None:
    """Why no C kernel can take these parameters (None: one can)."""
    if not kernels.enabled():
        return "METAOPT_NATIVE is off"
    for p in params:
        if is_dtensor(p):
            return "a parameter is a DTensor (sharded parameters take the fused or generic path)"
        if p.device.type != "cpu":
            return f"a parameter is on {p.device}; native kernels run on the CPU"
        if p.dtype != dtype or not kernels.supports(p.dtype):
            return f"a parameter is {p.dtype}; native kernels take float32 or float64, one dtype per optimizer"
    return None

