"""torch's generic optimizer contract, held against MetaOptimizer as a third party would hold it.

The checks are those PyTorch applies to its own optimizers (the OptimizerInfo tests of its
test/test_optim.py): state-dict determinism and Python-number step counts, every step and
state-dict hook, ``weights_only`` save and load, ``copy.deepcopy``, a tensor lr, parameters without gradients, a
``torch.compile``d training step. The references are independent of the code under test:
``torch.optim.Adam`` at MADA's Adam point, or the same optimizer run without the thing under
test (uninterrupted, with a float lr, eagerly), compared bit for bit wherever both sides run the
same arithmetic (float64 throughout).

Cases: MADA at the Adam point (its default hyper-optimizer, in its warm-up) on the generic,
fused and native paths, and MADA learning its coefficients (from an interior point, hyper-Adam)
on the native path.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from _util import assert_identical, batches, host_reads_forbidden, loss_fn, max_param_rel_diff, tiny_mlp, train
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from metaopt import MetaOptimizer, OneStep, Unrolled
from metaopt.plugins.mada import MADA

LR = 1e-2
F64 = torch.float64
CASES = {
    "generic": ("generic", "default"),
    "fused": ("fused", "default"),
    "native": ("native", "default"),
    "learning": ("native", OneStep(lr=0.05, optimizer="adam")),
}


def make(params, case, **kw):
    path, hypergrad = CASES[case]
    kw.setdefault("lr", LR)
    opt = MetaOptimizer(params, MADA().at("adam"), hypergrad=hypergrad, path=path, **kw)
    if case == "learning":
        opt.set_coefficients(beta3=0.3, c=0.7, rho=0.6)  # inside the boxes: the coefficients move
    return opt


def setup(case, **kw):
    model = tiny_mlp()
    return model, make(model.parameters(), case, **kw)


def assert_same_run(model_a, opt_a, model_b, opt_b):
    """Parameters and state dicts (state, lr & co., the metaopt record) equal bit for bit."""
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    assert_identical(opt_a.state_dict(), opt_b.state_dict())


# -- state dicts -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_two_optimizers_loaded_from_one_state_dict_continue_identically(case):
    data = batches(8)
    model, opt = setup(case)
    train(model, opt, data[:4])
    sd = copy.deepcopy(opt.state_dict())  # as torch.load gives it
    unchanged = copy.deepcopy(sd)
    twins = []
    for _ in range(2):
        m = copy.deepcopy(model)
        o = make(m.parameters(), case)
        o.load_state_dict(sd)  # the same dict, twice
        assert_identical(o.state_dict(), unchanged)  # a loaded optimizer's state dict is the one it loaded
        twins.append((m, o))
    for m, o in [(model, opt), *twins]:
        train(m, o, data[4:])
    for m, o in twins:
        assert_same_run(m, o, model, opt)
    assert_identical(sd, unchanged)  # steps change the optimizers' state, never the dict


@pytest.mark.parametrize("case", CASES)
def test_a_state_dict_with_python_number_steps_loads_and_continues_as_if_uninterrupted(case):
    """Step counts as Python numbers (other tools and converters write them; torch's optimizers
    turn them back into tensors)."""
    data = batches(8)
    ref_model, ref = setup(case)
    train(ref_model, ref, data)
    model, opt = setup(case)
    train(model, opt, data[:4])
    sd = copy.deepcopy(opt.state_dict())
    for pid, st in sd["state"].items():
        st["step"] = int(st["step"].item()) if pid % 2 else st["step"].item()  # ints and floats

    fresh_model = copy.deepcopy(model)
    fresh = make(fresh_model.parameters(), case)
    fresh.load_state_dict(sd)
    dtype = fresh.coefficients["c"].dtype
    assert all(st["step"].dtype == dtype and st["step"].dim() == 0 for st in fresh.state.values())
    train(fresh_model, fresh, data[4:])
    assert_same_run(fresh_model, fresh, ref_model, ref)


def _faulty(sd, fault, opt, monkeypatch):
    """``sd`` broken as ``fault`` says (or the optimizer made to fail while it loads it), and the error expected."""
    if fault == "bad step":
        sd["state"][max(sd["state"])]["step"] = "three"  # the last parameter's: all others convert first
        return ValueError, "parameter 3's step is 'three'"
    if fault == "bad lr":
        sd["param_groups"][0]["lr"] = torch.tensor([0.1, 0.2], dtype=F64)
        return ValueError, "a tensor lr must hold one"

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(opt._path, "restore", fail)  # the last thing a load does before it commits
    return RuntimeError, "injected"


@pytest.mark.parametrize("fault", ["bad step", "bad lr", "failure while deriving the path's state"])
@pytest.mark.parametrize("case", CASES)
def test_a_load_that_fails_anywhere_changes_nothing(case, fault, monkeypatch):
    data = batches(8)
    source_model, source = setup(case)
    train(source_model, source, data[:5])
    sd = copy.deepcopy(source.state_dict())
    sd["param_groups"][0]["lr"] = 0.5  # what the load would change first, were it not atomic
    model, opt = setup(case)
    train(model, opt, data[:3])
    twin_model, twin = copy.deepcopy((model, opt))
    before = copy.deepcopy(opt.state_dict())
    error, match = _faulty(sd, fault, opt, monkeypatch)
    with pytest.raises(error, match=match):
        opt.load_state_dict(sd)
    monkeypatch.undo()
    assert_identical(opt.state_dict(), before)
    train(model, opt, data[3:])  # and it steps on as if the load had never been tried
    train(twin_model, twin, data[3:])
    assert_same_run(model, opt, twin_model, twin)


@pytest.mark.parametrize("case", CASES)
def test_state_that_belongs_to_no_parameter_is_kept(case):
    model, opt = setup(case)
    train(model, opt, batches(2))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"]["note"] = {"written_by": "a tool", "at": torch.tensor(7)}
    fresh_model = copy.deepcopy(model)
    fresh = make(fresh_model.parameters(), case)
    fresh.load_state_dict(sd)
    assert_identical(fresh.state["note"], sd["state"]["note"])
    train(fresh_model, fresh, batches(2, seed=3))
    assert_identical(fresh.state_dict()["state"]["note"], sd["state"]["note"])


@pytest.mark.parametrize("case", CASES)
def test_state_dict_saves_and_loads_with_weights_only(case):
    """A tensor lr (second group) travels too, as a tensor, and stays the loaded optimizer's own."""
    data = batches(8)

    def run(steps):
        model = tiny_mlp()
        opt = make([{"params": model[0].parameters()},
                    {"params": model[2].parameters(), "lr": torch.tensor(5e-3, dtype=F64)}], case)
        train(model, opt, data[:steps])
        return model, opt

    ref_model, ref = run(8)
    model, opt = run(4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert_identical(loaded, opt.state_dict())
    fresh_model = copy.deepcopy(model)
    fresh = make([{"params": fresh_model[0].parameters()}, {"params": fresh_model[2].parameters()}], case)
    fresh.load_state_dict(loaded)
    lr = fresh.param_groups[1]["lr"]
    assert torch.is_tensor(lr) and lr is not loaded["param_groups"][1]["lr"]
    train(fresh_model, fresh, data[4:])
    assert_same_run(fresh_model, fresh, ref_model, ref)


# -- hooks -----------------------------------------------------------------------------------


def test_every_step_hook_is_called_with_what_torch_passes_and_may_change_it():
    model, opt = setup("learning")
    xy = batches(1)[0]
    calls = []

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, xy)
        loss.backward()
        return loss

    def other_closure():
        closure()
        return "from the hook's closure"

    def local_pre(o, args, kwargs):
        calls.append(("local pre", o, args, dict(kwargs), o._meta_step))
        return args, {"closure": other_closure}  # torch lets a pre-hook replace the arguments

    def local_post(o, args, kwargs):
        calls.append(("local post", o, args, dict(kwargs), o._meta_step))

    def global_pre(o, args, kwargs):
        calls.append(("global pre", o, args, dict(kwargs), o._meta_step))

    def global_post(o, args, kwargs):
        calls.append(("global post", o, args, dict(kwargs), o._meta_step))

    handles = [opt.register_step_pre_hook(local_pre), opt.register_step_post_hook(local_post),
               torch_optimizer.register_optimizer_step_pre_hook(global_pre),
               torch_optimizer.register_optimizer_step_post_hook(global_post)]
    try:
        assert opt.step(closure=closure) == "from the hook's closure"
    finally:
        for h in handles:
            h.remove()
    assert [c[0] for c in calls] == ["global pre", "local pre", "local post", "global post"]
    assert all(c[1] is opt and c[2] == (opt,) for c in calls)
    assert calls[0][3] == calls[1][3] == {"closure": closure}
    assert calls[2][3] == calls[3][3] == {"closure": other_closure}  # post-hooks see what ran
    assert [c[4] for c in calls] == [0, 0, 1, 1]  # before the step, after it
    opt.step(closure)  # removed: none is called again
    assert len(calls) == 4


