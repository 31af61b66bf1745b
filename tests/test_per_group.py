"""Coefficients per param group (``MetaOptimizer(..., coefficients="per_group")``).

References written independently of the per-group code: one ordinary (shared-coefficient)
MetaOptimizer per param group, which per-group learning must reproduce exactly in the one-step
and forward modes on every path (a group's hyper-gradient is the sum over its own parameters,
its rule reads its own coefficients, so the groups are separate problems); and, for the
unrolled mode, where the meta-loss couples the groups, the chain rule: with every group's
coefficients equal, the per-group hyper-gradient rows sum to the shared mode's hyper-gradient.
float64 throughout.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _util import batches, host_reads_forbidden, loss_fn, rel_diff, tiny_mlp, train
from test_checkpoint import assert_same_run
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from metaopt import Forward, MetaOptimizer, OneStep, Unrolled
from metaopt.plugins.mada import MADA
from metaopt.plugins.padam import Padam

STEPS = 20


def groups(model):
    """Two named groups of the tiny MLP, the second with weight decay (its rule differs)."""
    ps = list(model.parameters())
    return [{"params": ps[:2], "name": "first"}, {"params": ps[2:], "name": "second", "weight_decay": 0.1}]


def per_group_and_separate(family, hypergrad, path, steps=STEPS, sit_out=True):
    """The same data through one per-group optimizer and through one shared-coefficient
    optimizer per group; at mid-run one parameter of the first group sits a step out (buckets
    break up: the per-tensor code runs from there)."""
    model, ref = tiny_mlp(), tiny_mlp()
    opt = MetaOptimizer(groups(model), family, hypergrad=hypergrad, lr=1e-2, path=path, coefficients="per_group")
    separate = [MetaOptimizer([g], family, hypergrad=hypergrad, lr=1e-2, path=path) for g in groups(ref)]
    assert opt.path == path and all(o.path == path for o in separate)
    for t, xy in enumerate(batches(steps)):
        opt.zero_grad()
        for o in separate:
            o.zero_grad()
        loss_fn(model, xy).backward()
        loss_fn(ref, xy).backward()
        if sit_out and t == steps // 2:
            model[0].bias.grad = ref[0].bias.grad = None
        opt.step()
        for o in separate:
            o.step()
    return (model, opt), (ref, separate)


def assert_equal_runs(ours, theirs, tol=0.0):
    (model, opt), (ref, separate) = ours, theirs
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_diff(p, q) <= tol
        for k, v in opt.state[p].items():
            assert rel_diff(v, next(o for o in separate if q in o.state).state[q][k]) <= tol, k
    for gi, o in enumerate(separate):
        for k, v in o.coefficients.items():
            assert rel_diff(opt.coefficients_of(gi)[k], v) <= tol, (gi, k)
        for k, v in o.last_hypergrad.items():
            assert rel_diff(opt.last_hypergrad[k][gi], v) <= tol, (gi, k)
    # the groups really learned different coefficients, so the equality tests the rows apart
    assert any((opt.coefficients[k][0] - opt.coefficients[k][1]).abs() > 1e-6 for k in opt.learned)


CASES = {
    "one_step-generic": (MADA(), OneStep(lr=0.05), "generic"),
    "one_step-fused": (MADA(), OneStep(lr=0.05, optimizer="adam"), "fused"),
    "one_step-native": (MADA(), OneStep(lr=0.05, momentum=0.9), "native"),
    "forward-generic": (MADA().with_coefficients(beta3=0.1, c=0.9, rho=0.9), Forward(lr=0.05, decay=0.9), "generic"),
    "padam-generic": (Padam(), OneStep(lr=0.05), "generic"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_group_learning_equals_one_optimizer_per_group(case):
    family, hypergrad, path = CASES[case]
    assert_equal_runs(*per_group_and_separate(family, hypergrad, path))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["one_step", "forward"])
def test_per_group_learning_on_the_compiled_path(mode):
    """The compiled path (one graph over every group's bucket, each with its row) against one
    compiled optimizer per group: equal to float64 rounding (the graphs differ)."""
    family = Padam() if mode == "one_step" else MADA().with_coefficients(beta3=0.1, c=0.9, rho=0.9)
    hypergrad = OneStep(lr=0.05) if mode == "one_step" else Forward(lr=0.05, decay=0.9)
    ours, theirs = per_group_and_separate(family, hypergrad, "compiled", steps=12)
    assert ours[1]._path.compiled  # compiled, not fallen back to eager
    assert_equal_runs(ours, theirs, tol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_unrolled_per_group_rows_sum_to_the_shared_hypergradient(first_order):
    """Each group's row is ∂L/∂c_group; with every group at the same values the shared c is all
    of them at once, so the rows sum to the shared mode's ∂L/∂c (the chain rule)."""
    data = batches(4)
    hs = {}
    for mode in ("shared", "per_group"):
        model = tiny_mlp()
        opt = MetaOptimizer(groups(model), MADA().with_coefficients(beta3=0.1, c=0.9, rho=0.9),
                            hypergrad=Unrolled(steps=3, lr=0.0, first_order=first_order), lr=1e-2, coefficients=mode)
        opt.unrolled_step(model, data[:3], loss_fn, data[3])
        hs[mode] = torch.stack(list(opt.last_hypergrad.values()))
    assert hs["per_group"].shape == (3, 2)
    assert rel_diff(hs["per_group"].sum(1), hs["shared"]) <= 1e-12
    assert (hs["per_group"][:, 0] - hs["per_group"][:, 1]).abs().max() > 1e-8  # the groups' parts differ


def test_unrolled_per_group_moves_each_group_by_its_own_row():
    model = tiny_mlp()
    opt = MetaOptimizer(groups(model), MADA().with_coefficients(beta3=0.1, c=0.9, rho=0.9),
                        hypergrad=Unrolled(steps=2, lr=0.05, momentum=0.0), lr=1e-2, coefficients="per_group")
    data = batches(3)
    before = opt.coefficients
    opt.unrolled_step(model, data[:2], loss_fn, data[2])
    h = opt.last_hypergrad
    for k in opt.learned:  # plain SGD, inside the box: c ← c - lr·h, row by row
        assert rel_diff(opt.coefficients[k], before[k] - 0.05 * h[k]) <= 1e-12


def test_validation_hyperstep_per_group_equals_one_optimizer_per_group():
    model, ref = tiny_mlp(), tiny_mlp()
    hyper = OneStep(lr=0.05, objective="validation")
    family = MADA().with_coefficients(beta3=0.1, c=0.9, rho=0.9)
    opt = MetaOptimizer(groups(model), family, hypergrad=hyper, lr=1e-2, coefficients="per_group")
    separate = [MetaOptimizer([g], family, hypergrad=hyper, lr=1e-2) for g in groups(ref)]
    data = batches(8)
    for t, xy in enumerate(data[:6]):
        for m, os_ in ((model, [opt]), (ref, separate)):
            for o in os_:
                o.zero_grad()
            loss_fn(m, xy).backward()
            for o in os_:
                o.step()
        if t % 2:
            opt.validation_hyperstep(loss_fn(model, data[7]))
            for o in separate:
                o.validation_hyperstep(loss_fn(ref, data[7]))
    for gi, o in enumerate(separate):
        for k, v in o.coefficients.items():
            assert torch.equal(opt.coefficients_of(gi)[k], v), (gi, k)
    assert any((opt.coefficients[k][0] - opt.coefficients[k][1]).abs() > 1e-6 for k in opt.learned)


def test_reading_and_setting_a_groups_coefficients():
    model = tiny_mlp()
    opt = MetaOptimizer(groups(model), MADA(), coefficients="per_group")
    assert opt.coefficients["beta3"].shape == (2,)
    opt.set_coefficients(group="second", beta3=0.5, rho=-3.0)  # rho projected into [0, 1]
    assert opt.coefficients_of("second")["beta3"] == 0.5 and opt.coefficients_of(1)["rho"] == 0.0
    assert opt.coefficients_of("first")["beta3"] == 0.0 and opt.coefficients_of(0)["rho"] == 1.0
    opt.set_coefficients(c=0.25)  # no group: every group's
    assert opt.coefficients["c"].tolist() == [0.25, 0.25]
    with pytest.raises(KeyError, match="no param group named 'third'"):
        opt.coefficients_of("third")
    with pytest.raises(IndexError, match="param group 2 does not exist"):
        opt.set_coefficients(group=2, c=0.5)
    with pytest.raises(KeyError, match="no coefficient 'gamma2'"):
        opt.set_coefficients(group=0, gamma2=0.5)
    shared = MetaOptimizer(groups(tiny_mlp()), MADA())
    assert shared.coefficients["beta3"].shape == () and shared.coefficients_of("second")["c"] == 1.0
    with pytest.raises(ValueError, match="needs coefficients='per_group'"):
        shared.set_coefficients(group=0, c=0.5)
    with pytest.raises(ValueError, match="'shared' or 'per_group'"):
        MetaOptimizer(groups(tiny_mlp()), MADA(), coefficients="per_layer")


def test_a_group_added_later_starts_at_the_initial_coefficients_and_learns_on_its_own():
    model = tiny_mlp()
    ps = list(model.parameters())
    opt = MetaOptimizer([{"params": ps[:2]}], MADA(), hypergrad=OneStep(lr=0.05), lr=1e-2, coefficients="per_group")
    data = batches(12)
    for t, xy in enumerate(data):
        if t == 4:
            opt.add_param_group({"params": ps[2:], "name": "late"})
            init = dict(zip(MADA().space.names, MADA().space.tensors(torch.float64)[0].tolist()))
            assert {k: v.item() for k, v in opt.coefficients_of("late").items()} == init
            assert opt.last_hypergrad["beta3"][1] == 0.0
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
    assert opt.coefficients["beta3"].shape == (2,)
    assert opt.coefficients["beta3"][1] != opt.coefficients["beta3"][0]


def test_a_per_group_step_reads_nothing_back_to_the_host():
    model = tiny_mlp()
    opt = MetaOptimizer(groups(model), MADA(), hypergrad=OneStep(lr=0.05), lr=1e-2, path="fused", coefficients="per_group")
    data = batches(4)
    for xy in data[:2]:
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
    with host_reads_forbidden():
        for xy in data[2:]:
            opt.zero_grad()
            loss_fn(model, xy).backward()
            opt.step()


# -- checkpoints -------------------------------------------------------------------------------


def _trained(steps, path="generic", mode="per_group", seed=0):
    model = tiny_mlp(seed=seed)
    opt = MetaOptimizer(groups(model), MADA(), hypergrad=OneStep(lr=0.05, optimizer="adam"), lr=1e-2, path=path,
                        coefficients=mode)
    train(model, opt, batches(10), steps)
    return model, opt


def _continue(model, opt, start):
    train(model, opt, batches(10)[start:])


def _assert_same(a, b):
    """Parameters, coefficients, last hyper-gradients, every state tensor and the record: equal."""
    assert_same_run(*a, *b)


@pytest.mark.parametrize("path", ["generic", "native"])
def test_state_dict_resume_is_bit_identical(path):
    model, opt = _trained(5, path)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["metaopt"]["coefficients"].shape == (2, 5)
    fresh_model, fresh = _trained(0, path, seed=3)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(sd)
    _continue(fresh_model, fresh, 5)
    ref = _trained(10, path)
    _assert_same((fresh_model, fresh), ref)
    assert (ref[1].coefficients["beta3"][0] - ref[1].coefficients["beta3"][1]).abs() > 1e-6


def test_dcp_round_trip_is_bit_identical(tmp_path):
    model, opt = _trained(5)
    with warnings.catch_warnings():  # DCP warns that it runs without a process group
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=str(tmp_path))
        fresh_model, fresh = _trained(0, seed=3)
        sd = {"model": get_model_state_dict(fresh_model), "optim": get_optimizer_state_dict(fresh_model, fresh)}
        dcp.load(sd, checkpoint_id=str(tmp_path))
        set_model_state_dict(fresh_model, sd["model"])
        set_optimizer_state_dict(fresh_model, fresh, sd["optim"])
    _continue(fresh_model, fresh, 5)
    _assert_same((fresh_model, fresh), _trained(10))


def test_a_state_dict_of_the_other_kind_or_group_count_is_refused():
    _, shared = _trained(3, mode="shared")
    _, per_group = _trained(3)
    before = per_group.state_dict()
    with pytest.raises(ValueError, match="coefficients='shared', this optimizer coefficients='per_group'"):
        per_group.load_state_dict(shared.state_dict())
    with pytest.raises(ValueError, match="coefficients='per_group', this optimizer coefficients='shared'"):
        shared.load_state_dict(before)
    sd = per_group.state_dict()
    rec = sd["param_groups"][0]["metaopt"]
    rec["coefficients"] = rec["coefficients"][:1]
    with pytest.raises(ValueError, match=r"'coefficients' must be a float tensor of shape \(2, 5\)"):
        per_group.load_state_dict(sd)
    for k, v in per_group.coefficients.items():  # nothing changed
        assert torch.equal(v, before["param_groups"][0]["metaopt"]["coefficients"][:, MADA().space.names.index(k)])
