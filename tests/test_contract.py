"""The family contract, held by the engine (issue 21): a stranger's rule that breaks it is refused.

Each defect a new author met ran without an error on the engine before (wrong numbers, or a
hyper-gradient of 0); here each one is refused with one ``FamilyContractError`` that names the
family, the function, what was found and the fix, at construction, the same on every path and in
every mode. The family is an Adam <-> AdaBelief interpolation written as an author would.
"""

from __future__ import annotations

import pytest
import torch
from _util import batches, loss_fn, tiny_mlp, train

from metaopt import (
    Coefficient, CoefficientSpace, Family, FamilyContractError, Forward, Hyperparameters, MetaOptimizer, OneStep,
    Unrolled,
)
from metaopt.plugins.mada import MADA


class BeliefHyperparameters(Hyperparameters):
    eps: float = 1e-8


class Belief(Family):
    """Adam <-> AdaBelief: s = b2 s + (1-b2)(κ g² + (1-κ)(g-m)²), delta = -lr m̂ / (sqrt(ŝ) + eps)."""

    name = "belief"
    hyperparameters = BeliefHyperparameters
    elementwise = True
    points = {"adam": {"kappa": 1.0}, "adabelief": {"kappa": 0.0}}

    def __init__(self, kappa: float = 0.5):
        self.space = CoefficientSpace(kappa=Coefficient(init=kappa, low=0.0, high=1.0),
                                      beta1=Coefficient(init=0.9, low=0.0, high=0.99, learned=False))

    def init(self, param, grad, group):
        return {"m": torch.zeros_like(param), "s": torch.zeros_like(param)}

    def moments(self, grad, state, coefficients):
        k, b1 = coefficients["kappa"], coefficients["beta1"]
        m = b1 * state["m"] + (1 - b1) * grad
        s = 0.999 * state["s"] + 0.001 * (k * grad * grad + (1 - k) * (grad - m) ** 2)
        return m, s

    def update(self, grad, param, state, coefficients, group, step):
        m, s = self.moments(grad, state, coefficients)
        b1 = coefficients["beta1"]
        delta = -group["lr"] * (m / (1 - b1**step)) / (torch.sqrt(s / (1 - 0.999**step)) + group["eps"])
        return delta, {"m": m, "s": s}


def _variant(name, update=None, init=None, **attrs):
    body = dict(attrs)
    if update is not None:
        body["update"] = update
    if init is not None:
        body["init"] = init
    return type(name, (Belief,), body)


def _scalar_delta(self, grad, param, state, coefficients, group, step):
    delta, new = Belief.update(self, grad, param, state, coefficients, group, step)
    return delta.mean(), new


def _missing_key(self, grad, param, state, coefficients, group, step):
    delta, new = Belief.update(self, grad, param, state, coefficients, group, step)
    return delta, {"m": new["m"]}


def _in_place(self, grad, param, state, coefficients, group, step):
    state["m"].mul_(coefficients["beta1"]).add_((1 - coefficients["beta1"]) * grad)
    return Belief.update(self, grad, param, {**state, "m": state["m"] * 0}, coefficients, group, step)


def _item(self, grad, param, state, coefficients, group, step):
    return Belief.update(self, grad, param, state, {**coefficients, "kappa": coefficients["kappa"].item()}, group, step)


def _python_if(self, grad, param, state, coefficients, group, step):
    if coefficients["kappa"] > 0.5:
        grad = grad * 1.0
    return Belief.update(self, grad, param, state, coefficients, group, step)


def _detached(self, grad, param, state, coefficients, group, step):
    return Belief.update(self, grad, param, state, {**coefficients, "kappa": coefficients["kappa"].detach()}, group,
                         step)


def _only_delta(self, grad, param, state, coefficients, group, step):
    return Belief.update(self, grad, param, state, coefficients, group, step)[0]


def _mixes(self, grad, param, state, coefficients, group, step):
    return Belief.update(self, grad / grad.norm(), param, state, coefficients, group, step)


