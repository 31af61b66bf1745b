"""Shared helpers for the tests: a tiny float64 model, fixed batches, lockstep runs."""

from __future__ import annotations

import copy
import socket
from contextlib import contextmanager

import torch

from metaopt import Coefficient, CoefficientSpace, Family, MetaOptimizer, OneStep
from metaopt.contract import HostReadError, _HostReadOps


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
        lo, hi = opt.family.space[name].low, opt.family.space[name].high
        u = torch.rand((), generator=gen, dtype=torch.float64).item()
        values[name] = lo + (hi - lo) * (0.15 + 0.7 * u)
    return values


def engine_and_fd(family, group, seed=0, warm=6, new_lr=None, path="auto", model_fn=tiny_mlp):
    """(engine hyper-gradient, central finite differences) at a random state, name -> float.

    ``model_fn(seed)`` makes the model (``tiny_mlp`` by default).
    """
    gen = torch.Generator().manual_seed(seed)
    model = model_fn(seed)
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
        m = model_fn(seed)
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
def _to_names_cpu(args, kwargs) -> bool:
    """Tensor.to(...) given the device as a string that names the CPU ("cpu", "cpu:0")."""
    device = kwargs.get("device", args[0] if args else None)
    return isinstance(device, str) and torch.device(device).type == "cpu"


@contextmanager
def host_reads_forbidden():
    """While active, anything that reads a tensor value on the host raises AssertionError: a step
    that would synchronise with the device fails loudly, also in a CPU-only test run.

    Two layers, since on a CPU tensor some host reads never reach the dispatcher:

    * the engine's TorchDispatchMode (`metaopt.contract._HostReadOps`) that sees every aten op,
      including those called from C++ and those autograd runs inside torch.autograd.grad / backward. It flags
      ``_local_scalar_dense`` (item, bool, float, int, __index__, ``if t.any():``, indexing with a
      0-d tensor), nonzero (also torch.where(c) and argwhere), equal, allclose, masked_select, the
      unique ops, bincount, repeat_interleave with tensor repeats and no output_size, histc without
      a range, index / index_put with a bool or uint8 index (``x[mask]``, ``x[mask] = v``), and
      _to_copy / copy_ from a non-CPU tensor into a CPU one (a real device -> host copy on CUDA).
    * patches of torch.Tensor methods that on a CPU tensor return without any aten op:
      item, tolist, numpy, __array__, __bool__, __float__, __int__, __index__, __complex__,
      cpu (always: on a CUDA tensor it is a device -> host copy), and to(...) when the device is
      given as a string naming the CPU ("cpu", "cpu:0").

    ``t.to(device)`` with a torch.device object is *not* flagged at the Python level: the engine
    moves shared tensors with ``coef.to(param.device)``, a no-op on CPU and a device -> device
    copy on CUDA. A real device -> host copy made that way still reaches the dispatch mode.

    The dispatch mode is thread-local, the method patches are global; everything is restored on
    exit, also when the body raises. Nesting the context manager is fine.
    """
    names = ["item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__",
             "__index__", "__complex__", "cpu"]
    missing = object()
    saved = {n: torch.Tensor.__dict__.get(n, missing) for n in names + ["to"]}
    original_to = torch.Tensor.to

    def boom_for(name):
        def boom(self, *args, **kwargs):
            raise AssertionError(f"a tensor value was read on the host inside step(): Tensor.{name}")
        return boom

    def to(self, *args, **kwargs):
        if _to_names_cpu(args, kwargs):
            raise AssertionError("a tensor value was read on the host inside step(): Tensor.to('cpu')")
        return original_to(self, *args, **kwargs)

    try:
        for n in names:
            setattr(torch.Tensor, n, boom_for(n))
        torch.Tensor.to = to
        with _HostReadOps():
            yield
    except HostReadError as err:  # the engine's dispatch-level guard, as the tests' failure
        raise AssertionError(f"{err} inside step()") from err
    finally:
        for n, f in saved.items():
            if f is missing:
                if n in torch.Tensor.__dict__:
                    delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, f)


def assert_identical(a, b, where="root"):
    """Recursive bit equality: tensors by torch.equal (and dtype, shape), the rest by ==."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b), where
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NormalisedSGD(Family):
    """Δ = -η (a g/‖g‖ + (1-a) g): a norm over the whole tensor, so not elementwise (sharding must refuse it)."""

    name = "normalised_sgd"
    elementwise = False

    def __init__(self):
        self.space = CoefficientSpace(a=Coefficient(init=0.5, low=0.0, high=1.0))

    def init(self, param, grad, group):
        return {}

    def update(self, grad, param, state, coefficients, group, step):
        a = coefficients["a"]
        return -group["lr"] * (a * grad / (grad.norm() + 1e-12) + (1 - a) * grad), {}
