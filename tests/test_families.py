"""Two more families through the unchanged engine: hypergradient descent (SGD-HD, Adam-HD;
Baydin et al., ICLR 2018) and Padam with a learned exponent (Chen & Gu, 2018).

HD: the engine's one-step mode with hyper-SGD (lr β, no momentum) is the paper's algorithm; we
hold it to a direct hand implementation of the paper over 50 steps (float64, 1e-10; with an lr
scheduler too), and at β = 0 to torch.optim.SGD / Adam. Padam: fixed p vs pytorch-optimizer's
PAdam and p = 1/2 vs torch.optim.Adam(amsgrad=True) (float64, <= 1e-6, 150 steps), the default vs
the paper's Algorithm 1 by hand; the hyper-gradient in p vs central finite differences (reverse
and forward mode); the box under a huge hyper-lr; a run that learns p; finite tangents on
zero-gradient coordinates, one-step and second-order unrolled. All three: entry points, no fused
path needed, checkpoint resume, no host reads in step().
"""

from __future__ import annotations

import copy

import pytest
import pytorch_optimizer
import torch
from _util import (
    assert_close,
    batches,
    engine_and_fd,
    host_reads_forbidden,
    lockstep,
    loss_fn,
    max_param_rel_diff,
    rel_diff,
    tiny_mlp,
    train,
)
from pydantic import ValidationError

import metaopt
from metaopt import MetaOptimizer, OneStep, Unrolled
from metaopt.plugins.hd import AdamHD, SGDHD
from metaopt.plugins.padam import Padam

PAPER_TOL = 1e-10  # engine vs the hand-written paper algorithm: same arithmetic up to rounding
REF_TOL = 1e-6  # vs optimizers written by others


# -- hypergradient descent -----------------------------------------------------------------
def _paper_hd(model, data, alpha, beta, adam=None, etas=None):
    """The paper's SGD-HD / Adam-HD written out directly, one step per yield:
    α_t = α_{t-1} + β η_{t-1} g_t·u_{t-1};  θ_t = θ_{t-1} - η_t α_t u_t  (u_0 = 0; u = g for
    SGD-HD, Adam's m̂/(sqrt(v̂)+ε) for Adam-HD; η_t = 1 in the paper, else a schedule's
    multiplier). Yields α_t after each step."""
    params = list(model.parameters())
    u_prev = [torch.zeros_like(p) for p in params]
    etas = etas or [1.0] * len(data)
    eta_prev = 0.0
    if adam is not None:
        b1, b2, eps = adam
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
    for t, (xy, eta) in enumerate(zip(data, etas), start=1):
        grads = torch.autograd.grad(loss_fn(model, xy), params)
        alpha = alpha + beta * eta_prev * sum((g * u).sum() for g, u in zip(grads, u_prev))
        if adam is None:
            u_new = list(grads)
        else:
            m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grads)]
            v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, grads)]
            u_new = [(mi / (1 - b1**t)) / ((vi / (1 - b2**t)).sqrt() + eps) for mi, vi in zip(m, v)]
        with torch.no_grad():
            for p, u in zip(params, u_new):
                p.sub_(eta * alpha * u)
        u_prev, eta_prev = u_new, eta
        yield alpha


def _decay(t):
    return 1.0 / (1.0 + 0.05 * t)


@pytest.mark.parametrize(
    "family, alpha0, beta, adam, schedule",
    [
        (SGDHD, 0.02, 0.02, None, None),
        (AdamHD, 0.003, 3e-4, (0.9, 0.999, 1e-8), None),
        (SGDHD, 0.02, 0.02, None, _decay),
    ],
    ids=["sgd_hd", "adam_hd", "sgd_hd+scheduler"],
)
def test_hd_is_the_papers_algorithm(family, alpha0, beta, adam, schedule):
    steps = 50
    ref_model = tiny_mlp(0)
    our_model = copy.deepcopy(ref_model)
    opts = {} if adam is None else {"betas": adam[:2]}
    group = {} if adam is None else {"eps": adam[2]}
    opt = MetaOptimizer(
        our_model.parameters(), family(alpha=alpha0, **opts), hypergrad=family.paper_hypergrad(beta), **group
    )
    sched = etas = None
    if schedule is not None:  # lr (default 1) multiplies α; step t runs with lr = schedule(t-1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        etas = [schedule(t) for t in range(steps)]
    data = batches(steps, seed=5)
    paper = _paper_hd(ref_model, data, torch.tensor(alpha0, dtype=torch.float64), beta, adam, etas)
    worst_param = worst_alpha = 0.0
    alphas = []
    for xy, alpha_ref in zip(data, paper):
        opt.zero_grad()
        loss_fn(our_model, xy).backward()
        opt.step()
        if sched is not None:
            sched.step()
        assert 0.0 < alpha_ref.item() < 1.0  # the box [0, 1] never acts: the paper has none
        alphas.append(alpha_ref.item())
        worst_alpha = max(worst_alpha, rel_diff(opt.coefficients["alpha"], alpha_ref))
        worst_param = max(worst_param, max_param_rel_diff(our_model, ref_model))
    assert worst_alpha <= PAPER_TOL, worst_alpha
    assert worst_param <= PAPER_TOL, worst_param
    # The check must not be empty: α moved well away from its start, the model trained.
    assert max(abs(a - alpha0) for a in alphas) > 0.2 * alpha0, (alpha0, alphas[-5:])
    assert max_param_rel_diff(ref_model, tiny_mlp(0)) > 1e-2