def _float32_delta(self, grad, param, state, coefficients, group, step):
    delta, new = Belief.update(self, grad, param, state, coefficients, group, step)
    return delta.to(torch.float32), new


def _wrong_init_shape(self, param, grad, group):
    return {"m": torch.zeros(param.shape[0], dtype=param.dtype), "s": torch.zeros_like(param)}


def _mask_read(self, grad, param, state, coefficients, group, step):
    delta, new = Belief.update(self, grad, param, state, coefficients, group, step)
    return delta.clone().index_put_((delta > 0,), torch.zeros((), dtype=delta.dtype)), new


#: defect -> (the family, words the error must contain)
DEFECTS = {
    "a delta that only broadcasts": (_variant("ScalarDelta", _scalar_delta), ["delta has shape ()", "parameter's shape"]),
    "a state key missing": (_variant("MissingKey", _missing_key), ["missing ['s']", "init makes"]),
    "in-place ops on the state": (_variant("InPlace", _in_place), ["changed its input state['m'] in place",
                                                                   "out-of-place"]),
    ".item() on a coefficient": (_variant("Item", _item), ["Tensor.item", "torch.where"]),
    "a Python if on a coefficient": (_variant("PythonIf", _python_if), ["Tensor.__bool__", "torch.where"]),
    "a detached coefficient": (_variant("Detached", _detached), ["'kappa' does not reach delta differentiably",
                                                                 "learned=False"]),
    "update returning delta only": (_variant("OnlyDelta", _only_delta), ["not the pair (delta, new_state)"]),
    "elementwise on a rule that mixes coordinates": (_variant("Mixes", _mixes), ["elementwise is True",
                                                                                "elementwise = False"]),
    "a float32 delta for float64 parameters": (_variant("Float32Delta", _float32_delta), ["delta is float32"]),
    "init's state of the wrong shape": (_variant("WrongInitShape", init=_wrong_init_shape),
                                        ["m (2,) float64, not the parameter's shape (2, 3)", "the state init returns"]),
    "a boolean-mask index (nonzero)": (_variant("MaskRead", _mask_read), ["read on the host", "nonzero"]),
}

#: every path and mode a family with update alone can take (the error comes before any compilation)
RUNS = {
    "generic one-step": dict(hypergrad=OneStep(), path="generic"),
    "compiled one-step": dict(hypergrad=OneStep(), compile=True),
    "generic forward": dict(hypergrad=Forward()),
    "compiled forward": dict(hypergrad=Forward(), compile=True),
    "unrolled": dict(hypergrad=Unrolled(steps=2)),
    "fixed": dict(hypergrad=None),
}


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("defect", list(DEFECTS))
def test_a_broken_rule_is_refused_with_its_name_what_and_the_fix_on_every_path_and_mode(defect, run):
    cls, words = DEFECTS[defect]
    if run == "fixed" and defect in ("a detached coefficient",):
        pytest.skip("with fixed coefficients nothing is differentiated: a detached one is harmless")
    model = tiny_mlp()
    with pytest.raises(FamilyContractError) as info:
        MetaOptimizer(model.parameters(), cls(), lr=1e-2, **RUNS[run])
    err = info.value
    text = str(err)
    assert err.family == "belief" and cls.__name__ in err.rule, text
    assert "fix:" in text and err.fix, text
    for word in words:
        assert word in text, (word, text)


class BrokenMADA(MADA):
    """MADA whose update changes its incoming state in place; its fused rule and C kernel are fine."""

    def update(self, grad, param, state, coefficients, group, step):
        state["exp_avg"].mul_(1.0)
        return super().update(grad, param, state, coefficients, group, step)


@pytest.mark.parametrize("path", ["fused", "native", "generic"])
def test_the_same_refusal_on_the_hand_derived_paths(path):
    with pytest.raises(FamilyContractError, match=r"changed its input state\['exp_avg'\] in place"):
        MetaOptimizer(tiny_mlp().parameters(), BrokenMADA(), path=path)


