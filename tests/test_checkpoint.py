"""Checkpoints through torch.distributed.checkpoint (DCP) and torch.save: the learned
coefficients and the hyper-optimizer's state survive, resume is bit-identical to an
uninterrupted run, and a bad state dict is refused before anything changes.

The reference is always the same training run without the interruption (float64, compared
with ``torch.equal``). FSDP2 runs on two gloo processes, its state sharded in the checkpoint.
"""

from __future__ import annotations

import copy
import gc
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from _util import batches, free_port, loss_fn, tiny_mlp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from metaopt import Forward, MetaOptimizer, OneStep
from metaopt.plugins.mada import MADA
from metaopt.plugins.padam import Padam

N, M = 6, 5  # steps before the checkpoint, steps after it
PATHS = ["generic", "fused", "native"]


def make_opt(params, path="generic", family=None, mode=OneStep, **kw):
    family = family or MADA()
    # hyper-Adam (buffers and a step count to restore) with a warm-up that ends after the
    # checkpoint, so that the restored step count decides when the coefficients start moving
    hyper = mode(lr=0.05, optimizer="adam", warmup=N + 2)
    return MetaOptimizer(params, family, hypergrad=hyper, path=path, lr=1e-2, **kw)


def train(model, opt, data):
    for xy in data:
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()


def assert_same_run(model_a, opt_a, model_b, opt_b):
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    for k, v in opt_a.coefficients.items():
        assert torch.equal(v, opt_b.coefficients[k]), k
    for k, v in opt_a.last_hypergrad.items():
        assert torch.equal(v, opt_b.last_hypergrad[k]), k
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for pid in sa["state"]:
        assert sa["state"][pid].keys() == sb["state"][pid].keys()
        for k, v in sa["state"][pid].items():
            assert torch.equal(v, sb["state"][pid][k]), (pid, k)
    ra, rb = sa["param_groups"][0]["metaopt"], sb["param_groups"][0]["metaopt"]
    assert ra["step"] == rb["step"]
    for k, v in ra["hyper_state"].items():
        assert torch.equal(v, rb["hyper_state"][k]), k


def uninterrupted(path, family=None):
    model = tiny_mlp()
    opt = make_opt(model.parameters(), path, family)
    train(model, opt, batches(N + M))
    return model, opt


@pytest.fixture(autouse=True)
def _quiet_dcp():
    with warnings.catch_warnings():  # DCP warns that it runs without a process group
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


# -- one process, no process group ------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_dcp_round_trip_continues_bit_identically(path, tmp_path):
    data = batches(N + M)
    model = tiny_mlp()
    opt = make_opt(model.parameters(), path)
    train(model, opt, data[:N])
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(tmp_path))

    # a fresh process would start like this: new model, new optimizer, no state
    fresh = tiny_mlp(seed=5)
    fresh_opt = make_opt(fresh.parameters(), path)
    sd = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(sd, checkpoint_id=str(tmp_path))
    set_model_state_dict(fresh, sd["model"])
    set_optimizer_state_dict(fresh, fresh_opt, sd["optim"])
    assert fresh_opt.path == path
    train(fresh, fresh_opt, data[N:])

    ref_model, ref_opt = uninterrupted(path)
    assert_same_run(fresh, fresh_opt, ref_model, ref_opt)
    start = make_opt(tiny_mlp().parameters(), path).coefficients
    moved = [k for k in ref_opt.learned if not torch.equal(ref_opt.coefficients[k], start[k])]
    assert moved, "the coefficients never moved: the comparison would not test their restore"


def test_dcp_round_trip_of_forward_mode_keeps_the_state_tangents(tmp_path):
    """metaopt.Forward keeps tangents of the state buffers too; DCP loads only the keys the
    fresh optimizer's state dict has, so those must be there before any step."""
    data = batches(N + M)
    model = tiny_mlp()
    opt = make_opt(model.parameters(), mode=Forward)
    train(model, opt, data[:N])
    saved = get_optimizer_state_dict(model, opt)
    assert any("@" in k for st in saved["state"].values() for k in st)
    dcp.save({"model": get_model_state_dict(model), "optim": saved}, checkpoint_id=str(tmp_path))

    fresh = tiny_mlp(seed=5)
    fresh_opt = make_opt(fresh.parameters(), mode=Forward)
    sd = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    assert {k for st in sd["optim"]["state"].values() for k in st} == {k for st in saved["state"].values() for k in st}
    dcp.load(sd, checkpoint_id=str(tmp_path))
    set_model_state_dict(fresh, sd["model"])
    set_optimizer_state_dict(fresh, fresh_opt, sd["optim"])
    train(fresh, fresh_opt, data[N:])

    ref = tiny_mlp()
    ref_opt = make_opt(ref.parameters(), mode=Forward)
    train(ref, ref_opt, data)
    assert_same_run(fresh, fresh_opt, ref, ref_opt)


