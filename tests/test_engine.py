"""The engine: validation, boxes, the hyper-optimizer's formulas, checkpoints, torch habits,
and a second family defined right here with no engine change."""

from __future__ import annotations

import copy
import io

from contextlib import contextmanager

import pytest
import torch
from _util import (
    assert_close,
    batches,
    engine_and_fd,
    host_reads_forbidden,
    loss_fn,
    max_param_rel_diff,
    tiny_mlp,
    train,
)
from pydantic import ValidationError

import metaopt
from metaopt import Coefficient, CoefficientSpace, Family, HyperOptimizer, MetaOptimizer, OneStep
from metaopt.hyper import update as hyper_update
from metaopt.plugins.mada import MADA


class SGDMomentum(Family):
    """SGD with a learned heavy-ball momentum μ:  b_t = μ b_{t-1} + g_t,  θ_t = θ_{t-1} - η b_t."""

    name = "sgdm"

    def __init__(self, mu: float = 0.5):
        self.space = CoefficientSpace(mu=Coefficient(init=mu, low=0.0, high=0.99))

    def init(self, param, grad, group):
        return {"momentum_buffer": torch.zeros_like(param)}

    def update(self, grad, param, state, coefficients, group, step):
        buf = coefficients["mu"] * state["momentum_buffer"] + grad
        return -group["lr"] * buf, {"momentum_buffer": buf}


# -- a second family through the same engine ---------------------------------------------------
def test_tiny_family_with_fixed_coefficient_is_torch_sgd_momentum():
    ref, ours = tiny_mlp(), tiny_mlp()
    data = batches(100)
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.8), data)
    train(ours, MetaOptimizer(ours.parameters(), SGDMomentum(0.8), hypergrad=None, lr=0.05), data)
    assert max_param_rel_diff(ours, ref) <= 1e-10


@pytest.mark.parametrize("elementwise", [False, True], ids=["forward-mode", "elementwise"])
def test_tiny_family_hypergradient_matches_finite_differences(elementwise):
    family = SGDMomentum(0.5)
    family.elementwise = elementwise
    h, fd = engine_and_fd(family, {"lr": 0.05}, seed=2)
    assert_close(h, fd)


def test_tiny_family_learns_its_coefficient():
    model = tiny_mlp()
    opt = MetaOptimizer(model.parameters(), SGDMomentum(0.1), hypergrad=OneStep(lr=0.05, momentum=0.0), lr=0.05)
    train(model, opt, batches(1, seed=3) * 40)  # one batch over and over: more momentum helps
    assert opt.coefficients["mu"].item() > 0.1 + 1e-3


# -- validation ------------------------------------------------------------------------------
def test_coefficient_box_validation_names_the_field():
    with pytest.raises(ValidationError, match="box is empty"):
        Coefficient(init=0.5, low=1.0, high=0.0)
    with pytest.raises(ValidationError, match="init=2.0 lies outside"):
        Coefficient(init=2.0, low=0.0, high=1.0)
    with pytest.raises(ValidationError, match="rho"):
        MADA().with_coefficients(rho=1.5)
    with pytest.raises(ValidationError, match="zeta"):
        MADA().with_coefficients(zeta=0.1)


def test_hyperparameter_validation_names_the_field():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValidationError, match="lr"):
        MetaOptimizer(params, MADA(), lr=-1.0)
    with pytest.raises(ValidationError, match="lrr"):
        MetaOptimizer(params, MADA(), lrr=0.1)
    with pytest.raises(ValidationError, match="eps"):
        MetaOptimizer(params, MADA(), eps=-1e-8)
    with pytest.raises(ValidationError, match="betas"):
        MADA(betas=(0.9, 1.0))
    with pytest.raises(ValidationError, match="betas"):
        MADA(betas=(-0.1, 0.9))
    with pytest.raises(ValidationError, match="zeta"):
        MADA(learn=("zeta",))
    with pytest.raises(ValidationError, match="beta2"):
        MADA(learn=("beta2",))  # default β2=0.999 is outside the learned box [0.501, 0.99]
    with pytest.raises(ValidationError, match="lr"):
        OneStep(lr=-1.0)
    with pytest.raises(ValidationError, match="momentum"):
        OneStep(momentum=1.0)
    with pytest.raises(ValueError, match="zeta"):
        MetaOptimizer(params, MADA(), hypergrad=OneStep(lr={"zeta": 0.1}))
    opt = MetaOptimizer(params, MADA())
    with pytest.raises(ValidationError, match="weight_decay"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": -1})
    with pytest.raises(KeyError, match="zeta"):
        opt.set_coefficients(zeta=0.1)


# -- boxes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hypergrad",
    [OneStep(lr=1e6, momentum=0.9), OneStep(optimizer="adam", lr=10.0)],
    ids=["sgd", "adam"],
)
def test_coefficients_never_leave_their_box(hypergrad):
    model = tiny_mlp()
    fam = MADA(betas=(0.9, 0.99), lion=True, learn=("beta1", "beta2", "beta3", "c", "rho", "gamma"))
    opt = MetaOptimizer(model.parameters(), fam, hypergrad=hypergrad, lr=1e-2)
    hit_bound = set()
    for xy in batches(30):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
        for name, v in opt.coefficients.items():
            box = fam.space[name]
            assert box.low <= v.item() <= box.high, (name, v.item())
            if v.item() in (box.low, box.high) and v.item() != box.init:
                hit_bound.add(name)
    assert hit_bound  # the hyper-lr was large enough that the projection had work to do


