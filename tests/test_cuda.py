"""On a CUDA device: every path the engine takes there equals the generic path on the CPU
(float64, 30 steps, parameters, state, coefficients and hyper-gradients within 1e-6), with
``torch.cuda.set_sync_debug_mode("error")`` around every ``step()`` but the first of a compiled
path, whose compilation synchronises (a step that synchronises with the host raises); bf16
parameters train on the compiled paths; a state dict saved on the GPU resumes on it. CI has no GPU: these skip there; ``benchmarks/gpu.sh`` runs them."""

from __future__ import annotations

import io
from contextlib import contextmanager, nullcontext

import pytest
import torch
from _util import batches, loss_fn, tiny_mlp
from test_compiled_path import ClippedMomentum
from test_fast_path import assert_same_run

from metaopt import MetaOptimizer, OneStep
from metaopt.plugins.hd import SGDHD
from metaopt.plugins.mada import MADA
from metaopt.plugins.padam import Padam

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ALL5 = ("beta1", "beta2", "beta3", "c", "rho")
CASES = {
    # family, hyper-gradient, group, path, compile
    "mada-generic": (MADA(betas=(0.9, 0.99), learn=ALL5), OneStep(lr=0.05), {"lr": 1e-2, "weight_decay": 0.1}, "generic", False),
    "mada-fused-eager": (MADA(betas=(0.9, 0.99), learn=ALL5), OneStep(lr=0.05), {"lr": 1e-2, "weight_decay": 0.1}, "fused", False),
    "mada-fused-compiled": (MADA(betas=(0.9, 0.99), learn=ALL5), OneStep(lr=0.05), {"lr": 1e-2, "weight_decay": 0.1}, "fused", True),
    "mada-lion-compiled": (MADA(second_moment="mean", lion=True), OneStep(optimizer="adam", lr=1e-3),
                           {"lr": 1e-2}, "fused", True),
    "mada-automatic": (MADA(betas=(0.9, 0.99), learn=ALL5), OneStep(lr=0.05), {"lr": 1e-2, "weight_decay": 0.1}, "compiled", True),
    "padam-automatic": (Padam(), OneStep(lr=0.05), {"lr": 1e-2}, "compiled", True),
    "sgd_hd-automatic": (SGDHD(alpha=0.05), SGDHD.paper_hypergrad(1e-3), {}, "compiled", True),
    "clipped-momentum-automatic": (ClippedMomentum(), OneStep(lr=0.05), {"lr": 0.05}, "compiled", True),
}


@contextmanager
def no_sync():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def run(family, hypergrad, group, path, device, compile=False, steps=30, dtype=torch.float64):
    model = tiny_mlp(dtype=dtype).to(device)
    opt = MetaOptimizer(model.parameters(), family, hypergrad=hypergrad, path=path, compile=compile, **group)
    assert opt.path == path, opt.path_reason
    hs = []
    for i, xy in enumerate(batches(steps, seed=5)):
        x, y = (t.to(device=device, dtype=dtype) for t in xy)
        opt.zero_grad()
        loss_fn(model, (x, y)).backward()
        # every step but a compiled path's first, whose compilation synchronises (inductor's own,
        # once: it did so before this check first ran on a GPU, torch 2.11, H200)
        with no_sync() if device != "cpu" and not (compile and i == 0) else nullcontext():
            opt.step()
        hs.append({k: v.detach().cpu() for k, v in opt.last_hypergrad.items()})
    return model, opt, hs


def to_cpu(result):
    model, opt, hs = result
    cpu_model = tiny_mlp()
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})

    class View:  # what assert_same_run reads, moved to the CPU
        state = {q: {k: v.cpu() for k, v in opt.state[p].items()} for p, q in zip(model.parameters(), cpu_model.parameters())}
        coefficients = {k: v.cpu() for k, v in opt.coefficients.items()}

    return cpu_model, View, hs


@pytest.mark.parametrize("name", list(CASES))
def test_each_path_on_cuda_equals_the_generic_path_on_cpu_without_a_sync(name):
    family, hypergrad, group, path, compile = CASES[name]
    ours = run(family, hypergrad, group, path, "cuda", compile=compile)
    assert ours[0][0].weight.is_cuda and all(v.is_cuda for v in ours[1].coefficients.values())
    if compile:
        assert ours[1]._path.compiled, "compilation failed: it ran eagerly"
    assert_same_run(to_cpu(ours), run(family, hypergrad, group, "generic", "cpu"))


