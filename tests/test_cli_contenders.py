"""Contenders of any library in a `metaopt run` config, and learning-rate schedules.

`kind: module:Class` for a torch.optim.Optimizer subclass (torch.optim:SGD, Schedule-Free's
AdamWScheduleFree, Prodigy) gives the numbers of that optimizer driven by a hand-written loop
on the same model and batches; `schedule:` runs each step at nanoGPT's warm-up + cosine/linear
lr, written out again here; Schedule-Free is evaluated in its eval mode, and an interrupted run
of it (and of schedules) resumes bit for bit; bad kinds, hyperparameters and schedules are
refused before training, naming the field. About 30 s on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import matplotlib
import pytest
import torch
import yaml

matplotlib.use("Agg")

import metaopt.jobs.train as train  # noqa: E402
from metaopt.jobs.config import build_config, quick_sized, read_config_file  # noqa: E402
from metaopt.jobs.data import CharDataset  # noqa: E402
from metaopt.jobs.gpt import GPT, GPTConfig  # noqa: E402
from metaopt.jobs.schedule import build_scheduler  # noqa: E402
from test_cli import invoke, only_run_dir, records  # noqa: E402 - the same CLI helpers

schedulefree = pytest.importorskip("schedulefree")
prodigyopt = pytest.importorskip("prodigyopt")

STEPS, EVAL, BATCH, BLOCK, EVAL_BATCHES, EVAL_SEED = 12, 5, 4, 16, 2, 1234
MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": BLOCK}
LR, BETAS = 2e-3, (0.9, 0.99)


def job_yaml(optimizers: list[dict], **fields) -> str:
    """A tiny job: 12 steps, validation at 0, 5, 10, 12, one thread, no checkpoints unless set."""
    cfg = {
        "name": "c", "model": MODEL, "steps": STEPS, "batch_size": BATCH, "eval_interval": EVAL,
        "eval_batches": EVAL_BATCHES, "log_interval": 4, "checkpoint_every": 0, "seeds": [0], "threads": 1,
        "device": "cpu", "lr": LR, "betas": list(BETAS), "optimizers": optimizers, **fields,
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def run_job(tmp_path: Path, optimizers: list[dict], *args: str, **fields) -> tuple[Path, dict[str, list[dict]]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml(optimizers, **fields))
    out = tmp_path / "runs"
    result = invoke("run", str(config), "--out", str(out), "--no-progress", *args)
    assert result.exit_code == 0, result.output
    run_dir = only_run_dir(out)
    by_label: dict[str, list[dict]] = {}
    for r in records(run_dir):
        by_label.setdefault(r["optimizer"], []).append(r)
    return run_dir, by_label


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # the configs set threads: 1 in this process
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- the references: written out here, not taken from the job ---------------------------------------


def nanogpt_lr(t: int, peak: float, kind: str, warmup: int, final: float, steps: int = STEPS) -> float:
    """nanoGPT's get_lr(it) with lr_decay_iters = steps and min_lr = final × peak; linear: the same ramp, decayed linearly."""
    if t < warmup:
        return peak * (t + 1) / (warmup + 1)
    if kind == "constant":
        return peak
    ratio = (t - warmup) / (steps - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if kind == "cosine" else 1.0 - ratio
    return final * peak + coeff * (peak - final * peak)


def hand_loop(make_opt, *, lr_at=None, modes: bool = False, steps: int = STEPS):
    """The job's model and batches trained by a plain loop: per-step losses and the validation losses.

    The model as the job builds it (torch.manual_seed(seed) before GPT(...)), the training
    batches from a generator seeded with the seed, the validation batches from data.eval_seed.
    ``lr_at(t)``: set every group's lr before step t. ``modes``: Schedule-Free's opt.train() to
    train, opt.eval() to evaluate.
    """
    data = CharDataset.from_source(None, 0.1, "cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    opt = make_opt(model.parameters())
    val_batches = data.fixed_batches("val", EVAL_BATCHES, BATCH, BLOCK, EVAL_SEED)
    gen = torch.Generator().manual_seed(0)

    def val_loss() -> float:
        model.eval()
        if modes:
            opt.eval()
        with torch.no_grad():
            v = float(sum(model(x, y)[1] for x, y in val_batches) / len(val_batches))
        if modes:
            opt.train()
        model.train()
        return v

    if modes:
        opt.train()
    losses, vals = [], {0: val_loss()}
    for t in range(steps):
        if lr_at is not None:
            for g in opt.param_groups:
                g["lr"] = lr_at(t)
        x, y = data.batch("train", BATCH, BLOCK, gen)
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (t + 1) % EVAL == 0 or t + 1 == steps:
            vals[t + 1] = val_loss()
    return losses, vals, model, opt


def job_losses(recs: list[dict]) -> tuple[list[float], dict[int, float]]:
    assert [r["step"] for r in recs] == list(range(STEPS + 1))
    return [r["train_loss"] for r in recs[1:]], {r["step"]: r["val_loss"] for r in recs if r["val_loss"] is not None}


# -- torch.optim by name, Prodigy ---------------------------------------------------------------------


def test_torch_optim_sgd_by_name_equals_a_hand_loop(tmp_path):
    """torch.optim:SGD with momentum, Nesterov and (coupled) weight decay: the job's losses are a
    plain loop's exactly; a second SGD under warm-up + cosine equals the loop setting nanoGPT's lr."""
    hp = {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}
    schedule = {"kind": "cosine", "warmup": 3, "final": 0.2}
    run_dir, got = run_job(tmp_path, [
        {"kind": "torch.optim:SGD", "lr": 0.05, "hyperparameters": hp},
        {"name": "sgd-cos", "kind": "torch.optim:SGD", "lr": 0.05, "hyperparameters": hp, "schedule": schedule},
    ])
    assert list(got) == ["SGD", "sgd-cos"]  # the class names the contender where no name is given
    for label, lr_at in (("SGD", None), ("sgd-cos", lambda t: nanogpt_lr(t, 0.05, "cosine", 3, 0.2))):
        losses, vals, _, _ = hand_loop(lambda p: torch.optim.SGD(p, lr=0.05, **hp), lr_at=lr_at)
        assert job_losses(got[label]) == (losses, vals), label
    assert job_losses(got["SGD"])[0] != job_losses(got["sgd-cos"])[0]  # the schedule changed the steps
    assert [r["lr"] for r in got["SGD"][1:]] == [0.05] * STEPS
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizers"]["sgd-cos"]["schedule"] == "warmup 3 + cosine→0.2"
    assert summary["optimizers"]["SGD"]["kind"] == "torch.optim:SGD" and summary["optimizers"]["SGD"]["lr"] == 0.05
    md = (run_dir / "summary.md").read_text()
    assert re.search(r"^\| sgd-cos +\| torch.optim:SGD +\| 0.05 +\| warmup 3 \+ cosine→0.2 +\|$", md, re.M), md


def test_prodigy_equals_prodigyopt_driven_by_hand(tmp_path):
    """prodigyopt:Prodigy at lr 1 with decoupled weight decay; the job's betas reach it (it takes betas)."""
    _, got = run_job(tmp_path, [
        {"name": "prodigy", "kind": "prodigyopt:Prodigy", "lr": 1.0, "hyperparameters": {"weight_decay": 0.1}},
    ])
    losses, vals, _, opt = hand_loop(lambda p: prodigyopt.Prodigy(p, lr=1.0, betas=BETAS, weight_decay=0.1))
    assert job_losses(got["prodigy"]) == (losses, vals)
    assert opt.param_groups[0]["d"] > 1e-6  # Prodigy moved its step-size estimate off d0: the runs did something
    assert [r["lr"] for r in got["prodigy"][1:]] == [1.0] * STEPS


# -- schedules -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "warmup", "final"), [("cosine", 4, 0.2), ("linear", 3, 0.0), ("constant", 5, None)])
def test_the_recorded_lr_is_nanogpts_schedule_for_torch_and_family_contenders(tmp_path, kind, warmup, final):
    schedule = {"kind": kind, "warmup": warmup} | ({} if final is None else {"final": final})
    _, got = run_job(tmp_path, [
        {"name": "adamw", "kind": "adamw", "lr": 3e-3, "schedule": schedule},
        {"name": "mada", "kind": "mada", "point": "adam", "hypergrad": {"mode": "none"}, "schedule": schedule},
    ])
    for label, peak in (("adamw", 3e-3), ("mada", LR)):
        want = [nanogpt_lr(t, peak, kind, warmup, final or 0.0) for t in range(STEPS)]
        assert [r["lr"] for r in got[label][1:]] == pytest.approx(want, rel=1e-12, abs=0), label
        assert "lr" not in got[label][0]  # step 0 trains nothing
    # the family's steps run at that lr: MADA held at the Adam point follows torch's Adam under
    # the same lr (the rules' float32 rounding apart), where the constant lr lands far off
    losses, _, _, _ = hand_loop(lambda p: torch.optim.Adam(p, lr=LR, betas=BETAS),
                                lr_at=lambda t: nanogpt_lr(t, LR, kind, warmup, final or 0.0))
    constant, _, _, _ = hand_loop(lambda p: torch.optim.Adam(p, lr=LR, betas=BETAS))
    mada = job_losses(got["mada"])[0]
    gap = max(abs(a - b) for a, b in zip(mada, losses))
    assert gap < 1e-4 and max(abs(a - b) for a, b in zip(constant, losses)) > 100 * max(gap, 1e-6)


def test_a_constant_schedule_builds_no_scheduler_and_changes_nothing(tmp_path):
    """Unset, `constant` and `{kind: constant, warmup: 0}` are one schedule: the run without any."""
    _, got = run_job(tmp_path, [
        {"name": "a", "kind": "adam"},
        {"name": "b", "kind": "adam", "schedule": "constant"},
    ])
    losses, vals, _, _ = hand_loop(lambda p: torch.optim.Adam(p, lr=LR, betas=BETAS))
    assert job_losses(got["a"]) == job_losses(got["b"]) == (losses, vals)
    cfg = build_config({"optimizers": [{"kind": "adam"}, {"kind": "mada", "schedule": "cosine"}]})
    assert build_scheduler(torch.optim.Adam([torch.zeros(1, requires_grad=True)]), cfg.optimizers[0].schedule, 10) is None
    assert cfg.optimizers[1].schedule.final == 0.1  # filled in: the saved config keeps the value it ran with


def test_quick_scales_a_warmup_to_the_quick_steps():
    raw = {"steps": 1500, "optimizers": [{"kind": "adamw", "schedule": {"kind": "cosine", "warmup": 150}},
                                         {"kind": "adam"}]}
    quick = quick_sized(raw, "x")
    assert quick["optimizers"][0]["schedule"] == {"kind": "cosine", "warmup": 150 * quick["steps"] // 1500}
    assert quick["optimizers"][1] == {"kind": "adam"}
    assert build_config(quick).optimizers[0].schedule.warmup < quick["steps"]


# -- Schedule-Free --------------------------------------------------------------------------------------


def test_schedule_free_is_evaluated_in_eval_mode_and_equals_the_package_by_hand(tmp_path):
    hp = {"weight_decay": 0.05, "warmup_steps": 3}
    _, got = run_job(tmp_path, [{"name": "sf", "kind": "schedulefree:AdamWScheduleFree", "hyperparameters": hp}])
    losses, vals, model, opt = hand_loop(lambda p: schedulefree.AdamWScheduleFree(p, lr=LR, betas=BETAS, **hp), modes=True)
    assert job_losses(got["sf"]) == (losses, vals)
    # evaluated at y (train mode) the numbers would differ: the test tells the modes apart
    data = CharDataset.from_source(None, 0.1, "cpu")
    model.eval()
    with torch.no_grad():
        at_y = float(sum(model(x, y)[1] for x, y in data.fixed_batches("val", EVAL_BATCHES, BATCH, BLOCK, EVAL_SEED))
                     / EVAL_BATCHES)
    assert opt.param_groups[0]["train_mode"] and at_y != vals[STEPS]


TIMING = ("time", "train_time")


def _strip(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def test_an_interrupted_run_resumes_bit_for_bit_with_schedule_free_prodigy_and_schedules(tmp_path, monkeypatch):
    """Ctrl-C at step 9 (checkpoint at 8, validation at 5 and 10): the resumed run's records equal an
    uninterrupted run's, Schedule-Free's train/eval modes and every scheduler's state included."""
    optimizers = [
        {"name": "sf", "kind": "schedulefree:AdamWScheduleFree", "hyperparameters": {"warmup_steps": 2}},
        {"name": "sf-warm", "kind": "schedulefree:AdamWScheduleFree", "schedule": {"kind": "constant", "warmup": 6}},
        {"name": "prodigy", "kind": "prodigyopt:Prodigy", "lr": 1.0, "schedule": {"kind": "cosine", "warmup": 2}},
        {"name": "adamw-lin", "kind": "adamw", "hyperparameters": {"weight_decay": 0.1}, "schedule": {"kind": "linear", "warmup": 3}},
        {"name": "mada-cos", "kind": "mada", "point": "adam", "hypergrad": {"warmup": 0, "clip": False},
         "schedule": {"kind": "cosine", "warmup": 4, "final": 0.0}},
    ]
    _, want = run_job(tmp_path / "reference", optimizers, checkpoint_every=4)

    def hook(info):
        if info["optimizer"] == "mada-cos" and info["step"] == 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "step_hook", hook)
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml(optimizers, checkpoint_every=4))
    out = tmp_path / "runs"
    assert invoke("run", str(config), "--out", str(out), "--no-progress").exit_code == 130
    monkeypatch.setattr(train, "step_hook", None)
    run_dir = only_run_dir(out)
    result = invoke("run", "--resume", str(run_dir), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "sf from step 8" in result.stderr
    got: dict[str, list[dict]] = {}
    for r in records(run_dir):
        got.setdefault(r["optimizer"], []).append(r)
    assert sorted(got) == sorted(want)
    for label in want:
        assert _strip(got[label]) == _strip(want[label]), label


def test_a_checkpoint_from_before_schedules_resumes(tmp_path, monkeypatch):
    """A run directory of an earlier metaopt (no `schedule` in its configs, no scheduler, no lr in
    the checkpoint or the records) resumes to the numbers of an uninterrupted run."""
    optimizers = [{"name": "adam", "kind": "adam"},
                  {"name": "mada", "kind": "mada", "point": "adam", "hypergrad": {"warmup": 0, "clip": False}}]
    _, want = run_job(tmp_path / "reference", optimizers, checkpoint_every=4)
    monkeypatch.setattr(train, "step_hook", lambda info: (_ for _ in ()).throw(KeyboardInterrupt)
                        if info["optimizer"] == "mada" and info["step"] == 6 else None)
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml(optimizers, checkpoint_every=4))
    assert invoke("run", str(config), "--out", str(tmp_path / "runs"), "--no-progress").exit_code == 130
    monkeypatch.setattr(train, "step_hook", None)
    run_dir = only_run_dir(tmp_path / "runs")
    # made old: what the earlier version did not write
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for o in saved["optimizers"]:
        del o["schedule"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    path = run_dir / "checkpoints" / "seed-0.pt"
    ckpt = torch.load(path, weights_only=True)
    for o in ckpt["config"]["optimizers"]:
        del o["schedule"]
    for state in ckpt["runs"].values():
        del state["scheduler"], state["lrs"]
    torch.save(ckpt, path)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "lr"}) + "\n" for r in lines))

    result = invoke("run", "--resume", str(run_dir), "--no-progress")
    assert result.exit_code == 0, result.output
    got: dict[str, list[dict]] = {}
    for r in records(run_dir):
        got.setdefault(r["optimizer"], []).append(r)
    for label in want:
        assert [r["step"] for r in got[label]] == list(range(STEPS + 1))
        assert [{k: v for k, v in r.items() if k != "lr"} for r in _strip(got[label])] == \
            [{k: v for k, v in r.items() if k != "lr"} for r in _strip(want[label])], label
        # the steps taken after the resume record the lr, the constant one
        assert {r["lr"] for r in got[label] if "lr" in r} == {LR} and "lr" in got[label][-1]


