"""Reliability (issue #6): mixed precision, GradScaler, bad input, fuzzing, exact resume.

Every check has a reference that does not come from the code under test where one exists:
``torch.optim.Adam`` at MADA's Adam point, an uninterrupted run (bit equality), the boxes of the
coefficient space, torch's own GradScaler. For half-precision parameters the exact reference is
the same optimizer run on an fp32 copy of the parameter that is rounded to the storage precision
after every step (what "fp32 state, fp32 rule, update added to the half-precision parameter"
means, to the bit), backed by a looser comparison with ``torch.optim.Adam`` on such a copy.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _util import assert_identical, batches, loss_fn, rel_diff, tiny_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from metaopt import Coefficient, CoefficientSpace, Family, MetaOptimizer, OneStep, Unrolled
from metaopt.plugins.mada import MADA

PATHS = ["generic", "fused", "native"]
#: the paths in torch ops: the native kernels take float32/float64 (refusal of half precision
#: tested below) and MADA's kernel has no Lion term
TORCH_PATHS = ["generic", "fused"]
ALL5 = ("beta1", "beta2", "beta3", "c", "rho")
INTERIOR = {"beta3": 0.3, "c": 0.6, "rho": 0.5}
NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


# -- helpers -----------------------------------------------------------------------------------
def snapshot(params, opt):
    """Everything a step may change: parameters, per-parameter state, param groups, and the
    ``metaopt`` entry (coefficients, last hyper-gradient, hyper-optimizer state, step)."""
    return copy.deepcopy({"params": [p.detach() for p in params], "opt": opt.state_dict()})


def assert_in_boxes(opt):
    for name, v in opt.coefficients.items():
        box = opt.family.space[name]
        assert torch.isfinite(v), (name, v)
        assert box.low <= v.item() <= box.high, (name, v.item(), box.low, box.high)


def state_without_tangents(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items() if not k.startswith("hypergrad_tangent")}


# == 1. mixed precision ===========================================================================
@pytest.mark.parametrize("path", PATHS)
def test_autocast_bf16_forward_with_fp32_parameters_trains(path):
    """Training under CPU bf16 autocast (fp32 parameters, fp32 gradients) goes as training
    without it: the loss falls as far as an fp32 run's, the coefficients learn, stay fp32,
    finite and in their boxes."""
    x, y = batches(1, dtype=torch.float32, batch=64)[0]
    finals = {}
    for autocast in (True, False):
        model = tiny_mlp(dtype=torch.float32)
        opt = MetaOptimizer(model.parameters(), MADA(), hypergrad=OneStep(lr=0.05), path=path, lr=3e-2)
        losses = []
        for _ in range(40):
            opt.zero_grad()
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(x)
                assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
                loss = ((out.float() - y) ** 2).mean()
            loss.backward()
            assert all(p.grad.dtype == torch.float32 for p in model.parameters())
            opt.step()
            losses.append(loss.item())
            assert_in_boxes(opt)
            assert all(v.dtype == torch.float32 for v in opt.coefficients.values())
            assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in opt.last_hypergrad.values())
        finals[autocast] = losses[-1]
        assert losses[-1] < 0.8 * losses[0], losses
        assert any(abs(opt.coefficients[k].item() - opt.family.space[k].init) > 1e-5 for k in opt.learned)
        for p in model.parameters():
            assert p.dtype == torch.float32 and torch.isfinite(p).all()
            assert all(v.dtype == torch.float32 for v in opt.state[p].values())
    assert finals[True] <= 1.05 * finals[False], finals


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_native_path_refuses_half_precision_and_auto_takes_another_path(dtype):
    model = _half_model(dtype)
    with pytest.raises(ValueError, match=f"native.*{dtype}"):
        MetaOptimizer(model.parameters(), MADA(), path="native")
    assert MetaOptimizer(model.parameters(), MADA()).path == "generic"
    assert MetaOptimizer(model.parameters(), MADA(), compile=True).path == "fused"


def _half_model(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def _half_batches(n, dtype):
    return [(x.to(dtype), y.to(dtype)) for x, y in batches(n, seed=4, dtype=torch.float32)]


@pytest.mark.parametrize("hyper", [False, True], ids=["fixed", "one-step"])
@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_parameters_keep_fp32_state_and_round_once(dtype, path, hyper):
    """State and coefficients are fp32; the rule runs on fp32 upcasts of gradient and
    parameter; the fp32 update is added to the half-precision parameter (``p.add_(delta)``:
    computed in fp32, rounded once). Exact reference: the same optimizer on an fp32 copy fed
    the same (upcast) gradients, the copy rounded to ``dtype`` after every step."""
    model = _half_model(dtype)
    shadow = [torch.nn.Parameter(p.detach().float().clone()) for p in model.parameters()]

    def make(params):
        hypergrad = OneStep(lr=0.05) if hyper else None
        return MetaOptimizer(params, MADA(), hypergrad=hypergrad, path=path, lr=1e-2, weight_decay=0.01)

    opt, ref = make(model.parameters()), make(shadow)
    for t, xy in enumerate(_half_batches(25, dtype)):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        for p, q in zip(model.parameters(), shadow):
            assert p.grad.dtype == dtype
            q.grad = p.grad.float()
        opt.step()
        ref.step()
        with torch.no_grad():
            for q in shadow:
                q.copy_(q.to(dtype).float())
        for i, (p, q) in enumerate(zip(model.parameters(), shadow)):
            assert p.dtype == dtype
            assert torch.equal(p.float(), q), (t, i)
            state, ref_state = opt.state[p], ref.state[q]
            assert set(state) == set(ref_state)
            for k, v in state.items():
                if k != "step":
                    assert v.dtype == torch.float32, (k, v.dtype)
                assert torch.equal(v, ref_state[k]), (t, i, k)
        for k, v in opt.coefficients.items():
            assert v.dtype == torch.float32 and torch.equal(v, ref.coefficients[k]), k
        for k, v in opt.last_hypergrad.items():
            assert v.dtype == torch.float32 and torch.equal(v, ref.last_hypergrad[k]), k
    if hyper:
        assert any(k.startswith("hypergrad_tangent") for k in opt.state[next(model.parameters())])
        assert any(abs(opt.coefficients[k].item() - opt.family.space[k].init) > 1e-5 for k in opt.learned)


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_adam_point_is_fp32_state_torch_adam(dtype, path):
    """Independent of the engine: torch.optim.Adam on an fp32 copy rounded to ``dtype`` after
    every step (fp32 state, half-precision storage). MADA's Adam point computes Adam with
    other operations, so an fp32 ulp can flip a rounding now and then: a handful of elements may
    differ by a few ulps. torch.optim.Adam run directly on the half-precision parameter (whose
    state is then half precision too) differs in most elements: the check discriminates."""
    model = _half_model(dtype, seed=1)
    shadow = [torch.nn.Parameter(p.detach().float().clone()) for p in model.parameters()]
    direct = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    opt = MetaOptimizer(model.parameters(), MADA().at("adam"), hypergrad=None, path=path, lr=1e-2)
    ref = torch.optim.Adam(shadow, lr=1e-2, foreach=False)
    half_adam = torch.optim.Adam(direct, lr=1e-2, foreach=False)
    for xy in _half_batches(50, dtype):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        for p, q, d in zip(model.parameters(), shadow, direct):
            q.grad, d.grad = p.grad.float(), p.grad.clone()
        opt.step()
        ref.step()
        half_adam.step()
        with torch.no_grad():
            for q in shadow:
                q.copy_(q.to(dtype).float())
    n = sum(p.numel() for p in model.parameters())
    ours = sum((p.float() != q).sum().item() for p, q in zip(model.parameters(), shadow))
    theirs = sum((d.float() != q).sum().item() for d, q in zip(direct, shadow))
    eps = torch.finfo(dtype).eps
    for p, q in zip(model.parameters(), shadow):
        assert ((p.float() - q).abs() <= 4 * eps * q.abs()).all()
    assert ours <= 0.03 * n, (ours, n)
    assert theirs >= 0.3 * n, (theirs, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_parameters_in_unrolled_mode_keep_fp32_state(dtype):
    for plain_first in (False, True):
        model = _half_model(dtype)
        data = _half_batches(8, dtype)
        opt = MetaOptimizer(model.parameters(), MADA(), hypergrad=Unrolled(steps=2, lr=0.05), lr=1e-2)
        if plain_first:
            opt.zero_grad()
            loss_fn(model, data[0]).backward()
            opt.step()
        opt.unrolled_step(model, data[1:3], loss_fn, meta_batch=data[3])
        opt.zero_grad()
        loss_fn(model, data[4]).backward()
        opt.step()
        for p in model.parameters():
            assert p.dtype == dtype and torch.isfinite(p).all()
            assert all(v.dtype == torch.float32 for k, v in opt.state[p].items() if k != "step"), plain_first
        assert all(v.dtype == torch.float32 for v in opt.coefficients.values())
        assert_in_boxes(opt)


# -- GradScaler ------------------------------------------------------------------------------------
# Why a scaled run equals an unscaled one bit for bit: GradScaler's scale starts at a power of
# two and only ever doubles or halves, so backward of ``loss * 2^k`` produces exactly 2^k times
# every intermediate gradient (multiplying by a power of two commutes with rounding, barring
# overflow and subnormals, far away here), and unscaling multiplies by the exact 2^-k.
# (With a scale that is not a power of two the gradients differ in their last bits.)
def _scaler_run(path, use_scaler, poison=None, omit=None, steps=16):
    model = tiny_mlp(dtype=torch.float32)
    opt = MetaOptimizer(model.parameters(), MADA(), hypergrad=OneStep(lr=0.05, momentum=0.9), path=path, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3) if use_scaler else None
    scales, skipped_step_checked = [], False
    for i, xy in enumerate(batches(steps, dtype=torch.float32)):
        if i == omit:
            continue
        opt.zero_grad()
        loss = loss_fn(model, xy)
        if scaler is None:
            loss.backward()
            opt.step()
            continue
        if poison and i == poison[0] and poison[1] == "loss*inf":
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if poison and i == poison[0] and poison[1] != "loss*inf":
            model[2].weight.grad[1, 3] = NONFINITE[poison[1]]
        before = snapshot(model.parameters(), opt)
        h_before = opt.last_hypergrad
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        if poison and i == poison[0]:
            assert_identical(snapshot(model.parameters(), opt), before)  # params, state, metaopt
            assert_identical(opt.last_hypergrad, h_before)
            assert scales[-1] == scales[-2] / 2  # the scaler saw the inf and backed off
            skipped_step_checked = True
    assert skipped_step_checked or not poison
    return model, opt, scales


@pytest.mark.parametrize("path", PATHS)
def test_grad_scaler_normal_steps_equal_an_unscaled_run(path):
    scaled_model, scaled_opt, scales = _scaler_run(path, True)
    plain_model, plain_opt, _ = _scaler_run(path, False)
    assert len(set(scales)) > 2  # the scale grew during the run
    assert all(math.log2(s).is_integer() for s in scales)
    assert_identical(snapshot(scaled_model.parameters(), scaled_opt), snapshot(plain_model.parameters(), plain_opt))
    assert any(abs(plain_opt.coefficients[k].item() - MADA().space[k].init) > 1e-5 for k in plain_opt.learned)


@pytest.mark.parametrize("kind", ["loss*inf", "nan", "inf"])
@pytest.mark.parametrize("path", PATHS)
def test_grad_scaler_skips_a_non_finite_step_whole(path, kind):
    """scaler.step skips: parameters, every state tensor, coefficients, hyper-optimizer state
    and last_hypergrad stay bit-identical (checked inside _scaler_run), and the whole run equals
    an unscaled run that never saw that batch."""
    scaled_model, scaled_opt, _ = _scaler_run(path, True, poison=(7, kind))
    plain_model, plain_opt, _ = _scaler_run(path, False, omit=7)
    assert_identical(snapshot(scaled_model.parameters(), scaled_opt), snapshot(plain_model.parameters(), plain_opt))
    assert int(scaled_opt.skipped_hypersteps) == 0  # the optimizer never saw the bad gradient


def test_grad_scaler_refuses_fp16_parameter_gradients_as_for_any_torch_optimizer():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = MetaOptimizer([p], MADA(), path="generic")
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((p.float() ** 2).sum()).backward()
    with pytest.raises(ValueError, match="FP16"):
        scaler.step(opt)
    assert torch.equal(p, torch.ones(3, dtype=torch.float16)) and len(opt.state[p]) == 0


# == 2. bad input =================================================================================
def _independent_params(gen, n=3):
    return [torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64)) for _ in range(n)]


@pytest.mark.parametrize("bad", list(NONFINITE))
@pytest.mark.parametrize("path", PATHS)
def test_non_finite_gradient_updates_like_torch_adam_and_is_counted(path, bad):
    """At the Adam point the parameter update with a NaN/Inf gradient is torch.optim.Adam's:
    the non-finite value reaches that coordinate of that parameter (and its moments), nothing
    else. The hyper-step of that step is skipped and counted; since the poisoned coordinate's
    state and tangent are non-finite from then on, so is every later hyper-gradient: the count
    grows by exactly one per step (the parameter stays NaN, as it does in torch.optim.Adam)."""
    gen = torch.Generator().manual_seed(0)
    ours = _independent_params(gen)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = MetaOptimizer(ours, MADA().at("adam"), hypergrad=OneStep(lr=0.0), path=path, lr=1e-2)
    ref = torch.optim.Adam(theirs, lr=1e-2)
    counts = []
    for t in range(12):
        grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in ours]
        if t == 5:
            grads[1][2, 1] = NONFINITE[bad]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        counts.append(int(opt.skipped_hypersteps))
    assert counts == [0] * 5 + list(range(1, 8)), counts
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert torch.equal(p.isnan(), q.isnan()), i
        assert torch.equal(p.isinf(), q.isinf()), i
        fin = torch.isfinite(q)
        assert ((p - q)[fin].abs() <= 1e-12 * q[fin].abs().clamp_min(1.0)).all(), i
    assert ours[1].isnan().sum() == 1 and all(torch.isfinite(ours[i]).all() for i in (0, 2))
    assert_in_boxes(opt)


@pytest.mark.parametrize("bad", list(NONFINITE))
@pytest.mark.parametrize("path", PATHS)
def test_non_finite_gradient_freezes_coefficients_and_hyper_state(path, bad):
    gen = torch.Generator().manual_seed(1)
    params = _independent_params(gen)
    opt = MetaOptimizer(
        params, MADA().with_coefficients(**INTERIOR), hypergrad=OneStep(lr=0.05, momentum=0.9), path=path, lr=1e-2
    )
    frozen = None
    for t in range(10):
        for p in params:
            p.grad = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        if t == 5:
            params[0].grad[0, 0] = NONFINITE[bad]
            meta = copy.deepcopy(opt.state_dict()["param_groups"][0]["metaopt"])
            frozen = (meta["coefficients"], meta["hyper_state"])
            moved = any(abs(opt.coefficients[k].item() - INTERIOR[k]) > 1e-6 for k in opt.learned)
        skipped = int(opt.skipped_hypersteps)
        opt.step()
        assert_in_boxes(opt)
        if t >= 5:
            assert int(opt.skipped_hypersteps) == skipped + 1, t
            meta = opt.state_dict()["param_groups"][0]["metaopt"]
            assert torch.equal(meta["coefficients"], frozen[0]), t
            hyper_state = {k: v for k, v in meta["hyper_state"].items() if k != "skipped"}
            assert_identical(hyper_state, {k: v for k, v in frozen[1].items() if k != "skipped"})
        for i in (1, 2):  # parameters with finite gradients stay finite
            assert torch.isfinite(params[i]).all(), (t, i)
    assert moved  # the coefficients were moving before: the freeze is not vacuous


@pytest.mark.parametrize("path", PATHS)
def test_eps_zero_with_a_zero_gradient_is_nan_like_torch_adam(path):
    """Documented, not defended: eps=0 is valid (as in torch.optim.Adam) and 0/0 is NaN there."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = MetaOptimizer([p], MADA().at("adam"), hypergrad=None, path=path, lr=1e-2, eps=0.0)
    ref = torch.optim.Adam([q], lr=1e-2, eps=0.0)
    p.grad = torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)
    q.grad = p.grad.clone()
    opt.step()
    ref.step()
    assert torch.equal(p.isnan(), q.isnan()) and p.isnan().tolist() == [False, True, False]


