"""C kernels written from a family's ``update`` (``metaopt.codegen``, issue 22 part 3).

A family with only ``init`` and ``update`` runs, under ``compile=True`` on a CPU, as a C kernel
the engine writes from the traced rule and its derived tangents. The reference is the generic
path (the family's ``update`` differentiated by autograd), which shares no code with the writer.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from _util import batches, loss_fn, rel_diff, tiny_mlp
from test_fast_path import assert_same_run
from test_fast_path import run as run_with_a_sit_out

from metaopt import Coefficient, CoefficientSpace, Family, Hyperparameters, MetaOptimizer, OneStep, codegen, kernels
from metaopt.paths import derived_unfit
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
    """Every op the writer knows, in one rule a stranger might write (not a sensible optimizer)."""

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
    assert ours[1]._path.derived
    if dtype == torch.float64:
        worst = errors(ours, run(family, "generic", dtype, **kw))
        assert max(worst.values()) <= TOL64, worst
        return
    truth = run(family, "generic", torch.float64, **kw)
    mine, torchs = errors(ours, truth), errors(run(family, "generic", dtype, **kw), truth)
    for k in torchs:
        assert mine[k] <= FACTOR32 * torchs[k] + FLOOR32, (k, mine[k], torchs[k])


FAMILIES = {"zoo": Zoo, "two_moments": TwoMoments, "padam": Padam, "sgd_hd": SGDHD, "mada": MADAUpdateOnly}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_family_with_only_update_runs_a_written_kernel_equal_to_the_generic_path(name, dtype):
    assert_like_the_generic_path(FAMILIES[name](), dtype, lr={"sgd_hd": 1.0}.get(name, 1e-2))


@pytest.mark.parametrize("name", ["two_moments", "padam", "mada"])
def test_fifty_steps_with_a_parameter_sitting_one_out_equal_the_generic_path(name):
    """As the fused and the hand-written kernel are held: 50 float64 steps, the bucket until a
    parameter sits a step out, then the kernel parameter by parameter (tests/test_fast_path.py)."""
    family = FAMILIES[name]()
    ours = run_with_a_sit_out(family, OneStep(lr=0.05), {"lr": 1e-2}, "native")
    assert ours[1]._path.derived
    assert_same_run(ours, run_with_a_sit_out(family, OneStep(lr=0.05), {"lr": 1e-2}, "generic"))
    assert any(abs(ours[1].coefficients[k].item() - family.space[k].init) > 1e-5 for k in ours[1].learned)


def test_special_values_take_torchs_semantics():
    """NaN, ±inf, ±0 and huge gradients through every op of the zoo: the kernel's state holds what
    torch's ops give, NaN where torch has NaN (maximum, clamp and sign each treat NaN their own way)."""
    family = Zoo()
    grads = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e200, -1e-30, 3.0, -2.0, 0.5],
                         dtype=torch.float64)
    runs = []
    for path, compile in (("auto", True), ("generic", False)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, grads.numel(), dtype=torch.float64))
        opt = MetaOptimizer([p], family, hypergrad=None, path=path, compile=compile, lr=1e-2)
        for scale in (1.0, -0.5):
            p.grad = grads * scale
            opt.step()
        runs.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}, opt.path))
    (p1, s1, path1), (p2, s2, _) = runs
    assert path1 == "native"
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=0, equal_nan=True)
    for k in s2:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-12, atol=0, equal_nan=True, msg=k)
    # the special values did reach the ops, and the ordinary ones stayed finite
    assert torch.isnan(s1["top"]).any() and torch.isfinite(s1["v"]).sum() >= 5


def test_groups_with_different_hyperparameters_get_kernels_of_their_own():
    """eps and weight_decay are constants in a written kernel: two groups, two kernels; a change to
    a group's value after construction makes a third."""
    def groups(model):
        first, second = list(model.children())[0], list(model.children())[2]
        return [{"params": first.parameters(), "weight_decay": 0.1}, {"params": second.parameters(), "eps": 1e-3}]

    ours = run(TwoMoments(), "auto", torch.float64, compile=True, groups=groups, lr=1e-2)
    theirs = run(TwoMoments(), "generic", torch.float64, groups=groups, lr=1e-2)
    assert max(errors(ours, theirs).values()) <= TOL64
    assert len(ours[1]._path.kernels) == 2
    for (m, o) in (ours, theirs):
        o.param_groups[0]["weight_decay"] = 0.3
        for xy in batches(3, seed=5):
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
    assert len(ours[1]._path.kernels) == 3
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
    assert opt.path == "compiled" and "cannot be written as C" in opt.path_reason
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="path='native' runs a C kernel"):
        MetaOptimizer(p, family, path="native", lr=1e-2)


def test_without_compile_and_for_other_devices_nothing_changes():
    """compile=False keeps the generic path; a family that says it is not elementwise is not written."""
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert MetaOptimizer(p, TwoMoments(), lr=1e-2).path == "generic"
    mixing = TwoMoments()
    mixing.elementwise = False
    assert derived_unfit(mixing, ("kappa",), p, torch.float32, ()) == "codegen_two_moments is not elementwise " \
        "(Family.elementwise)"


def test_the_written_source_reads_lr_from_memory_and_takes_other_hyperparameters_as_constants():
    family = TwoMoments()
    rule = codegen.native_rule(family, ("kappa",), ("kappa",), {"lr": 0.0123, "eps": 1e-3, "weight_decay": 0.25})
    text = rule.source.read_text()
    assert "pc->hp[0]" in text  # lr, the first field
    assert (0.25).hex() in text and (1e-3).hex() in text and (0.0123).hex() not in text
    assert rule.state_keys == ("m", "s")
    again = codegen.native_rule(family, ("kappa",), ("kappa",), {"lr": 0.1, "eps": 1e-3, "weight_decay": 0.25})
    assert again.source == rule.source  # lr is no constant: the same kernel


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