def test_state_dict_hooks_see_the_whole_state_dict_and_may_change_it():
    model, opt = setup("learning")
    train(model, opt, batches(3))
    seen = {}

    def pre(o):
        o.state["note"] = 1  # torch lets a pre-hook change the optimizer before the dict is made

    def post(o, sd):
        seen["record"] = copy.deepcopy(sd["param_groups"][0]["metaopt"])
        seen["note"] = sd["state"].pop("note")
        return {**sd, "written_by": "post hook"}  # and a post-hook replace the dict

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["written_by"] == "post hook" and "note" not in sd["state"] and seen["note"] == 1
    record = seen["record"]
    assert torch.equal(record["coefficients"], torch.stack(list(opt.coefficients.values())))
    assert record["step"] == 3 and record["family"] == "mada"


def test_load_state_dict_hooks_see_the_whole_state_dict_then_the_loaded_optimizer():
    data = batches(5)
    source_model, source = setup("learning")
    train(source_model, source, data)
    sd = copy.deepcopy(source.state_dict())
    model, opt = setup("learning")
    train(model, opt, data[:2])
    seen = []

    def pre_sets_lr(o, d):
        seen.append(("pre 1", "metaopt" in d["param_groups"][0], sorted(d["state"])))
        d["param_groups"][0]["lr"] = 0.002

    def pre_replaces_dict(o, d):
        seen.append(("pre 2", "metaopt" in d["param_groups"][0], sorted(d["state"])))
        mine = copy.deepcopy(d)
        mine["param_groups"][0]["lr"] = 0.003
        return mine

    def post(o):
        seen.append(("post", o.param_groups[0]["lr"], o._meta_step, dict(o.coefficients),
                     {k: v.clone() for k, v in o.state[next(model.parameters())].items()}))

    opt.register_load_state_dict_pre_hook(pre_sets_lr)
    opt.register_load_state_dict_pre_hook(pre_replaces_dict, prepend=True)  # runs first, so pre 1 has the last word
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(sd)
    assert seen[0] == ("pre 2", True, [0, 1, 2, 3]) and seen[1] == ("pre 1", True, [0, 1, 2, 3])
    _, lr, step, coefficients, state = seen[2]
    assert lr == opt.param_groups[0]["lr"] == 0.002 and step == 5
    assert_identical(coefficients, source.coefficients)
    assert_identical(state, dict(source.state[next(source_model.parameters())]))


