"""Sweeps over a family's space (`points:`, `grid:`, `at:`) and the report's answers.

A contender of `points: [adam]` trains exactly as a hand-written MADA held at the Adam point (and,
within float32 rounding, as torch's Adam); a grid cell and a point train bit for bit as a plain
loop with `MetaOptimizer(..., hypergrad=None)` and `set_coefficients`; every cell of a grid holds
the values the grid gives it;
the saved config.yaml holds the expanded contenders, validates to itself and resumes bit for bit;
the best fixed point, the regret, the Δs against baselines, the noise floor and the coefficient
offsets equal a computation written out here from metrics.jsonl, their intervals
`scipy.stats.t`'s; `metaopt report` over two directories split by seed equals the run over both;
the plots are written, and the landscape is skipped with its reason where no grid has two
coefficients; bad sweeps are refused naming the field. About 25 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib
import pytest
import torch
import yaml

matplotlib.use("Agg")

import metaopt.jobs.train as train  # noqa: E402
from metaopt.jobs.analysis import paired  # noqa: E402
from metaopt.jobs.config import build_config, read_config_file  # noqa: E402
from metaopt.jobs.summary import summarize  # noqa: E402
from test_cli import PNG, invoke, only_run_dir, records, runner  # noqa: E402 - the same CLI helpers
from metaopt.cli import app  # noqa: E402

scipy_stats = pytest.importorskip("scipy.stats")

STEPS = 12
MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}
BETAS = (0.9, 0.99)
GRID = {"beta3": [0.0, 0.5, 0.9], "rho": [0.1, 1.0]}
OPTIMIZERS = [
    {"name": "adam", "kind": "adam"},
    {"name": "pts", "kind": "mada", "points": ["adam", "yogi"]},
    {"name": "hand", "kind": "mada", "point": "adam", "hypergrad": {"mode": "none"}},
    {"name": "grid", "kind": "mada", "point": "adam", "grid": GRID},
    {"name": "learn", "kind": "mada", "point": "adam", "hypergrad": {"warmup": 0, "clip": False, "lr": 0.05}},
    {"name": "adamw", "kind": "adamw", "schedule": {"kind": "cosine", "warmup": 2}},
]
GRID_LABELS = [f"grid[beta3={b:g},rho={r:g}]" for b in GRID["beta3"] for r in GRID["rho"]]
LABELS = ["adam", "pts@adam", "pts@yogi", "hand", *GRID_LABELS, "learn", "adamw"]


def job_yaml(optimizers: list[dict], **fields) -> str:
    cfg = {
        "name": "sweep", "model": MODEL, "steps": STEPS, "batch_size": 4, "eval_interval": 5, "eval_batches": 2,
        "log_interval": 4, "checkpoint_every": 0, "seeds": [0, 1], "threads": 1, "device": "cpu", "lr": 2e-3,
        "betas": list(BETAS), "optimizers": optimizers, **fields,
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def by_label(run_dir: Path) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = {}
    for r in records(run_dir):
        out.setdefault((r["optimizer"], r["seed"]), []).append(r)
    return out


def strip(recs: list[dict]) -> list[dict]:
    """Records without the label and the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("optimizer", "time", "train_time")} for r in recs]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # the configs set threads: 1 in this process
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, Path]:
    """The sweep job on seeds 0 and 1: (its config file, its run directory)."""
    n = torch.get_num_threads()
    base = tmp_path_factory.mktemp("sweep")
    config = base / "sweep.yaml"
    config.write_text(job_yaml(OPTIMIZERS))
    result = invoke("run", str(config), "--out", str(base / "runs"), "--no-progress")
    torch.set_num_threads(n)
    assert result.exit_code == 0, result.output
    return config, only_run_dir(base / "runs")


# -- sweeps ----------------------------------------------------------------------------------------------