def test_set_coefficients_projects_into_the_box():
    opt = MetaOptimizer([torch.nn.Parameter(torch.zeros(2))], MADA())
    opt.set_coefficients(rho=7.0, beta3=-1.0, c=torch.tensor(0.25))
    c = opt.coefficients
    assert c["rho"].item() == 1.0 and c["beta3"].item() == 0.0 and c["c"].item() == 0.25


# -- the hyper-optimizer's formulas ----------------------------------------------------------
def _trajectory(hypergrad, steps=25, fam=None):
    model = tiny_mlp()
    fam = fam or MADA().with_coefficients(beta3=0.3, c=0.6, rho=0.5)
    opt = MetaOptimizer(model.parameters(), fam, hypergrad=hypergrad, lr=1e-2)
    cs, hs = [opt.coefficients], []
    for xy in batches(steps):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
        cs.append(opt.coefficients)
        hs.append(opt.last_hypergrad)
    return opt, cs, hs


def test_hyper_sgd_is_heavy_ball_momentum():
    lr, mu = 0.5, 0.7
    opt, cs, hs = _trajectory(OneStep(lr=lr, momentum=mu))
    buf = {k: 0.0 for k in opt.learned}
    moved = 0.0
    for t in range(1, len(cs)):
        for k in opt.learned:
            if t > 1:  # step 1 has no tangents yet: no hyper-step
                buf[k] = mu * buf[k] + hs[t - 1][k].item()
            expected = cs[t - 1][k].item() - (lr * buf[k] if t > 1 else 0.0)
            assert cs[t][k].item() == pytest.approx(expected, rel=1e-12, abs=1e-15), (t, k)
            moved = max(moved, abs(cs[t][k].item() - cs[0][k].item()))
    assert moved > 1e-4


def test_hyper_adam_is_torch_adam_on_the_coefficients():
    opt, cs, hs = _trajectory(OneStep(optimizer="adam", lr=1e-3, betas=(0.8, 0.95), eps=1e-8))
    x = torch.tensor([cs[0][k].item() for k in opt.learned], dtype=torch.float64, requires_grad=True)
    ref = torch.optim.Adam([x], lr=1e-3, betas=(0.8, 0.95), eps=1e-8)
    for t in range(2, len(cs)):
        x.grad = torch.stack([hs[t - 1][k] for k in opt.learned]).detach()
        ref.step()
        got = torch.stack([cs[t][k] for k in opt.learned])
        assert torch.allclose(got, x.detach(), rtol=1e-12, atol=1e-15), t
    assert (x.detach() - torch.stack([cs[0][k] for k in opt.learned])).abs().max() > 1e-3


def test_hyper_gradient_clipping():
    clip = 1e-9
    opt, cs, hs = _trajectory(OneStep(lr=1.0, momentum=0.0, clip=clip))
    for t in range(2, len(cs)):
        for k in opt.learned:
            step = cs[t - 1][k].item() - cs[t][k].item()
            assert step == pytest.approx(max(-clip, min(clip, hs[t - 1][k].item())), rel=1e-6)
    assert max(abs(h[k].item()) for h in hs for k in opt.learned) > 10 * clip


def test_warmup_freezes_coefficients():
    opt, cs, hs = _trajectory(OneStep(lr=0.5, warmup=5), steps=10)
    for t in range(1, 6):
        assert all(torch.equal(cs[t][k], cs[0][k]) for k in cs[0]), t
    assert any(abs(hs[3][k].item()) > 0 for k in opt.learned)  # computed, not applied
    assert any(not torch.equal(cs[6][k], cs[0][k]) for k in opt.learned)