# -- deepcopy --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_deepcopy_steps_independently_and_equals_the_original(case):
    data = batches(6)
    model, opt = setup(case, lr=torch.tensor(LR, dtype=F64))
    train(model, opt, data[:3])
    model2, opt2 = copy.deepcopy((model, opt))
    assert {k for k in vars(opt) if not k.startswith("_")} == {k for k in vars(opt2) if not k.startswith("_")}
    assert_identical(opt2.defaults, opt.defaults)
    before = copy.deepcopy(opt.state_dict())
    train(model2, opt2, data[3:])  # the copy alone
    assert_identical(opt.state_dict(), before)
    train(model, opt, data[3:])
    assert_same_run(model2, opt2, model, opt)
    opt.param_groups[0]["lr"].fill_(0.5)  # the copy's lr is its own tensor
    assert opt2.param_groups[0]["lr"].item() == LR
    extra = torch.nn.Parameter(torch.ones(2, dtype=F64))
    opt2.add_param_group({"params": [extra]})  # a copy takes new groups as the original does
    extra.grad = torch.ones(2, dtype=F64)
    opt2.step()
    assert not torch.equal(extra, torch.ones(2, dtype=F64))


# -- a tensor lr -------------------------------------------------------------------------------

#: where a tensor lr runs: (path, compile, hypergrad); the coefficients learn (their tangents carry lr)
HYPER_ADAM = OneStep(lr=0.05, optimizer="adam")
LR_KINDS = {
    "generic": ("generic", False, HYPER_ADAM),
    "fused": ("fused", False, HYPER_ADAM),
    "fused compiled": ("fused", True, HYPER_ADAM),
    "compiled": ("compiled", True, HYPER_ADAM),
    "native": ("native", False, HYPER_ADAM),
    "unrolled": ("generic", False, Unrolled(steps=2, lr=0.05)),
}
#: the lr from these steps on (a scheduler's fill_, a user's in-place change)
SCHEDULE = {3: 5e-3, 6: 2e-2}