def test_a_points_contender_trains_as_a_hand_written_fixed_one_and_as_torch_adam(job):
    _, run_dir = job
    got = by_label(run_dir)
    assert sorted({lb for lb, _ in got}) == sorted(LABELS)
    for seed in (0, 1):
        # the same rule, the same coefficients, the same seed: the same numbers, bit for bit
        assert strip(got[("pts@adam", seed)]) == strip(got[("hand", seed)])
        # torch's Adam: the same update up to float32 rounding
        mada = [r["train_loss"] for r in got[("pts@adam", seed)][1:]]
        adam = [r["train_loss"] for r in got[("adam", seed)][1:]]
        assert max(abs(a - b) for a, b in zip(mada, adam)) < 1e-4
        # Yogi's point is another rule: it lands elsewhere
        yogi = [r["train_loss"] for r in got[("pts@yogi", seed)][1:]]
        assert max(abs(a - b) for a, b in zip(yogi, adam)) > 1e-4
    for r in got[("pts@yogi", 0)]:
        assert r["coefficients"]["c"] == 0.0 and r["coefficients"]["beta3"] == 0.0  # held at Yogi's point
        assert "hypergrad" not in r  # nothing learned


def hand_losses(point: str, **values: float) -> list[float]:
    """The job's model and batches (seed 0) trained by a plain loop with MADA held by the engine's own calls.

    ``MetaOptimizer(..., hypergrad=None)`` at MADA's init, then ``set_coefficients`` to the point's
    values and ``values``: not the job's ``family.at``.
    """
    from metaopt import MetaOptimizer
    from metaopt.jobs.data import CharDataset
    from metaopt.jobs.gpt import GPT, GPTConfig
    from metaopt.plugins.mada import MADA

    torch.set_num_threads(1)  # as the job ran (threads: 1): the same reductions, rounded alike
    data = CharDataset.from_source(None, 0.1, "cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    family = MADA(betas=BETAS)
    opt = MetaOptimizer(model.parameters(), family, hypergrad=None, lr=2e-3)
    opt.set_coefficients(**{**family.points[point], **values})
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        x, y = data.batch("train", 4, 16, gen)
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_sweep_contenders_train_as_the_family_held_by_hand(job):
    _, run_dir = job
    got = by_label(run_dir)
    for label, point, values in (("grid[beta3=0.5,rho=0.1]", "adam", {"beta3": 0.5, "rho": 0.1}), ("pts@yogi", "yogi", {})):
        assert [r["train_loss"] for r in got[(label, 0)][1:]] == hand_losses(point, **values), label


def test_every_grid_cell_holds_the_values_the_grid_gives_it(job):
    _, run_dir = job
    got = by_label(run_dir)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731 - the coefficients are float32
    for beta3 in GRID["beta3"]:
        for rho in GRID["rho"]:
            recs = got[(f"grid[beta3={beta3:g},rho={rho:g}]", 0)]
            assert [r["step"] for r in recs] == list(range(STEPS + 1))
            want = {"beta1": f32(BETAS[0]), "beta2": f32(BETAS[1]), "beta3": f32(beta3), "c": 1.0, "rho": f32(rho)}
            assert all(r["coefficients"] == want for r in recs)  # at every step: held there
    # the learning contender moved its coefficients
    assert got[("learn", 0)][-1]["coefficients"]["beta3"] != 0.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [lb for lb in summary["optimizers"]] == LABELS
    assert summary["optimizers"]["grid[beta3=0.5,rho=0.1]"]["at"] == {"beta3": 0.5, "rho": 0.1}
    assert summary["optimizers"]["grid[beta3=0.5,rho=0.1]"]["role"] == "fixed"
    assert summary["optimizers"]["learn"]["role"] == "learning" and summary["optimizers"]["adamw"]["role"] == "baseline"


def test_the_saved_config_holds_the_expanded_contenders_and_resumes_from_the_sweep(job, tmp_path):
    config, run_dir = job
    saved = read_config_file(run_dir / "config.yaml")
    assert [o["name"] for o in saved["optimizers"]] == LABELS
    assert all("points" not in o and "grid" not in o for o in saved["optimizers"])
    cell = saved["optimizers"][LABELS.index("grid[beta3=0.9,rho=1]")]
    assert cell["at"] == {"beta3": 0.9, "rho": 1.0} and cell["point"] == "adam" and cell["hypergrad"]["mode"] == "none"
    assert cell["sweep"] == {"entry": "grid", "by": "grid", "over": ["beta3", "rho"]}
    assert build_config(saved).dump() == saved  # validates to itself
    # the config as written (sweeps unexpanded) agrees with the run's, so it may be given with --resume
    result = invoke("run", str(config), "--resume", str(run_dir), "--dry-run")
    assert result.exit_code == 0, result.output
    # a change to the sweep is listed contender by contender
    result = runner.invoke(app, ["run", str(config), "--resume", str(run_dir), "--dry-run", "--set", "optimizers.grid.lr=0.01"])
    assert result.exit_code == 2 and "optimizers.grid[beta3=0,rho=0.1].lr: null there, 0.01 given" in result.output
    # --set by the sweep's name reaches the same contenders in the sweep and in config.yaml
    for source in (config, run_dir / "config.yaml"):
        result = invoke("run", str(source), "--dry-run", "--set", "optimizers.grid.lr=0.01")
        assert result.exit_code == 0, result.output
        dumped = yaml.safe_load(result.stdout)
        assert [o["name"] for o in dumped["optimizers"] if o["lr"] == 0.01] == GRID_LABELS
    result = runner.invoke(app, ["run", str(config), "--dry-run", "--set", "optimizers.pts@adam.lr=0.01"])
    assert result.exit_code == 2 and "one of the contenders the sweep 'pts' expands into" in result.output
    # in config.yaml each is an entry: a grid cell by its label, '=' and '.' in it included
    result = invoke("run", str(run_dir / "config.yaml"), "--dry-run", "--set", "optimizers.grid[beta3=0.5,rho=0.1].lr=0.01")
    assert result.exit_code == 0, result.output
    assert [o["name"] for o in yaml.safe_load(result.stdout)["optimizers"] if o["lr"] == 0.01] == ["grid[beta3=0.5,rho=0.1]"]


def test_an_interrupted_run_with_sweeps_resumes_bit_for_bit(job, tmp_path, monkeypatch):
    """Ctrl-C at step 7 of seed 1 (checkpoint at 4): the resumed records equal the uninterrupted run's."""
    _, reference = job

    def hook(info):
        if info["seed"] == 1 and info["optimizer"] == "learn" and info["step"] == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "step_hook", hook)
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml(OPTIMIZERS, checkpoint_every=4))  # the records do not depend on checkpoint_every
    assert invoke("run", str(config), "--out", str(tmp_path / "runs"), "--no-progress").exit_code == 130
    monkeypatch.setattr(train, "step_hook", None)
    run_dir = only_run_dir(tmp_path / "runs")
    result = invoke("run", "--resume", str(run_dir), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "grid[beta3=0.5,rho=0.1] from step 4" in result.stderr
    got, want = by_label(run_dir), by_label(reference)
    assert sorted(got) == sorted(want)
    for key in want:
        assert strip(got[key]) == strip(want[key]), key
    a = json.loads((run_dir / "summary.json").read_text())["analysis"]
    assert a == json.loads((reference / "summary.json").read_text())["analysis"]


# -- the report, from the run's own metrics ------------------------------------------------------------------


def finals(run_dir: Path) -> dict[str, dict[int, float]]:
    """Label -> seed -> final validation loss, read from metrics.jsonl."""
    out: dict[str, dict[int, float]] = {}
    for (label, seed), recs in by_label(run_dir).items():
        last = max(recs, key=lambda r: r["step"])
        assert last["step"] == STEPS and last["val_loss"] is not None
        out.setdefault(label, {})[seed] = last["val_loss"]
    return out


def t_interval(deltas: list[float]) -> tuple[float, float]:
    n = len(deltas)
    mean = sum(deltas) / n
    s = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1))
    return scipy_stats.t.interval(0.95, n - 1, loc=mean, scale=s / math.sqrt(n))


