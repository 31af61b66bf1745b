"""The `metaopt` command: run (quick job end to end, configs, overrides, --quick with a config,
hyper-optimizer settings from the family's default, hyper-gradient magnitudes in the metrics, bad
configs, Ctrl-C and ignored signals), families, describe, report. About 45-60 s on 2 CPU cores,
most of it the quick job and the two runs stopped by a real signal."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import EntryPoint
from pathlib import Path

import matplotlib
import pytest
import torch
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

matplotlib.use("Agg")

import metaopt  # noqa: E402
import metaopt.jobs.train as train  # noqa: E402
from metaopt.cli import app  # noqa: E402
from metaopt.jobs.config import JobConfig, build_config, packaged_config_path, read_config_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def only_run_dir(out: Path) -> Path:
    dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def trained(out: Path, *args: str) -> Path:
    """``metaopt run ARGS --out OUT`` in this process, which must succeed; its run directory."""
    result = invoke("run", *args, "--out", str(out))
    assert result.exit_code == 0, result.output
    return only_run_dir(out)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`metaopt run --quick --out DIR`, once for the module."""
    out = tmp_path_factory.mktemp("quick")
    result = invoke("run", "--quick", "--out", str(out))
    assert result.exit_code == 0, result.output
    return result, only_run_dir(out)


# -- run -------------------------------------------------------------------------------------------


def test_quick_run_writes_the_run_directory(quick):
    result, run_dir = quick
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "summary.md"):
        assert (run_dir / name).is_file(), name
    for name in ("val_loss.png", "coefficients.png", "train_loss.png"):
        data = (run_dir / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name

    cfg = read_config_file(packaged_config_path("quick"))
    recs = records(run_dir)
    by_opt = {label: [r for r in recs if r["optimizer"] == label] for label in ("adam", "mada")}
    for label, rs in by_opt.items():
        assert [r["step"] for r in rs] == list(range(cfg["steps"] + 1)), label  # every step logged
        assert all(r["seed"] == 0 for r in rs)
        assert all(isinstance(r["train_loss"], float) for r in rs[1:])
        val_steps = [r["step"] for r in rs if r["val_loss"] is not None]
        assert val_steps == list(range(0, cfg["steps"] + 1, cfg["eval_interval"]))
        assert all(r["time"] >= 0 for r in rs)
    assert all("coefficients" not in r for r in by_opt["adam"])
    assert all(set(r["coefficients"]) == {"beta1", "beta2", "beta3", "c", "rho"} for r in by_opt["mada"])
    # MADA started at the Adam point and learned: β3 moved off 0, inside its box
    assert by_opt["mada"][0]["coefficients"]["beta3"] == 0.0
    assert 0.0 < by_opt["mada"][-1]["coefficients"]["beta3"] <= 0.99
    # same seed → same initial weights and same first batch for both optimizers
    assert by_opt["adam"][0]["val_loss"] == by_opt["mada"][0]["val_loss"]
    assert by_opt["adam"][1]["train_loss"] == by_opt["mada"][1]["train_loss"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is False and summary["complete_runs"] == 2
    assert list(summary["optimizers"]) == ["adam", "mada"]
    for e in summary["optimizers"].values():
        assert e["final_val_loss"]["mean"] < 4.0 and e["steps_per_s"]["mean"] > 0
    assert summary["optimizers"]["mada"]["learned"] == ["beta3", "c", "rho"]
    assert "beta3" in summary["optimizers"]["mada"]["final_coefficients"]
    assert "| mada" in result.stdout and "final val loss" in result.stdout
    assert "| mada" in (run_dir / "summary.md").read_text()

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["steps"] == cfg["steps"] and resolved["name"] == "quick"
    assert build_config(resolved).dump() == resolved  # the resolved config validates to itself


def test_report_remakes_summary_and_plots(quick, tmp_path):
    _, run_dir = quick
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    for name in ("summary.json", "summary.md", "val_loss.png", "coefficients.png"):
        (copy / name).unlink()
    result = invoke("report", str(copy))
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "summary.json").read_text()) == json.loads((run_dir / "summary.json").read_text())
    assert (copy / "coefficients.png").read_bytes()[:8] == PNG