# -- sparse gradients ------------------------------------------------------------------------------
def _sparse_setup(path, hyper=True):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    lin = torch.nn.Linear(3, 1).double()
    opt = MetaOptimizer(
        [{"params": lin.parameters()}, {"params": emb.parameters()}], MADA(),
        hypergrad=OneStep(lr=0.05) if hyper else None, path=path, lr=1e-2,
    )
    return emb, lin, opt


SPARSE_MESSAGE = r"(?s)(?=.*\bparameter 0\b)(?=.*\bgroup 1\b)(?=.*\(10, 3\))(?=.*sparse)"


@pytest.mark.parametrize("path", PATHS)
def test_sparse_gradient_raises_naming_the_parameter(path):
    emb, lin, opt = _sparse_setup(path)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match=SPARSE_MESSAGE):
        opt.step()


@pytest.mark.parametrize("path", PATHS)
def test_sparse_gradient_error_leaves_everything_untouched(path):
    emb, lin, opt = _sparse_setup(path)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    params = list(lin.parameters()) + list(emb.parameters())
    before = snapshot(params, opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_identical(snapshot(params, opt), before)


@pytest.mark.parametrize("path", PATHS)
def test_sparse_gradient_after_dense_steps_raises_naming_the_parameter(path):
    emb, lin, opt = _sparse_setup(path)
    for _ in range(3):
        opt.zero_grad()
        lin(emb(torch.tensor([1, 2]))).sum().backward()
        emb.weight.grad = emb.weight.grad.to_dense()
        opt.step()
    # opt.zero_grad() keeps a flat bucket's gradient views (fused path): autograd then adds the
    # sparse gradient into the dense view, and no sparse gradient reaches the step
    opt.zero_grad()
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    if path == "fused":
        assert not emb.weight.grad.is_sparse and emb.weight.grad[1:3].abs().sum() > 0
    opt.zero_grad(set_to_none=True)  # with the gradients gone, backward leaves a sparse one
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match=SPARSE_MESSAGE):
        opt.step()


