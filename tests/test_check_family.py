"""metaopt.check_family, gradcheck for optimizer families (issue 21): every family the project
ships, tests and teaches passes it, and each kind of mistake fails the check that should catch it,
with the fix."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from test_compiled_path import ClippedMomentum
from test_contract import DEFECTS, Belief
from test_engine import SGDMomentum
from test_fast_path import LearnedDecay
from test_forward import Heavy
from test_reliability import Fuzzy
from test_scale_free import TwoScales
from test_zero_gradients import FusedBelief

import metaopt
from metaopt import Coefficient, CoefficientSpace, check_family
from metaopt.plugins.hd import AdamHD, SGDHD
from metaopt.plugins.mada import MADA
from metaopt.plugins.padam import Padam

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "define_a_family.py"


def example_family():
    spec = importlib.util.spec_from_file_location("define_a_family_for_check", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.SGDToAdam()


FAMILIES = {
    "mada": (MADA, {}),
    "mada-avgrad-lion-decay": (lambda: MADA(second_moment="mean", lion=True), {"weight_decay": 0.1}),
    "mada-yogi": (lambda: MADA(initial_m=1e-6, initial_v=1e-6), {}),
    "mada-adan": (lambda: MADA(betas=(0.98, 0.99), initial_grad="first", bias_correction="per_moment"), {}),
    "mada-all-five": (lambda: MADA(betas=(0.9, 0.99), learn=("beta1", "beta2", "beta3", "c", "rho")), {}),
    "padam": (Padam, {}),
    "padam-code": (lambda: Padam(amsgrad=False, bias_correction="code", eps_placement="root"), {"weight_decay": 0.01}),
    "sgd_hd": (SGDHD, {}),
    "adam_hd": (AdamHD, {"weight_decay": 0.01}),
    "example": (example_family, {}),
    "belief": (Belief, {}),
    "fused-belief": (FusedBelief, {}),
    "learned-decay": (LearnedDecay, {}),
    "sgd-momentum": (SGDMomentum, {}),
    "heavy": (Heavy, {}),
    "clipped-momentum": (ClippedMomentum, {}),
    "two-scales": (TwoScales, {}),
    "fuzzy": (lambda: Fuzzy(CoefficientSpace(c0=Coefficient(init=0.3, low=-1.0, high=2.0),
                                             c1=Coefficient(init=0.5, low=0.0, high=3.0),
                                             c2=Coefficient(init=0.1, low=-0.5, high=0.5)), elementwise=True), {}),
    "fuzzy-per-tensor": (lambda: Fuzzy(CoefficientSpace(c0=Coefficient(init=0.3, low=-1.0, high=2.0)),
                                       elementwise=False), {}),
    "reference-trajectory-momentum": (lambda: _reference_family("forward-mode"), {}),
}
# Not here: tests/test_zero_gradients.py's Root starts at c = 0, where its derivative is infinite
# on purpose (the skipped hyper-steps it shows off fail "zero gradients"), and the broken
# families of tests/test_contract.py, each of which fails "contract" (below).


def _reference_family(mode):
    import reference_trajectory

    return reference_trajectory._family(mode)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_shipped_tested_and_taught_passes(name):
    make, group = FAMILIES[name]
    report = check_family(make(), compile=False, **group)
    assert report.ok, str(report)
    statuses = {c.name: c.status for c in report.checks}
    family = make()
    if family.space.learned:
        for check in ("contract", "hypergrad one-step", "hypergrad forward", "zero gradients", "state_dict", "box"):
            assert statuses[check] == "pass", (check, str(report))
    if family.fused_update is not None:
        assert statuses["path fused"] == "pass", str(report)
    for point in family.references:
        assert statuses[f"point {point}"] in ("pass", "skip"), str(report)


def test_the_official_preset_is_told_apart_from_the_true_hyper_gradient():
    """MADA(preset="official") reproduces the authors' code, which treats AVGrad's running mean as a
    constant in the hyper-gradient: on purpose not the derivative, and the check says so."""
    report = check_family(MADA(preset="official"), compile=False)
    failed = {c.name for c in report.checks if c.status == "fail"}
    assert failed == {"hypergrad one-step", "hypergrad forward", "zero gradients"}, str(report)
    statuses = {c.name: c.status for c in report.checks}
    assert statuses["path fused"] == "pass"
    # no mada.c for the preset: the kernel written from its update is checked instead of skipped
    assert statuses["path native"] == "pass", str(report)


def test_mada_points_against_torch_and_pytorch_optimizer():
    seen = {}
    for make, group in [(MADA, {}), (FAMILIES["mada-yogi"][0], {}), (FAMILIES["mada-adan"][0], {}),
                        (lambda: MADA(lion=True), {"lr": 1e-3, "weight_decay": 0.01})]:
        report = check_family(make(), compile=False, paths=(), **group)
        seen.update({c.name: c for c in report.checks if c.name.startswith("point")})
    assert {n for n, c in seen.items() if c.status == "pass"} == {
        "point adam", "point amsgrad", "point yogi", "point adan", "point lion"}
    assert "torch's AdamW" in seen["point adam"].detail and "pytorch_optimizer's Yogi" in seen["point yogi"].detail


@pytest.mark.slow
def test_the_example_passes_on_the_compiled_path_too():
    report = check_family(example_family(), compile=True)
    assert report.ok, str(report)
    assert {c.name: c.status for c in report.checks}["path compiled"] == "pass"


# -- each kind of mistake fails the check that should catch it ----------------------------------


def _status(report, name):
    return next(c for c in report.checks if c.name == name)


def test_a_contract_break_fails_the_contract_and_skips_the_rest_with_the_fix():
    report = check_family(DEFECTS[".item() on a coefficient"][0](), compile=False)
    assert not report.ok
    contract = _status(report, "contract")
    assert contract.status == "fail" and "Tensor.item" in contract.detail and "torch.where" in contract.fix
    assert all(c.status == "skip" for c in report.checks[1:])
    text = str(report)
    assert text.splitlines()[0].startswith("FAIL  contract") and "      fix: " in text
    assert text.splitlines()[-1] == "belief: 0 passed, 1 failed, 7 skipped"
    assert json.loads(json.dumps(report.to_dict()))["ok"] is False


class WrongFused(MADA):
    """MADA whose hand-derived rule takes 1% too large a step."""

    def fused_update(self, grad, param, state, sc, learned):
        delta, new, tangents = super().fused_update(grad, param, state, sc, learned)
        return delta * 1.01, new, tangents


def test_a_wrong_fused_rule_fails_its_path():
    report = check_family(WrongFused(), compile=False)
    assert _status(report, "path fused").status == "fail"
    assert "fused path's parameters differ from the generic path's" in _status(report, "path fused").detail
    assert _status(report, "hypergrad one-step").status == "pass"  # the generic path is right


class WrongReference(Belief):
    """A reference that is not the point: Adam with another β2."""

    references = {"adam": lambda params, lr, eps: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=eps)}


def test_a_point_that_is_not_its_reference_fails():
    report = check_family(WrongReference(), compile=False)
    point = _status(report, "point adam")
    assert point.status == "fail" and "differs from its reference torch's Adam" in point.detail


class Stateful(Belief):
    """Keeps a step count on the family object instead of in the state: a checkpoint loses it.
    (Declared elementwise, it would already fail the contract: the probe runs the rule twice on
    the same inputs and gets two answers.)"""

    calls = 0
    elementwise = False

    def update(self, grad, param, state, coefficients, group, step):
        type(self).calls += 1
        delta, new = super().update(grad, param, state, coefficients, group, step)
        return delta * (1 + 1e-3 * (type(self).calls % 3)), new


def test_hidden_state_on_the_family_fails_the_checkpoint_check():
    report = check_family(Stateful(), compile=False, paths=())
    assert _status(report, "state_dict").status == "fail"


class WrongTangent(FusedBelief):
    """A hand-derived tangent with its sign flipped."""

    def fused_update(self, grad, param, state, sc, learned):
        delta, new, (tangent,) = super().fused_update(grad, param, state, sc, learned)
        return delta, new, [-tangent]


def test_a_wrong_hand_derived_tangent_fails_its_path():
    report = check_family(WrongTangent(), compile=False)
    assert _status(report, "path fused").status == "fail"


def test_progress_sees_every_check_in_order():
    seen = []
    report = check_family(Belief(), compile=False, progress=seen.append)
    assert seen == report.checks and [c.name for c in seen][:4] == [
        "contract", "hypergrad one-step", "hypergrad forward", "zero gradients"]


def test_check_family_is_exported():
    assert metaopt.check_family is check_family and "check_family" in metaopt.__all__