def test_non_finite_hypergradient_is_skipped_and_counted():
    cfg = HyperOptimizer(lr={"a": 1.0, "b": 0.5}, momentum=0.5)
    space = CoefficientSpace(a=Coefficient(init=0.3, low=0.0, high=1.0), b=Coefficient(init=0.4, low=0.0, high=1.0))
    state = hyper_update.init_state(cfg, space, ("a", "b"), torch.float64, "cpu")
    state = state._replace(buffers={"momentum_buffer": torch.full((2,), 0.25, dtype=torch.float64)})
    h = torch.tensor([float("nan"), 1.0], dtype=torch.float64)
    new = hyper_update.step(cfg, state, h)
    assert torch.equal(new.coefficients, state.coefficients)
    assert torch.equal(new.buffers["momentum_buffer"], torch.full((2,), 0.25, dtype=torch.float64))
    assert int(new.skipped) == 1 and int(state.skipped) == 0  # a new record; the old one unchanged
    assert new.last_h is h


def test_fixed_coefficients_when_hypergrad_is_none():
    model = tiny_mlp()
    opt = MetaOptimizer(model.parameters(), MADA(), hypergrad=None, lr=1e-2)
    before = opt.coefficients
    train(model, opt, batches(5))
    assert all(torch.equal(opt.coefficients[k], before[k]) for k in before)
    assert opt.learned == () and opt.last_hypergrad == {}
    assert not any(k.startswith("hypergrad_tangent") for s in opt.state.values() for k in s)


# -- checkpoints -----------------------------------------------------------------------------
def _resume_run(hypergrad, family, steps=20, split=None):
    model = tiny_mlp()
    opt = MetaOptimizer(model.parameters(), family, hypergrad=hypergrad, lr=1e-2)
    for i, xy in enumerate(batches(steps)):
        if i == split:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = tiny_mlp(seed=123)  # different weights: everything must come from the file
            model.load_state_dict(ckpt["model"])
            opt = MetaOptimizer(model.parameters(), family, hypergrad=hypergrad, lr=0.5)
            opt.load_state_dict(ckpt["opt"])
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize(
    "hypergrad",
    [OneStep(lr=0.05, momentum=0.9), OneStep(optimizer="adam", lr=1e-3, warmup=3)],
    ids=["sgd", "adam"],
)
def test_state_dict_resume_is_bit_identical(hypergrad):
    family = MADA(second_moment="mean", lion=True)
    m1, o1 = _resume_run(hypergrad, family)
    m2, o2 = _resume_run(hypergrad, family, split=9)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    for k in o1.coefficients:
        assert torch.equal(o1.coefficients[k], o2.coefficients[k])
    for k in o1.last_hypergrad:
        assert torch.equal(o1.last_hypergrad[k], o2.last_hypergrad[k])
    for k, v in o1._hyper.buffers.items():
        assert torch.equal(v, o2._hyper.buffers[k])
    assert torch.equal(o1._hyper.skipped, o2._hyper.skipped)
    assert any(abs(o1.coefficients[k].item() - family.space[k].init) > 1e-4 for k in o1.learned)


@pytest.mark.parametrize("path", ["generic", "fused", "native"])
def test_deepcopy_and_pickle_keep_coefficients_and_hyper_state(path):
    model = tiny_mlp()
    opt = MetaOptimizer(model.parameters(), MADA(), hypergrad=OneStep(lr=0.05), lr=1e-2, path=path)
    train(model, opt, batches(5))
    model2, opt2 = copy.deepcopy((model, opt))
    buf = io.BytesIO()
    torch.save((model, opt), buf)
    buf.seek(0)
    model3, opt3 = torch.load(buf, weights_only=False)
    for o in (opt2, opt3):
        assert o.learned == opt.learned and o._meta_step == opt._meta_step and o.path == path
        assert all(torch.equal(o.coefficients[k], opt.coefficients[k]) for k in opt.coefficients)
    data = batches(5, seed=9)
    for m, o in ((model, opt), (model2, opt2), (model3, opt3)):
        train(m, o, data)
    for m in (model2, model3):
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), model.parameters()))


def test_state_dict_of_another_family_is_refused():
    p = [torch.nn.Parameter(torch.zeros(2))]
    sd = MetaOptimizer(p, MADA(lion=True)).state_dict()
    with pytest.raises(ValueError, match="gamma"):
        MetaOptimizer(p, MADA()).load_state_dict(sd)
    with pytest.raises(ValueError, match="metaopt"):
        MetaOptimizer(p, MADA()).load_state_dict(torch.optim.Adam(p).state_dict())


