"""Non-differentiable points are the engine's job (issue 21): a dead unit contributes exactly 0.

A coordinate whose gradient is always 0 (a ReLU unit that never fires) keeps a second moment of
0, where ``torch.sqrt`` has an infinite derivative: its tangent came out as 0·∞ = NaN and every
hyper-step was skipped. The update there does not depend on the coefficients, so a central finite
difference of the loss says it contributes 0; the engine now agrees on every path and in every
mode (state tangents included), while a real NaN (a NaN gradient) is still skipped and counted.
The family is written the way an author would, with a plain ``torch.sqrt``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _util import EPS, assert_close, batches, engine_and_fd, loss_fn, rel_diff
from test_contract import Belief

from metaopt import Coefficient, CoefficientSpace, Family, Forward, MetaOptimizer, OneStep, Unrolled
from metaopt.plugins.mada import MADA


def dead_mlp(seed: int = 0) -> torch.nn.Module:
    """5-7-3 ReLU network whose unit 0 never fires: its row, bias and outgoing column get zero gradients."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).to(torch.float64)
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = -10.0
    return model


def _has_zero_gradient_coordinates():
    model = dead_mlp()
    loss_fn(model, batches(1)[0]).backward()
    assert bool((model[0].weight.grad[0] == 0).all()) and float(model[2].weight.grad[:, 0].abs().max()) == 0.0


GROUP = {"lr": 1e-2}


@pytest.mark.parametrize("path", ["generic", pytest.param("compiled", marks=pytest.mark.slow)])
def test_one_step_hypergradient_with_a_dead_unit_equals_finite_differences(path):
    _has_zero_gradient_coordinates()
    h, fd = engine_and_fd(Belief(), GROUP, path=path, model_fn=dead_mlp)
    assert_close(h, fd)


def _forward_and_fd(path, steps=5, seed=0):
    """Forward(decay=1)'s h after ``steps`` steps and a central difference of the loss after the
    same steps replayed with the same gradients (the first-order hyper-gradient it computes)."""
    data = batches(steps + 1, seed=seed + 2)
    model = dead_mlp(seed)
    opt = MetaOptimizer(model.parameters(), Belief(kappa=0.3), hypergrad=Forward(lr=0.0), path=path, **GROUP)
    recorded = []
    for xy in data[:steps]:
        opt.zero_grad()
        loss_fn(model, xy).backward()
        recorded.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    opt.zero_grad()
    loss_fn(model, data[steps]).backward()
    opt.step()

    def loss_after(kappa):
        m = dead_mlp(seed)
        o = MetaOptimizer(m.parameters(), Belief(kappa=kappa), hypergrad=None, path="generic", **GROUP)
        for grads in recorded:
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            o.step()
        with torch.no_grad():
            return loss_fn(m, data[steps]).item()

    fd = (loss_after(0.3 + EPS) - loss_after(0.3 - EPS)) / (2 * EPS)
    return opt, {"kappa": opt.last_hypergrad["kappa"].item()}, {"kappa": fd}


@pytest.mark.parametrize("path", ["generic", pytest.param("compiled", marks=pytest.mark.slow)])
def test_forward_mode_with_a_dead_unit_equals_finite_differences_state_tangents_included(path):
    opt, h, fd = _forward_and_fd(path)
    assert_close(h, fd)
    assert int(opt.skipped_hypersteps) == 0
    for st in opt.state.values():  # the state tangents too
        for k, v in st.items():
            if k.startswith("hypergrad_tangent"):
                assert bool(torch.isfinite(v).all()), k


@pytest.mark.parametrize("first_order", [False, True])
def test_unrolled_hypergradient_with_a_dead_unit_equals_finite_differences(first_order):
    data = batches(3, seed=4)
    model = dead_mlp()
    ref = copy.deepcopy(model)
    opt = MetaOptimizer(model.parameters(), Belief(kappa=0.3), hypergrad=Unrolled(steps=2, lr=0.0,
                                                                                  first_order=first_order), **GROUP)
    opt.unrolled_step(model, data[:2], loss_fn, data[2], commit=False)
    h = opt.last_hypergrad["kappa"].item()
    assert int(opt.skipped_hypersteps) == 0

    def meta_loss(kappa):  # the two inner steps, their gradients recomputed (second order included)
        m = copy.deepcopy(ref)
        o = MetaOptimizer(m.parameters(), Belief(kappa=kappa), hypergrad=None, path="generic", **GROUP)
        for xy in data[:2]:
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
        with torch.no_grad():
            return loss_fn(m, data[2]).item()

    fd = (meta_loss(0.3 + EPS) - meta_loss(0.3 - EPS)) / (2 * EPS)
    if first_order:  # first order drops the loss Hessian: close to, not equal to, the total derivative
        assert abs(h - fd) <= 0.2 * abs(fd), (h, fd)
    else:
        assert abs(h - fd) <= 1e-5 * abs(fd), (h, fd)


