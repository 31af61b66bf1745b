"""Flat parameter and gradient storage (issue 22): a bucket holds its group's parameters and gradients.

On the fused and compiled paths each param group's parameters, gradients and state live in flat
buffers the optimizer owns, every ``.data``, ``.grad`` and state entry a view into them. Here:
the views are what they claim to be, a step moves no data between buffers, and each way a user
can break the views still trains exactly as the generic path (which holds nothing) does.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _util import batches, loss_fn, rel_diff, tiny_mlp
from torch.utils._python_dispatch import TorchDispatchMode

from metaopt import MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA

TOL = 1e-10  # the fused rule against the generic path's autograd, float64


def make(model, path, **kw):
    return MetaOptimizer(model.parameters(), MADA(), hypergrad=OneStep(lr=0.05), path=path, lr=1e-2, **kw)


def step(model, opt, xy, zero="opt"):
    if zero == "opt":
        opt.zero_grad()
    elif zero == "model":
        model.zero_grad()
    loss_fn(model, xy).backward()
    opt.step()


def assert_same_training(ours, theirs, tol=TOL):
    (m1, o1), (m2, o2) = ours, theirs
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert rel_diff(p.detach(), q.detach()) <= tol
    for k in o1.learned:  # coefficients are O(1), and may sit at 0 exactly: absolute
        assert (o1.coefficients[k] - o2.coefficients[k]).abs().max() <= tol


def bucket_of(opt):
    (bucket,) = opt._path.buckets.values()
    return bucket


def holds(bucket, model, grads=True) -> bool:
    """Every parameter's .data (and .grad) are the bucket's views, in order."""
    ptr, gptr, off = bucket.param.data_ptr(), bucket.grad.data_ptr(), 0
    for p in model.parameters():
        size = bucket.param.element_size()
        if p.data_ptr() != ptr + off * size:
            return False
        if grads and (p.grad is None or p.grad.data_ptr() != gptr + off * size):
            return False
        off += p.numel()
    return True


def pair(seed=0, dtype=torch.float64):
    """The same model twice: one on the fused path (flat storage), one on the generic path."""
    model = tiny_mlp(seed, dtype)
    ref = copy.deepcopy(model)
    return (model, make(model, "fused")), (ref, make(ref, "generic"))


def test_parameters_and_gradients_are_views_of_the_buckets_flat_buffers():
    (model, opt), _ = pair()
    for xy in batches(2):
        step(model, opt, xy)
    bucket = bucket_of(opt)
    assert bucket.owns and holds(bucket, model)
    first = next(model.parameters())
    bucket.param[0] += 1.0  # one storage: a write to the buffer is a write to the parameter
    assert first.view(-1)[0] == bucket.param[0]


class OpsSeen(TorchDispatchMode):
    """The aten ops a region dispatches, and the sizes every copy_ writes."""

    def __init__(self):
        super().__init__()
        self.ops, self.copied = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        if func.overloadpacket is torch.ops.aten.copy_:
            self.copied.append(args[0].numel())
        return func(*args, **(kwargs or {}))


def test_a_step_gathers_and_scatters_nothing():
    (model, opt), _ = pair()
    data = batches(3)
    for xy in data[:2]:
        step(model, opt, xy)
    opt.zero_grad()
    loss_fn(model, data[2]).backward()
    with OpsSeen() as seen:
        opt.step()
    # no parameter, gradient or update passes through a buffer of its own: the only copies are
    # the rule's writes of whole flat state buffers, none of one parameter's gradient
    assert not {"aten.cat", "aten._foreach_copy_", "aten._foreach_add_"} & set(seen.ops), seen.ops
    n = sum(p.numel() for p in model.parameters())
    assert seen.copied and set(seen.copied) == {n}, seen.copied
    assert seen.ops.count("aten.dot") == len(opt.learned)  # h: K dot products over the flat gradient


def test_opt_zero_grad_zeroes_the_flat_gradient_and_keeps_the_views():
    ours, theirs = pair()
    model, opt = ours
    for xy in batches(6):
        step(*ours, xy)
        step(*theirs, xy)
        bucket = bucket_of(opt)
        opt.zero_grad()
        assert holds(bucket, model) and all(p.grad.abs().max() == 0 for p in model.parameters())
    assert_same_training(ours, theirs)


def test_gradients_left_by_model_zero_grad_are_taken_and_pointed_back():
    ours, theirs = pair()
    model, opt = ours
    for xy in batches(6):
        step(*ours, xy, zero="model")  # set_to_none: each backward leaves gradients of its own
        step(*theirs, xy, zero="model")
        assert holds(bucket_of(opt), model)
    assert_same_training(ours, theirs)


def test_zero_grad_set_to_none_clears_every_gradient():
    (model, opt), _ = pair()
    for xy in batches(2):
        step(model, opt, xy)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    step(model, opt, batches(3)[2], zero=None)
    assert holds(bucket_of(opt), model)


def test_after_opt_zero_grad_an_unused_parameter_steps_with_a_zero_gradient():
    """The documented difference from torch's default: as torch's zero_grad(set_to_none=False)."""
    (model, opt), (ref, ref_opt) = pair()
    data = batches(6)
    for t, xy in enumerate(data):
        for m, o, zero in ((model, opt, None), (ref, ref_opt, False)):
            o.zero_grad(set_to_none=zero)
            if t == 3:  # this step the last layer's bias is not used: no gradient reaches it
                loss = ((torch.nn.functional.linear(m[1](m[0](xy[0])), m[2].weight) - xy[1]) ** 2).mean()
            else:
                loss = loss_fn(m, xy)
            loss.backward()
            o.step()
    assert model[2].bias.grad is not None
    assert_same_training((model, opt), (ref, ref_opt))


def test_gradients_kept_elsewhere_are_copied_in_every_step():
    """As DDP's gradient_as_bucket_view leaves them: each gradient a view of another flat buffer."""
    ours, theirs = pair()
    model, opt = ours
    elsewhere = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for xy in batches(6):
        opt.zero_grad()
        loss_fn(model, xy).backward()
        off = 0
        for p in model.parameters():
            view = elsewhere[off:off + p.numel()].view(p.shape)
            view.copy_(p.grad)
            p.grad = view
            off += p.numel()
        opt.step()
        step(*theirs, xy)
    assert holds(bucket_of(opt), model)
    assert_same_training(ours, theirs)