# -- complex parameters ----------------------------------------------------------------------------
def _assert_names_complex(err, group, index, shape):
    msg = str(err.value)
    assert "complex" in msg, msg
    assert f"parameter {index}" in msg and f"group {group}" in msg, msg
    assert str(shape) in msg or str(list(shape)) in msg, msg


@pytest.mark.parametrize("path", PATHS)
def test_complex_parameters_are_refused_with_their_name(path):
    real = torch.nn.Parameter(torch.zeros(4))
    cplx = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.complex64))
    with pytest.raises(ValueError) as err:
        MetaOptimizer([real, cplx], MADA(), path=path)
    _assert_names_complex(err, 0, 1, (2, 3))
    with pytest.raises(ValueError) as err:
        MetaOptimizer([{"params": [real]}, {"params": [cplx]}], MADA(), path=path)
    _assert_names_complex(err, 1, 0, (2, 3))
    opt = MetaOptimizer([real], MADA(), path=path)
    other = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError) as err:
        opt.add_param_group({"params": [other, cplx]})
    _assert_names_complex(err, 1, 1, (2, 3))
    assert len(opt.param_groups) == 1  # refused whole: the optimizer is as it was


# -- parameters without a gradient ----------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_parameters_without_gradient_are_skipped_like_torch_adam(path):
    ref_model, model = tiny_mlp(), tiny_mlp()
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    opt = MetaOptimizer(model.parameters(), MADA().at("adam"), hypergrad=None, path=path, lr=1e-2)
    for i, xy in enumerate(batches(20)):
        for m, o in ((ref_model, ref), (model, opt)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            if i % 3 == 0:
                m[0].bias.grad = None
            if i % 4 == 1:
                m[2].weight.grad = None
            if i % 5 == 2:
                m[2].bias.grad.zero_()  # a zero gradient is a gradient: updated (momentum), as torch does
        before = state_without_tangents(opt, model[0].bias) if i % 3 == 0 and i else None
        bias_before = model[0].bias.detach().clone()
        ref.step()
        opt.step()
        if before is not None:
            assert torch.equal(model[0].bias, bias_before)
            assert_identical(state_without_tangents(opt, model[0].bias), before)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_diff(p, q) <= 1e-12, name
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item(), name
    assert opt.state[model[0].bias]["step"].item() == 13


@pytest.mark.parametrize("path", PATHS)
def test_hypergradient_after_a_step_without_gradient_ignores_the_stale_tangent(path):
    """Exact reference: the gradients here do not depend on the parameters and the
    coefficients do not move (hyper-lr 0), so the hyper-gradient of the step after Q sat out
    must equal that of a run in which Q was never optimized: Q did not move on the step before,
    so it contributes nothing. The stale tangent Q kept from two steps back would contribute
    ⟨g_Q, tangent⟩, checked below to be far from negligible."""
    steps, skip = 9, 5

    def grads(gen):
        return [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((4, 3), (6,), (3, 3))]

    def run(with_q):
        gen = torch.Generator().manual_seed(3)
        a, b, q = (torch.nn.Parameter(g) for g in grads(gen))
        groups = [{"params": [a, b]}] + ([{"params": [q]}] if with_q else [])
        opt = MetaOptimizer(groups, MADA().with_coefficients(**INTERIOR), hypergrad=OneStep(lr=0.0), path=path, lr=1e-2)
        hs, stale = [], None
        for t in range(steps):
            ga, gb, gq = grads(gen)
            a.grad, b.grad = ga, gb
            q.grad = None if t == skip else gq
            if with_q and t == skip:
                kept = {k: v.clone() for k, v in opt.state[q].items() if k.startswith("hypergrad_tangent")}
                assert kept  # Q holds tangents from step skip-1
                fam_state = state_without_tangents(opt, q)
                q_before = q.detach().clone()
            if with_q and t == skip + 1:
                stale = torch.stack([torch.dot(gq.reshape(-1), kept[k].reshape(-1)) for k in sorted(kept)])
            opt.step()
            if with_q and t == skip:
                assert torch.equal(q, q_before)
                assert_identical(state_without_tangents(opt, q), fam_state)
            hs.append(torch.stack(list(opt.last_hypergrad.values())))
        return hs, stale

    ours, stale = run(True)
    ref, _ = run(False)
    h, h_ref = ours[skip + 1], ref[skip + 1]
    if path == "generic":
        assert torch.equal(h, h_ref), (h, h_ref)
    else:  # the fused and native paths sum a bucket in another order of addition
        assert ((h - h_ref).abs() <= 1e-12 * h_ref.abs().max()).all(), (h, h_ref)
    assert stale.abs().max() > 1e-3 * h_ref.abs().max(), (stale, h_ref)
    assert not torch.equal(ours[skip + 2], ref[skip + 2])  # Q's fresh tangent counts again


def test_fast_hypergradients_equal_generic_after_a_parameter_of_another_group_sits_out():
    """Reference: the generic path (test_fast_path holds the two equal when the parameter that
    sits out shares its group with the others; here it is in a group of its own)."""
    hs = {}
    for path in PATHS:
        model = tiny_mlp()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
        opt = MetaOptimizer(groups, MADA(), hypergrad=OneStep(lr=0.0), path=path, lr=1e-2)
        hs[path] = []
        for i, xy in enumerate(batches(8)):
            opt.zero_grad()
            loss_fn(model, xy).backward()
            if i == 4:
                model[2].bias.grad = None
            opt.step()
            hs[path].append(torch.stack(list(opt.last_hypergrad.values())))
    scale = torch.stack(hs["generic"]).abs().amax(0)
    for path in ("fused", "native"):
        for t, (f, g) in enumerate(zip(hs[path], hs["generic"])):
            assert ((f - g).abs() <= 1e-9 * scale).all(), (path, t, f, g)


# -- add_param_group mid-run ----------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_add_param_group_mid_run_matches_torch_adam(path):
    ref_model, model = tiny_mlp(), tiny_mlp()
    ref = torch.optim.Adam(ref_model[0].parameters(), lr=1e-2)
    opt = MetaOptimizer(model[0].parameters(), MADA().at("adam"), hypergrad=None, path=path, lr=1e-2)
    for i, xy in enumerate(batches(20)):
        if i == 6:
            ref.add_param_group({"params": ref_model[2].parameters(), "lr": 3e-2, "eps": 1e-6})
            opt.add_param_group({"params": model[2].parameters(), "lr": 3e-2, "eps": 1e-6})
            assert all(len(opt.state[p]) == 0 for p in model[2].parameters())
        for m, o in ((ref_model, ref), (model, opt)):
            m.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
        if i == 6:  # fresh state: first step of the new group
            assert all(opt.state[p]["step"].item() == 1 for p in model[2].parameters())
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups] == [1e-2, 3e-2]
    assert opt.param_groups[1]["eps"] == 1e-6 and opt.param_groups[1]["weight_decay"] == 0.0
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_diff(p, q) <= 1e-12, name
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item()
    assert not torch.equal(model[2].weight, tiny_mlp()[2].weight)  # the new group trained


