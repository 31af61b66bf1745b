"""Unrolled hyper-gradients through higher, and the validation objective of the one-step mode.

float64 throughout. References: the one-step mode (itself checked against finite differences),
central finite differences of the meta-objective after K steps, an unroll written here by hand
with torch.func.functional_call (no higher), and K plain steps.
"""

from __future__ import annotations

import copy
import gc
import warnings

import higher
import pytest
import torch
from _util import assert_close, batches, loss_fn, tiny_mlp
from torch.func import functional_call

from metaopt import DifferentiableMetaOptimizer, MetaOptimizer, OneStep, Unrolled
from metaopt.plugins.mada import MADA

ALL5 = ("beta1", "beta2", "beta3", "c", "rho")
FAMILY = MADA(betas=(0.9, 0.99), learn=ALL5)
COEFS = {"beta1": 0.8, "beta2": 0.9, "beta3": 0.4, "c": 0.6, "rho": 0.7}
GROUP = {"lr": 1e-2}


def warmed(hypergrad, family=FAMILY, warm=5, model_fn=tiny_mlp, data=None):
    """A model and optimizer at a non-trivial state (interior coefficients, moments built)."""
    model = model_fn()
    opt = MetaOptimizer(model.parameters(), family, hypergrad=hypergrad, **GROUP)
    opt.set_coefficients(**{k: v for k, v in COEFS.items() if k in opt.coefficients})
    for xy in (data or batches(warm, seed=7)):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
    return model, opt


def as_floats(d):
    return {k: v.item() for k, v in d.items()}


def test_k1_unrolled_with_training_loss_equals_one_step():
    data = batches(2, seed=11)
    model_a, a = warmed(OneStep(lr=0.0))
    for xy in data:  # step t on data[0]; step t+1 forms h from data[1]'s gradient
        a.zero_grad()
        loss_fn(model_a, xy).backward()
        a.step()
    model_b, b = warmed(Unrolled(steps=1, lr=0.0))
    b.unrolled_step(model_b, data[:1], loss_fn, meta_batch=data[1])
    ha, hb = as_floats(a.last_hypergrad), as_floats(b.last_hypergrad)
    for k in ha:
        assert abs(ha[k] - hb[k]) <= 1e-6 * max(abs(ha[k]), 1e-12), (k, ha[k], hb[k])
    assert max(abs(v) for v in ha.values()) > 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_k3_unrolled_hypergradient_matches_finite_differences(seed):
    train_batches, meta_batch = batches(3, seed=20 + seed), batches(1, seed=30 + seed)[0]
    model, opt = warmed(Unrolled(steps=3, lr=0.0))
    ckpt = copy.deepcopy((model.state_dict(), opt.state_dict()))
    opt.unrolled_step(model, train_batches, loss_fn, meta_batch, commit=False)
    h = as_floats(opt.last_hypergrad)

    def meta_after_3(**coefficients):
        m = tiny_mlp(seed=99)
        o = MetaOptimizer(m.parameters(), FAMILY, hypergrad=Unrolled(steps=3, lr=0.0), **GROUP)
        m.load_state_dict(ckpt[0])
        o.load_state_dict(copy.deepcopy(ckpt[1]))
        o.set_coefficients(**coefficients)
        for xy in train_batches:
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()  # in Unrolled mode a plain step with fixed coefficients
        with torch.no_grad():
            return loss_fn(m, meta_batch).item()

    eps, fd = 1e-6, {}
    for k in opt.learned:
        c = opt.coefficients[k].item()
        fd[k] = (meta_after_3(**{k: c + eps}) - meta_after_3(**{k: c - eps})) / (2 * eps)
    assert_close(h, fd, tol=1e-4)


