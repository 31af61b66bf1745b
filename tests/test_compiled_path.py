"""The compiled path: a family's own ``update``, its tangents derived automatically (forward
mode), compiled — equal to the generic path (the rule differentiated by the engine) on
parameters, state, coefficients and hyper-gradients within 1e-6 over 50 float64 steps, for MADA
with its hand-derived pieces unused, the HD and Padam families, a family defined here, and the
family of examples/define_a_family.py. Each configuration compiles its own graphs (tens of
seconds on 2 cores), hence slow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from _util import host_reads_forbidden
from test_fast_path import assert_same_run, run

from metaopt import Coefficient, CoefficientSpace, Family, MetaOptimizer, OneStep
from metaopt.plugins.hd import AdamHD, SGDHD
from metaopt.plugins.mada import MADA
from metaopt.plugins.padam import Padam

ROOT = Path(__file__).resolve().parent.parent


def _example_family():
    spec = importlib.util.spec_from_file_location("define_a_family", ROOT / "examples" / "define_a_family.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.SGDToAdam(lam=0.3)


class ClippedMomentum(Family):
    """Heavy-ball momentum μ on a gradient clipped to norm κ per tensor — it mixes coordinates
    (the norm), so the engine may not concatenate its parameters:
    b_t = μ b_{t-1} + g_t min(1, κ/‖g_t‖),  Δ = -η b_t."""

    name = "clipped_momentum"
    elementwise = False

    def __init__(self):
        self.space = CoefficientSpace(
            mu=Coefficient(init=0.5, low=0.0, high=0.99), kappa=Coefficient(init=0.5, low=0.01, high=10.0)
        )

    def init(self, param, grad, group):
        return {"buf": torch.zeros_like(param)}

    def update(self, grad, param, state, coefficients, group, step):
        scale = torch.clamp(coefficients["kappa"] / (grad.norm() + 1e-12), max=1.0)
        buf = coefficients["mu"] * state["buf"] + grad * scale
        return -group["lr"] * buf, {"buf": buf}


ALL5 = ("beta1", "beta2", "beta3", "c", "rho")
CONFIGS = {
    "mada": (MADA(betas=(0.9, 0.99), learn=ALL5), OneStep(lr=0.05, momentum=0.9), {"lr": 1e-2, "weight_decay": 0.1}),
    "sgd_hd": (SGDHD(alpha=0.05), SGDHD.paper_hypergrad(1e-3), {}),
    "adam_hd": (AdamHD(alpha=1e-2), AdamHD.paper_hypergrad(1e-5), {}),
    "padam": (Padam(), OneStep(lr=0.05), {"lr": 1e-2}),
    "clipped_momentum": (ClippedMomentum(), OneStep(lr=0.05), {"lr": 0.05}),
    "example": (_example_family(), OneStep(lr=0.05, momentum=0.9), {"lr": 1e-2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_path_equals_generic_path(name):
    family, hypergrad, group = CONFIGS[name]
    ours = run(family, hypergrad, group, "compiled")
    generic = run(family, hypergrad, group, "generic")
    opt = ours[1]
    assert opt.path == "compiled" and opt._path.compiled  # compiled, not fallen back to eager
    # an elementwise family ran its first half as flat buckets, then (a parameter sat out) per
    # tensor; one that mixes coordinates ran per tensor throughout
    half = len(opt.bucketed) // 2
    if family.elementwise:
        assert all(opt.bucketed[:half]) and not any(opt.bucketed[half:])
    else:
        assert not any(opt.bucketed)
    assert_same_run(ours, generic)
    assert any(abs(opt.coefficients[k].item() - family.space[k].init) > 1e-5 for k in opt.learned)


def test_auto_compiles_a_family_that_has_only_update():
    """On a CPU an elementwise family's update becomes a C kernel (tests/test_codegen.py); one
    that mixes coordinates, the compiled graph."""
    p = [torch.nn.Parameter(torch.zeros(3))]
    for family in (SGDHD(), Padam(), ClippedMomentum()):
        assert MetaOptimizer(p, family).path == "generic"  # nothing compiled without asking
        opt = MetaOptimizer(p, family, compile=True)
        if family.elementwise:
            assert opt.path == "native" and "no fused rule: a C kernel written from its update" in opt.path_reason
        else:
            assert opt.path == "compiled" and "no fused rule" in opt.path_reason and "not elementwise" in opt.path_reason
    # a fused rule, but no kernel of its own for the Lion term: one written from update beats the compiled rule
    opt = MetaOptimizer(p, MADA(lion=True), compile=True)
    assert opt.path == "native" and "no C kernel of its own for this configuration" in opt.path_reason
    assert MetaOptimizer(p, MADA(lion=True), path="compiled").path == "compiled"
    from metaopt import Unrolled

    with pytest.raises(ValueError, match="compiled.*one-step or fixed"):
        MetaOptimizer(p, SGDHD(), hypergrad=Unrolled(steps=2), path="compiled")


@pytest.mark.slow
def test_compiled_path_never_reads_tensors_on_the_host():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).double()
    opt = MetaOptimizer(model.parameters(), Padam(), hypergrad=OneStep(lr=0.05), path="compiled", lr=1e-2)
    x = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(3):  # compile outside the guard: dynamo reads guards' values itself
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        with host_reads_forbidden():
            opt.step()
    assert any(v.item() != 0 for v in opt.last_hypergrad.values())