@pytest.mark.parametrize(
    "hypergrad, weight_decay",
    [(OneStep(lr=0.0, momentum=0.0), 0.0), (OneStep(lr=0.0, momentum=0.0), 0.01), (None, 0.0)],
    ids=["beta0", "beta0+L2", "fixed"],
)
def test_hd_at_beta_zero_is_torch_sgd_and_adam(hypergrad, weight_decay):
    ref, ours = lockstep(
        lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=weight_decay),
        lambda p: MetaOptimizer(p, SGDHD(alpha=0.05), hypergrad=hypergrad, weight_decay=weight_decay),
        steps=100,
    )
    assert max_param_rel_diff(ours, ref) <= REF_TOL
    ref, ours = lockstep(
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=weight_decay),
        lambda p: MetaOptimizer(p, AdamHD(alpha=0.01), hypergrad=hypergrad, weight_decay=weight_decay),
        steps=100,
    )
    assert max_param_rel_diff(ours, ref) <= REF_TOL
    assert max_param_rel_diff(ref, tiny_mlp(0)) > 1e-2


def test_hd_lr_is_a_multiplier_on_alpha_and_schedulers_scale_it():
    # step = lr_t · α: SGD-HD with lr 2, α 0.04 (held still) is SGD with lr 0.08, under a scheduler too.
    schedule = lambda t: 0.5 ** (t // 10)  # noqa: E731
    ref_model, our_model = tiny_mlp(0), tiny_mlp(0)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.08)
    ours = MetaOptimizer(our_model.parameters(), SGDHD(alpha=0.04), hypergrad=None, lr=2.0)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (ref, ours)]
    for xy in batches(40):
        for model, opt, sched in zip((ref_model, our_model), (ref, ours), scheds):
            opt.zero_grad()
            loss_fn(model, xy).backward()
            opt.step()
            sched.step()
    assert max_param_rel_diff(our_model, ref_model) <= REF_TOL


@pytest.mark.parametrize("family", [SGDHD(), AdamHD(), Padam()], ids=["sgd_hd", "adam_hd", "padam"])
def test_families_need_no_fused_path(family):
    assert family.fused_update is None and family.fused_scalars is None
    param = torch.nn.Parameter(torch.zeros(3))
    assert MetaOptimizer([param], family).path == "generic"
    # its update: on a CPU written as a C kernel (tests/test_codegen.py), else compiled
    opt = MetaOptimizer([param], family, compile=True)
    assert opt.path == "native" and "C kernel written from its update" in opt.path_reason
    assert MetaOptimizer([param], family, path="compiled").path == "compiled"
    with pytest.raises(ValueError, match="fused"):
        MetaOptimizer([param], family, path="fused")


@pytest.mark.parametrize(
    "family, group",
    [(SGDHD(), {}), (AdamHD(), {}), (Padam(), {"lr": 1e-2})],
    ids=["sgd_hd", "adam_hd", "padam"],
)
def test_hypergradient_matches_finite_differences(family, group):
    h, fd = engine_and_fd(family, group, seed=2)
    assert_close(h, fd)