# -- torch habits ----------------------------------------------------------------------------
def test_scheduler_and_param_groups_match_torch_adam():
    ref, ours = tiny_mlp(), tiny_mlp()

    def groups(m):
        return [{"params": m[0].parameters(), "lr": 2e-2}, {"params": m[2].parameters()}]

    a = torch.optim.Adam(groups(ref), lr=1e-2)
    b = MetaOptimizer(groups(ours), MADA().at("adam"), hypergrad=None, lr=1e-2)
    sa = torch.optim.lr_scheduler.StepLR(a, step_size=5, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(b, step_size=5, gamma=0.5)
    for xy in batches(30):
        for m, o, s in ((ref, a, sa), (ours, b, sb)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
            s.step()
    assert [g["lr"] for g in b.param_groups] == [g["lr"] for g in a.param_groups]
    assert max_param_rel_diff(ours, ref) <= 1e-6


def test_params_without_gradient_are_skipped_like_torch_adam():
    ref, ours = tiny_mlp(), tiny_mlp()
    a = torch.optim.Adam(ref.parameters(), lr=1e-2)
    b = MetaOptimizer(ours.parameters(), MADA().at("adam"), hypergrad=OneStep(lr=0.0), lr=1e-2)
    for i, xy in enumerate(batches(20)):
        for m, o in ((ref, a), (ours, b)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            if i % 3 == 0:
                m[0].bias.grad = None  # this step the bias gets no gradient
            o.step()
    assert max_param_rel_diff(ours, ref) <= 1e-6
    assert b.state[ours[0].bias]["step"].item() == a.state[ref[0].bias]["step"].item() == 13
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b.add_param_group({"params": [unused]})
    train(ours, b, batches(3))
    assert torch.equal(unused, torch.ones(3, dtype=torch.float64)) and len(b.state[unused]) == 0


@pytest.mark.parametrize(
    "dtype,expected", [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
)
def test_coefficients_live_in_the_parameter_dtype_never_below_float32(dtype, expected):
    opt = MetaOptimizer([torch.nn.Parameter(torch.zeros(3, dtype=dtype))], MADA())
    assert all(v.dtype == expected for v in opt.coefficients.values())
    assert all(v.dtype == expected for v in opt.last_hypergrad.values())


def test_closure_is_called_and_its_loss_returned():
    model = tiny_mlp()
    opt = MetaOptimizer(model.parameters(), MADA(), lr=1e-2)
    xy = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, xy)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert opt.step(closure) < first


def test_registry_finds_mada_by_entry_point():
    assert "mada" in metaopt.families()
    fam = metaopt.get_family("mada", second_moment="mean")
    assert isinstance(fam, MADA) and fam.options.second_moment == "mean"
    opt = MetaOptimizer([torch.nn.Parameter(torch.zeros(2))], "mada")
    assert opt.family.name == "mada"
    with pytest.raises(KeyError, match="mada"):
        metaopt.get_family("nope")


# -- no host synchronisation in step() ---------------------------------------------------------


def _steps_without_sync(device, hypergrad, family, path="auto", guard=None):
    """Six steps, each ``opt.step()`` under ``guard`` (the host-read guard by default)."""
    guard = guard or host_reads_forbidden
    model = tiny_mlp().to(device)
    opt = MetaOptimizer(model.parameters(), family, hypergrad=hypergrad, lr=1e-2, path=path)
    for xy in batches(6):
        x, y = (t.to(device) for t in xy)
        opt.zero_grad()
        loss_fn(model, (x, y)).backward()
        with guard():
            opt.step()
    return opt


@pytest.mark.parametrize("path", ["generic", "fused", "native"])
@pytest.mark.parametrize(
    "hypergrad",
    [OneStep(), OneStep(optimizer="adam", clip=1.0, warmup=2), None],
    ids=["sgd", "adam+clip+warmup", "fixed"],
)
def test_step_never_reads_tensors_on_the_host(hypergrad, path):
    # the guard works: reading a value inside it fails (every kind: see the test below)
    with pytest.raises(AssertionError), host_reads_forbidden():
        torch.ones(()).item()
    family = MADA(second_moment="mean", lion=path != "native")  # MADA's C kernel has no Lion term
    opt = _steps_without_sync("cpu", hypergrad, family, path=path)
    if hypergrad is not None:
        assert any(v.item() != 0 for v in opt.last_hypergrad.values())


def _if_any(t):
    if (t > 0).any():
        return 1
    return 0


_t = torch.tensor([-1.0, 2.0, 0.0, 3.0])
_HOST_READS = {
    "item": lambda t: t[0].item(),
    "bool": lambda t: bool(t[0]),
    "float": lambda t: float(t[0]),
    "int": lambda t: int(t[0]),
    "index": lambda t: [1, 2][torch.tensor(1)],
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "cpu": lambda t: t.cpu(),
    "to_cpu": lambda t: t.to("cpu"),
    "to_cpu0": lambda t: t.to("cpu:0"),
    "to_device_cpu": lambda t: t.to(device="cpu", dtype=torch.float64),
    "nonzero": lambda t: t.nonzero(),
    "torch_nonzero": lambda t: torch.nonzero(t),
    "where_1arg": lambda t: torch.where(t > 0),
    "mask_index": lambda t: t[t > 0],
    "mask_assign": lambda t: t.clone().__setitem__(t > 0, 0.0),
    "equal": lambda t: torch.equal(t, t.clone()),
    "allclose": lambda t: torch.allclose(t, t.clone()),
    "masked_select": lambda t: torch.masked_select(t, t > 0),
    "unique": lambda t: torch.unique(t),
    "unique_consecutive": lambda t: torch.unique_consecutive(t),
    "repeat_interleave": lambda t: torch.repeat_interleave(t, torch.tensor([1, 2, 0, 1])),
    "bincount": lambda t: torch.bincount(torch.tensor([1, 3])),
    "if_any": _if_any,
    "in": lambda t: 2.0 in t,
    "format": lambda t: f"{t[0]:.3f}",
    # a device -> host copy as it would happen on CUDA, from the meta device here
    "to_host_device": lambda t: torch.empty(3, device="meta").to(t.device),
    "copy_to_host": lambda t: t[:3].clone().copy_(torch.empty(3, device="meta")),
}
_NOT_HOST_READS = {
    "elementwise": lambda t: (t * 2 + 1).exp().clamp(max=10).sqrt(),
    "reductions": lambda t: (t.sum(), t.mean(), t.abs().max(), t.norm(), (t > 0).any(), (t > 0).all()),
    "where": lambda t: torch.where(t > 0, t, torch.zeros_like(t)),
    "masked_fill": lambda t: t.masked_fill(t > 0, 0.0),
    "to_dtype": lambda t: t.to(torch.float64),
    "to_own_device": lambda t: t.to(t.device),
    "to_tensor": lambda t: t.to(torch.zeros((), dtype=torch.float64)),
    "clone": lambda t: t.clone(),
    "integer_index": lambda t: t[torch.tensor([0, 2])],
    "nonzero_static": lambda t: torch.nonzero_static(t, size=4),
    "repeat_interleave_sized": lambda t: torch.repeat_interleave(t, torch.tensor([1, 2, 0, 1]), output_size=4),
    "repeat_interleave_int": lambda t: torch.repeat_interleave(t, 2),
    "foreach": lambda t: torch._foreach_mul([t, t], 2.0),
    "shapes": lambda t: torch.zeros(len(t), t.shape[0], t.numel()),
}


def _grad_of_grad():
    torch.manual_seed(0)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(x.tanh().pow(2).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    y = torch.randn(3, requires_grad=True)
    (y * y).sum().backward()
    return gg, y.grad


@pytest.mark.parametrize("case", list(_HOST_READS))
def test_host_read_guard_catches_every_kind_of_host_read(case):
    t = _t.clone()
    with pytest.raises(AssertionError, match="read on the host"), host_reads_forbidden():
        _HOST_READS[case](t)
    # restored on the way out, also after the exception
    assert torch.ones(()).item() == 1.0 and bool(torch.ones(())) and t.to("cpu") is t
    assert t.nonzero().shape == (3, 1) and t[t > 0].tolist() == [2.0, 3.0]
    assert not torch.utils._python_dispatch._get_current_dispatch_mode_stack()


def test_host_read_guard_lets_device_side_math_through():
    t = _t.clone()
    with host_reads_forbidden():
        for fn in _NOT_HOST_READS.values():
            fn(t)
        gg, yg = _grad_of_grad()  # autograd.grad and backward run their ops under the guard
        with host_reads_forbidden():  # nests
            t.sum()
    ref_gg, ref_yg = _grad_of_grad()
    assert torch.equal(gg, ref_gg) and torch.equal(yg, ref_yg)
    assert not torch.utils._python_dispatch._get_current_dispatch_mode_stack()


@contextmanager
def _cuda_sync_is_an_error():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_never_synchronises_on_cuda():
    # around step() alone: moving the model and the batches there synchronises by design
    for path in ("generic", "fused"):
        _steps_without_sync("cuda", OneStep(), MADA(second_moment="mean", lion=True), path=path,
                            guard=_cuda_sync_is_an_error)