def test_the_report_answers_from_the_runs_metrics(job):
    _, run_dir = job
    f = finals(run_dir)
    a = json.loads((run_dir / "summary.json").read_text())["analysis"]
    fixed = ["pts@adam", "pts@yogi", "hand", *GRID_LABELS]
    assert a["roles"] == {"fixed": fixed, "learning": ["learn"], "baseline": ["adam", "adamw"]}
    mean = {lb: (f[lb][0] + f[lb][1]) / 2 for lb in fixed}
    best = min(fixed, key=lambda lb: mean[lb])
    assert a["best_fixed"]["optimizer"] == best and a["best_fixed"]["final_val_loss"] == pytest.approx(mean[best], abs=1e-15)
    # the noise floor: the two contenders held at Adam's point against torch's Adam
    assert [(p["family"], p["baseline"]) for p in a["noise_floor"]["pairs"]] == [("pts@adam", "adam"), ("hand", "adam")]
    d = [f["pts@adam"][s] - f["adam"][s] for s in (0, 1)]
    floor = math.sqrt((d[0] ** 2 + d[1] ** 2) / 2)
    assert a["noise_floor"]["floor"] == pytest.approx(floor, rel=1e-12)
    learn = a["learning"]["learn"]
    for got, other in [(learn["regret"], best), (learn["vs_baselines"]["adam"], "adam"), (learn["vs_baselines"]["adamw"], "adamw")]:
        deltas = [f["learn"][s] - f[other][s] for s in (0, 1)]
        assert got["n"] == 2 and got["deltas"] == pytest.approx(deltas, abs=1e-15)
        low, high = t_interval(deltas)
        assert (got["low"], got["high"]) == pytest.approx((low, high), rel=1e-9)
        assert got["below_floor"] == (abs(sum(deltas) / 2) < floor)
    # where the learned coefficients end: the mean over seeds of the last record's, against the best point's
    pos = learn["position"]
    last = {s: max(by_label(run_dir)[("learn", s)], key=lambda r: r["step"])["coefficients"] for s in (0, 1)}
    best_coefs = by_label(run_dir)[(best, 0)][-1]["coefficients"]
    boxes = {"beta1": math.nextafter(1.0, 0.0), "beta2": math.nextafter(1.0, 0.0), "beta3": 0.99, "c": 1.0, "rho": 1.0}
    squares = 0.0
    for name in ("beta1", "beta2", "beta3", "c", "rho"):
        final = (last[0][name] + last[1][name]) / 2
        entry = pos["coefficients"][name]
        assert entry["final"] == pytest.approx(final, abs=1e-12) and entry["best"] == pytest.approx(best_coefs[name], abs=1e-12)
        assert entry["offset_box"] == pytest.approx((final - best_coefs[name]) / boxes[name], rel=1e-6, abs=1e-12)
        squares += ((final - best_coefs[name]) / boxes[name]) ** 2
    assert pos["distance_box"] == pytest.approx(math.sqrt(squares), rel=1e-6)
    assert a["vs_baseline"]["learn"]["deltas"] == pytest.approx([f["learn"][s] - f["adam"][s] for s in (0, 1)], abs=1e-15)