# -- refused before training ----------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "field", "words"), [
    ({"kind": "torch.optim:SGD", "hyperparameters": {"momentun": 0.9}}, "optimizers.0.hyperparameters.momentun",
     ["not a parameter of torch.optim.sgd.SGD", "did you mean 'momentum'", "It takes: momentum, dampening"]),
    ({"kind": "torch.optim:SGD", "hyperparameters": {"momentum": -1}}, "optimizers.0.hyperparameters",
     ["torch.optim.sgd.SGD refuses these settings", "Invalid momentum value: -1"]),
    ({"kind": "prodigyopt:Prodigy", "hyperparameters": {"lr": 1.0}}, "optimizers.0.hyperparameters.lr",
     ["set it with the entry's own `lr:` field"]),
    ({"kind": "adam", "hyperparameters": {"momentum": 0.9}}, "optimizers.0.hyperparameters.momentum",
     ["not a parameter of torch.optim.adam.Adam", "amsgrad"]),
    ({"kind": "collections:OrderedDict"}, "optimizers.0.kind",
     ["OrderedDict is a class but not a metaopt.Family subclass, nor a torch.optim.Optimizer subclass"]),
    ({"kind": "torch.optim:SDG"}, "optimizers.0.kind", ["torch.optim has no 'SDG'", "did you mean 'SGD'?", "Adagrad"]),
    ({"kind": "no_such_optimizers_xyz:Fast"}, "optimizers.0.kind",
     ["no module named 'no_such_optimizers_xyz'", "pip install no_such_optimizers_xyz"]),
    ({"kind": "torch.optim:SGD", "options": {"momentum": 0.9}}, "optimizers.0.options", ["go in `hyperparameters:`"]),
    ({"kind": "torch.optim:LBFGS"}, "optimizers.0.kind", ["LBFGS.step needs a closure"]),
    ({"kind": "schedulefree:ScheduleFreeWrapper"}, "optimizers.0.kind",
     ["ScheduleFreeWrapper is a class but not a metaopt.Family subclass, nor a torch.optim.Optimizer subclass"]),
    ({"kind": "wrap.py:Wrapper"}, "optimizers.0.kind",
     ["Wrapper's constructor takes no lr (base, momentum)", "an optimizer that wraps another cannot be built"]),
    ({"kind": "schedulefree:SGDScheduleFreeClosure"}, "optimizers.0.kind", ["SGDScheduleFreeClosure.step needs a closure"]),
    ({"kind": "adamw", "schedule": {"kind": "cosin"}}, "optimizers.0.schedule.kind", ["'constant', 'cosine' or 'linear'"]),
    ({"kind": "adamw", "schedule": "step"}, "optimizers.0.schedule.kind", ["'constant', 'cosine' or 'linear'"]),
    ({"kind": "adamw", "schedule": {"kind": "cosine", "warmup": STEPS}}, "optimizers.0.schedule.warmup",
     [f"warmup={STEPS} must be fewer than the job's steps ({STEPS})"]),
    ({"kind": "mada", "schedule": {"kind": "linear", "final": 1.5}}, "optimizers.0.schedule.final", ["less than or equal to 1"]),
    ({"kind": "adamw", "schedule": {"kind": "constant", "final": 0.1}}, "optimizers.0.schedule",
     ["final applies to the decaying kinds (cosine, linear)"]),
    ({"kind": "adamw", "schedule": {"kind": "cosine", "floor": 0.1}}, "optimizers.0.schedule.floor", ["unknown field"]),
])
def test_bad_contenders_and_schedules_are_refused_before_training(tmp_path, entry, field, words):
    (tmp_path / "wrap.py").write_text(  # an optimizer built around another, as wrappers are
        "import torch\n\nclass Wrapper(torch.optim.Optimizer):\n    def __init__(self, base, momentum=0.9):\n"
        "        super().__init__(base.param_groups, {})\n"
    )
    config = tmp_path / "bad.yaml"
    config.write_text(job_yaml([entry]))
    out = tmp_path / "runs"
    result = invoke("run", str(config), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert re.search(rf"^  {re.escape(field)}( \(optimizer '[^']*'\))?: ", result.stderr, re.M), result.stderr
    for w in words:
        assert w in result.stderr, (w, result.stderr)
    assert "Traceback" not in result.output and not out.exists()


def test_every_contenders_problems_are_reported_together(tmp_path):
    """The checks that need the job's lr and steps report every contender, not the first (those of
    one entry alone, such as a misspelt name, come first, as pydantic validates entries before the job)."""
    config = tmp_path / "bad.yaml"
    config.write_text(job_yaml([
        {"name": "a", "kind": "torch.optim:RMSprop", "hyperparameters": {"alpha": -0.9}},
        {"name": "b", "kind": "prodigyopt:Prodigy", "lr": 1.0, "hyperparameters": {"betas": [0.9, 1.5]}},
        {"name": "c", "kind": "adamw", "schedule": {"kind": "linear", "warmup": 50}},
    ]))
    result = invoke("run", str(config), "--out", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "(3 problems)" in result.stderr, result.output
    assert "  optimizers.0.hyperparameters (optimizer 'a'): torch.optim.rmsprop.RMSprop refuses these settings: " \
           "ValueError: Invalid alpha value: -0.9" in result.stderr
    assert "  optimizers.1.hyperparameters (optimizer 'b'): prodigyopt.prodigy.Prodigy refuses these settings: " \
           "ValueError: Invalid beta parameter at index 1: 1.5" in result.stderr
    assert f"  optimizers.2.schedule.warmup (optimizer 'c'): warmup=50 must be fewer than the job's steps ({STEPS})" \
        in result.stderr


def test_a_missing_package_names_the_pip_package_and_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] == "schedulefree"
                        else real(name, *a))
    config = tmp_path / "sf.yaml"
    config.write_text(job_yaml([{"name": "sf", "kind": "schedulefree:AdamWScheduleFree"}]))
    result = invoke("run", str(config), "--out", str(tmp_path / "runs"))
    assert result.exit_code == 2, result.output
    assert "  optimizers.0.kind (optimizer 'sf'): no module named 'schedulefree' can be imported; pip install " \
           "schedulefree (or pip install 'metaopt[contenders]'" in result.stderr