def test_a_replaced_parameter_storage_is_the_one_the_step_updates():
    ours, theirs = pair()
    data = batches(6)
    for xy in data[:3]:
        step(*ours, xy)
        step(*theirs, xy)
    new = ours[0][0].weight.detach().clone()
    ours[0][0].weight.data = new  # p.data re-assigned: the parameter no longer lives in the bucket
    for xy in data[3:]:
        step(*ours, xy)
        step(*theirs, xy)
    assert rel_diff(new, theirs[0][0].weight.detach()) <= TOL  # updated where it now lives
    assert ours[1]._path.bucket_plan(ours[1].param_groups, ours[1].state) is None  # per tensor from here
    assert_same_training(ours, theirs)


def test_a_model_cast_after_its_first_steps_trains_on_per_tensor():
    """bf16 after float32 steps: the state stays in float32, the compute precision of both."""
    (model, opt), (ref, ref_opt) = pair(dtype=torch.float32)
    data = batches(6, dtype=torch.float32)
    for xy in data[:3]:
        step(model, opt, xy)
        step(ref, ref_opt, xy)
    model.bfloat16(), ref.bfloat16()
    for xy in batches(6, dtype=torch.bfloat16)[3:]:
        step(model, opt, xy)
        step(ref, ref_opt, xy)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert opt._path.bucket_plan(opt.param_groups, opt.state) is None  # per tensor from here
    # one bf16 rounding of the update apart at most (2^-8 relative), where float32 rules differ
    assert_same_training((model, opt), (ref, ref_opt), tol=2 ** -7)


def test_a_model_cast_before_its_first_step_trains_in_flat_storage():
    model = tiny_mlp(0, torch.float32)
    ref = copy.deepcopy(model)
    opt, ref_opt = make(model, "fused"), make(ref, "generic")
    model.double(), ref.double()  # after the optimizer was made, as torch optimizers allow
    for xy in batches(5):
        step(model, opt, xy)
        step(ref, ref_opt, xy)
    assert holds(bucket_of(opt), model) and bucket_of(opt).param.dtype == torch.float64
    # the coefficients and step counts stay float32, as the optimizer was made: the two rules'
    # float32 scalars differ in their last bits
    assert_same_training((model, opt), (ref, ref_opt), tol=1e-7)