@pytest.mark.parametrize("path", PATHS)
def test_add_param_group_validates_the_new_groups_hyperparameters(path):
    model = tiny_mlp()
    opt = MetaOptimizer(model[0].parameters(), MADA(), path=path, lr=1e-2)
    for bad, field in (({"lr": -1.0}, "lr"), ({"eps": -1e-8}, "eps"), ({"weight_decay": "x"}, "weight_decay")):
        with pytest.raises(ValidationError, match=field):
            opt.add_param_group({"params": model[2].parameters(), **bad})
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.5, "name": "head"})
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["name"] == "head"
    assert opt.param_groups[1]["eps"] == opt.defaults["eps"]


@pytest.mark.parametrize("path", PATHS)
def test_add_param_group_mid_run_with_hypergradients(path):
    """The step that adds a group forms its hyper-gradient from the old parameters only (the new
    ones have no tangent yet): it equals, to the bit, that of a run that never adds the group;
    after that the new group trains with fresh state and contributes."""
    runs = {}
    for add in (True, False):
        model = tiny_mlp()
        opt = MetaOptimizer(model[0].parameters(), MADA().with_coefficients(**INTERIOR),
                            hypergrad=OneStep(lr=0.05), path=path, lr=1e-2)
        hs, cs = [], []
        for i, xy in enumerate(batches(10)):
            if add and i == 5:
                opt.add_param_group({"params": model[2].parameters(), "lr": 2e-2})
            model.zero_grad()
            loss_fn(model, xy).backward()
            opt.step()
            hs.append(opt.last_hypergrad)
            cs.append(opt.coefficients)
            if add and i == 5:
                assert all(opt.state[p]["step"].item() == 1 for p in model[2].parameters())
        runs[add] = (model, opt, hs, cs)
    (model, opt, hs, cs), (_, _, hs0, cs0) = runs[True], runs[False]
    assert_identical(hs[5], hs0[5])
    assert_identical(cs[5], cs0[5])
    assert any(not torch.equal(hs[6][k], hs0[6][k]) for k in hs[6])  # the new group counts now
    assert not torch.equal(model[2].weight, tiny_mlp()[2].weight)
    assert_in_boxes(opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# == 3. fuzzing ===================================================================================
# Gradients are float64 with magnitudes bounded by 1e30: the second moments square them (1e60),
# a hyper-gradient is a sum of gradient × tangent (≲ 1e65 here) and hyper-Adam squares it
# (≲ 1e130), all far from float64's 1.8e308, so a finite gradient never overflows; in
# float32, 1e30² already overflows (there torch.optim.Adam stops moving that coordinate, and
# the tangents may turn NaN — which is why the non-finite check of the hyper-step exists), and a
# finite hyper-gradient near float32's maximum can overflow the hyper-optimizer's momentum
# buffer (test_huge_finite_hypergradients_in_float32_keep_coefficients_finite, below). With
# finite coefficients each parameter's update depends only on its own gradient and state (the
# rules are per parameter), so a NaN in one parameter's gradient cannot reach another
# parameter; coefficients stay finite because a non-finite hyper-gradient is skipped whole and
# every hyper-step ends in a projection onto the box. eps is kept > 0: with eps = 0 a zero
# gradient gives 0/0 = NaN, in torch.optim.Adam as in MADA.
class Fuzzy(Family):
    """A test family over 1-3 coefficients with random boxes:
    b_t = tanh(c0)·b_{t-1} + g_t,  Δ = -η (b_t (1 + c1²) + c2 g_t)."""

    name = "fuzzy"

    def __init__(self, space: CoefficientSpace, elementwise: bool):
        self.space = space
        self.elementwise = elementwise

    def init(self, param, grad, group):
        return {"buf": torch.zeros_like(param)}

    def update(self, grad, param, state, coefficients, group, step):
        c = [coefficients[n] for n in self.space.names]
        buf = torch.tanh(c[0]) * state["buf"] + grad
        u = buf * (1 + c[1] * c[1]) if len(c) > 1 else buf
        if len(c) > 2:
            u = u + c[2] * grad
        return -group["lr"] * u, {"buf": buf}


MAGNITUDES = [0.0, 1e-30, 1e-3, 1.0, 1e30]
SHAPES = [(3,), (2, 2)]

def _rarely(draw, one_in=8):
    """True about once in ``one_in`` draws: for out-of-range values and non-finite gradients."""
    return draw(st.sampled_from([False] * (one_in - 1) + [True]))


@st.composite
def hyper_settings(draw, learned):
    """(OneStep kwargs, valid?) — now and then out of range on purpose."""
    lr = draw(st.one_of(st.sampled_from([0.05, 1e6, 10.0, 1e-3, 1e-6, 0.0]), st.floats(0.0, 1e6)))
    if _rarely(draw):
        lr = draw(st.floats(-1.0, 1.0))
    elif learned and draw(st.booleans()):
        lr = {n: draw(st.sampled_from([1e6, 1e-3, 0.0])) for n in learned if draw(st.booleans())} or lr
    momentum = draw(st.floats(-0.5, 1.5) if _rarely(draw) else st.floats(0.0, 1.0, exclude_max=True))
    clip = draw(st.one_of(st.none(), st.sampled_from([1.0, 1e-9, 1e9, 0.0]), st.floats(0.0, 10.0)))
    if _rarely(draw):
        clip = draw(st.floats(-1.0, 1.0))
    kwargs = dict(
        optimizer=draw(st.sampled_from(["sgd", "adam"])), lr=lr, momentum=momentum, clip=clip,
        clip_style=draw(st.sampled_from(["value", "norm"])), warmup=draw(st.integers(0, 2)),
    )
    lrs = lr.values() if isinstance(lr, dict) else [lr]
    valid = all(x >= 0 for x in lrs) and 0 <= momentum < 1 and (clip is None or clip >= 0)
    return kwargs, valid


@st.composite
def gradient_plan(draw, steps=6):
    """Per step and parameter: (magnitude or 'mixed', poison or None, zero mask?); one seed.
    Non-finite entries appear in about one example in three."""
    poisoned = draw(st.integers(0, 2)) == 0
    plan = []
    for _ in range(steps):
        row = []
        for _ in SHAPES:
            mag = draw(st.sampled_from(["mixed", *MAGNITUDES[::-1]]))
            poison = draw(st.sampled_from(list(NONFINITE))) if poisoned and _rarely(draw) else None
            row.append((mag, poison, draw(st.booleans())))
        plan.append(row)
    return plan, draw(st.integers(0, 2**31 - 1))


def _gradients(plan_row, gen):
    grads = []
    for shape, (mag, poison, zeros) in zip(SHAPES, plan_row):
        sign = torch.randn(shape, generator=gen, dtype=torch.float64).sign()
        if mag == "mixed":
            idx = torch.randint(len(MAGNITUDES), shape, generator=gen)
            g = sign * torch.tensor(MAGNITUDES, dtype=torch.float64)[idx]
        else:
            g = sign * mag * (1 + torch.rand(shape, generator=gen, dtype=torch.float64))
        if zeros:
            g = g * (torch.rand(shape, generator=gen) > 0.5)
        if poison is not None:
            g.view(-1)[0] = NONFINITE[poison]
        grads.append(g)
    return grads


def _fuzz_run(make_opt, valid, plan):
    """Build (or expect a ValidationError), then step through the plan checking the invariants."""
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in SHAPES]
    try:
        opt = make_opt(params)
    except ValidationError:
        assert not valid
        return
    assert valid, "an invalid configuration was accepted"
    steps, seed = plan
    gen = torch.Generator().manual_seed(seed)
    clean = [True] * len(params)  # gradients of this parameter finite so far
    learning = opt.hypergrad is not None and len(opt.learned) > 0
    for t, row in enumerate(steps, start=1):
        grads = _gradients(row, gen)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = g
            clean[i] = clean[i] and bool(torch.isfinite(g).all())
        before_c, before_n = opt.coefficients, int(opt.skipped_hypersteps)
        opt.step()
        assert_in_boxes(opt)
        for p, ok in zip(params, clean):
            if ok:
                assert torch.isfinite(p).all(), "a parameter with finite gradients went non-finite"
        n = int(opt.skipped_hypersteps)
        assert n - before_n in (0, 1)
        due = learning and t >= 2 and t - 1 >= opt.hypergrad.warmup
        if not due:
            assert n == before_n
        elif not all(torch.isfinite(g).all() for g in grads):
            assert n == before_n + 1  # a non-finite gradient always makes h non-finite
        if n > before_n:
            assert_identical(opt.coefficients, before_c)