def test_the_refusal_changes_nothing_and_names_the_line():
    model = tiny_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FamilyContractError) as info:
        MetaOptimizer(model.parameters(), DEFECTS[".item() on a coefficient"][0]())
    assert "test_contract.py" in str(info.value) and ".item()" in str(info.value)  # the file, line and code
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_shipped_and_example_families_pass_the_probe_in_every_mode():
    from metaopt.plugins.hd import AdamHD, SGDHD
    from metaopt.plugins.padam import Padam

    families = [MADA(), MADA(lion=True, second_moment="mean"), MADA(preset="official"), Padam(), SGDHD(), AdamHD(),
                Belief()]
    for family in families:
        for run in RUNS.values():
            MetaOptimizer(tiny_mlp().parameters(), family, **run)


# -- declarations -------------------------------------------------------------------------------


def test_a_plain_dict_as_space_is_refused_with_the_fix():
    class DictSpace(Belief):
        def __init__(self):
            self.space = {"kappa": Coefficient(init=0.5, low=0.0, high=1.0)}

    with pytest.raises(FamilyContractError, match=r"space is a dict, not a metaopt.CoefficientSpace(.|\n)*"
                                                  r"CoefficientSpace\(kappa=\.\.\.\)"):
        MetaOptimizer(tiny_mlp().parameters(), DictSpace())


def test_a_family_without_update_or_with_an_instance_as_hyperparameters_is_refused():
    class NoUpdate(Family):
        name = "no_update"
        space = CoefficientSpace(a=Coefficient(init=0.5, low=0.0, high=1.0))

        def init(self, param, grad, group):
            return {}

    with pytest.raises(FamilyContractError, match="does not define update"):
        MetaOptimizer(tiny_mlp().parameters(), NoUpdate())

    class Instance(Belief):
        hyperparameters = BeliefHyperparameters()

    with pytest.raises(FamilyContractError, match="not a subclass of metaopt.Hyperparameters"):
        MetaOptimizer(tiny_mlp().parameters(), Instance())


def _update_param_first(self, param, grad, state, coefficients, group, step):  # init's order, a natural slip
    return Belief.update(self, grad, param, state, coefficients, group, step)


def _update_without_step(self, grad, param, state, coefficients, group):
    return Belief.update(self, grad, param, state, coefficients, group, torch.tensor(1.0))


def _init_grad_first(self, grad, param, group):
    return Belief.init(self, param, grad, group)


def _update_other_names(self, g, p, st, c, grp, t):
    return Belief.update(self, g, p, st, c, grp, t)


def _update_star_args(self, *args):
    return Belief.update(self, *args)


@pytest.mark.parametrize(("update", "init", "found"), [
    (_update_param_first, None, "update's argument 1 is named 'param', but the engine passes the gradient there "
                                "(the parameter is argument 2)"),
    (_update_without_step, None, "update(self, grad, param, state, coefficients, group) takes 5 arguments, but the "
                                 "engine passes 6"),
    (None, _init_grad_first, "init's argument 1 is named 'grad', but the engine passes the parameter there"),
])
def test_arguments_in_another_order_or_number_are_refused_before_any_step(update, init, found):
    """The engine passes them by position: param and grad swapped would otherwise run, silently wrong."""
    bad = _variant("Swapped", update=update, init=init)
    with pytest.raises(FamilyContractError) as err:
        MetaOptimizer(tiny_mlp().parameters(), bad())
    assert found in str(err.value)
    assert "def update(self, grad, param, state, coefficients, group, step)" in str(err.value) or init is not None


def test_arguments_with_names_of_their_own_or_star_args_are_accepted():
    for update in (_update_other_names, _update_star_args):
        model = tiny_mlp()
        opt = MetaOptimizer(model.parameters(), _variant("Own", update=update)(), lr=1e-2)
        train(model, opt, batches(2))
        assert opt.state[next(model.parameters())]["m"].abs().sum() > 0  # it stepped