def test_plots_are_written_with_captions_and_the_landscape_draws_the_grid(job):
    _, run_dir = job
    summary = json.loads((run_dir / "summary.json").read_text())
    files = [p["file"] for p in summary["plots"]]
    assert files == ["val_loss.png", "train_loss.png", "coefficients.png", "deltas.png", "landscape-grid.png"]
    md = (run_dir / "summary.md").read_text()
    for p in summary["plots"]:
        data = (run_dir / p["file"]).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, p["file"]
        assert f"- `{p['file']}`: {p['caption']}" in md
    land = summary["analysis"]["landscapes"]
    assert len(land) == 1 and land[0]["over"] == ["beta3", "rho"] and land[0]["paths"] == ["learn"]
    assert land[0]["x"] == GRID["beta3"] and land[0]["y"] == GRID["rho"]
    f = finals(run_dir)
    for i, rho in enumerate(GRID["rho"]):
        for j, beta3 in enumerate(GRID["beta3"]):
            label = f"grid[beta3={beta3:g},rho={rho:g}]"
            assert land[0]["labels"][i][j] == label
            assert land[0]["values"][i][j] == pytest.approx(statistics.fmean(f[label].values()), abs=1e-15)
    assert summary["analysis"]["landscape_skipped"] == []
    for words in ("**Best fixed point**", "**Noise floor**", "(regret)", "95% interval", "Distance in box units"):
        assert words in md