FUZZ_SETTINGS = settings(
    max_examples=50, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_custom_family(data):
    k = data.draw(st.integers(1, 3))
    coefs, valid = {}, True
    for name in ("a", "b", "c")[:k]:
        low = data.draw(st.floats(-100, 100))
        width = data.draw(st.one_of(st.sampled_from([2.0, 20.0, 200.0, 0.1]), st.floats(1e-6, 200)))
        if _rarely(data.draw, 16):  # now and then a point box, or an empty one
            width = data.draw(st.sampled_from([0.0, -1e-3, -50.0]))
        high = low + width
        if _rarely(data.draw, 16):  # now and then anywhere, possibly outside the box
            init = data.draw(st.floats(-100, 100))
        else:
            u = data.draw(st.one_of(st.sampled_from([0.5, 0.1, 0.9, 0.0, 1.0]), st.floats(0, 1)))
            init = min(max(low + u * (high - low), low), high)
        valid = valid and low <= init <= high
        coefs[name] = dict(init=init, low=low, high=high, learned=not _rarely(data.draw, 4))
    learned = [n for n, c in coefs.items() if c["learned"]]
    hyper, hyper_valid = data.draw(hyper_settings(learned))
    valid = valid and hyper_valid
    elementwise = data.draw(st.booleans())
    lr = data.draw(st.sampled_from([1e-3, 1.0, 0.0]))
    plan = data.draw(gradient_plan())

    def make(params):
        space = CoefficientSpace(**{n: Coefficient(**c) for n, c in coefs.items()})
        return MetaOptimizer(params, Fuzzy(space, elementwise), hypergrad=OneStep(**hyper), lr=lr)

    _fuzz_run(make, valid, plan)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_mada(data):
    lion = data.draw(st.booleans())
    names = list(ALL5) + (["gamma"] if lion else [])
    learn = tuple(n for n in names if not _rarely(data.draw, 3))
    b1 = data.draw(st.floats(0.01, 0.99) if "beta1" in learn else st.floats(0.0, 0.999))
    b2 = data.draw(st.floats(0.501, 0.99) if "beta2" in learn else st.floats(0.0, 0.9999))
    valid = True
    if _rarely(data.draw):  # a beta outside its range on purpose
        b1 = data.draw(st.floats(-0.5, 1.5))
        valid = 0 <= b1 < 1 and ("beta1" not in learn or 0.01 <= b1 <= 0.99)
    options = dict(
        betas=(b1, b2), learn=learn, lion=lion,
        second_moment=data.draw(st.sampled_from(["max", "mean"])),
        bias_correction=data.draw(st.sampled_from(["adam", "per_moment"])),
        initial_grad=data.draw(st.sampled_from(["zero", "first"])),
    )
    boxes = {"beta3": (0.0, 0.99), "c": (0.0, 1.0), "rho": (0.0, 1.0), "gamma": (0.0, 1.0)}
    point = {}
    for n in [n for n in boxes if n in names and data.draw(st.booleans())]:
        lo, hi = boxes[n]
        x = data.draw(st.floats(-0.5, 1.5) if _rarely(data.draw) else st.floats(lo, hi))
        valid = valid and lo <= x <= hi
        point[n] = x
    hyper, hyper_valid = data.draw(hyper_settings(list(learn)))
    valid = valid and hyper_valid
    path = data.draw(st.sampled_from(TORCH_PATHS if lion else PATHS))
    group = dict(lr=data.draw(st.sampled_from([0.1, 1e-3, 0.0])), weight_decay=data.draw(st.sampled_from([0.0, 0.01])))
    plan = data.draw(gradient_plan())

    def make(params):
        family = MADA(**options).at(point)
        return MetaOptimizer(params, family, hypergrad=OneStep(**hyper), path=path, **group)

    _fuzz_run(make, valid, plan)


def test_huge_finite_hypergradients_in_float32_keep_coefficients_finite():
    """float32, a family whose tangent grows with the gradient (SGD momentum: h ~ g²): gradients of
    1e19 give finite hyper-gradients near float32's maximum, whose running sum overflows. A
    coefficient with hyper-lr 0 must not move at all; every coefficient stays finite and in its box."""
    space = CoefficientSpace(a=Coefficient(init=0.5, low=0.0, high=0.99), b=Coefficient(init=0.1, low=0.0, high=1.0))
    p = torch.nn.Parameter(torch.zeros(100))
    opt = MetaOptimizer([p], Fuzzy(space, True), hypergrad=OneStep(lr={"a": 0.0, "b": 1e-3}, momentum=0.9), lr=1e-2)
    for _ in range(40):
        p.grad = torch.full((100,), 1e19)
        opt.step()
        assert_in_boxes(opt)
        assert opt.coefficients["a"].item() == 0.5
        assert all(torch.isfinite(v).all() for v in opt._hyper.buffers.values())


# == 4. exact resume ==============================================================================
def _case(name):
    """(family, hypergrad, path, dtype, unrolled?, total steps or rounds, split, map_location)."""
    return {
        "one-step": (MADA(second_moment="mean", lion=True), OneStep(lr=0.05, momentum=0.9), "generic",
                     torch.float64, False, 16, 9, None),
        "one-step-adam": (MADA(), OneStep(optimizer="adam", lr=1e-3, warmup=3), "generic",
                          torch.float64, False, 16, 9, "cpu"),
        "fused": (MADA(betas=(0.9, 0.99), learn=ALL5), OneStep(lr=0.05), "fused",
                  torch.float64, False, 16, 9, torch.device("cpu")),
        "fused-bf16": (MADA(), OneStep(lr=0.05), "fused", torch.bfloat16, False, 16, 9, "cpu"),
        "native": (MADA(betas=(0.9, 0.99), learn=ALL5), OneStep(lr=0.05), "native",
                   torch.float64, False, 16, 9, None),
        "native-f32": (MADA(), OneStep(lr=0.05), "native", torch.float32, False, 16, 9, "cpu"),
        # a model wide enough that the kernel splits each pass between two threads
        "native-f32-threads": (MADA(), OneStep(lr=0.05), "native", torch.float32, False, 16, 9, "cpu"),
        "unrolled": (MADA(), Unrolled(steps=3, lr=0.05), "generic", torch.float64, True, 4, 2, "cpu"),
    }[name]


RESUME_CASES = ["one-step", "one-step-adam", "fused", "fused-bf16", "native", "native-f32", "native-f32-threads", "unrolled"]
#: cases run on wide_mlp, with two threads
THREADED = {"native-f32-threads"}


def wide_mlp(seed: int = 0) -> torch.nn.Module:
    """5 -> 256 -> 256 -> 3, 68,099 parameters: two native threads' worth (MIN_PER_THREAD each)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 3)
    ).double()


@pytest.fixture
def two_threads():
    """torch (and the native kernel) on two intra-op threads, whatever the machine has."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _case_data(name):
    dtype, unrolled, total = _case(name)[3], _case(name)[4], _case(name)[5]
    n = 3 * total + 1 if unrolled else total
    return [(x.to(dtype), y.to(dtype)) for x, y in batches(n, seed=3)]


def _case_build(name, seed, lr):
    family, hypergrad, path, dtype, *_ = _case(name)
    model = (wide_mlp(seed) if name in THREADED else tiny_mlp(seed, dtype=torch.float64)).to(dtype)
    opt = MetaOptimizer(model.parameters(), family, hypergrad=hypergrad, path=path, lr=lr)
    assert opt.path == path  # also in the fresh process, which the suite's path guard does not reach
    if name in THREADED:
        from metaopt import kernels

        assert kernels.threads_for(sum(p.numel() for p in model.parameters())) == 2
    return model, opt


def _case_train(name, model, opt, start, stop):
    unrolled, data = _case(name)[4], _case_data(name)
    for i in range(start, stop):
        if unrolled:  # one round: K = 3 inner steps, the hyper-step, the commit
            opt.unrolled_step(model, data[3 * i:3 * i + 3], loss_fn, meta_batch=data[3 * i + 3])
        else:
            opt.zero_grad()
            loss_fn(model, data[i]).backward()
            opt.step()


def _case_result(model, opt):
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})