def test_notes_for_schedule_free_under_a_decay_and_prodigy_at_the_jobs_lr(tmp_path):
    config = tmp_path / "n.yaml"
    config.write_text(job_yaml([
        {"name": "sf", "kind": "schedulefree:AdamWScheduleFree", "schedule": "cosine"},
        {"name": "p", "kind": "prodigyopt:Prodigy"},
        {"name": "p1", "kind": "prodigyopt:Prodigy", "lr": 1.0},
    ]))
    result = invoke("run", str(config), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "note: optimizer 'sf' (schedulefree:AdamWScheduleFree) has train/eval modes (Schedule-Free)" in result.stderr
    assert "note: optimizer 'p' (prodigyopt:Prodigy) runs at the job's lr 0.002, far below its default lr 1" \
        in result.stderr
    assert "'p1'" not in result.stderr
    saved = yaml.safe_load(result.stdout)
    assert [o["kind"] for o in saved["optimizers"]] == ["schedulefree:AdamWScheduleFree"] + ["prodigyopt:Prodigy"] * 2
    assert build_config(saved).dump() == saved  # the resolved config validates to itself


def test_a_torch_optimizer_from_a_file(tmp_path):
    """`path/file.py:Class` names an optimizer too: a subclass of torch.optim.SGD defined beside the config."""
    (tmp_path / "my_opt.py").write_text(
        "import torch\n\nclass Slow(torch.optim.SGD):\n    def __init__(self, params, lr=0.1, scale=0.5):\n"
        "        super().__init__(params, lr=lr * scale)\n"
    )
    config = tmp_path / "f.yaml"
    config.write_text(job_yaml([{"kind": "my_opt.py:Slow", "lr": 0.1, "hyperparameters": {"scale": 0.5}}]))
    cfg = build_config(read_config_file(config))
    assert cfg.optimizers[0].is_torch and cfg.optimizers[0].label == "Slow"
    assert cfg.optimizers[0].kind == f"{tmp_path / 'my_opt.py'}:Slow"  # absolute: the saved config runs from anywhere
    _, got = run_job(tmp_path, [{"kind": "my_opt.py:Slow", "lr": 0.1, "hyperparameters": {"scale": 0.5}}])
    losses, vals, _, _ = hand_loop(lambda p: torch.optim.SGD(p, lr=0.05))
    assert job_losses(got["Slow"]) == (losses, vals)


def test_the_docs_example_config_validates_as_documented():
    """docs/cli.md's contenders.yaml: every contender validates, with the kinds, lrs and schedules the page describes."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    block = re.search(r"^```yaml\n(# contenders\.yaml.*?)^```", text, re.S | re.M)
    assert block, "docs/cli.md lost its contenders.yaml example"
    cfg = build_config(yaml.safe_load(block.group(1)))
    by_name = {o.label: o for o in cfg.optimizers}
    assert by_name["schedule-free"].optimizer_cls is schedulefree.AdamWScheduleFree
    assert by_name["prodigy"].optimizer_cls is prodigyopt.Prodigy and by_name["prodigy"].lr == 1.0
    assert by_name["sgd"].optimizer_cls is torch.optim.SGD
    assert not by_name["mada-cosine"].is_torch and by_name["mada-cosine"].schedule.describe() == "warmup 100 + cosine→0.1"
    assert by_name["adamw-cosine"].schedule.describe() == "warmup 100 + cosine→0.1"
    # nothing in it draws a note: Schedule-Free at a constant lr, Prodigy at lr 1
    assert [n for o in cfg.optimizers for n in train.contender_notes(o, cfg)] == []