def test_report_over_directories_split_by_seed_equals_the_run_over_both(job, tmp_path):
    config, whole = job
    for seed in (0, 1):
        assert invoke("run", str(config), "--out", str(tmp_path / f"s{seed}"), "--seeds", f"{seed},", "--no-progress").exit_code == 0
    parts = [str(only_run_dir(tmp_path / f"s{seed}")) for seed in (0, 1)]
    result = invoke("report", *parts, "--out", str(tmp_path / "joined"))
    assert result.exit_code == 0, result.output
    joined = json.loads((tmp_path / "joined" / "summary.json").read_text())
    alone = json.loads((whole / "summary.json").read_text())
    assert joined["analysis"] == alone["analysis"]
    assert [p["file"] for p in joined["plots"]] == [p["file"] for p in alone["plots"]]
    assert (tmp_path / "joined" / "landscape-grid.png").read_bytes()[:8] == PNG
    section = lambda md: md.split("## What the results say")[1].split("## Plots")[0]  # noqa: E731
    assert section((tmp_path / "joined" / "summary.md").read_text()) == section((whole / "summary.md").read_text())


# -- the analysis on numbers written here ---------------------------------------------------------------------


def test_the_paired_interval_is_students_t():
    a = {0: 1.50, 1: 1.42, 2: 1.61, 3: 1.55, 7: 1.0}  # seed 7: the reference has no run there
    b = {0: 1.47, 1: 1.45, 2: 1.52, 3: 1.50, 5: 2.0}  # seed 5: the contender has none
    d = paired(a, b, floor=0.05)
    deltas = [0.03, -0.03, 0.09, 0.05]
    assert d["n"] == 4 and d["seeds"] == [0, 1, 2, 3] and d["deltas"] == pytest.approx(deltas, abs=1e-12)
    assert d["mean"] == pytest.approx(0.035, abs=1e-12)
    assert (d["low"], d["high"]) == pytest.approx(t_interval(deltas), rel=1e-9)
    assert d["excludes_zero"] is False and d["below_floor"] is True and d["resolved"] is False
    # n = 1: a mean, no interval; no pair: nothing
    one = paired({0: 2.0}, {0: 1.5})
    assert one["n"] == 1 and one["mean"] == 0.5 and one["low"] is None and one["resolved"] is False
    assert paired({0: 1.0}, {1: 1.0})["n"] == 0
    # a diverged seed is counted apart, not paired
    nan = paired({0: 1.0, 1: math.nan, 2: 1.2}, {0: 0.9, 1: 1.0, 2: 1.0})
    assert nan["n"] == 2 and nan["non_finite"] == 1