def test_a_copy_of_model_and_optimizer_holds_its_own_parameters():
    (model, opt), _ = pair()
    data = batches(8)
    for xy in data[:3]:
        step(model, opt, xy)
    model2, opt2 = copy.deepcopy((model, opt))
    # the copy's gradients are its own until its next step takes them
    assert holds(bucket_of(opt2), model2, grads=False)
    assert bucket_of(opt2).param.data_ptr() != bucket_of(opt).param.data_ptr()
    for xy in data[3:]:
        step(model, opt, xy)
        step(model2, opt2, xy)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)  # the same steps, bit for bit
    assert holds(bucket_of(opt2), model2)


def test_state_dict_resume_into_a_fresh_optimizer_holds_the_parameters_again():
    (model, opt), _ = pair()
    data = batches(8)
    for xy in data[:3]:
        step(model, opt, xy)
    model2 = copy.deepcopy(model)
    opt2 = make(model2, "fused")
    opt2.load_state_dict(opt.state_dict())
    assert holds(bucket_of(opt2), model2, grads=False)
    for xy in data[3:]:
        step(model, opt, xy)
        step(model2, opt2, xy)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert holds(bucket_of(opt2), model2)


@pytest.mark.slow
def test_the_compiled_step_writes_the_flat_buffers_in_place():
    model = tiny_mlp(0, torch.float32)
    ref = copy.deepcopy(model)
    opt = MetaOptimizer(model.parameters(), MADA(), hypergrad=OneStep(lr=0.05), path="compiled", lr=1e-2)
    ref_opt = make(ref, "generic")
    data = batches(5, dtype=torch.float32)
    for xy in data[:4]:
        step(model, opt, xy)
        step(ref, ref_opt, xy)
    opt.zero_grad()
    loss_fn(model, data[4]).backward()
    with OpsSeen() as seen:
        opt.step()
    step(ref, ref_opt, data[4], zero="opt")
    assert opt._path.compiled and holds(bucket_of(opt), model)
    assert not {"aten.cat", "aten._foreach_copy_", "aten._foreach_add_"} & set(seen.ops)
    assert_same_training((model, opt), (ref, ref_opt), tol=1e-5)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_native_optimizer_copied_where_its_kernel_does_not_build_trains_on(compile, monkeypatch):
    """The copy takes the path "auto" would without the kernel, over the same buckets: the
    generic path, or under compile=True the fused path, whose buckets then hold the parameters."""
    from metaopt import kernels

    model = tiny_mlp(0)
    opt = MetaOptimizer(model.parameters(), MADA(), hypergrad=OneStep(lr=0.05), compile=compile, lr=1e-2)
    assert opt.path == "native"
    data = batches(8)
    for xy in data[:3]:
        step(model, opt, xy)
    with monkeypatch.context() as m:
        m.setattr(kernels, "load", lambda source, flags=(): None)
        model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.path == ("fused" if compile else "generic") and "does not build" in opt2.path_reason
    for xy in data[3:]:
        step(model, opt, xy)
        step(model2, opt2, xy)
    if compile:
        assert holds(bucket_of(opt2), model2)
    assert_same_training((model2, opt2), (model, opt))


@pytest.mark.parametrize("path", ["native", "fused"])
def test_a_plainly_pickled_optimizer_continues_bit_for_bit(path):
    """pickle (not torch.save) copies each view's storage on its own: the copy's state entries
    and step counts must be views into its buckets again, or the kernel writes buffers the state
    no longer shows (the step count then stays behind)."""
    import pickle

    model = tiny_mlp(0, torch.float64)
    opt = make(model, path)
    assert opt.path == path
    data = batches(6)
    for xy in data[:3]:
        step(model, opt, xy)
    twin_model, twin_opt = pickle.loads(pickle.dumps((model, opt)))
    for xy in data[3:]:
        step(model, opt, xy)
        step(twin_model, twin_opt, xy)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, twin_opt.state[q][k]), k