def test_dcp_keeps_the_record_in_the_first_param_group():
    model = tiny_mlp()
    opt = make_opt(model.parameters())
    train(model, opt, batches(2))
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd) == {"state", "param_groups"}  # what DCP keeps
    record = osd["param_groups"][0]["metaopt"]
    assert torch.equal(record["coefficients"], torch.stack(list(opt.coefficients.values())))
    assert record["step"] == 2


@pytest.mark.parametrize("preset", ["default", "official"])
def test_the_state_making_step_of_dcp_changes_nothing(preset):
    """get_optimizer_state_dict on a fresh optimizer runs a zero-gradient, lr-0 step to make the
    state. It must leave the run exactly as if it had not happened: step counts (bias
    correction), the warm-up count, coefficients, hyper-state, and state a family's init makes
    from the first real gradient (the official preset's exp_avg_diff = g²)."""
    family = MADA(preset=preset)
    data = batches(N)
    model = tiny_mlp()
    opt = make_opt(model.parameters(), family=family)
    before = copy.deepcopy(opt.state_dict())
    osd = get_optimizer_state_dict(model, opt)
    assert osd["state"], "DCP found no state to save"
    assert all(int(st["step"]) == 0 for st in osd["state"].values())
    assert all(p.grad is None for p in model.parameters())
    after = opt.state_dict()["param_groups"][0]["metaopt"]
    for k in ("coefficients", "last_hypergrad"):
        assert torch.equal(after[k], before["param_groups"][0]["metaopt"][k])
    assert after["step"] == 0
    train(model, opt, data)

    ref_model = tiny_mlp()
    ref_opt = make_opt(ref_model.parameters(), family=family)
    train(ref_model, ref_opt, data)
    assert_same_run(model, opt, ref_model, ref_opt)


# -- bad input: refused, naming the culprit, nothing half-loaded ------------------------


def _trained(family=None, learned=None, steps=3):
    model = tiny_mlp()
    fam = family or MADA()
    if learned is not None:  # only these coefficients learned
        fam = fam.with_coefficients(**{n: {"learned": n in learned} for n in fam.space.names})
    opt = make_opt(model.parameters(), family=fam)
    train(model, opt, batches(steps))
    return model, opt


def _bad(sd, how):
    sd = copy.deepcopy(sd)
    record = sd["param_groups"][0]["metaopt"]
    if how == "missing":
        del sd["param_groups"][0]["metaopt"]
    elif how == "not a dict":
        sd["param_groups"][0]["metaopt"] = "garbage"
    elif how == "field missing":
        del record["hyper_state"]
    elif how == "coefficients shape":
        record["coefficients"] = record["coefficients"][:2]
    elif how == "hypergrad not a tensor":
        record["last_hypergrad"] = [0.0] * len(record["last_hypergrad"])
    elif how == "step":
        record["step"] = "three"
    elif how == "two records":
        sd["param_groups"].append({**sd["param_groups"][0], "params": []})
    return sd


BAD = {
    "missing": "not a metaopt state dict",
    "not a dict": "'metaopt' record is a str",
    "field missing": "lacks ['hyper_state']",
    "coefficients shape": "'coefficients' must be a float tensor of shape (5,)",
    "hypergrad not a tensor": "'last_hypergrad' must be a float tensor",
    "step": "'step' is 'three'",
    "two records": "2 param groups hold a 'metaopt' record",
}


@pytest.mark.parametrize("how", list(BAD))
def test_a_missing_or_corrupt_record_is_refused_and_nothing_changes(how):
    _, source = _trained(steps=4)
    model, opt = _trained(steps=2)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=BAD[how].replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        opt.load_state_dict(_bad(source.state_dict(), how))
    after = opt.state_dict()
    assert torch.equal(before["param_groups"][0]["metaopt"]["coefficients"], after["param_groups"][0]["metaopt"]["coefficients"])
    assert before["param_groups"][0]["metaopt"]["step"] == after["param_groups"][0]["metaopt"]["step"]
    for pid, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][pid][k]), (how, pid, k)


@pytest.mark.parametrize("other", ["family", "learned"])
def test_a_state_dict_of_another_family_or_learned_set_is_refused(other):
    if other == "family":
        _, source = _trained(family=Padam())
        match = "family 'padam'"
    else:
        _, source = _trained(learned=("beta1", "beta2"))
        match = r"learns \['beta1', 'beta2'\]"
    model, opt = _trained()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(source.state_dict())
    after = opt.state_dict()
    assert torch.equal(before["param_groups"][0]["metaopt"]["coefficients"], after["param_groups"][0]["metaopt"]["coefficients"])
    for pid, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][pid][k])


def test_dcp_load_of_a_checkpoint_without_the_record_fails_naming_it(tmp_path):
    model, opt = _trained()
    osd = get_optimizer_state_dict(model, opt)
    del osd["param_groups"][0]["metaopt"]
    dcp.save({"optim": osd}, checkpoint_id=str(tmp_path))
    fresh = tiny_mlp()
    fresh_opt = make_opt(fresh.parameters())
    target = {"optim": get_optimizer_state_dict(fresh, fresh_opt)}
    del target["optim"]["param_groups"][0]["metaopt"]  # loads what the checkpoint has
    dcp.load(target, checkpoint_id=str(tmp_path))
    with pytest.raises(ValueError, match="not a metaopt state dict"):
        set_optimizer_state_dict(fresh, fresh_opt, target["optim"])