def synthetic(cfg, finals: dict[tuple[str, int], float], coefs: dict[str, dict[str, float]]) -> list[dict]:
    """metrics.jsonl records of complete runs with the given final validation losses."""
    out = []
    for (label, seed), final in finals.items():
        out.append({"step": 0, "optimizer": label, "seed": seed, "train_loss": None, "val_loss": 4.0, "time": 0.0, "train_time": 0.0})
        last = {"step": cfg.steps, "optimizer": label, "seed": seed, "train_loss": final, "val_loss": final, "time": 1.0,
                "train_time": 1.0, "lr": 1e-3}
        if label in coefs:
            last["coefficients"] = coefs[label]
        out.append(last)
    return out


def synthetic_config():
    return build_config({
        "steps": 2, "seeds": [0, 1, 2], "optimizers": [
            {"name": "adam", "kind": "adam"},
            {"name": "p", "kind": "mada", "points": ["adam", "yogi"]},
            {"name": "g", "kind": "mada", "point": "adam", "grid": {"beta3": [0.0, 0.5], "rho": [0.5]}},
            {"name": "learn", "kind": "mada", "point": "adam"},
            {"name": "adamw", "kind": "adamw"},
        ]})


def test_best_point_regret_floor_and_offsets_on_known_numbers():
    cfg = synthetic_config()
    F = {  # noqa: N806 - the table of final losses
        ("adam", 0): 2.000, ("adam", 1): 2.100, ("adam", 2): 2.050,
        ("p@adam", 0): 2.003, ("p@adam", 1): 2.096, ("p@adam", 2): 2.050,
        ("p@yogi", 0): 2.200, ("p@yogi", 1): 2.300, ("p@yogi", 2): 2.250,
        ("g[beta3=0,rho=0.5]", 0): 1.990, ("g[beta3=0,rho=0.5]", 1): 2.080, ("g[beta3=0,rho=0.5]", 2): 2.040,
        ("g[beta3=0.5,rho=0.5]", 0): 1.900, ("g[beta3=0.5,rho=0.5]", 1): 2.000,  # seed 2 missing: chosen on 0, 1
        ("learn", 0): 1.950, ("learn", 1): 2.060,  # seed 2 missing: paired on 0, 1 only
        ("adamw", 0): 1.952, ("adamw", 1): 2.061, ("adamw", 2): 1.0,
    }
    common = {"beta1": 0.9, "beta2": 0.99}
    coefs = {"learn": {**common, "beta3": 0.3, "c": 0.9, "rho": 0.8},
             "g[beta3=0.5,rho=0.5]": {**common, "beta3": 0.5, "c": 1.0, "rho": 0.5}}
    a = summarize(cfg, synthetic(cfg, F, coefs))["analysis"]
    best = a["best_fixed"]
    # means over seeds 0 and 1 (every fixed contender has them): g[beta3=0.5,rho=0.5] 1.95, lowest
    assert best["optimizer"] == "g[beta3=0.5,rho=0.5]" and best["common_seeds"] == [0, 1]
    assert best["final_val_loss"] == pytest.approx(1.95, abs=1e-12) and best["candidates"] == 4
    # noise floor: p@adam − adam = +0.003, −0.004, 0.000 → RMS √(25e-6 / 3)
    assert [(p["family"], p["baseline"]) for p in a["noise_floor"]["pairs"]] == [("p@adam", "adam")]
    floor = math.sqrt((0.003**2 + 0.004**2 + 0.0) / 3)
    assert a["noise_floor"]["floor"] == pytest.approx(floor, rel=1e-9)
    learn = a["learning"]["learn"]
    regret = learn["regret"]  # 1.95 − 1.90, 2.06 − 2.00
    assert regret["seeds"] == [0, 1] and regret["deltas"] == pytest.approx([0.05, 0.06], abs=1e-12)
    assert (regret["low"], regret["high"]) == pytest.approx(t_interval([0.05, 0.06]), rel=1e-9)
    assert regret["below_floor"] is False
    vs = learn["vs_baselines"]["adamw"]  # −0.002, −0.001: smaller than the floor
    assert vs["seeds"] == [0, 1] and vs["deltas"] == pytest.approx([-0.002, -0.001], abs=1e-12)
    assert vs["below_floor"] is True and vs["resolved"] is False
    pos = learn["position"]
    assert pos["coefficients"]["beta3"]["offset"] == pytest.approx(-0.2) and pos["coefficients"]["rho"]["offset"] == pytest.approx(0.3)
    assert pos["distance_box"] == pytest.approx(math.sqrt((0.2 / 0.99) ** 2 + 0.1**2 + 0.3**2), rel=1e-9)
    # the grid has two coefficients, one with a single value: a 2 × 1 landscape
    (land,) = a["landscapes"]
    assert land["x"] == [0.0, 0.5] and land["y"] == [0.5]
    assert land["values"][0] == pytest.approx([statistics.fmean([1.99, 2.08, 2.04]), 1.95], abs=1e-12)