def test_report_combines_run_directories_as_if_they_were_one_job(quick, tmp_path):
    """Each run (optimizer × seed) is independent of the others in its config, so a second
    config's contender reported with the first's baseline gives the table a single config with
    all of them gives; a directory of another job is refused, naming the field."""
    _, first = quick  # adam, mada
    # the engine's bare one-step setting (no warm-up, no clip: unset settings would take MADA's default's)
    bare = "mode: one_step, warmup: 0, clip: false"
    extra = f"optimizers=[{{name: mada-fast, kind: mada, point: adam, hypergrad: {{{bare}, lr: 0.05}}}}]"
    assert invoke("run", "--quick", "--out", str(tmp_path / "b"), "--set", extra).exit_code == 0
    together = (f"optimizers=[{{name: adam, kind: adam}}, {{name: mada, kind: mada, point: adam, hypergrad: {{{bare}}}}}, "
                f"{{name: mada-fast, kind: mada, point: adam, hypergrad: {{{bare}, lr: 0.05}}}}]")
    assert invoke("run", "--quick", "--out", str(tmp_path / "c"), "--set", together).exit_code == 0
    second, single = only_run_dir(tmp_path / "b"), only_run_dir(tmp_path / "c")
    result = invoke("report", str(first), str(second), "--out", str(tmp_path / "both"), "--name", "together")
    assert result.exit_code == 0, result.output
    combined = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert combined["name"] == "together"
    reference = json.loads((single / "summary.json").read_text())
    assert list(combined["optimizers"]) == ["adam", "mada", "mada-fast"] and combined["baseline"] == "adam"
    for label, entry in reference["optimizers"].items():
        for key in ("final_val_loss", "best_val_loss", "final_train_loss", "delta_final_val_vs_baseline",
                    "wins_vs_baseline", "final_coefficients"):
            assert combined["optimizers"][label].get(key) == entry.get(key), (label, key)
    assert (tmp_path / "both" / "coefficients.png").read_bytes()[:8] == PNG
    assert invoke("report", str(tmp_path / "both")).exit_code == 0  # the combined directory is a run directory

    assert invoke("run", "--quick", "--out", str(tmp_path / "d"), "--steps", "20", "--set", extra).exit_code == 0
    result = runner.invoke(app, ["report", str(first), str(only_run_dir(tmp_path / "d")), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "steps is 20" in result.output
    result = runner.invoke(app, ["report", str(first), str(second)])
    assert result.exit_code != 0 and "--out" in result.output
    result = runner.invoke(app, ["report", str(first), str(single), "--out", str(tmp_path / "y")])
    assert result.exit_code != 0 and "ran 'adam' on seed 0 like an earlier directory" in result.output
    other = f"optimizers=[{{name: mada-fast, kind: mada, point: adam, hypergrad: {{{bare}, lr: 0.5}}}}]"
    assert invoke("run", "--quick", "--out", str(tmp_path / "e"), "--set", other).exit_code == 0
    result = runner.invoke(app, ["report", str(second), str(only_run_dir(tmp_path / "e")), "--out", str(tmp_path / "z")])
    assert result.exit_code != 0 and "'mada-fast' with other settings" in result.output


def test_report_joins_the_seeds_of_one_config_run_in_pieces(quick, tmp_path):
    """Seeds of one config run in several processes join up; a run a kill left unfinished in
    one directory gives way to its finished run in another."""
    _, whole = quick
    assert invoke("run", "--quick", "--out", str(tmp_path / "s1"), "--seeds", "1,").exit_code == 0
    piece = only_run_dir(tmp_path / "s1")
    killed = tmp_path / "killed"  # seed 1 stopped at step 20 of 60: what a kill leaves
    shutil.copytree(piece, killed)
    kept = [r for r in records(piece) if r["step"] <= 20]
    (killed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    result = invoke("report", str(whole), str(killed), str(piece), "--out", str(tmp_path / "both"))
    assert result.exit_code == 0, result.output
    assert "adam seed 1: the unfinished run of an earlier directory left out" in result.output
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["optimizers"]["mada"]["wins_vs_baseline"]["paired"] == 2
    assert not summary["interrupted"]
    alone = json.loads((piece / "summary.json").read_text())["runs"]
    assert [r for r in summary["runs"] if r["seed"] == 1] == alone


def test_a_joined_report_expects_only_the_runs_its_directories_planned(quick, tmp_path):
    """A contender of a config with other seeds is not missing on the seeds it never planned:
    the joined job is complete when every directory's own runs are."""
    _, first = quick  # adam, mada on seed 0
    extra = "optimizers=[{name: adam-small, kind: adam, lr: 0.001}]"
    assert invoke("run", "--quick", "--out", str(tmp_path / "b"), "--seeds", "1,", "--set", extra).exit_code == 0
    result = invoke("report", str(first), str(only_run_dir(tmp_path / "b")), "--out", str(tmp_path / "both"))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert (summary["expected_runs"], summary["complete_runs"], summary["interrupted"]) == (3, 3, False)
    assert "interrupted" not in (tmp_path / "both" / "summary.md").read_text()


def test_coefficients_per_group_split_the_gpt_into_embeddings_blocks_and_head(tmp_path):
    groups = ("optimizers=[{name: adam, kind: adam}, {name: mada-groups, kind: mada, point: adam, "
              "coefficients: per_group, hypergrad: {mode: one_step, warmup: 0, clip: false, lr: 0.05}}]")
    result = invoke("run", "--quick", "--out", str(tmp_path), "--set", groups)
    assert result.exit_code == 0, result.output
    run_dir = only_run_dir(tmp_path)
    keys = [f"{g}/{n}" for g in ("embeddings", "blocks", "head") for n in ("beta1", "beta2", "beta3", "c", "rho")]
    recs = [r for r in records(run_dir) if r["optimizer"] == "mada-groups"]
    assert list(recs[-1]["coefficients"]) == keys
    finals = {g: recs[-1]["coefficients"][f"{g}/beta3"] for g in ("embeddings", "blocks", "head")}
    assert len(set(finals.values())) == 3  # each group learned its own β3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizers"]["mada-groups"]["learned"] == [k for k in keys if k.rsplit("/")[1] in ("beta3", "c", "rho")]
    assert (run_dir / "coefficients.png").read_bytes()[:8] == PNG
    bad = runner.invoke(app, ["run", "--quick", "--dry-run", "--set", "optimizers=[{kind: adam, coefficients: per_group}]"])
    assert bad.exit_code != 0 and "coefficients per group apply to metaopt families" in bad.output


def test_seeds_override_and_a_second_seed(tmp_path):
    result = invoke("run", "--quick", "--out", str(tmp_path), "--steps", "6", "--seeds", "2", "--set", "eval_interval=3")
    assert result.exit_code == 0, result.output
    run_dir = only_run_dir(tmp_path)
    recs = records(run_dir)
    assert {(r["optimizer"], r["seed"]) for r in recs} == {(o, s) for o in ("adam", "mada") for s in (0, 1)}
    s0 = [r for r in recs if r["seed"] == 0 and r["optimizer"] == "adam"]
    s1 = [r for r in recs if r["seed"] == 1 and r["optimizer"] == "adam"]
    assert s0[0]["val_loss"] != s1[0]["val_loss"]  # another seed: another initialisation
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["optimizers"]["mada"]["final_val_loss"]
    assert final["n"] == 2 and final["std"] is not None
    assert summary["optimizers"]["mada"]["wins_vs_baseline"]["paired"] == 2
    assert "±" in result.stdout


def test_overrides_are_applied(tmp_path):
    result = invoke(
        "run", "--quick", "--dry-run", "--out", str(tmp_path), "--steps", "7", "--seeds", "0,3",
        "--device", "cpu", "--name", "mine", "--set", "model.n_embd=16", "--set", "optimizers.mada.hypergrad.lr=0.01",
        "--set", "optimizers.1.options={second_moment: mean}",
    )
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert cfg["steps"] == 7 and cfg["seeds"] == [0, 3] and cfg["name"] == "mine"
    assert cfg["out_dir"] == str(tmp_path) and cfg["model"]["n_embd"] == 16
    mada = cfg["optimizers"][1]
    assert mada["hypergrad"]["lr"] == 0.01 and mada["options"] == {"second_moment": "mean"}
    assert list(tmp_path.iterdir()) == []  # a dry run makes no run directory


def test_set_reaches_default_optimizers_of_a_config_that_lists_none(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("steps: 5\n")
    result = invoke("run", str(path), "--dry-run", "--set", "optimizers.mada.lr=0.001")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert cfg["name"] == "job" and cfg["steps"] == 5
    assert [o["name"] for o in cfg["optimizers"]] == ["adam", "mada"] and cfg["optimizers"][1]["lr"] == 0.001


def test_set_on_a_contender_takes_nothing_from_another(tmp_path):
    """`--set optimizers.<name>.options.X` (or `.hypergrad.X`) on a contender without that mapping
    sets that one field: the rest is not taken from the default job's optimizer at its position."""
    # the quick job's mada has no options: lion and nothing else (before: the default job's mada's
    # second_moment: mean came along, silently switching v-bar from AMSGrad's max to the mean)
    result = invoke("run", "--quick", "--dry-run", "--set", "optimizers.mada.options.lion=true")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["optimizers"][1]["options"] == {"lion": True}
    cfg = build_config(resolved)
    assert cfg.optimizers[1].family(cfg.betas).options.second_moment == "max"

    # another family at the default mada's position (#1): only what --set gives (before: MADA's
    # second_moment went to SGD-HD's constructor, and MADA's hyper-optimizer settings to its hypergrad)
    from metaopt.plugins.hd import SGDHD

    path = tmp_path / "job.yaml"
    path.write_text("optimizers:\n  - {name: adam, kind: adam}\n  - {name: hd, kind: sgd_hd}\n")
    result = invoke("run", str(path), "--dry-run", "--set", "optimizers.hd.options.alpha=0.01",
                    "--set", "optimizers.hd.hypergrad.lr=0.0001")
    assert result.exit_code == 0, result.output
    cfg = build_config(yaml.safe_load(result.stdout))
    hd = cfg.optimizers[1]
    assert hd.options == {"alpha": 0.01}
    assert hd.hyper() == SGDHD().default_hypergrad().model_copy(update={"lr": 0.0001})  # SGD-HD's own, no warm-up

    # a missing top-level list is still the default job's (so that optimizers.mada.* works)
    (tmp_path / "bare.yaml").write_text("steps: 5\n")
    result = invoke("run", str(tmp_path / "bare.yaml"), "--dry-run", "--set", "optimizers.mada.options.lion=true")
    assert result.exit_code == 0, result.output
    mada = yaml.safe_load(result.stdout)["optimizers"][1]
    assert mada["options"] == {"second_moment": "mean", "lion": True}  # the default job's own mada


def test_quick_with_a_config_runs_its_contenders_at_the_quick_size(tmp_path):
    """`metaopt run CONFIG --quick`: the quick job's size (read from quick.yaml), the config's
    contenders, lr, betas, data and device, its name with -quick; command-line overrides still win."""
    from metaopt.jobs.config import QUICK_SIZE

    path = tmp_path / "mine.yaml"
    path.write_text(
        "steps: 900\nbatch_size: 7\nseeds: 4\neval_interval: 50\neval_batches: 9\nlog_interval: 3\n"
        "checkpoint_every: 0\nlr: 0.003\nbetas: [0.8, 0.95]\ndevice: cpu\nthreads: 1\n"
        "model: {n_layer: 3, n_head: 4, n_embd: 64, block_size: 16, dropout: 0.1}\n"
        "optimizers:\n  - {name: a, kind: adam}\n  - {name: m, kind: mada, point: yogi}\n"
    )
    result = invoke("run", str(path), "--quick", "--dry-run")
    assert result.exit_code == 0, result.output
    got = yaml.safe_load(result.stdout)
    quick = build_config(read_config_file(packaged_config_path("quick"))).dump()
    given = build_config(read_config_file(path)).dump()
    assert set(QUICK_SIZE) == {"model", "steps", "batch_size", "eval_interval", "eval_batches", "log_interval",
                               "checkpoint_every", "seeds"}
    for key in QUICK_SIZE:
        if key != "model":
            assert got[key] == quick[key], key
    assert got["model"] == {**quick["model"], "dropout": 0.1}  # the quick GPT; the config's dropout
    for key in ("optimizers", "lr", "betas", "device", "threads", "data"):
        assert got[key] == given[key], key
    assert got["name"] == "mine-quick"
    result = invoke("run", str(path), "--quick", "--dry-run", "--steps", "6", "--set", "seeds=2")
    assert result.exit_code == 0, result.output
    got = yaml.safe_load(result.stdout)
    assert (got["steps"], got["seeds"]) == (6, [0, 1])


def test_unset_hypergrad_settings_take_the_familys_default(monkeypatch):
    """A setting left unset in `hypergrad:` takes the value of the contender's
    family.default_hypergrad() (its shared hyper-optimizer settings, whatever the mode; the mode's
    own from the config); `warmup: 0` and `clip: false` switch MADA's warm-up and clip off; the
    resolved config holds every value, so that a saved config keeps its meaning."""
    from metaopt.hyper import HyperOptimizer
    from metaopt.plugins.hd import SGDHD
    from metaopt.plugins.mada import MADA

    shared = {f: getattr(MADA().default_hypergrad(), f) for f in HyperOptimizer.model_fields}
    assert shared["warmup"] == 50 and shared["clip"] == 10.0  # what is being inherited
    cfg = build_config({"optimizers": [
        {"name": "hd", "kind": "sgd_hd"},
        {"name": "one", "kind": "mada", "hypergrad": {"lr": 0.01}},
        {"name": "fwd", "kind": "mada", "hypergrad": {"mode": "forward", "decay": 0.5, "momentum": 0.9}},
        {"name": "unr", "kind": "mada", "hypergrad": {"mode": "unrolled", "k": 2, "first_order": True}},
        {"name": "bare", "kind": "mada", "hypergrad": {"mode": "one_step", "warmup": 0, "clip": False}},
        {"name": "fixed", "kind": "mada", "hypergrad": {"mode": "none"}},
    ]})
    hyper = {o.label: o.hyper() for o in cfg.optimizers}
    assert hyper["hd"] == SGDHD().default_hypergrad()  # the paper's hyper-step, not MADA's or the engine's
    assert hyper["one"] == metaopt.OneStep(**{**shared, "lr": 0.01})
    assert hyper["fwd"] == metaopt.Forward(decay=0.5, **{**shared, "momentum": 0.9})
    assert hyper["unr"] == metaopt.Unrolled(steps=2, first_order=True, **shared)
    assert hyper["bare"] == metaopt.OneStep()  # no warm-up, no clip: the engine's bare setting
    assert hyper["fixed"] is None

    # whatever the family's default is: read from it, not assumed
    monkeypatch.setattr(MADA, "default_hypergrad",
                        lambda self: metaopt.Forward(optimizer="adam", lr=0.07, warmup=3, decay=0.2, max_move=0.5))
    later = build_config({"optimizers": [{"name": "m", "kind": "mada"}, {"name": "n", "kind": "mada",
                                          "hypergrad": {"max_move": False}}]})
    assert later.optimizers[0].hyper() == metaopt.OneStep(optimizer="adam", lr=0.07, warmup=3, max_move=0.5)
    assert later.optimizers[1].hyper() == metaopt.OneStep(optimizer="adam", lr=0.07, warmup=3)
    # the saved (resolved) config of the earlier job means what it meant, whatever the default is now
    again = build_config(cfg.dump())
    assert {o.label: o.hyper() for o in again.optimizers} == hyper
    monkeypatch.undo()

    # the configs that meant the engine's bare one-step setting say so, and keep meaning it
    packaged = build_config(read_config_file(packaged_config_path("quick")))
    assert packaged.optimizers[1].hyper() == metaopt.OneStep()
    study = build_config(read_config_file(ROOT / "studies" / "default-job" / "one-step.yaml"))
    assert {o.label: o.hyper() for o in study.optimizers} == {
        "adam": None, "mada": metaopt.OneStep(), "mada-stabilised": metaopt.OneStep(warmup=50, clip=10.0, clip_style="norm")}
    study = build_config(read_config_file(ROOT / "studies" / "default-job" / "forward.yaml"))
    assert [o.hyper() for o in study.optimizers] == [metaopt.Forward(decay=1.0), metaopt.Forward(decay=0.9)]


@pytest.mark.parametrize(("setting", "words"), [
    ("clip: true", ["clip", "false for none"]),
    ("clip: -1", ["clip", ">= 0"]),
    ("max_move: 0", ["max_move", "> 0"]),
    ("lr_scale: boxed", ["lr_scale", "absolute"]),
])
def test_bad_hypergrad_bounds_are_refused(tmp_path, setting, words):
    path = tmp_path / "bad.yaml"
    path.write_text(f"optimizers:\n  - {{kind: mada, hypergrad: {{{setting}}}}}\n")
    result = invoke("run", str(path), "--dry-run")
    assert result.exit_code == 2, result.output
    field = setting.split(":")[0]
    assert re.search(rf"^  optimizers\.0\.hypergrad\.{field}( \(optimizer '[^']*'\))?: ", result.stderr, re.M), result.stderr
    for w in words:
        assert w in result.stderr


def test_metrics_record_each_learned_coefficients_hypergradient(tmp_path, monkeypatch):
    """Each step's record holds |h| of each learned coefficient's last hyper-gradient (per group
    with coefficients per group), as the optimizer had it after that step; the per-evaluation
    line shows them with the skip count."""
    seen: dict[tuple[str, int], dict[str, float]] = {}

    def hook(info):
        opt = info["run"].opt
        if isinstance(opt, metaopt.MetaOptimizer):
            h = opt.last_hypergrad
            if opt.per_group:
                seen[(info["optimizer"], info["step"])] = {
                    f"{g['name']}/{n}": abs(float(h[n][gi])) for gi, g in enumerate(opt.param_groups) for n in h}
            else:
                seen[(info["optimizer"], info["step"])] = {n: abs(float(v)) for n, v in h.items()}

    monkeypatch.setattr(train, "step_hook", hook)
    contenders = ("optimizers=[{name: adam, kind: adam}, "
                  "{name: mada, kind: mada, point: adam, hypergrad: {mode: one_step, warmup: 0, clip: false}}, "
                  "{name: groups, kind: mada, point: adam, coefficients: per_group, hypergrad: {mode: one_step, warmup: 0}}, "
                  "{name: fixed, kind: mada, point: adam, hypergrad: {mode: none}}]")
    result = invoke("run", "--quick", "--out", str(tmp_path), "--steps", "6", "--set", "eval_interval=3",
                    "--set", "log_interval=4", "--set", contenders, "--no-progress")
    assert result.exit_code == 0, result.output
    recs = records(only_run_dir(tmp_path))
    for label, keys in (("mada", ["beta3", "c", "rho"]),
                        ("groups", [f"{g}/{n}" for g in ("embeddings", "blocks", "head") for n in ("beta3", "c", "rho")])):
        mine = [r for r in recs if r["optimizer"] == label]
        assert "hypergrad" not in mine[0]  # step 0: none yet
        for r in mine[1:]:
            assert list(r["hypergrad"]) == keys, label
            assert r["hypergrad"] == pytest.approx(seen[(label, r["step"])], rel=1e-6, abs=0), (label, r["step"])
        assert any(v > 0 for r in mine[1:] for v in r["hypergrad"].values())
    assert all("hypergrad" not in r for r in recs if r["optimizer"] in ("adam", "fixed"))
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith("seed 0 mada step 3/6"))
    last = max(seen[("mada", 3)], key=seen[("mada", 3)].get)
    assert f"{seen[('mada', 3)][last]:.1e}" in line and "skip 0" in line, line


def test_toml_needs_tomli_before_python_3_11():
    """requires-python allows 3.10, which has no tomllib: the package depends on tomli there, and
    the config module imports it in tomllib's place."""
    import ast
    import types

    from metaopt.jobs import config as config_module

    meta = config_module.tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.10"
    assert "tomli>=2; python_version < '3.11'" in meta["dependencies"]
    tree = ast.parse(Path(config_module.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "version_info" in ast.unparse(n.test))
    fake_tomli = types.ModuleType("tomli")
    for version, want in (((3, 10, 14), fake_tomli), ((3, 11, 0), config_module.tomllib)):
        namespace = {"sys": types.SimpleNamespace(version_info=version)}
        saved = sys.modules.get("tomli")
        sys.modules["tomli"] = fake_tomli
        try:
            exec(compile(ast.Module([block], []), "config.py", "exec"), namespace)
        finally:
            if saved is None:
                del sys.modules["tomli"]
            else:
                sys.modules["tomli"] = saved
        assert namespace["tomllib"] is want, version


def test_yaml_and_toml_configs_load_alike(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "name: same\nsteps: 11\nseeds: 2\nmodel: {n_layer: 1, n_head: 2, n_embd: 32}\n"
        "optimizers:\n  - {name: adam, kind: adam}\n"
        "  - {name: m, kind: mada, point: yogi, options: {second_moment: mean}, hypergrad: {mode: unrolled, k: 2, lr: 0.01}}\n"
    )
    (tmp_path / "a.toml").write_text(
        'name = "same"\nsteps = 11\nseeds = 2\n[model]\nn_layer = 1\nn_head = 2\nn_embd = 32\n'
        '[[optimizers]]\nname = "adam"\nkind = "adam"\n'
        '[[optimizers]]\nname = "m"\nkind = "mada"\npoint = "yogi"\noptions = { second_moment = "mean" }\n'
        'hypergrad = { mode = "unrolled", k = 2, lr = 0.01 }\n'
    )
    outs = []
    for name in ("a.yaml", "a.toml"):
        result = invoke("run", str(tmp_path / name), "--dry-run")
        assert result.exit_code == 0, result.output
        outs.append(yaml.safe_load(result.stdout))
    assert outs[0] == outs[1]
    assert outs[0]["seeds"] == [0, 1] and outs[0]["optimizers"][1]["hypergrad"]["k"] == 2
    (tmp_path / "a.json").write_text("{}")
    result = invoke("run", str(tmp_path / "a.json"))
    assert result.exit_code == 2 and ".toml" in result.stderr


def test_forward_mode_trains_from_a_config(tmp_path):
    """hypergrad.mode: forward runs metaopt.Forward (decay from the config) and learns."""
    (tmp_path / "f.yaml").write_text(
        "name: fwd\nsteps: 8\nseeds: 1\neval_interval: 8\nlog_interval: 4\ncheckpoint_every: 0\n"
        "model: {n_layer: 1, n_head: 2, n_embd: 16, block_size: 16}\nbatch_size: 2\n"
        "optimizers:\n  - {name: fwd, kind: mada, point: yogi, hypergrad: {mode: forward, decay: 0.9, lr: 0.05, warmup: 0}}\n"
    )
    cfg = build_config(read_config_file(tmp_path / "f.yaml"))
    hg = cfg.optimizers[0].hyper()
    assert isinstance(hg, metaopt.Forward) and hg.decay == 0.9 and hg.lr == 0.05 and hg.warmup == 0
    result = invoke("run", str(tmp_path / "f.yaml"), "--out", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    recs = [r for r in records(only_run_dir(tmp_path / "runs")) if "coefficients" in r]
    assert recs and recs[-1]["coefficients"] != recs[0]["coefficients"]


@pytest.mark.parametrize(
    ("content", "field", "words"),
    [
        ("steps: -1\n", "steps", ["greater than or equal to 1"]),
        ("stepz: 100\n", "stepz", ["unknown field", "steps"]),
        ("optimizers:\n  - {name: x, kind: nosuch}\n", "optimizers.0.kind", ["nosuch", "mada"]),
        ("optimizers:\n  - {kind: mada, options: {bogus: 1}}\n", "optimizers.0.options.bogus", ["unknown"]),
        ("optimizers:\n  - {kind: mada, point: nowhere}\n", "optimizers.0.point", ["adam", "yogi"]),
        ("optimizers:\n  - {kind: mada, hypergrad: {mode: one_step, k: 4}}\n", "optimizers.0.hypergrad.k", ["unrolled"]),
        ("optimizers:\n  - {kind: mada, hypergrad: {mode: one_step, decay: 0.5}}\n", "optimizers.0.hypergrad.decay",
         ["forward"]),
        ("model: {n_embd: 30, n_head: 4}\n", "model.n_head", ["divide"]),
        ("betas: [0.9, 1.5]\n", "betas", ["[0, 1)"]),
    ],
)
def test_bad_config_fails_before_training(tmp_path, content, field, words):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    out = tmp_path / "runs"
    result = invoke("run", str(path), "--out", str(out))
    assert result.exit_code == 2, result.output
    # one line per problem: the field's dotted path (and the optimizer's name), then the message
    assert re.search(rf"^  {re.escape(field)}( \(optimizer '[^']*'\))?: ", result.stderr, re.M), result.stderr
    for w in words:
        assert w in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()  # nothing trained, no run directory, no metrics


def test_bad_override_and_bad_arguments_exit_2(tmp_path):
    result = invoke("run", "--quick", "--steps", "0", "--out", str(tmp_path))
    assert result.exit_code == 2 and "steps:" in result.stderr
    result = invoke("run", "--quick", "--set", "model.n_layers=2", "--out", str(tmp_path))
    assert result.exit_code == 2 and "model.n_layers" in result.stderr and "n_layer" in result.stderr
    assert invoke("run", "quick", "--quick").exit_code == 2
    assert invoke("run", str(tmp_path / "missing.yaml")).exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_keeps_metrics_and_writes_summary(tmp_path, monkeypatch):
    def hook(info):
        if info["optimizer"] == "mada" and info["step"] == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "step_hook", hook)
    result = invoke("run", "--quick", "--out", str(tmp_path), "--steps", "20", "--set", "log_interval=5")
    assert result.exit_code == 130, result.output
    run_dir = only_run_dir(tmp_path)
    recs = records(run_dir)
    # the optimizers advance in turn: both stopped at step 8, every step done so far logged
    assert [r["step"] for r in recs if r["optimizer"] == "adam"] == list(range(9))
    mada = [r for r in recs if r["optimizer"] == "mada"]
    assert [r["step"] for r in mada] == list(range(9))
    assert all("coefficients" in r for r in mada)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["complete_runs"] == 0
    for label in ("adam", "mada"):
        assert summary["optimizers"][label]["runs"] == 1 and summary["optimizers"][label]["complete_runs"] == 0
    run = {r["optimizer"]: r for r in summary["runs"]}
    assert run["mada"]["steps_done"] == 8 and run["mada"]["final_val_step"] == 0  # last evaluated: step 0
    for name in ("val_loss.png", "coefficients.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG
    assert "interrupted" in result.stderr and "**interrupted**" in (run_dir / "summary.md").read_text()


def _logged_steps(out: Path) -> dict[str, list[int]]:
    """The steps logged so far per optimizer, read while the run writes (a line being written is
    skipped here; the test reads the finished file strictly)."""
    steps: dict[str, list[int]] = {}
    for path in out.glob("*/metrics.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            steps.setdefault(r["optimizer"], []).append(r["step"])
    return steps


#: `metaopt` in a child process whose SIGINT handling the test sets, whatever this process's is: a
#: child inherits an ignored SIGINT (pytest run as a background job of a shell), and Python then
#: installs no KeyboardInterrupt handler (nor does `metaopt run`: an ignored signal stays ignored)
CHILD = "import signal, sys; signal.signal(signal.SIGINT, {sigint}); from metaopt.cli import main; main()"


@pytest.fixture
def signal_handlers():
    """SIGINT and SIGTERM as a Python program started from a terminal has them, put back after.

    pytest itself may run with SIGINT ignored (started as a background job of a shell).
    """
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_real_signal_keeps_metrics_and_writes_summary(tmp_path, sig):
    """A real Ctrl-C (SIGINT) or SIGTERM sent to a `metaopt run` process in the middle of its
    training: the signal handlers of the command and of the training loop (not a hook that raises)
    stop it with exit code 130, every record written whole, the summary and plots made. The
    SIGTERM run is started with SIGINT ignored, as a shell starts a background job, and gets a
    SIGINT first: it trains on (an ignored signal stays ignored), and SIGTERM still stops it."""
    out = tmp_path / "runs"
    sigint = "signal.default_int_handler" if sig == signal.SIGINT else "signal.SIG_IGN"
    cmd = [
        sys.executable, "-c", CHILD.format(sigint=sigint), "run", "--quick", "--out", str(out),
        "--steps", "100000", "--set", "log_interval=1", "--no-progress",
    ]
    stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=so, stderr=se)
    try:
        # wait until MADA (the optimizers advance in turn) is past its first evaluation, step 20
        deadline, steps = time.monotonic() + 120, {}
        while time.monotonic() < deadline and proc.poll() is None:
            steps = _logged_steps(out)
            if max(steps.get("mada", [0])) >= 25:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"exited with {proc.returncode} before the signal:\n{stderr_path.read_text()}"
        assert max(steps.get("mada", [0])) >= 25, f"training not under way after 120 s: {steps}\n{stderr_path.read_text()}"
        if sig == signal.SIGTERM:  # SIGINT, ignored since the start: training goes on
            proc.send_signal(signal.SIGINT)
            before, deadline = max(steps["mada"]), time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None and max(steps.get("mada", [0])) < before + 5:
                time.sleep(0.2)
                steps = _logged_steps(out)
            assert proc.poll() is None, f"SIGINT stopped a run started with SIGINT ignored:\n{stderr_path.read_text()}"
            assert max(steps["mada"]) >= before + 5, f"no progress after an ignored SIGINT: {max(steps['mada'])}"
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"{sig.name}: still running 60 s after the signal (killed):\n{stderr_path.read_text()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout, stderr = stdout_path.read_text(), stderr_path.read_text()
    assert code == 130, f"exit code {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert "interrupted" in stderr and "interrupted again" not in stderr, stderr

    run_dir = only_run_dir(out)
    text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n"), text[-200:]
    recs = [json.loads(line) for line in text.splitlines()]  # every line whole: no torn record
    by_opt = {label: [r["step"] for r in recs if r["optimizer"] == label] for label in ("adam", "mada")}
    assert {r["optimizer"] for r in recs} == {"adam", "mada"}
    for label, st in by_opt.items():
        assert st == list(range(len(st))), (label, st)  # every step done logged, once, in order
        assert len(st) > 25, (label, len(st))
    # in turn: Adam is at MADA's step, or one ahead when the signal fell in MADA's step
    assert 0 <= by_opt["adam"][-1] - by_opt["mada"][-1] <= 1, (by_opt["adam"][-1], by_opt["mada"][-1])
    assert all("coefficients" in r for r in recs if r["optimizer"] == "mada")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["complete_runs"] == 0 and summary["expected_runs"] == 2
    assert {r["optimizer"]: r["steps_done"] for r in summary["runs"]} == {k: v[-1] for k, v in by_opt.items()}
    for name in ("val_loss.png", "coefficients.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG, name
    assert "**interrupted**" in (run_dir / "summary.md").read_text()
    assert "| mada" in stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_record_write_is_delivered_after_it(sig, signal_handlers):
    """The window between writing records and marking them written: a signal that lands there
    (SIGTERM too, which the command turns into an interrupt) waits for the block to finish, so
    no record is written twice, and then interrupts."""
    from metaopt.jobs.train import sigterm_as_interrupt

    done = []
    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        with train.deferred_interrupt():
            signal.raise_signal(sig)
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_the_process_ignores_stays_ignored(sig, signal_handlers):
    """Started with a signal ignored (SIGINT in a shell's background job), `metaopt run` leaves it
    ignored: neither the command's SIGTERM handler nor a record write's deferral makes it stop the
    run. The other signal still interrupts."""
    from metaopt.jobs.train import sigterm_as_interrupt

    signal.signal(sig, signal.SIG_IGN)
    other = signal.SIGTERM if sig == signal.SIGINT else signal.SIGINT
    done = []
    with sigterm_as_interrupt():
        with train.deferred_interrupt():
            signal.raise_signal(sig)
            done.append("block")
        signal.raise_signal(sig)
        done.append("after")
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(other)
    assert done == ["block", "after"]
    assert signal.getsignal(sig) is signal.SIG_IGN


# -- families, describe ----------------------------------------------------------------------------


def test_families_lists_mada():
    result = invoke("families")
    assert result.exit_code == 0, result.output
    assert "mada" in result.stdout and "beta3" in result.stdout and "rho" in result.stdout


def test_families_survives_a_broken_plugin(monkeypatch):
    import metaopt.registry as registry

    real = registry.entry_points

    def fake(group):
        eps = list(real(group=group))
        return [*eps, EntryPoint("broken", "metaopt_no_such_module:Family", group)]

    monkeypatch.setattr(registry, "entry_points", fake)
    result = invoke("families")
    assert result.exit_code == 0
    assert "mada" in result.stdout
    assert "broken" in result.stderr and "metaopt_no_such_module" in result.stderr
    # the library call skips it too, with a warning naming it
    with pytest.warns(UserWarning, match="broken"):
        found = metaopt.families()
    assert "mada" in found and "broken" not in found


def test_describe_mada():
    result = invoke("describe", "mada")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for word in ("beta3", "c ", "rho", "[0, 0.99]", "learned", "fixed", "second_moment", "weight_decay", "eps"):
        assert word in out, word
    for point in ("adam", "amsgrad", "yogi", "adan"):
        assert f"\n  {point} " in out, point
    assert "native CPU kernel" in out
    info = json.loads(invoke("describe", "mada", "-o", "lion=true", "--json").stdout)
    assert "gamma" in info["learned"] and "lion" in info["points"]
    assert {f["name"]: f["value"] for f in info["options"]}["lion"] is True
    assert info["fast_path"] and not info["native_kernel"]  # mada.c has no Lion term


def test_describe_shows_the_familys_own_description():
    """`metaopt describe` is where the family comes from plus `Family.description()`, which
    `Family.describe()` (what `metaopt families` prints) summarises: one description of a family.
    A field's type reads as written, without the address of a validator it carries."""
    from metaopt.plugins.mada import MADA

    info = json.loads(invoke("describe", "mada", "--json").stdout)
    own = json.loads(json.dumps(MADA().description(), default=str))
    assert list(info)[:3] == ["name", "entry_point", "source"] and {k: info[k] for k in own} == own
    types = {f["name"]: f["type"] for f in info["options"]}
    assert types["betas"] == "Optional[tuple[float, float]]" and " at 0x" not in json.dumps(info)
    short = MADA().describe().splitlines()
    assert short[0] == f"mada: {own['summary']}"
    assert [line.split()[0] for line in short[1:-1]] == [c["name"] for c in own["coefficients"]]
    assert short[-1] == "  points: " + ", ".join(sorted(own["points"]))


def test_describe_errors_exit_2():
    result = invoke("describe", "nosuch")
    assert result.exit_code == 2
    assert "nosuch" in result.stderr and "mada" in result.stderr
    result = invoke("describe", "mada", "-o", "bogus=1")
    assert result.exit_code == 2 and "bogus" in result.stderr


def test_console_script_exit_code():
    exe = shutil.which("metaopt")
    cmd = [exe] if exe else [sys.executable, "-m", "metaopt.cli"]
    out = subprocess.run([*cmd, "describe", "nosuch"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "registered" in out.stderr


# -- pieces ----------------------------------------------------------------------------------------


def test_default_yaml_is_the_default_job():
    packaged = build_config(read_config_file(packaged_config_path("default")))
    defaults = JobConfig()
    assert packaged.model_copy(update={"name": None}) == defaults
    assert (defaults.steps, defaults.batch_size, defaults.lr, defaults.betas) == (1500, 32, 2e-3, (0.9, 0.99))
    assert (defaults.model.n_layer, defaults.model.n_head, defaults.model.n_embd, defaults.model.block_size) == (4, 4, 128, 64)
    # the job's MADA runs MADA's own default hyper-optimizer (the study's choice), taken from the
    # family: the optimizer the job builds has exactly it, and default.yaml spells out none of it
    from metaopt.plugins.mada import MADA

    mada = next(o for o in defaults.optimizers if o.kind == "mada")
    opt = train.build_optimizer(mada, defaults, torch.nn.Linear(3, 2))
    assert opt.hypergrad == MADA().default_hypergrad()
    assert mada.family(defaults.betas).options.second_moment == "mean"
    raw = read_config_file(packaged_config_path("default"))
    assert next(o for o in raw["optimizers"] if o["kind"] == "mada")["hypergrad"] == {"mode": "one_step"}
    # both under nanoGPT's warm-up and cosine decay, whose noise floor resolves them (docs/study.md)
    for o in defaults.optimizers:
        assert (o.schedule.kind, o.schedule.warmup, o.schedule.final) == ("cosine", 100, 0.1)


def test_a_shorter_job_without_contenders_gets_the_default_ones_with_their_warm_up_scaled(tmp_path):
    """The default contenders warm up for 100 of 1500 steps; a config that sets only ``steps: 50``
    (or reaches them through ``--set``) runs them with a warm-up of 50 · 100 // 1500 = 3 steps."""
    path = tmp_path / "job.yaml"
    path.write_text("steps: 50\n")
    for extra in ([], ["--set", "optimizers.mada.lr=0.001"]):
        result = invoke("run", str(path), "--dry-run", *extra)
        assert result.exit_code == 0, result.output
        cfg = yaml.safe_load(result.stdout)
        assert [o["schedule"] for o in cfg["optimizers"]] == [{"kind": "cosine", "warmup": 3, "final": 0.1}] * 2
    # a longer job keeps nanoGPT's 100 steps; a warm-up written out is never changed
    assert build_config({"steps": 3000}).optimizers[0].schedule.warmup == 100
    with pytest.raises(ValidationError, match="warmup"):
        build_config({"steps": 50, "optimizers": [{"kind": "adam", "schedule": {"kind": "cosine", "warmup": 100}}]})


def test_char_data_split_and_batches():
    from metaopt.jobs.data import CharDataset

    data = CharDataset.from_source(None)
    assert data.vocab_size == 65
    total = len(data.train) + len(data.val)
    assert len(data.train) == int(total * 0.9)
    a = data.batch("train", 4, 8, torch.Generator().manual_seed(3))
    b = data.batch("train", 4, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[0][:, 1:], a[1][:, :-1])


def test_benchmarks_gpt_reexports_the_model():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpt as bench_gpt
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from metaopt.jobs import gpt

    assert bench_gpt.GPT is gpt.GPT and bench_gpt.GPTConfig is gpt.GPTConfig