@pytest.mark.parametrize("other", ["family", "more learned", "fewer learned"])
def test_dcp_refuses_a_checkpoint_of_another_family_or_learned_set_before_loading_anything(other, tmp_path):
    """Through DCP the layouts differ (other state keys, another hyper-gradient length): DCP's
    planner refuses, naming the key, before it reads a byte into the optimizer."""
    model, opt = _trained()
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    family, match = {
        "family": (Padam(), r"Missing key .*hypergrad_tangent\.p"),
        "more learned": (MADA().with_coefficients(beta1={"learned": True}), r"Missing key .*hypergrad_tangent\.beta1"),
        "fewer learned": (MADA().with_coefficients(rho={"learned": False}),
                          r"Size mismatch .*metaopt\.last_hypergrad"),
    }[other]
    target_model, target = _trained(family=family)
    before = copy.deepcopy(target.state_dict())
    sd = {"optim": get_optimizer_state_dict(target_model, target)}
    with pytest.raises(CheckpointException, match=match):
        dcp.load(sd, checkpoint_id=str(tmp_path))
    after = target.state_dict()
    assert torch.equal(before["param_groups"][0]["metaopt"]["coefficients"], after["param_groups"][0]["metaopt"]["coefficients"])
    for pid, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][pid][k]), (other, pid, k)


# -- FSDP2 on two gloo ranks --------------------------------------------------------------

WORLD = 2
FSDP_PATHS = ["generic", "fused"]


def _sharded(seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_mlp(seed)
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    return model


def _local_batches(rank, data):
    half = len(data[0][0]) // WORLD
    return [tuple(t[rank * half:(rank + 1) * half] for t in xy) for xy in data]


def _fsdp_worker(rank, port, ckpt_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data = _local_batches(rank, batches(N + M))
        results = {}
        for path in FSDP_PATHS:
            target = os.path.join(ckpt_dir, path)
            model = _sharded(0)
            opt = make_opt(model.parameters(), path)
            train(model, opt, data[:N])
            osd = get_optimizer_state_dict(model, opt)
            saved_state_types = sorted({type(v).__name__ for st in osd["state"].values() for k, v in st.items()
                                        if k != "step"})
            dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=target)
            del model, opt, osd

            fresh = _sharded(5)
            fresh_opt = make_opt(fresh.parameters(), path)
            sd = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
            dcp.load(sd, checkpoint_id=target)
            set_model_state_dict(fresh, sd["model"])
            set_optimizer_state_dict(fresh, fresh_opt, sd["optim"])
            train(fresh, fresh_opt, data[N:])

            ref = _sharded(0)
            ref_opt = make_opt(ref.parameters(), path)
            train(ref, ref_opt, data)

            coef = torch.stack(list(fresh_opt.coefficients.values()))
            gathered = [torch.empty_like(coef) for _ in range(WORLD)]
            dist.all_gather(gathered, coef)
            metadata = dcp.FileSystemReader(target).read_metadata().state_dict_metadata
            chunks = {k: len(v.chunks) for k, v in metadata.items()
                      if k.startswith("optim.state.") and not k.endswith(".step") and hasattr(v, "chunks")}
            results[path] = {
                "resumed": [p.full_tensor().detach() for p in fresh.parameters()],
                "reference": [p.full_tensor().detach() for p in ref.parameters()],
                "coefficients": fresh_opt.coefficients, "ref_coefficients": ref_opt.coefficients,
                "gathered": gathered, "chunks": chunks, "saved_state_types": saved_state_types,
                "local_state": [{k: v.equal(ref_opt.state[q][k]) for k, v in fresh_opt.state[p].items()}
                                for p, q in zip(fresh.parameters(), ref.parameters())],
            }
            del fresh, fresh_opt, ref, ref_opt, sd
        if rank == 0:
            torch.save(results, out)
        del results
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2_dcp")
    out = str(root / "results.pt")
    mp.spawn(_fsdp_worker, args=(free_port(), str(root), out), nprocs=WORLD, join=True)
    return torch.load(out)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("path", FSDP_PATHS)
def test_fsdp2_dcp_resume_is_bit_identical_with_sharded_state(path, fsdp2_runs):
    got = fsdp2_runs[path]
    assert got["saved_state_types"] == ["DTensor"]  # every rank's shard goes into the checkpoint
    assert got["chunks"] and all(n == WORLD for n in got["chunks"].values()), got["chunks"]
    for p, q in zip(got["resumed"], got["reference"]):
        assert torch.equal(p, q)
    for k, v in got["ref_coefficients"].items():
        assert torch.equal(got["coefficients"][k], v), k
    assert torch.equal(got["gathered"][0], got["gathered"][1])  # identical on every rank
    assert all(all(st.values()) for st in got["local_state"])  # rank 0's state, entry by entry