class NaiveFusedBelief(Belief):
    """Belief with a hand-derived rule whose tangent is the textbook one: 1/(2 sqrt(ŝ)) is infinite
    where ŝ = 0, and 0·∞ = NaN there. A hand-derived rule is its author's own (the engine does not
    differentiate it, and cleaning its tangents cost the compiled fused step half again):
    check_family's "zero gradients" check catches it."""

    def fused_scalars(self, coefficients, group, step, learned):
        b1 = coefficients["beta1"]
        return {"kappa": coefficients["kappa"], "b1": b1, "bc1": 1 - b1**step, "bc2": 1 - 0.999**step,
                "lr": group["lr"], "eps": group["eps"]}

    def fused_update(self, grad, param, state, sc, learned):
        k, b1 = sc["kappa"], sc["b1"]
        m = b1 * state["m"] + (1 - b1) * grad
        ds = 0.001 * (grad * grad - (grad - m) ** 2)  # ∂s/∂κ
        s = 0.999 * state["s"] + 0.001 * (k * grad * grad + (1 - k) * (grad - m) ** 2)
        root = torch.sqrt(s / sc["bc2"])
        delta = -sc["lr"] * (m / sc["bc1"]) / (root + sc["eps"])
        tangent = sc["lr"] * (m / sc["bc1"]) / (root + sc["eps"]) ** 2 * (ds / sc["bc2"]) / (2 * root)
        return delta, {"m": m, "s": s}, [tangent]


class FusedBelief(NaiveFusedBelief):
    """The same rule with its tangent taken as 0 where ŝ = 0, where the update does not move with κ."""

    def fused_update(self, grad, param, state, sc, learned):
        delta, new, (tangent,) = super().fused_update(grad, param, state, sc, learned)
        return delta, new, [torch.where(new["s"] > 0, tangent, torch.zeros_like(tangent))]


def test_check_family_catches_a_hand_derived_tangent_that_is_nan_at_zero_gradients():
    from metaopt import check_family

    report = check_family(NaiveFusedBelief(), compile=False)
    zero = next(c for c in report.checks if c.name == "zero gradients")
    assert zero.status == "fail" and "one-step on the fused path" in zero.detail and "1/(2 sqrt v)" in zero.fix
    assert check_family(FusedBelief(), compile=False).ok


def _run(family, path, steps=6):
    model = dead_mlp()
    opt = MetaOptimizer(model.parameters(), family, hypergrad=OneStep(lr=0.05), path=path, **GROUP)
    for xy in batches(steps, seed=5):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize(("family", "path"), [(FusedBelief, "fused"), (MADA, "native"), (MADA, "fused")])
def test_hand_derived_paths_with_a_dead_unit_equal_the_generic_path(family, path):
    model, opt = _run(family(), path)
    ref_model, ref = _run(family(), "generic")
    assert int(opt.skipped_hypersteps) == 0 and int(ref.skipped_hypersteps) == 0
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert rel_diff(a, b) <= 1e-12
    for k in opt.coefficients:
        assert rel_diff(opt.coefficients[k], ref.coefficients[k]) <= 1e-12
    assert opt.coefficients["kappa" if family is FusedBelief else "beta3"] != family().space[
        "kappa" if family is FusedBelief else "beta3"].init  # it learned


@pytest.mark.parametrize("mode", ["one-step", "forward"])
def test_a_real_nan_gradient_is_still_skipped_and_counted(mode):
    model = dead_mlp()
    hg = OneStep(lr=0.05) if mode == "one-step" else Forward(lr=0.05)
    opt = MetaOptimizer(model.parameters(), Belief(), hypergrad=hg, **GROUP)
    data = batches(4, seed=6)
    for i, xy in enumerate(data):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        if i == 2:
            model[2].weight.grad[1, 1] = float("nan")
        before = opt.coefficients["kappa"].clone()
        opt.step()
        # step 3's h dots the NaN gradient; step 4's the tangent of step 3, NaN where its update is
        assert int(opt.skipped_hypersteps) == max(0, i - 1)
        if i >= 2:
            assert torch.equal(opt.coefficients["kappa"], before)


class Root(Family):
    """delta = -lr g (d + sqrt(c)): at c = 0 the derivative in c is infinite everywhere, a real singularity."""

    name = "root"
    elementwise = True

    def __init__(self):
        self.space = CoefficientSpace(c=Coefficient(init=0.0, low=0.0, high=1.0),
                                      d=Coefficient(init=0.5, low=0.0, high=1.0))

    def init(self, param, grad, group):
        return {}

    def update(self, grad, param, state, coefficients, group, step):
        return -group["lr"] * grad * (coefficients["d"] + torch.sqrt(coefficients["c"])), {}


def test_hypersteps_that_keep_being_skipped_warn_once_naming_the_coefficient_and_the_cause():
    from metaopt.watch import SkippedHyperstepsWarning

    model = dead_mlp()
    opt = MetaOptimizer(model.parameters(), Root(), hypergrad=OneStep(lr=0.01), **GROUP)
    data = batches(5)
    with pytest.warns(SkippedHyperstepsWarning) as record:
        for i in range(160):
            opt.zero_grad()
            loss_fn(model, data[i % 5]).backward()
            opt.step()
    assert len(record) == 1  # once
    text = str(record[0].message)
    assert "50 of the last 50 hyper-steps of family 'root' were skipped" in text
    assert "'c'" in text and "'d'" not in text.split(";")[1] and "c=0 at its box's lower end" in text
    assert int(opt.skipped_hypersteps) == 159


def test_a_healthy_run_does_not_warn_and_the_watch_reads_nothing_back_inside_step():
    import warnings

    from _util import host_reads_forbidden

    from metaopt.watch import SkippedHyperstepsWarning

    model = dead_mlp()
    opt = MetaOptimizer(model.parameters(), Belief(), hypergrad=OneStep(lr=0.01), path="generic", **GROUP)
    data = batches(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedHyperstepsWarning)
        for i in range(120):
            opt.zero_grad()
            loss_fn(model, data[i % 5]).backward()
            with host_reads_forbidden():
                opt.step()
    assert opt._skip_watch.last is not None  # it did look, twice, without a host read of a device tensor