@pytest.mark.parametrize("path", ["fused", "compiled"])
def test_bf16_parameters_train_on_cuda_without_a_sync(path):
    family = MADA() if path == "fused" else Padam()
    model, opt, hs = run(family, OneStep(lr=0.05), {"lr": 1e-2}, path, "cuda", compile=True, steps=20,
                         dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert all(v.dtype == torch.float32 for v in opt.coefficients.values())  # never below float32
    assert all(torch.isfinite(v).all() for h in hs for v in h.values())


def test_a_cuda_state_dict_resumes_on_cuda_exactly():
    family, hypergrad, group, *_ = CASES["mada-fused-compiled"]
    data = batches(12, seed=3)

    def train(model, opt, xys):
        for x, y in xys:
            opt.zero_grad()
            loss_fn(model, (x.cuda(), y.cuda())).backward()
            opt.step()

    model = tiny_mlp().cuda()
    opt = MetaOptimizer(model.parameters(), family, hypergrad=hypergrad, path="fused", compile=True, **group)
    train(model, opt, data[:6])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, data[6:])
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = tiny_mlp().cuda()
    model2.load_state_dict(saved["model"])
    opt2 = MetaOptimizer(model2.parameters(), family, hypergrad=hypergrad, path="fused", compile=True, **group)
    opt2.load_state_dict(saved["opt"])
    assert all(v.is_cuda for st in opt2.state.values() for v in st.values())
    train(model2, opt2, data[6:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for k in opt.coefficients:
        assert torch.equal(opt.coefficients[k], opt2.coefficients[k])


def test_a_family_that_breaks_the_contract_is_refused_on_cuda_as_on_the_cpu():
    from test_contract import DEFECTS

    from metaopt import FamilyContractError

    for name, (cls, words) in DEFECTS.items():
        model = tiny_mlp().cuda()
        with pytest.raises(FamilyContractError) as info:
            MetaOptimizer(model.parameters(), cls(), lr=1e-2)
        if name == "init's state of the wrong shape":  # its torch.zeros(n) is made on the CPU: said first
            words = ["state['m'] is on cpu, its parameter on cuda:0"]
        assert all(w in str(info.value) for w in words), str(info.value)


def test_skipped_hypersteps_warn_on_cuda_without_a_sync():
    """The skip count reaches the host by a copy nobody waits for (pinned memory, an event)."""
    from test_zero_gradients import Root, dead_mlp

    from metaopt.watch import SkippedHyperstepsWarning

    model = dead_mlp().cuda()
    opt = MetaOptimizer(model.parameters(), Root(), hypergrad=OneStep(lr=0.01), lr=1e-2)
    data = [(x.cuda(), y.cuda()) for x, y in batches(5)]
    with pytest.warns(SkippedHyperstepsWarning, match="hyper-steps of family 'root' were skipped"):
        for i in range(400):
            opt.zero_grad()
            loss_fn(model, data[i % 5]).backward()
            with no_sync():
                opt.step()
            if getattr(opt, "_skip_watch", None) is not None and opt._skip_watch.warned:
                break
    assert opt._skip_watch.host.is_pinned()


def test_a_dead_unit_on_cuda_keeps_finite_tangents_on_every_path():
    from test_contract import Belief
    from test_zero_gradients import dead_mlp

    for path, compile in (("generic", False), ("compiled", True)):
        model = dead_mlp().cuda()
        opt = MetaOptimizer(model.parameters(), Belief(), hypergrad=OneStep(lr=0.05), path=path, compile=compile,
                            lr=1e-2)
        for i, (x, y) in enumerate(batches(6, seed=5)):
            opt.zero_grad()
            loss_fn(model, (x.cuda(), y.cuda())).backward()
            with no_sync() if not (compile and i == 0) else nullcontext():  # compiling syncs, once
                opt.step()
        assert int(opt.skipped_hypersteps) == 0 and opt.coefficients["kappa"].item() != 0.5, path
