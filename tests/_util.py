"""Shared helpers for the tests: a tiny float64 model, fixed batches, lockstep runs."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from metaopt import MetaOptimizer, OneStep


def tiny_mlp(seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    ).to(dtype)


def batches(n: int, seed: int = 1, dtype=torch.float64, batch: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 5, generator=gen, dtype=dtype), torch.randn(batch, 3, generator=gen, dtype=dtype))
        for _ in range(n)
    ]


def loss_fn(model, xy):
    x, y = xy
    return ((model(x) - y) ** 2).mean()


def train(model, opt, data, steps=None):
    for xy in data[:steps]:
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| / max |b| (b the reference)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def max_param_rel_diff(m1, m2) -> float:
    return max(rel_diff(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def lockstep(make_ref, make_ours, steps=200, seed=0):
    """Train two copies of the same model on the same batches; return both models."""
    ref_model = tiny_mlp(seed)
    our_model = copy.deepcopy(ref_model)
    ref, ours = make_ref(ref_model.parameters()), make_ours(our_model.parameters())
    data = batches(steps)
    train(ref_model, ref, data)
    train(our_model, ours, data)
    return ref_model, our_model


# -- one-step hyper-gradient vs central finite differences ------------------------------
EPS = 1e-6
TOL = 1e-5


def random_interior(opt, gen):
    """Random coefficient values well inside their boxes."""
    values = {}
    for name in opt.coefficients:
        lo, hi = float(opt._low[opt._names.index(name)]), float(opt._high[opt._names.index(name)])
        u = torch.rand((), generator=gen, dtype=torch.float64).item()
        values[name] = lo + (hi - lo) * (0.15 + 0.7 * u)
    return values


def engine_and_fd(family, group, seed=0, warm=6, new_lr=None, path="auto"):
    """(engine hyper-gradient, central finite differences) at a random state, name -> float."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_mlp(seed)
    opt = MetaOptimizer(model.parameters(), family, hypergrad=OneStep(lr=0.0), path=path, **group)
    data = batches(warm + 2, seed=seed + 1)
    opt.set_coefficients(**random_interior(opt, gen))
    for xy in data[:warm]:  # a random state
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
    # step t from this checkpoint
    opt.zero_grad()
    loss_fn(model, data[warm]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    ckpt = copy.deepcopy((model.state_dict(), opt.state_dict()))
    c = opt.coefficients

    def loss_after_step_t(**coefficients):
        m = tiny_mlp(seed)
        o = MetaOptimizer(m.parameters(), family, hypergrad=OneStep(lr=0.0), path=path, **group)
        m.load_state_dict(ckpt[0])
        o.load_state_dict(copy.deepcopy(ckpt[1]))
        o.set_coefficients(**coefficients)
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
        o.step()
        with torch.no_grad():
            return loss_fn(m, data[warm + 1]).item()

    opt.step()  # step t
    if new_lr is not None:  # a scheduler moves lr before step t+1; h must carry step t's lr
        for g in opt.param_groups:
            g["lr"] = new_lr
    opt.zero_grad()
    loss_fn(model, data[warm + 1]).backward()
    opt.step()  # step t+1 computes h from step t's tangents
    h = opt.last_hypergrad

    fd = {}
    for k in opt.learned:
        ck = c[k].item()
        fd[k] = (loss_after_step_t(**{k: ck + EPS}) - loss_after_step_t(**{k: ck - EPS})) / (2 * EPS)
    return {k: v.item() for k, v in h.items()}, fd


def assert_close(h, fd, tol=TOL):
    assert set(h) == set(fd)
    scale = max(abs(v) for v in fd.values())
    assert scale > 1e-8, fd  # a vanishing hyper-gradient would make the check empty
    for k in fd:
        err = abs(h[k] - fd[k]) / max(abs(fd[k]), 1e-3 * scale)
        assert err <= tol, (k, h[k], fd[k], err)


# -- no host synchronisation in step() ---------------------------------------------------------
@contextmanager
def host_reads_forbidden():
    """Tensor.item/__bool__/__float__/... raise while active: a step that reads a value on the
    host fails loudly."""
    names = ["item", "tolist", "numpy", "__bool__", "__float__", "__int__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def boom(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host inside step()")

    for n in names:
        setattr(torch.Tensor, n, boom)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