@pytest.mark.parametrize(
    "family, hypergrad",
    [
        (SGDHD(alpha=0.05), SGDHD.paper_hypergrad(0.01)),
        (AdamHD(alpha=0.01), AdamHD.paper_hypergrad(1e-4)),
        (Padam(), OneStep()),
    ],
    ids=["sgd_hd", "adam_hd", "padam"],
)
def test_checkpoint_resume_is_bit_identical(family, hypergrad):
    data = batches(10, seed=4)
    model = tiny_mlp()
    opt = MetaOptimizer(model.parameters(), family, hypergrad=hypergrad, lr=1e-2 if family.name == "padam" else 1.0)
    train(model, opt, data[:5])
    model2 = copy.deepcopy(model)
    opt2 = MetaOptimizer(model2.parameters(), family, hypergrad=hypergrad, lr=0.123)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, data[5:])
    train(model2, opt2, data[5:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert all(torch.equal(opt.coefficients[k], opt2.coefficients[k]) for k in opt.coefficients)
    name = family.space.names[0]
    assert opt.coefficients[name].item() != family.space[name].init  # it learned something


def test_entry_points_resolve():
    registered = metaopt.families()
    assert {"sgd_hd", "adam_hd", "padam"} <= set(registered)
    assert isinstance(metaopt.get_family("sgd_hd"), SGDHD)
    assert isinstance(metaopt.get_family("adam_hd", betas=(0.8, 0.99)), AdamHD)
    fam = metaopt.get_family("padam", p=0.25, amsgrad=False)
    assert isinstance(fam, Padam) and fam.space["p"].init == 0.25 and not fam.options.amsgrad
    model = tiny_mlp()
    for name in ("sgd_hd", "adam_hd", "padam"):
        opt = MetaOptimizer(model.parameters(), name, lr=0.5)
        assert opt.family.name == name and opt.param_groups[0]["lr"] == 0.5


def test_hd_families_default_to_the_papers_hyper_step():
    """Without ``hypergrad=``, the engine asks the family: HD gets the paper's plain β-step,
    Padam, which defines none, the engine's scale-free one."""
    model = tiny_mlp()
    for family, beta in ((SGDHD(), SGDHD.paper_beta), (AdamHD(), AdamHD.paper_beta)):
        opt = MetaOptimizer(model.parameters(), family)
        assert opt.hypergrad == OneStep(lr=beta, momentum=0.0)
    assert MetaOptimizer(model.parameters(), Padam()).hypergrad == OneStep.scale_free()
    assert MetaOptimizer(model.parameters(), SGDHD(), hypergrad=None).hypergrad is None


def test_mada_defaults_to_the_studys_hyper_step():
    """MADA without ``hypergrad=``: the setting the MADA-vs-Adam study chose (the authors'
    stabilisers), which keeps the coefficients where they start for 50 steps and bounds each
    hyper-gradient to norm 10; an explicit OneStep() learns from the second step."""
    from metaopt.plugins.mada import MADA

    model = tiny_mlp()
    opt = MetaOptimizer(model.parameters(), MADA().with_coefficients(beta3=0.1, c=0.9, rho=0.9), lr=1e-2)
    assert opt.hypergrad == OneStep(warmup=50, clip=10.0, clip_style="norm")
    plain = copy.deepcopy(model)
    eager = MetaOptimizer(plain.parameters(), MADA().with_coefficients(beta3=0.1, c=0.9, rho=0.9),
                          hypergrad=OneStep(), lr=1e-2)
    start = opt.coefficients
    for step, xy in enumerate(batches(52), start=1):
        for m, o in ((model, opt), (plain, eager)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
        if step == 50:
            assert all(torch.equal(opt.coefficients[k], start[k]) for k in start)
            assert any(not torch.equal(eager.coefficients[k], start[k]) for k in eager.learned)
    assert any(not torch.equal(opt.coefficients[k], start[k]) for k in opt.learned)  # moving after the warm-up


def test_options_are_validated():
    with pytest.raises(ValidationError, match="alpha"):
        SGDHD(alpha=2.0)  # outside [0, alpha_max]
    with pytest.raises(ValidationError, match="betas"):
        AdamHD(betas=(0.9, 1.0))
    with pytest.raises(ValidationError, match="p"):
        Padam(p=0.6)
    with pytest.raises(ValidationError, match="bias_correction"):
        Padam(bias_correction="sometimes")
    with pytest.raises(ValidationError, match="lr"):
        MetaOptimizer(tiny_mlp().parameters(), SGDHD(), lr=-1.0)
    assert SGDHD(learn=False).space.learned == ()




@pytest.mark.parametrize(
    "family",
    [SGDHD(), AdamHD(), Padam(bias_correction="code", decoupled_weight_decay=True)],
    ids=["sgd_hd", "adam_hd", "padam"],
)
def test_step_never_reads_tensors_on_the_host(family):
    model = tiny_mlp()
    opt = MetaOptimizer(model.parameters(), family, hypergrad=OneStep(), lr=1e-2, weight_decay=0.1)
    for xy in batches(4):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        with host_reads_forbidden():
            opt.step()
    assert all(v.item() != 0 for v in opt.last_hypergrad.values())


# -- Padam ---------------------------------------------------------------------------------
PYTORCH_OPTIMIZER_PADAM = {"amsgrad": False, "bias_correction": "code", "eps_placement": "root"}


@pytest.mark.parametrize(
    "partial, wd, decouple, hypergrad",
    [
        (0.125, 0.0, False, None),
        (0.125, 0.0, False, OneStep(lr=0.0)),
        (0.3, 1e-2, False, OneStep(lr=0.0)),
        (0.5, 1e-2, True, None),
    ],
    ids=["p=1/8", "p=1/8,hypergrad", "p=0.3,L2,hypergrad", "p=1/2,decoupled"],
)
def test_padam_equals_pytorch_optimizer_padam(partial, wd, decouple, hypergrad):
    fam = Padam(p=partial, decoupled_weight_decay=decouple, **PYTORCH_OPTIMIZER_PADAM)
    ref, ours = lockstep(
        lambda p: pytorch_optimizer.PAdam(p, lr=0.02, partial=partial, weight_decay=wd, weight_decouple=decouple),
        lambda p: MetaOptimizer(p, fam, hypergrad=hypergrad, lr=0.02, weight_decay=wd),
        steps=150,
    )
    assert max_param_rel_diff(ours, ref) <= REF_TOL
    assert max_param_rel_diff(ref, tiny_mlp(0)) > 1e-2


@pytest.mark.parametrize(
    "amsgrad, hypergrad",
    [(True, None), (True, OneStep(lr=0.0)), (False, None)],
    ids=["amsgrad", "amsgrad,hypergrad", "adam"],
)
def test_padam_at_one_half_with_adam_corrections_is_torch_adam(amsgrad, hypergrad):
    fam = Padam(bias_correction="adam", amsgrad=amsgrad).at("amsgrad")
    ref, ours = lockstep(
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=amsgrad),
        lambda p: MetaOptimizer(p, fam, hypergrad=hypergrad, lr=1e-2),
        steps=150,
    )
    assert max_param_rel_diff(ours, ref) <= REF_TOL
    assert max_param_rel_diff(ref, tiny_mlp(0)) > 1e-2


def test_padam_default_is_the_papers_algorithm():
    """Algorithm 1 of the paper (no bias correction) plus ε outside the power, by hand."""
    model, ref_model = tiny_mlp(0), tiny_mlp(0)
    lr, b1, b2, eps, p = 0.02, 0.9, 0.999, 1e-8, 0.125
    opt = MetaOptimizer(model.parameters(), Padam(), hypergrad=None, lr=lr)
    params = list(ref_model.parameters())
    m = [torch.zeros_like(q) for q in params]
    v = [torch.zeros_like(q) for q in params]
    vmax = [torch.zeros_like(q) for q in params]
    data = batches(100)
    train(model, opt, data)
    for xy in data:
        grads = torch.autograd.grad(loss_fn(ref_model, xy), params)
        with torch.no_grad():
            for i, (q, g) in enumerate(zip(params, grads)):
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                vmax[i] = torch.maximum(vmax[i], v[i])
                q -= lr * m[i] / (vmax[i] ** p + eps)
    assert max_param_rel_diff(model, ref_model) <= 1e-10


@pytest.mark.parametrize(
    "options, group",
    [
        ({}, {"lr": 1e-2}),
        (PYTORCH_OPTIMIZER_PADAM, {"lr": 1e-2, "weight_decay": 0.1}),
        ({"bias_correction": "adam", "decoupled_weight_decay": True}, {"lr": 1e-2, "weight_decay": 0.1}),
    ],
    ids=["paper", "pytorch-optimizer+L2", "adam+decoupled"],
)
def test_padam_hypergradient_in_p_matches_finite_differences(options, group):
    h, fd = engine_and_fd(Padam(**options), group, seed=1)
    assert_close(h, fd)


def test_padam_forward_mode_hypergradient_matches_finite_differences():
    family = Padam()
    family.elementwise = False  # the engine's jacfwd path, through the guarded power
    h, fd = engine_and_fd(family, {"lr": 1e-2}, seed=3, warm=3)
    assert_close(h, fd)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_padam_p_stays_in_its_box_under_a_huge_hyper_lr(optimizer):
    model = tiny_mlp()
    opt = MetaOptimizer(model.parameters(), Padam(), hypergrad=OneStep(optimizer=optimizer, lr=1e6), lr=1e-2)
    seen = []
    for xy in batches(15):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
        p = opt.coefficients["p"].item()
        assert 0.0 <= p <= 0.5
        seen.append(p)
    assert {0.0, 0.5} & set(seen)  # the hyper-step did push against the box
    assert all(torch.isfinite(q).all() for q in model.parameters())


def test_padam_learns_p_on_a_small_problem():
    # a student MLP fits a teacher MLP on four batches, revisited
    with torch.no_grad():
        teacher = tiny_mlp(9)
        gen = torch.Generator().manual_seed(3)
        xs = [torch.randn(32, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
        data = [(x, teacher(x)) for x in xs] * 25
    model, fixed_model = tiny_mlp(), tiny_mlp()
    opt = MetaOptimizer(model.parameters(), Padam(), hypergrad=OneStep(lr=0.03), lr=0.02)
    fixed = MetaOptimizer(fixed_model.parameters(), Padam(), hypergrad=None, lr=0.02)
    losses = []
    for xy in data:
        opt.zero_grad()
        loss = loss_fn(model, xy)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    train(fixed_model, fixed, data)
    p = opt.coefficients["p"].item()
    assert 0.125 + 0.02 < p < 0.5, p  # measured: p ≈ 0.19
    assert all(torch.isfinite(torch.tensor(losses)))
    assert float(opt.skipped_hypersteps) == 0
    final = sum(loss_fn(model, xy).item() for xy in data[:4])
    final_fixed = sum(loss_fn(fixed_model, xy).item() for xy in data[:4])
    assert final < 0.1 * sum(losses[:4])
    # on this problem the learned p also beats p fixed at 1/8 (measured 0.014 vs 0.025)
    assert final < final_fixed, (final, final_fixed)


def _embedding_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 1)).double()


def _token_batches(n):
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 5, (8, 3), generator=gen), torch.randn(8, 1, generator=gen, dtype=torch.float64))
        for _ in range(n)
    ]  # tokens 5..9 never appear: their embedding rows get zero gradients and keep v̂ = 0