@pytest.mark.parametrize("kind", LR_KINDS)
def test_a_tensor_lr_is_kept_and_its_in_place_changes_are_honoured(kind, monkeypatch):
    """Equal, bit for bit, to the same run with a float lr set in the group; compiled, no
    recompilation when the value changes; and, eagerly, no host read of it in a step."""
    path, compiled, hypergrad = LR_KINDS[kind]
    graphs = CompileCounter()
    if compiled:  # the fused and compiled paths' torch.compile, with a counting backend (no inductor)
        real = torch.compile
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": graphs}))
    data = batches(10)
    unrolled = hypergrad is not None and hypergrad.unrolls

    def run(lr):
        model = tiny_mlp()
        opt = MetaOptimizer(model.parameters(), MADA(), hypergrad=hypergrad, path=path, compile=compiled, lr=lr)
        opt.set_coefficients(beta3=0.3, c=0.7, rho=0.6)
        graphs_before_change = None
        for i in range(0, len(data) - 2, 2) if unrolled else range(len(data)):
            if i in SCHEDULE or (unrolled and i + 1 in SCHEDULE):
                graphs_before_change = graphs_before_change or graphs.frame_count
                new = SCHEDULE.get(i, SCHEDULE.get(i + 1))
                if torch.is_tensor(lr):
                    lr.fill_(new)
                else:
                    opt.param_groups[0]["lr"] = new
            if unrolled:
                opt.unrolled_step(model, data[i:i + 2], loss_fn, data[i + 2])
                continue
            opt.zero_grad()
            loss_fn(model, data[i]).backward()
            if path in ("generic", "fused") and not compiled:
                with host_reads_forbidden():
                    opt.step()
            else:
                opt.step()
        return model, opt, graphs_before_change

    ref_model, ref, _ = run(LR)
    lr = torch.tensor(LR, dtype=F64)
    model, opt, graphs_before_change = run(lr)
    assert opt.param_groups[0]["lr"] is lr and opt.path == path
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert_identical(opt.coefficients, ref.coefficients)
    assert not torch.equal(opt.coefficients["c"], torch.tensor(0.7, dtype=F64))  # they learned
    if compiled:
        assert graphs.frame_count == graphs_before_change > 0  # the lr changed twice, nothing recompiled


@pytest.mark.parametrize("path", ["generic", "fused", "native"])
def test_a_tensor_lr_matches_torch_adam_with_a_tensor_lr(path):
    """At the Adam point, under a scheduler (which fills the tensor in place) and an in-place
    change of the user's own; torch.optim.Adam keeps and honours its tensor lr the same way."""
    ref_model, model = tiny_mlp(), tiny_mlp()
    ref_lr, lr = torch.tensor(LR, dtype=F64), torch.tensor(LR, dtype=F64)
    ref = torch.optim.Adam(ref_model.parameters(), lr=ref_lr, foreach=False)
    ours = MetaOptimizer(model.parameters(), MADA().at("adam"), hypergrad=None, path=path, lr=lr)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5) for o in (ref, ours)]
    for i, xy in enumerate(batches(20)):
        if i == 12:
            ref_lr.mul_(3.0)
            lr.mul_(3.0)
        for m, o, s in ((ref_model, ref, schedulers[0]), (model, ours, schedulers[1])):
            o.zero_grad()
            loss_fn(m, xy).backward()
            o.step()
            s.step()
    assert ours.param_groups[0]["lr"] is lr and torch.equal(lr, ref_lr) and lr.item() != LR
    assert max_param_rel_diff(model, ref_model) <= 1e-6


def test_a_tensor_lr_that_no_path_can_take_is_refused():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for bad in (torch.tensor([1e-3, 2e-3]), torch.tensor(1, dtype=torch.int64), torch.tensor(1e-3 + 0j)):
        with pytest.raises(ValueError, match="a tensor lr must hold one real floating-point value"):
            MetaOptimizer(p, MADA(), lr=bad)
    one = torch.tensor([1e-3])  # one value of one dimension: kept as a 0-d view of it
    opt = MetaOptimizer(p, MADA(), lr=one)
    one.fill_(2e-3)
    assert opt.param_groups[0]["lr"].shape == () and opt.param_groups[0]["lr"].item() == one.item()