def _resume_child(directory: str) -> None:
    """Runs in a fresh interpreter: load each checkpoint into a fresh model and optimizer
    (other weights, other lr: everything must come from the file) and finish the run."""
    for name in RESUME_CASES:
        *_, total, split, map_location = _case(name)
        ckpt = torch.load(Path(directory) / f"{name}.pt", map_location=map_location)
        model, opt = _case_build(name, seed=123, lr=0.5)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        _case_train(name, model, opt, split, total)
        torch.save(_case_result(model, opt), Path(directory) / f"{name}.out.pt")


def test_exact_resume_in_a_fresh_process(tmp_path, two_threads):
    expected = {}
    for name in RESUME_CASES:
        *_, total, split, _ = _case(name)
        model, opt = _case_build(name, seed=0, lr=1e-2)
        _case_train(name, model, opt, 0, total)
        expected[name] = _case_result(model, opt)
        assert any(abs(opt.coefficients[k].item() - opt.family.space[k].init) > 1e-6 for k in opt.learned), name
        model, opt = _case_build(name, seed=0, lr=1e-2)
        _case_train(name, model, opt, 0, split)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / f"{name}.pt")
    tests_dir = str(Path(__file__).resolve().parent)
    code = (
        "import sys, torch; torch.set_num_threads(int(sys.argv[2])); "
        f"sys.path[:0] = [{tests_dir!r}]; import test_reliability as t; t._resume_child(sys.argv[1])"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(torch.get_num_threads())],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in RESUME_CASES:
        got = torch.load(tmp_path / f"{name}.out.pt")
        # parameters, every state tensor (dtype included: fp32 state for bf16 parameters),
        # param groups, coefficients, last hyper-gradient, hyper-optimizer state, step
        assert_identical(got, expected[name], name)
    bf16_state = expected["fused-bf16"]["opt"]["state"]
    assert all(v.dtype == torch.float32 for s in bf16_state.values() for k, v in s.items() if k != "step")