@pytest.mark.parametrize(
    "options, eps",
    [({}, 1e-8), ({}, 0.0), (PYTORCH_OPTIMIZER_PADAM, 1e-8), (PYTORCH_OPTIMIZER_PADAM, 0.0)],
    ids=["outside", "outside,eps=0", "root", "root,eps=0"],
)
def test_padam_zero_gradient_coordinates_keep_tangents_finite(options, eps):
    model = _embedding_model()
    start = model[0].weight.detach().clone()
    opt = MetaOptimizer(model.parameters(), Padam(**options), hypergrad=OneStep(lr=1e-2), lr=1e-2, eps=eps)
    for x, y in _token_batches(20):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        for p in model.parameters():
            tangent = opt.state[p]["hypergrad_tangent.p"]
            assert torch.isfinite(tangent).all()
            assert torch.isfinite(p).all()
    assert torch.equal(opt.state[model[0].weight]["hypergrad_tangent.p"][5:], torch.zeros(5, 4, dtype=torch.float64))
    assert torch.equal(model[0].weight[5:], start[5:])  # absent rows never move
    assert float(opt.skipped_hypersteps) == 0
    assert abs(opt.coefficients["p"].item() - 0.125) > 0  # the hyper-steps did act


def test_padam_unrolled_second_order_hypergradient_is_finite_at_zero_gradient_rows():
    """Second order differentiates through v̂^p in v̂ too, where v̂ = 0 would give inf·0."""
    model = _embedding_model()
    opt = MetaOptimizer(model.parameters(), Padam(), hypergrad=Unrolled(steps=2, lr=1e-2), lr=1e-2)
    data = _token_batches(9)

    def token_loss(net, xy):
        x, y = xy
        return ((net(x) - y) ** 2).mean()

    for k in range(3):
        opt.unrolled_step(model, data[3 * k : 3 * k + 2], token_loss, meta_batch=data[3 * k + 2])
        assert torch.isfinite(opt.last_hypergrad["p"]) and opt.last_hypergrad["p"].item() != 0
    assert float(opt.skipped_hypersteps) == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
