"""C kernels written from a family's ``update`` (``metaopt.codegen``, issue 22 part 3).

A family with only ``init`` and ``update`` runs, under ``compile=True`` on a CPU, as a C kernel
the engine writes from the traced rule and its derived tangents. The reference is the generic
path (the family's ``update`` differentiated by autograd), which shares no code with the writer.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from _util import batches, loss_fn, rel_diff, tiny_mlp
from test_fast_path import assert_same_run
from test_fast_path import run as run_with_a_sit_out

from metaopt import Coefficient, CoefficientSpace, Family, Hyperparameters, MetaOptimizer, OneStep, codegen, kernels
from metaopt.paths import derived_unfit, native
from metaopt.plugins.hd import SGDHD
from metaopt.plugins.mada import MADA
from metaopt.plugins.padam import Padam

pytestmark = pytest.mark.skipif(kernels.load(MADA().native_rule(()).source) is None,
                                reason="no C compiler builds kernels here")

#: float64: derived C against the generic path's autograd, relative (normwise, per tensor)
TOL64 = 1e-11
#: float32: the C kernel's error against the float64 generic run, at most this many times the
#: float32 generic run's own (libm's and libmvec's transcendental functions round within a few
#: ulp of torch's SLEEF, and a tangent's cancellations make either's rounding chance), plus an
#: absolute floor of a few float32 ulp for entries the float32 generic run gets exactly right
FACTOR32, FLOOR32 = 4.0, 1e-6


class ZooHyperparameters(Hyperparameters):
    eps: float = 1e-8
    weight_decay: float = 0.0


class Zoo(Family):
    """Most ops the writer knows (arithmetic, lerp, addcmul, maximum/minimum, clamp, tanh, sigmoid,
    sign, sqrt, rsqrt, exp, log1p, where, pow with a constant and a learned exponent, reciprocal,
    nan_to_num), in one rule a stranger might write (not a sensible optimizer)."""

    name = "codegen_zoo"
    hyperparameters = ZooHyperparameters
    elementwise = True

    def __init__(self) -> None:
        self.space = CoefficientSpace(a=Coefficient(init=0.7, low=0.0, high=1.0),
                                      b=Coefficient(init=1.3, low=0.5, high=2.0))

    def init(self, param, grad, group):
        return {"m": torch.zeros_like(param), "v": torch.zeros_like(param), "top": torch.zeros_like(param)}

    def update(self, grad, param, state, coefficients, group, step):
        a, b = coefficients["a"], coefficients["b"]
        g = grad + group["weight_decay"] * param
        m = torch.lerp(g, state["m"], a)
        v = torch.addcmul(state["v"] * 0.9, g, g, value=0.1)
        top = torch.maximum(state["top"], v.abs())
        low = torch.minimum(m, torch.zeros_like(m))
        shaped = torch.clamp(m, -1.0, 1.0) + torch.tanh(m) * torch.sigmoid(v) - torch.sign(g) * low.pow(2)
        root = torch.sqrt(top) + torch.rsqrt(v + 1.0) * 1e-3 + torch.exp(-v) * torch.log1p(v)
        bent = torch.where(g > 0, shaped.abs().pow(b) + 1e-12, shaped / (1 + b))
        bc = 1 - a ** step
        delta = -group["lr"] * (bent / (root + group["eps"]) + m.reciprocal().nan_to_num(0.0, 0.0, 0.0) * 1e-6) / bc
        return delta, {"m": m, "v": v, "top": top}


class TwoMoments(Family):
    """Adam at κ = 0, AdaBelief at κ = 1: a family with only init and update."""

    name = "codegen_two_moments"
    hyperparameters = ZooHyperparameters
    elementwise = True

    def __init__(self) -> None:
        self.space = CoefficientSpace(kappa=Coefficient(init=0.5, low=0.0, high=1.0))

    def init(self, param, grad, group):
        return {"m": torch.zeros_like(param), "s": torch.zeros_like(param)}

    def update(self, grad, param, state, coefficients, group, step):
        k = coefficients["kappa"]
        m = torch.lerp(grad, state["m"], 0.9)
        s = torch.lerp(torch.lerp(grad * grad, (grad - m) ** 2, k), state["s"], 0.999)
        m_hat, s_hat = m / (1 - 0.9**step), s / (1 - 0.999**step)
        return -group["lr"] * (m_hat / (torch.sqrt(s_hat) + group["eps"]) + group["weight_decay"] * param), {"m": m, "s": s}


class MADAUpdateOnly(MADA):
    """MADA with its update alone: no fused rule, no kernel of its own."""

    name = "codegen_mada_update_only"
    fused_update = None
    fused_scalars = None

    def native_rule(self, learned):
        return None


def run(family, path, dtype, steps=8, compile=False, groups=None, **kw):
    model = tiny_mlp(0, dtype)
    params = model.parameters() if groups is None else groups(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a derived kernel that fails to build says so: fail here
        opt = MetaOptimizer(params, family, hypergrad=OneStep(lr=0.05) if family.space.learned else None,
                            path=path, compile=compile, **kw)
        for xy in batches(steps, dtype=dtype):
            opt.zero_grad()
            loss_fn(model, xy).backward()
            opt.step()
    return model, opt


def errors(run, reference) -> dict[str, float]:
    """max |a - b| / max |b| per tensor (normwise, as tests/test_fast_path.py holds paths), in float64."""
    (m1, o1), (m2, o2) = run, reference
    out = {}
    for i, (p, q) in enumerate(zip(m1.parameters(), m2.parameters())):
        out[f"param{i}"] = rel_diff(p.detach().double(), q.detach().double())
        assert set(o1.state[p]) == set(o2.state[q])
        for k, v in o2.state[q].items():
            out[f"param{i}.{k}"] = rel_diff(o1.state[p][k].double(), v.double())
    for n in o1.coefficients:
        out[n] = rel_diff(o1.coefficients[n].double(), o2.coefficients[n].double())
    return {k: 0.0 if v != v else v for k, v in out.items()}  # 0/0: both all zeros


def assert_like_the_generic_path(family, dtype, **kw):
    ours = run(family, "auto", dtype, compile=True, **kw)
    assert ours[1].path == "native" and "written from its update" in ours[1].path_reason, ours[1].path_reason
    assert ours[1]._path.derived and ours[1]._path.last_units > 0  # the C kernel took the last step
    if dtype == torch.float64:
        worst = errors(ours, run(family, "generic", dtype, **kw))
        assert max(worst.values()) <= TOL64, worst
        return
    truth = run(family, "generic", torch.float64, **kw)
    mine, torchs = errors(ours, truth), errors(run(family, "generic", dtype, **kw), truth)
    for k in torchs:
        assert mine[k] <= FACTOR32 * torchs[k] + FLOOR32, (k, mine[k], torchs[k])


FAMILIES = {"zoo": Zoo, "two_moments": TwoMoments, "padam": Padam, "sgd_hd": SGDHD, "mada": MADAUpdateOnly,
            # a fused rule but no kernel of its own for these options: the C kernel is written from update
            "mada_lion": lambda: MADA(second_moment="mean", lion=True), "mada_official": lambda: MADA(preset="official")}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_family_with_only_update_runs_a_written_kernel_equal_to_the_generic_path(name, dtype):
    assert_like_the_generic_path(FAMILIES[name](), dtype, lr={"sgd_hd": 1.0}.get(name, 1e-2))


@pytest.mark.parametrize("name", ["two_moments", "padam", "mada", "mada_lion"])
def test_fifty_steps_with_a_parameter_sitting_one_out_equal_the_generic_path(name):
    """As the fused and the hand-written kernel are held: 50 float64 steps, the bucket until a
    parameter sits a step out, then the kernel parameter by parameter (tests/test_fast_path.py)."""
    family = FAMILIES[name]()
    ours = run_with_a_sit_out(family, OneStep(lr=0.05), {"lr": 1e-2}, "native")
    assert ours[1]._path.derived
    assert_same_run(ours, run_with_a_sit_out(family, OneStep(lr=0.05), {"lr": 1e-2}, "generic"))
    assert any(abs(ours[1].coefficients[k].item() - family.space[k].init) > 1e-5 for k in ours[1].learned)


#: each op the writer knows, on the gradient g and the previous gradient q; each kept in a state
#: buffer of its own, so that how it treats NaN, ±inf and ±0 shows (nothing else mixes in)
OPS = {
    "add": lambda g, q: g + 2.5 * q, "sub": lambda g, q: g - q, "mul": lambda g, q: g * q, "div": lambda g, q: g / q,
    "neg": lambda g, q: -g, "reciprocal": lambda g, q: g.reciprocal(), "abs": lambda g, q: g.abs(),
    "maximum": lambda g, q: torch.maximum(g, q), "minimum": lambda g, q: torch.minimum(g, q),
    "clamp": lambda g, q: torch.clamp(g, -1.0, 1.0), "clamp_min_tensor": lambda g, q: torch.clamp(g, min=q),
    "sign": lambda g, q: torch.sign(g), "where": lambda g, q: torch.where(g > q, g, q),
    "eq": lambda g, q: (g == q).to(g.dtype), "isinf": lambda g, q: torch.isinf(g).to(g.dtype),
    "isnan": lambda g, q: torch.isnan(g).to(g.dtype), "nan_to_num": lambda g, q: torch.nan_to_num(g, 0.0, 7.0, -7.0),
    "nan_to_num_default": lambda g, q: torch.nan_to_num(g), "nan_to_num_inf": lambda g, q: torch.nan_to_num(
        g, nan=0.5, posinf=math.inf, neginf=-math.inf),
    "lerp": lambda g, q: torch.lerp(g, q, 0.3), "lerp_far": lambda g, q: torch.lerp(g, q, 0.9),
    "addcdiv": lambda g, q: torch.addcdiv(q, g, q, value=0.5), "square": lambda g, q: g**2, "cube": lambda g, q: g**3,
    "pow_half": lambda g, q: g**0.5, "pow_minus_half": lambda g, q: g**-0.5, "pow_minus_one": lambda g, q: g**-1,
    "pow_minus_two": lambda g, q: g**-2, "pow_1_7": lambda g, q: g**1.7, "pow_tensor": lambda g, q: g.abs() ** q,
    "sqrt": lambda g, q: torch.sqrt(g), "rsqrt": lambda g, q: torch.rsqrt(g), "exp": lambda g, q: torch.exp(g),
    "log": lambda g, q: torch.log(g), "log1p": lambda g, q: torch.log1p(g), "expm1": lambda g, q: torch.expm1(g),
    "tanh": lambda g, q: torch.tanh(g), "sigmoid": lambda g, q: torch.sigmoid(g), "sin": lambda g, q: torch.sin(g),
    "floor": lambda g, q: torch.floor(g), "round": lambda g, q: torch.round(g), "atan2": lambda g, q: torch.atan2(g, q),
    "erf": lambda g, q: torch.erf(g), "fmod": lambda g, q: torch.fmod(g, q),
}


class EveryOp(Family):
    """Plain SGD whose state keeps each of ``ops`` applied to this and the last gradient."""

    name = "codegen_every_op"
    elementwise = True

    def __init__(self, ops) -> None:
        self.ops = ops
        self.space = CoefficientSpace(a=Coefficient(init=1.0, low=0.0, high=2.0))

    def init(self, param, grad, group):
        return {"q": torch.zeros_like(param), **{k: torch.zeros_like(param) for k in self.ops}}

    def update(self, grad, param, state, coefficients, group, step):
        q = state["q"]
        return -group["lr"] * coefficients["a"] * grad, {"q": grad, **{k: op(grad, q) for k, op in self.ops.items()}}


#: OPS in families of at most 15 ops (with q, a kernel's 16 state buffers)
CHUNKS = [dict(list(OPS.items())[i:i + 15]) for i in range(0, len(OPS), 15)]


@pytest.mark.parametrize("chunk", range(len(CHUNKS)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_every_op_takes_torchs_semantics_on_special_values(dtype, chunk):
    """NaN, ±inf, ±0, huge and tiny values, as the gradient and as the last gradient: each op's
    result in C equals torch's eager op (the generic path), NaN where torch has NaN, zeros of the
    same sign. Transcendental functions: libm/libmvec against torch's SLEEF, a few ulp."""
    ops = CHUNKS[chunk]
    specials = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e200, -1e-30, 3.0, -2.0, 0.5, 1.0, -1.0, 0.25]
    first = torch.tensor(specials, dtype=dtype)
    runs = {}
    for path in ("native", "generic"):  # native asked for: fmod has no vector form, so the kernel is scalar
        p = torch.nn.Parameter(torch.linspace(-1, 1, first.numel(), dtype=dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # that it is scalar
            opt = MetaOptimizer([p], EveryOp(ops), hypergrad=None, path=path, lr=1e-2)
        for grad in (first, first.roll(5), first.roll(2).neg()):  # every pairing of specials in turn
            p.grad = grad.clone()
            opt.step()
        runs[path] = (opt, p)
    (opt, p), (ref, q) = runs["native"], runs["generic"]
    assert opt._path.derived and opt._path.last_units == 1
    rtol = {torch.float64: 1e-13, torch.float32: 1e-6}[dtype]
    for k in ops:
        mine, torchs = opt.state[p][k], ref.state[q][k]
        torch.testing.assert_close(mine, torchs, rtol=rtol, atol=0, equal_nan=True, msg=k)
        assert torch.equal(torch.signbit(mine[mine == 0]), torch.signbit(torchs[mine == 0])), k


class Branches(TwoMoments):
    """Decides in Python on a hyperparameter: traceable only with it as a constant."""

    name = "codegen_branches"

    def update(self, grad, param, state, coefficients, group, step):
        delta, new = super().update(grad, param, state, coefficients, group, step)
        if group["weight_decay"] > 0.2:
            delta = 2 * delta
        return delta, new


def written_kernels(family) -> int:
    """How many kernels were written from ``family``'s update in this process."""
    return sum(1 for rule, _, _ in native._WRITTEN[family].kernels.values() if rule is not None)


@pytest.mark.parametrize("family, kernels_before, kernels_after", [(TwoMoments(), 1, 1), (Branches(), 2, 3)],
                         ids=["read", "constants"])
def test_groups_and_schedules_of_hyperparameters(family, kernels_before, kernels_after):
    """eps and weight_decay are read at run time: one kernel for two groups with other values and
    after a change to one; a rule that branches on weight_decay in Python holds them as constants
    instead, a kernel per set of values. Either way each group steps as the generic path."""
    def groups(model):
        first, second = list(model.children())[0], list(model.children())[2]
        return [{"params": first.parameters(), "weight_decay": 0.1}, {"params": second.parameters(), "eps": 1e-3}]

    ours = run(family, "auto", torch.float64, compile=True, groups=groups, lr=1e-2)
    theirs = run(copy.deepcopy(family), "generic", torch.float64, groups=groups, lr=1e-2)
    assert max(errors(ours, theirs).values()) <= TOL64
    assert written_kernels(family) == kernels_before
    for (m, o) in (ours, theirs):
        o.param_groups[0]["weight_decay"] = 0.3  # doubles that group's steps in Branches
        for xy in batches(3, seed=5):
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
    assert ours[1]._path.last_units == 2  # both groups ran in C
    assert written_kernels(family) == kernels_after
    assert max(errors(ours, theirs).values()) <= TOL64


def test_a_copy_and_a_resumed_optimizer_continue_bit_for_bit():
    model, opt = run(TwoMoments(), "auto", torch.float64, compile=True, lr=1e-2)
    assert opt.path == "native"
    data = batches(4, seed=9)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    fresh_model = copy.deepcopy(model)
    fresh_opt = MetaOptimizer(fresh_model.parameters(), TwoMoments(), hypergrad=OneStep(lr=0.05), compile=True, lr=1e-2)
    buf.seek(0)
    fresh_opt.load_state_dict(torch.load(buf))
    pickled_model, pickled_opt = pickle.loads(pickle.dumps((model, opt)))
    for m, o in ((model, opt), (twin_model, twin_opt), (fresh_model, fresh_opt), (pickled_model, pickled_opt)):
        assert o.path == "native"
        for xy in data:
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
    for m in (twin_model, fresh_model, pickled_model):
        for p, q in zip(model.parameters(), m.parameters()):
            assert torch.equal(p, q)


class Normalized(TwoMoments):
    """Divides by the gradient's norm: not elementwise (the contract refuses its flag; the writer
    finds the reduction by itself)."""

    name = "codegen_normalized"

    def update(self, grad, param, state, coefficients, group, step):
        delta, new = super().update(grad, param, state, coefficients, group, step)
        return delta / (grad.norm() + 1), new


class LogGamma(TwoMoments):
    """An elementwise op the writer has no C form for."""

    name = "codegen_log_gamma"

    def update(self, grad, param, state, coefficients, group, step):
        delta, new = super().update(grad, param, state, coefficients, group, step)
        return delta * torch.lgamma(2 + new["s"]), new


def test_more_buffers_than_a_kernel_holds_are_refused_by_name():
    family = EveryOp(OPS)
    with pytest.raises(codegen.NotDerivable, match=f"{len(OPS) + 1} state buffers: a native kernel holds at most 16"):
        codegen.native_rule(family, ("a",), ("a",), family.defaults())


def test_a_reduction_is_found_by_the_writer():
    family = Normalized()
    with pytest.raises(codegen.NotDerivable, match="not elementwise"):
        codegen.native_rule(family, family.space.names, family.space.learned, family.defaults())


def test_an_op_without_a_c_form_is_named_and_the_compiled_path_takes_the_rule():
    family = LogGamma()
    with pytest.raises(codegen.NotDerivable, match="lgamma has no C form"):
        codegen.native_rule(family, family.space.names, family.space.learned, family.defaults())
    p = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    with pytest.warns(UserWarning, match="codegen_log_gamma's update cannot be written as a C kernel.*lgamma"):
        opt = MetaOptimizer(p, family, compile=True, lr=1e-2)
    assert opt.path == "compiled" and "cannot be written as C here: torch.ops.aten.lgamma" in opt.path_reason
    with pytest.raises(ValueError, match="path='native' runs a C kernel"):  # said once: no second warning
        MetaOptimizer(p, family, path="native", lr=1e-2)


def test_without_compile_and_for_other_devices_nothing_changes():
    """compile=False keeps the generic path; a family that says it is not elementwise is not written."""
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert MetaOptimizer(p, TwoMoments(), lr=1e-2).path == "generic"
    mixing = TwoMoments()
    mixing.elementwise = False
    assert derived_unfit(mixing, ("kappa",), p, torch.float32, ()) == "codegen_two_moments is not elementwise " \
        "(Family.elementwise)"


def test_the_written_source_reads_its_hyperparameters_from_memory():
    family = TwoMoments()
    rule, constants = codegen.native_rule(family, ("kappa",), ("kappa",),
                                          {"lr": 0.0123, "eps": 1e-3, "weight_decay": 0.25})
    text = rule.source.read_text()
    assert constants == ()
    for slot in (0, 1, 2):  # lr, eps, weight_decay: the fields' order
        assert f"pc->hp[{slot}]" in text
    assert not any(v.hex() in text for v in (0.0123, 1e-3, 0.25))
    assert rule.state_keys == ("m", "s")
    again, _ = codegen.native_rule(family, ("kappa",), ("kappa",), {"lr": 0.1, "eps": 0.5, "weight_decay": 0.0})
    assert again.source == rule.source  # one kernel for every value
    held, constants = codegen.native_rule(Branches(), ("kappa",), ("kappa",),
                                          {"lr": 0.0123, "eps": 1e-3, "weight_decay": 0.25})
    assert constants == ("eps", "weight_decay") and (0.25).hex() in held.source.read_text()


def test_the_arithmetic_reader_tells_packed_from_scalar():
    listing = """
0000000000001000 <metaopt_rule_range_f32.constprop.0>:
    1000:	62 f1 7c 48 59 c0    	vmulps %zmm0,%zmm1,%zmm2
    1006:	c5 fa 58 c0          	vaddss %xmm0,%xmm0,%xmm0
0000000000002000 <metaopt_step_f64._omp_fn.0>:
    2000:	f2 0f 5e c0          	divsd  %xmm0,%xmm0
0000000000003000 <metaopt_dots_f64>:
    3000:	66 0f 59 c0          	mulpd  %xmm0,%xmm0
"""
    assert kernels.arithmetic_counts(listing) == {"f32": {"packed": 1, "scalar": 1}, "f64": {"packed": 0, "scalar": 1}}


def test_per_group_coefficients_run_in_the_written_kernel():
    """Each group's own coefficients reach its kernel call (the row of the coefficient matrix)."""
    def groups(model):
        first, second = list(model.children())[0], list(model.children())[2]
        return [{"params": first.parameters()}, {"params": second.parameters(), "eps": 1e-3}]

    ours = run(TwoMoments(), "auto", torch.float64, compile=True, groups=groups, lr=1e-2, coefficients="per_group")
    theirs = run(TwoMoments(), "generic", torch.float64, groups=groups, lr=1e-2, coefficients="per_group")
    assert ours[1].path == "native" and ours[1]._path.last_units == 2
    assert max(errors(ours, theirs).values()) <= TOL64
    first, second = ours[1].coefficients["kappa"]
    assert abs(float(first) - float(second)) > 1e-6  # the groups learned apart