def manual_unroll(model, opt, train_batches, meta_batch, detach_inner_grads):
    """An unroll written without higher: functional_call on explicit tensors."""
    family = opt.family
    names = [n for n, _ in model.named_parameters()]
    leaf = torch.stack([opt.coefficients[k] for k in opt.learned]).requires_grad_()
    coeffs = {k: (leaf[opt.learned.index(k)] if k in opt.learned else v) for k, v in opt.coefficients.items()}
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    group = opt.param_groups[0]
    states = []
    for p in model.parameters():
        s = opt.state[p]
        states.append({k: v.clone() for k, v in s.items() if not k.startswith("hypergrad_tangent")})
    for xy in train_batches:
        loss = loss_fn(lambda x: functional_call(model, dict(zip(names, params)), (x,)), xy)
        grads = torch.autograd.grad(loss, params, create_graph=not detach_inner_grads)
        new_params = []
        for p, g, s in zip(params, grads, states):
            step = s.pop("step") + 1
            delta, new = family.update(g, p, s, coeffs, group, step)
            s.update(new)
            s["step"] = step
            new_params.append(p + delta)
        params = new_params
    meta = loss_fn(lambda x: functional_call(model, dict(zip(names, params)), (x,)), meta_batch)
    (h,) = torch.autograd.grad(meta, leaf)
    return dict(zip(opt.learned, h.tolist()))


@pytest.mark.parametrize("first_order", [True, False], ids=["first-order", "second-order"])
def test_unroll_equals_a_hand_written_unroll(first_order):
    train_batches, meta_batch = batches(3, seed=40), batches(1, seed=41)[0]
    model, opt = warmed(Unrolled(steps=3, lr=0.0, first_order=first_order))
    expected = manual_unroll(model, opt, train_batches, meta_batch, detach_inner_grads=first_order)
    other = manual_unroll(model, opt, train_batches, meta_batch, detach_inner_grads=not first_order)
    opt.unrolled_step(model, train_batches, loss_fn, meta_batch, commit=False)
    got = as_floats(opt.last_hypergrad)
    for k in expected:
        assert got[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-14), k
    # detaching the inner gradients really changes the answer, so the check is not empty
    assert max(abs(expected[k] - other[k]) for k in expected) > 1e-6 * max(abs(v) for v in expected.values())


def bn_mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    ).double()


def test_commit_equals_k_plain_steps_with_the_coefficients_in_force():
    train_batches, meta_batch = batches(3, seed=50), batches(1, seed=51, batch=5)[0]
    model, opt = warmed(Unrolled(steps=3, lr=0.5, momentum=0.0), model_fn=bn_mlp)
    ref_model, ref_opt = copy.deepcopy((model, opt))
    c0 = opt.coefficients
    opt.unrolled_step(model, train_batches, loss_fn, meta_batch)
    for xy in train_batches:
        ref_opt.zero_grad()
        loss_fn(ref_model, xy).backward()
        ref_opt.step()
    # bit-identical: the unroll runs the rule the plain step runs, on the same numbers
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n
        assert p.is_leaf and p.grad_fn is None and p.requires_grad, n  # a parameter, no graph
    for (n, b), r in zip(model.named_buffers(), ref_model.buffers()):
        assert torch.equal(b, r), n  # running stats of the 3 training forwards, not the meta one
    for p, q in zip(model.parameters(), ref_model.parameters()):
        s, r = opt.state[p], ref_opt.state[q]
        assert set(s) == set(r)
        for k in s:
            assert torch.equal(s[k], r[k]), k
            assert s[k].grad_fn is None and not s[k].requires_grad, k  # committed without the graph
    assert all(v.grad_fn is None and not v.requires_grad for v in opt.coefficients.values())
    assert all(v.grad_fn is None for v in opt.last_hypergrad.values())
    assert opt._meta_step == ref_opt._meta_step
    # the hyper-step happened after the committed steps
    assert any(abs(opt.coefficients[k].item() - c0[k].item()) > 1e-6 for k in opt.learned)
    assert all(torch.equal(ref_opt.coefficients[k], c0[k]) for k in c0)