def test_load_into_another_family_or_learned_set_is_refused():
    from test_engine import SGDMomentum

    model = tiny_mlp()
    opt = MetaOptimizer(model.parameters(), MADA(), lr=1e-2)
    _case_train_plain(model, opt)
    sd = opt.state_dict()
    for other, words in (
        (SGDMomentum(), ("mada", "sgdm")),
        (MADA(lion=True), ("gamma",)),
        (MADA(learn=("c",)), ("beta3", "rho")),
        (MADA().at("adam", learned=False), ("learn",)),
    ):
        fresh = MetaOptimizer(model.parameters(), other, lr=1e-2)
        before = snapshot(model.parameters(), fresh)
        with pytest.raises(ValueError) as err:
            fresh.load_state_dict(sd)
        assert all(w in str(err.value) for w in words), (str(err.value), words)
        assert_identical(snapshot(model.parameters(), fresh), before)  # refused whole
    fixed = MetaOptimizer(model.parameters(), MADA(), hypergrad=None, lr=1e-2)
    with pytest.raises(ValueError, match="learn"):
        fixed.load_state_dict(sd)


def _case_train_plain(model, opt, n=3):
    for xy in batches(n):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()


@pytest.mark.parametrize("name", ["one-step", "fused", "unrolled", "native-f32-threads"])
def test_two_runs_with_the_same_seed_are_bit_identical(name, two_threads):
    total = _case(name)[5]
    runs = []
    for _ in range(2):
        model, opt = _case_build(name, seed=0, lr=1e-2)
        _case_train(name, model, opt, 0, total)
        runs.append(_case_result(model, opt))
    assert_identical(runs[0], runs[1])
