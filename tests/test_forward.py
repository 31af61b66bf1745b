"""metaopt.Forward: forward-mode hyper-gradients through the optimizer state, first order.

References written here, independently of the engine's jvp: a K-step unroll differentiated by
reverse-mode autograd (gradients detached: first order), which ``decay=1`` must equal; explicit
per-step Jacobians (torch.autograd.functional.jacobian) for 0 < decay < 1; the one-step mode,
which ``decay=0`` must equal. float64 throughout.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _util import batches, loss_fn, rel_diff, tiny_mlp

from metaopt import Coefficient, CoefficientSpace, Family, Forward, Hyperparameters, MetaOptimizer, OneStep
from metaopt.hyper import forward as forward_mode
from metaopt.plugins.hd import AdamHD
from metaopt.plugins.mada import MADA
from metaopt.plugins.padam import Padam


class Heavy(Family):
    """A test family whose state depends on the learned coefficients twice over: heavy-ball
    momentum m ← μ m + g, a second buffer v ← ν v + (1-ν) m², Δ = -lr · a · m / (√v + eps)."""

    name = "heavy_test"
    space = CoefficientSpace(
        mu=Coefficient(init=0.8, low=0.0, high=0.99),
        nu=Coefficient(init=0.9, low=0.0, high=0.999),
        a=Coefficient(init=1.0, low=0.1, high=2.0),
    )

    class hyperparameters(Hyperparameters):  # noqa: N801 - the Family attribute's name
        eps: float = 1e-8

    elementwise = True

    def init(self, param, grad, group):
        return {"m": torch.zeros_like(param), "v": torch.zeros_like(param)}

    def update(self, grad, param, state, coefficients, group, step):
        m = coefficients["mu"] * state["m"] + grad
        v = coefficients["nu"] * state["v"] + (1 - coefficients["nu"]) * m * m
        return -group["lr"] * coefficients["a"] * m / (v.sqrt() + group["eps"]), {"m": m, "v": v}


FAMILIES = {
    "mada": lambda: MADA(),
    "mada_wd": lambda: MADA(),  # with weight decay: the update depends on θ itself
    "padam": lambda: Padam(),
    "padam_wd": lambda: Padam(),  # coupled decay: θ (which moves with p) enters the moments
    "adam_hd": lambda: AdamHD(),
    "heavy": lambda: Heavy(),
}
GROUP = {"mada_wd": {"weight_decay": 0.1}, "padam_wd": {"weight_decay": 0.1}}
K_MAX = 6


def _opt(model, name, hypergrad, **kw):
    return MetaOptimizer(model.parameters(), FAMILIES[name](), hypergrad=hypergrad, lr=1e-2, **GROUP.get(name, {}), **kw)


def _grads(model, values, xy):
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)
    params = list(model.parameters())
    return torch.autograd.grad(loss_fn(model, xy), params)


def first_order_unroll(name, k, data):
    """⟨g_{k+1}, dθ_k/dc⟩ with θ_k from k steps of the family's rule at fixed coefficients,
    differentiated by reverse-mode autograd with every gradient a constant."""
    model = tiny_mlp()
    opt = _opt(model, name, None)  # only for the family, its names and the group's values
    family, group = opt.family, {k_: v for k_, v in opt.param_groups[0].items() if k_ != "params"}
    names, learned = family.space.names, opt.family.space.learned
    c = family.space.tensors(torch.float64)[0].clone().requires_grad_()
    coeffs = {n: c[i] for i, n in enumerate(names)}
    theta = [p.detach().clone() for p in model.parameters()]
    states = [None] * len(theta)
    for t in range(1, k + 1):
        grads = _grads(model, [th.detach() for th in theta], data[t - 1])
        for i, g in enumerate(grads):
            if states[i] is None:
                states[i] = family.init(theta[i].detach(), g, group)
            delta, states[i] = family.update(g, theta[i], states[i], coeffs, group, torch.tensor(float(t), dtype=torch.float64))
            theta[i] = theta[i] + delta
    g_next = _grads(model, [th.detach() for th in theta], data[k])
    (h,) = torch.autograd.grad(sum((g * th).sum() for g, th in zip(g_next, theta)), c)
    return h[[names.index(n) for n in learned]]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_decay_one_equals_the_first_order_unrolled_hypergradient(name):
    data = batches(K_MAX + 1)
    model = tiny_mlp()
    opt = _opt(model, name, Forward(lr=0.0, decay=1.0))
    assert opt.path == "generic"
    got = []
    for xy in data:
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
        got.append(torch.stack(list(opt.last_hypergrad.values())))
    refs = [first_order_unroll(name, k, data) for k in range(1, K_MAX + 1)]
    # step k+1 records the hyper-gradient over the first k steps. Each entry within 1e-10 of
    # itself, or for one that nearly cancels (β3's after one step: -1.2e-8, a sum of much larger
    # terms, against 0.015 a step later) of 1e-3 of that coefficient's scale over the run, as in
    # test_fast_path.assert_same_run: float64 rounding of the summands, not the method, sets that
    scale = torch.stack(refs).abs().amax(0)
    for k, ref in enumerate(refs, start=1):
        bound = 1e-10 * torch.maximum(ref.abs(), 1e-3 * scale)
        assert ((got[k] - ref).abs() <= bound).all(), (name, k, got[k], ref)
    # the state path matters: after several steps forward mode is not the one-step mode
    one_step = tiny_mlp()
    os_opt = _opt(one_step, name, OneStep(lr=0.0))
    for xy in data:
        os_opt.zero_grad()
        loss_fn(one_step, xy).backward()
        os_opt.step()
    if forward_mode.dependent_state(opt.family, opt.family.space.names, opt.learned, opt.param_groups[0], torch.float64) \
            or name == "mada_wd":
        assert rel_diff(torch.stack(list(os_opt.last_hypergrad.values())), got[-1]) > 1e-3


@pytest.mark.parametrize("name", ["mada", "heavy", "padam"])
def test_decay_zero_is_the_one_step_mode(name):
    data = batches(20)
    runs = []
    for hg in (Forward(lr=0.05, decay=0.0), OneStep(lr=0.05)):
        model = tiny_mlp()
        opt = _opt(model, name, hg, path="generic")
        for xy in data:
            opt.zero_grad()
            loss_fn(model, xy).backward()
            opt.step()
        runs.append((model, opt))
    (fm, fo), (om, oo) = runs
    for p, q in zip(fm.parameters(), om.parameters()):
        assert rel_diff(p, q) <= 1e-10
    for k, v in oo.coefficients.items():
        assert rel_diff(fo.coefficients[k], v) <= 1e-10, k
    assert any(not torch.equal(oo.coefficients[k], _opt(tiny_mlp(), name, None).coefficients[k]) for k in oo.learned)


def test_partial_decay_matches_explicit_jacobians():
    """0 < λ < 1 on one 3-element parameter: the tangent recursion of the module docstring with
    each step's Jacobians taken by torch.autograd.functional.jacobian."""
    decay, steps = 0.5, 6
    family = Heavy()
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(steps + 1)]
    p = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    opt = MetaOptimizer([p], family, hypergrad=Forward(lr=0.0, decay=decay), lr=1e-2)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    names, learned = family.space.names, family.space.learned
    c0 = family.space.tensors(torch.float64)[0]

    theta = p.detach().clone()
    state = family.init(theta, grads[0], group)
    t_theta = torch.zeros(len(learned), 3, dtype=torch.float64)
    t_state = {k: torch.zeros(len(learned), 3, dtype=torch.float64) for k in state}
    expected = []
    for t in range(steps):
        expected.append(torch.stack([grads[t] @ t_theta[j] for j in range(len(learned))]))
        step = torch.tensor(float(t + 1), dtype=torch.float64)

        def rule(th, m, v, c, g=grads[t], step=step):
            delta, new = family.update(g, th, {"m": m, "v": v}, {n: c[i] for i, n in enumerate(names)}, group, step)
            return delta, new["m"], new["v"]

        jac = torch.autograd.functional.jacobian(rule, (theta, state["m"], state["v"], c0))
        outs = rule(theta, state["m"], state["v"], c0)
        new_t = []
        for out_jac in jac:  # per output: d/dθ, d/dm, d/dv, d/dc
            j_th, j_m, j_v, j_c = out_jac
            new_t.append(torch.stack([
                j_th @ (decay * t_theta[j]) + j_m @ (decay * t_state["m"][j]) + j_v @ (decay * t_state["v"][j])
                + j_c[:, names.index(n)] for j, n in enumerate(learned)
            ]))
        t_theta = decay * t_theta + new_t[0]
        t_state = {"m": new_t[1], "v": new_t[2]}
        theta = theta + outs[0]
        state = {"m": outs[1], "v": outs[2]}
    expected.append(torch.stack([grads[steps] @ t_theta[j] for j in range(len(learned))]))

    assert not expected[0].any()  # no tangent before the first step
    for t in range(steps + 1):
        p.grad = grads[t].clone()
        opt.step()
        got = torch.stack(list(opt.last_hypergrad.values()))
        assert (got - expected[t]).abs().max() <= 1e-10 * expected[t].abs().max().clamp_min(1e-30), t
        if t == steps - 1:
            assert rel_diff(p.detach(), theta) <= 1e-12  # the same trajectory
    assert expected[-1].abs().min() > 0  # every coefficient's hyper-gradient is exercised