def test_commit_false_leaves_model_buffers_and_state_untouched():
    train_batches, meta_batch = batches(2, seed=60), batches(1, seed=61)[0]
    model, opt = warmed(Unrolled(steps=2, lr=0.5), model_fn=bn_mlp)
    params = list(model.parameters())
    before = copy.deepcopy((model.state_dict(), [dict(opt.state[p]) for p in params]))
    opt.unrolled_step(model, train_batches, loss_fn, meta_batch, commit=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    for p, old in zip(params, before[1]):
        assert set(opt.state[p]) == set(old)
        for k, v in opt.state[p].items():
            assert torch.equal(v, old[k]), k


def _live_tensors() -> tuple[int, int]:
    """(live tensor objects, bytes of the distinct storages they hold)."""
    gc.collect()
    with warnings.catch_warnings():  # scanning every object touches deprecated torch aliases
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if torch.is_tensor(o)]
    storages = {}
    for t in tensors:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except RuntimeError:  # fake and functional tensors a compile test left alive: no memory
            continue
        storages[ptr] = max(storages.get(ptr, 0), storage.nbytes())
    return len(tensors), sum(storages.values())


def test_many_unrolled_hypersteps_do_not_grow_memory():
    model, opt = warmed(Unrolled(steps=2, lr=1e-3), warm=1)
    data = batches(3, seed=70)
    opt.unrolled_step(model, data[:2], loss_fn, data[2])
    count, nbytes = _live_tensors()
    for _ in range(50):
        opt.unrolled_step(model, data[:2], loss_fn, data[2])
    # neither objects nor bytes: a kept graph would hold the 50 unrolls' activations
    after_count, after_bytes = _live_tensors()
    assert after_count <= count and after_bytes <= nbytes
    for p in model.parameters():
        assert p.grad_fn is None and all(v.grad_fn is None for v in opt.state[p].values())


def test_validation_objective_in_one_step_mode():
    val = batches(1, seed=80)[0]
    step_t = batches(1, seed=81)[0]
    # reference: the training objective with the validation batch as "next" training batch
    model_a, a = warmed(OneStep(lr=0.0))
    for xy in (step_t, val):
        a.zero_grad()
        loss_fn(model_a, xy).backward()
        a.step()
    model_b, b = warmed(OneStep(lr=0.0, objective="validation"))
    b.zero_grad()
    loss_fn(model_b, step_t).backward()
    b.step()
    grads_before = [p.grad.clone() for p in model_b.parameters()]
    b.validation_hyperstep(loss_fn(model_b, val))
    ha, hb = as_floats(a.last_hypergrad), as_floats(b.last_hypergrad)
    for k in ha:
        assert hb[k] == pytest.approx(ha[k], rel=1e-12), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model_b.parameters(), grads_before))


def test_validation_objective_steps_do_not_move_coefficients_on_their_own():
    model, opt = warmed(OneStep(lr=1.0, objective="validation"))
    c0 = opt.coefficients
    for xy in batches(3, seed=90):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
    assert all(torch.equal(opt.coefficients[k], c0[k]) for k in c0)
    opt.validation_hyperstep(loss_fn(model, batches(1, seed=91)[0]))
    assert any(not torch.equal(opt.coefficients[k], c0[k]) for k in opt.learned)


def test_higher_innerloop_ctx_takes_a_meta_optimizer_like_adam():
    model, opt = warmed(OneStep(lr=0.0))
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        assert isinstance(diffopt, DifferentiableMetaOptimizer)
        for xy in batches(2, seed=95):
            diffopt.step(loss_fn(fmodel, xy))
        (h,) = torch.autograd.grad(loss_fn(fmodel, batches(1, seed=96)[0]), diffopt.learned_coefficients)
    assert h.shape == (len(opt.learned),) and torch.isfinite(h).all() and h.abs().max() > 0

    class MyOptimizer(MetaOptimizer):  # subclasses are registered too
        pass

    sub = MyOptimizer(model.parameters(), FAMILY)
    with higher.innerloop_ctx(model, sub) as (_, diffopt):
        assert isinstance(diffopt, DifferentiableMetaOptimizer)


def test_unrolled_step_checks_its_arguments():
    model, opt = warmed(Unrolled(steps=2))
    with pytest.raises(ValueError, match="steps=2"):
        opt.unrolled_step(model, batches(3), loss_fn, batches(1)[0])
    model, fixed = warmed(None)
    with pytest.raises(RuntimeError, match="learned"):
        fixed.unrolled_step(model, batches(2), loss_fn, batches(1)[0])