def test_path_native_without_a_kernel_says_it_needs_a_c_kernel():
    """Asked for, a kernel is written from update; where none can be, the error says why."""
    assert MetaOptimizer(tiny_mlp().parameters(), Belief(), path="native")._path.derived
    mixing = Belief()
    mixing.elementwise = False
    with pytest.raises(ValueError, match=r"path='native' runs a C kernel(.|\n)*belief has no kernel of its own"
                                         r"(.|\n)*not elementwise"):
        MetaOptimizer(tiny_mlp().parameters(), mixing, path="native")
    with pytest.raises(ValueError, match=r"path='fused' runs a family's hand-derived rule(.|\n)*compile=True"):
        MetaOptimizer(tiny_mlp().parameters(), Belief(), path="fused")


# -- the first real step: the contract at each parameter's own shape ----------------------------


class ShapeDependent(Family):
    """Per tensor (not elementwise): delta of the wrong shape for 3-d parameters only."""

    name = "shape_dependent"

    def __init__(self):
        self.space = CoefficientSpace(a=Coefficient(init=0.5, low=0.0, high=1.0))

    def init(self, param, grad, group):
        return {}

    def update(self, grad, param, state, coefficients, group, step):
        delta = -group["lr"] * coefficients["a"] * grad
        if param.dim() == 3:
            delta = delta.sum(0)
        return delta, {}


class Cube(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2, 3, 4, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["generic", "compiled", "unrolled"])
def test_the_first_step_holds_each_shape_to_the_contract(kind):
    model = Cube()
    run = {"generic": {}, "compiled": {"compile": True}, "unrolled": {"hypergrad": Unrolled(steps=1)}}[kind]
    opt = MetaOptimizer(model.parameters(), ShapeDependent(), lr=0.1, **run)  # the probe's (2, 3) is fine
    with pytest.raises(FamilyContractError, match=r"delta has shape \(3, 4\), its parameter \(2, 3, 4\)"):
        if kind == "unrolled":
            opt.unrolled_step(model, [None], lambda m, b: (m.w ** 2).sum(), None)
        else:
            (model.w ** 2).sum().backward()
            opt.step()


def test_the_first_step_check_costs_nothing_later(monkeypatch):
    import metaopt.state as state_module

    calls = []
    real = state_module.first_step
    monkeypatch.setattr(state_module, "first_step", lambda *a, **k: calls.append(a) or real(*a, **k))
    model = tiny_mlp()
    opt = MetaOptimizer(model.parameters(), Belief(), lr=1e-2, path="generic")
    train(model, opt, batches(5))
    # one check per kind of parameter (group, shape, dtype, device): 4 tensors of 4 shapes, at the first step
    assert len(calls) == 4


# -- messages that used to come from deep inside -------------------------------------------------


def test_a_wrong_init_shape_is_named_when_update_fails_on_it():
    def init(self, param, grad, group):
        return {"m": torch.zeros(5, dtype=param.dtype), "s": torch.zeros_like(param)}

    cls = _variant("BadInit", init=init)
    with pytest.raises(FamilyContractError) as info:
        MetaOptimizer(tiny_mlp().parameters(), cls())
    text = str(info.value)
    assert "raised RuntimeError" in text and "m (5,) float64, not the parameter's shape (2, 3)" in text, text


def _root_of_the_gradient(self, grad, param, state, coefficients, group, step):
    delta, new = Belief.update(self, grad, param, state, coefficients, group, step)
    return delta + 1e-3 * torch.sqrt(grad) + 1e-3 * torch.log(grad), new


def test_an_undefined_slope_is_no_evidence_of_mixing_coordinates():
    """sqrt and log of a negative gradient have NaN slopes: times the zero cotangent of another
    coordinate they give NaN off the diagonal, which is not a coupling (a norm would give a
    finite one, as the mixing defect above shows)."""
    family = _variant("RootOfTheGradient", _root_of_the_gradient)()
    MetaOptimizer(tiny_mlp().parameters(), family, lr=1e-2)  # the probe's gradients are partly negative