@pytest.mark.parametrize("path", ["generic", pytest.param("compiled", marks=pytest.mark.slow)])
def test_resume_from_a_state_dict_is_bit_identical(path, tmp_path):
    """On the compiled path the loaded state goes back into a flat bucket, state tangents among
    its buffers (Buckets.restore), and the bucketed graph continues from it."""
    from test_checkpoint import assert_same_run

    data = batches(12)
    model = tiny_mlp()
    opt = _opt(model, "heavy", Forward(lr=0.05, decay=0.9, optimizer="adam"), path=path)
    ref_model = copy.deepcopy(model)
    ref = _opt(ref_model, "heavy", Forward(lr=0.05, decay=0.9, optimizer="adam"), path=path)
    for xy in data[:6]:
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
    assert any(k.endswith("@v") for k in opt.state[next(model.parameters())])  # state tangents kept
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed = tiny_mlp(seed=7)
    resumed.load_state_dict(ckpt["model"])
    r_opt = _opt(resumed, "heavy", Forward(lr=0.05, decay=0.9, optimizer="adam"), path=path)
    r_opt.load_state_dict(ckpt["opt"])
    assert bool(r_opt._path.buckets) == (path == "compiled")
    for xy in data[6:]:
        for m, o in ((resumed, r_opt), (ref_model, ref)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
    assert_same_run(resumed, r_opt, ref_model, ref)  # parameters, coefficients, h, every state tensor
    if path == "compiled":
        assert r_opt._path.compiled and r_opt._path.buckets  # compiled, and over the restored bucket
    assert any(not torch.equal(v, _opt(tiny_mlp(), "heavy", None).coefficients[k]) for k, v in ref.coefficients.items())


def test_warmup_freezes_the_coefficients_while_the_tangents_accumulate():
    model = tiny_mlp()
    opt = _opt(model, "heavy", Forward(lr=0.05, warmup=4))
    start = opt.coefficients
    for t, xy in enumerate(batches(8)):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
        moved = any(not torch.equal(opt.coefficients[k], start[k]) for k in opt.learned)
        assert moved == (t >= 4), t


def test_the_dependent_state_buffers_are_found_from_the_rule():
    names = MADA().space.names
    assert forward_mode.dependent_state(MADA(), names, ("beta3", "c", "rho"), MADA().defaults(), torch.float64) == (
        "exp_avg_diff", "exp_avg_sq", "max_exp_avg_sq")
    # β1 learned too: the first moment depends on it
    assert "exp_avg" in forward_mode.dependent_state(MADA(), names, ("beta1",), MADA().defaults(), torch.float64)
    # Padam's moments read only gradients with its fixed betas
    assert forward_mode.dependent_state(Padam(), Padam().space.names, ("p",), Padam().defaults(), torch.float64) == ()
    assert forward_mode.dependent_state(Heavy(), Heavy().space.names, ("a",), Heavy().defaults(), torch.float64) == ()
    assert forward_mode.dependent_state(Heavy(), Heavy().space.names, ("mu",), Heavy().defaults(), torch.float64) == ("m", "v")


def test_a_configuration_that_would_not_fit_is_refused(monkeypatch):
    big = torch.nn.Linear(100, 100).double()
    monkeypatch.setattr(forward_mode, "available_bytes", lambda device: 1 << 20)  # 1 MiB free
    with pytest.raises(MemoryError, match=r"needs 0\.9 MiB on cpu .*K=3 learned coefficients × \(1 \+ 3 dependent"):
        MetaOptimizer(big.parameters(), MADA(), hypergrad=Forward())
    MetaOptimizer(big.parameters(), MADA(), hypergrad=OneStep())  # K buffers: not checked, fits
    monkeypatch.setattr(forward_mode, "available_bytes", lambda device: 1 << 30)
    MetaOptimizer(big.parameters(), MADA(), hypergrad=Forward())


def test_forward_refuses_the_paths_that_cannot_carry_state_tangents():
    model = tiny_mlp()
    for path in ("fused", "native"):
        with pytest.raises(ValueError, match="metaopt.Forward runs on the generic or the compiled path"):
            _opt(model, "mada", Forward(), path=path)
    assert _opt(model, "mada", Forward()).path == "generic"
    assert _opt(model, "mada", Forward(), compile=True).path == "compiled"
    assert _opt(model, "mada", Forward(), path="compiled").path == "compiled"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mada_wd", "heavy"])
def test_compiled_forward_equals_the_generic_forward(name):
    """The compiled path's forward mode (the rule and every tangent in one graph over a flat
    bucket, then per tensor once a parameter sat a step out) against the generic path's eager
    jvps: parameters, state (the state tangents among it), coefficients and hyper-gradients
    within 1e-6 over 50 float64 steps, with the coefficients moving."""
    from test_fast_path import assert_same_run, run

    family, group = FAMILIES[name](), {"lr": 1e-2, **GROUP.get(name, {})}
    hypergrad = Forward(decay=0.9 if name == "mada_wd" else 1.0, lr=0.05, momentum=0.9)
    ours = run(family, hypergrad, group, "compiled")
    generic = run(family, hypergrad, group, "generic")
    opt = ours[1]
    assert opt._path.compiled  # compiled, not fallen back to eager
    half = len(opt.bucketed) // 2
    assert all(opt.bucketed[:half]) and not any(opt.bucketed[half:])
    state = opt.state[next(iter(opt.state))]
    assert any("@" in k for k in state)  # state tangents were kept, and compared below
    assert_same_run(ours, generic)
    assert any(abs(opt.coefficients[k].item() - family.space[k].init) > 1e-5 for k in opt.learned)