def test_the_landscape_is_skipped_with_its_reason(tmp_path):
    from metaopt.jobs.plots import make_plots
    from metaopt.jobs.summary import format_markdown

    for grid, reason in (({"beta3": [0.0, 0.5]}, "sweeps 1 coefficient (beta3); a landscape is drawn over exactly two"),
                         ({"beta3": [0.0], "c": [1.0], "rho": [0.5]}, "sweeps 3 coefficients (beta3, c, rho)"),
                         (None, "no grid")):
        sweep = [{"name": "g", "kind": "mada", "grid": grid}] if grid else []
        cfg = build_config({"steps": 2, "seeds": [0], "optimizers": [{"name": "adam", "kind": "adam"}, *sweep]})
        finals = {(o.label, 0): 2.0 for o in cfg.optimizers}
        recs = synthetic(cfg, finals, {})
        summary = summarize(cfg, recs)
        out = tmp_path / str(len(grid or {}))
        out.mkdir()
        make_plots(cfg, recs, out, summary)
        assert not list(out.glob("landscape*"))
        assert [p["file"] for p in summary["plots"]][-1] == "deltas.png"
        assert (out / "deltas.png").read_bytes()[:8] == PNG
        assert reason in format_markdown(summary).split("- no landscape: ")[1]


# -- refused before anything starts --------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "field", "words"), [
    ({"kind": "mada", "points": ["adam", "adm"]}, "optimizers.1.points.1", "its points: ['adam', 'adan', 'amsgrad', 'yogi']"),
    ({"kind": "mada", "grid": {"beta4": [0.1]}}, "optimizers.1.grid.beta4", "its coefficients: ['beta1', 'beta2', 'beta3', 'c', 'rho']"),
    ({"kind": "mada", "grid": {"beta3": [0.5, 1.5]}}, "optimizers.1.grid.beta3.1", "beta3=1.5 lies outside its box [0, 0.99]"),
    ({"kind": "mada", "at": {"rho": -0.5}}, "optimizers.1.at.rho", "rho=-0.5 lies outside its box [0, 1]"),
    ({"kind": "mada", "at": {"gamma": 0.5}}, "optimizers.1.at.gamma", "has no coefficient 'gamma'"),
    ({"kind": "adamw", "grid": {"beta3": [0.5]}}, "optimizers.1.grid", "the torch optimizer adamw has no coefficients"),
    ({"kind": "torch.optim:SGD", "points": ["adam"]}, "optimizers.1.points", "has no coefficients to hold"),
    ({"kind": "adam", "at": {"beta3": 0.5}}, "optimizers.1.at", "applies to metaopt families"),
    ({"kind": "mada", "points": ["adam"], "hypergrad": {"mode": "one_step"}}, "optimizers.1.hypergrad.mode",
     "a sweep holds each of its contenders fixed"),
    ({"kind": "mada", "grid": {"beta3": []}}, "optimizers.1.grid.beta3", "an empty list"),
    ({"kind": "mada", "grid": {}}, "optimizers.1.grid", "an empty grid sweeps nothing"),
    ({"kind": "mada", "points": []}, "optimizers.1.points", "an empty list sweeps nothing"),
    ({"kind": "mada", "grid": {"rho": [0.5, 0.5]}}, "optimizers.1.grid.rho.1", "rho=0.5 is listed twice"),
    ({"kind": "mada", "points": ["adam"], "grid": {"rho": [0.5]}}, "optimizers.1.grid", "points or a grid, not both"),
    ({"kind": "mada", "point": "adam", "points": ["yogi"]}, "optimizers.1.point", "drop point:"),
    ({"kind": "mada", "at": {"rho": 0.5}, "grid": {"rho": [0.1]}}, "optimizers.1.grid.rho", "also set in at:"),
    ({"name": "adam", "kind": "mada", "points": ["adam"]}, "optimizers.1.name", "two optimizers are labelled 'adam'"),
    ({"name": "m", "kind": "mada", "points": ["adam"], "sweep": {"entry": "x", "by": "points"}}, "optimizers.1.sweep",
     "cannot sweep again"),
])
def test_bad_sweeps_are_refused_naming_the_field(tmp_path, entry, field, words):
    config = tmp_path / "bad.yaml"
    config.write_text(job_yaml([{"name": "adam", "kind": "adam"}, entry]))
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "runs"), "--no-progress"])
    assert result.exit_code == 2, result.output
    line = next((ln for ln in result.output.splitlines() if ln.strip().startswith(field + " ") or ln.strip().startswith(field + ":")), None)
    assert line is not None and words in line, result.output
    assert not (tmp_path / "runs").exists()