# -- parameters without gradients ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["generic", "fused", "native"])
def test_params_without_grads_are_skipped_like_torch_adam(case):
    """A frozen parameter (never a gradient) and a bias without one every third step."""
    ref_model, model = tiny_mlp(), tiny_mlp()

    def params(m):
        frozen = torch.nn.Parameter(torch.ones(4, dtype=F64), requires_grad=False)
        return [*m.parameters(), frozen]

    ref = torch.optim.Adam(params(ref_model), lr=LR)
    ours = make(params(model), case)
    for i, xy in enumerate(batches(12)):
        for m, o in ((ref_model, ref), (model, ours)):
            o.zero_grad()
            loss_fn(m, xy).backward()
            if i % 3 == 0:
                m[0].bias.grad = None
            o.step()
    assert max_param_rel_diff(model, ref_model) <= 1e-6
    ref_sd, sd = ref.state_dict(), ours.state_dict()
    assert sorted(sd["state"]) == sorted(ref_sd["state"]) == [0, 1, 2, 3]  # nothing for the frozen one
    assert all(sd["state"][i]["step"].item() == ref_sd["state"][i]["step"].item() for i in range(4))
    assert ours.param_groups[0]["params"][4].equal(torch.ones(4, dtype=F64))


# -- torch.compile ---------------------------------------------------------------------------------


class CountingOptimizer(MetaOptimizer):
    """A subclass with a step of its own, as users write them."""

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        return super().step(closure)


def _training_step(model, opt):
    def train_step(x, y):
        loss = loss_fn(model, (x, y))
        loss.backward()
        opt.step()
        return loss.detach()

    return train_step


def _graph_breaks(run):
    """What ``run`` left in dynamo's graph-break counter: reason -> how often."""
    torch._dynamo.reset()
    counters.clear()
    run()
    breaks = dict(counters["graph_break"])
    torch._dynamo.reset()
    return breaks


@pytest.mark.parametrize("case", ["generic", "fused", "native", "learning", "subclass"])
def test_a_compiled_training_step_breaks_once_at_step_and_equals_eager(case):
    """Forward, backward and opt.step() in one compiled function: dynamo's graph breaks are torch's
    own at loss.backward() and one at the step (docs/reliability.md, "Under torch.compile"); the
    step hooks still run once per step; the run equals the eager one bit for bit (a counting
    backend runs the graphs dynamo captured as they are); the optimizer still pickles
    (through ``torch.save``, as tests/test_engine.py pickles it)."""
    data = batches(5)
    kind = "native" if case == "subclass" else case
    eager_model, eager = setup(kind)
    model = tiny_mlp()
    opt = (CountingOptimizer(model.parameters(), MADA().at("adam"), path="native", lr=LR) if case == "subclass"
           else make(model.parameters(), case))
    hook_calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: hook_calls.append(o._meta_step))
    graphs = CompileCounter()

    def run():
        step = torch.compile(_training_step(model, opt), backend=graphs)
        for xy in data:
            step(*xy)
            opt.zero_grad()

    breaks = _graph_breaks(run)
    train(eager_model, eager, data)
    assert_same_run(model, opt, eager_model, eager)
    if case == "subclass":  # (torch's wrapper runs the hooks around both steps, the subclass's and ours)
        assert opt.calls == 5
    else:
        assert hook_calls == [1, 2, 3, 4, 5]
    ours = {reason: n for reason, n in breaks.items() if "Tensor.backward()" not in reason}
    assert len(ours) == 1, breaks
    (reason, n), = ours.items()
    assert n == 1 and f"{type(opt).__name__}.step" in reason, breaks
    assert graphs.frame_count == 2  # before the break at backward, and after the step
    assert pickle.loads(pickle.dumps(type(opt).step)) is type(opt).step  # by reference, as before
    buf = io.BytesIO()
    torch.save((model, opt), buf)
    buf.seek(0)
    model2, opt2 = torch.load(buf, weights_only=False)
    train(model2, opt2, batches(2, seed=4))
    train(eager_model, eager, batches(2, seed=4))
    assert_same_run(model2, opt2, eager_model, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_tensor_lr_on_another_device_than_its_parameters_is_refused():
    cpu, cuda = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="cuda"))
    with pytest.raises(ValueError, match="lr is a tensor on cuda:0 and a parameter is on cpu"):
        MetaOptimizer([cpu], MADA(), lr=torch.tensor(1e-3, device="cuda"))
    opt = MetaOptimizer([cuda], MADA(), lr=torch.tensor(1e-3, device="cuda"))  # on its parameters' device
    with pytest.raises(ValueError, match="param group 1's lr is a tensor on cuda:0"):
        opt.add_param_group({"params": [cpu]})