def test_a_contender_label_a_sweep_also_makes_is_refused(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(job_yaml([{"name": "m@adam", "kind": "mada", "point": "adam"}, {"name": "m", "kind": "mada", "points": ["adam"]}]))
    result = runner.invoke(app, ["run", str(config), "--dry-run"])
    assert result.exit_code == 2
    assert "optimizers.1.name" in result.output and "two contenders are labelled 'm@adam' (entries #0 and #1 (the sweep 'm'))" in result.output


def test_the_docs_example_expands_as_documented():
    """docs/cli.md's space.yaml: the contenders, labels and roles the page describes."""
    import re

    from metaopt.jobs.analysis import role

    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    block = re.search(r"^```yaml\n(# space\.yaml.*?)^```", text, re.S | re.M)
    assert block, "docs/cli.md lost its space.yaml example"
    cfg = build_config(yaml.safe_load(block.group(1)))
    grid = [f"grid[beta3={b:g},rho={r:g}]" for b in (0.0, 0.5, 0.9) for r in (0.1, 0.5, 1.0)]
    assert [o.label for o in cfg.optimizers] == [
        "adamw", "adam", "mada@adam", "mada@amsgrad", "mada@yogi", "mada@adan", *grid, "mada-learned", "mada-from-here", "held"]
    roles = {o.label: role(o) for o in cfg.optimizers}
    assert roles["held"] == roles["mada@yogi"] == roles[grid[4]] == "fixed"
    assert roles["mada-learned"] == roles["mada-from-here"] == "learning" and roles["adamw"] == "baseline"
    assert cfg.optimizers[-2].family(cfg.betas).space["c"].init == 0.0  # at: starts there
    from metaopt.jobs.analysis import floor_pairs

    assert [(f.label, b.label) for f, b in floor_pairs(cfg)] == [("mada@adam", "adam")]


def test_points_with_at_say_so_in_their_labels():
    cfg = build_config({"optimizers": [{"name": "m", "kind": "mada", "points": ["adam", "yogi"], "at": {"beta1": 0.8}}]})
    assert [o.label for o in cfg.optimizers] == ["m@adam[beta1=0.8]", "m@yogi[beta1=0.8]"]
    yogi = cfg.optimizers[1].family(cfg.betas).space
    assert (yogi["beta1"].init, yogi["c"].init) == (0.8, 0.0)  # the point, then at: over it
