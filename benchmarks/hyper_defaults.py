"""Which hyper-optimizer a family gets when its author chooses none: the alternatives, measured.

    python benchmarks/hyper_defaults.py [--seeds 5] [--steps 400] [--json FILE] [--only NAME,...]
                                        [--tasks two-scales,belief,padam,spikes]

Each contender runs in a fresh process, one thread, on four tasks and the same seeds:

* ``two-scales``: a synthetic family whose two coefficients' hyper-gradients differ by 1e9
  (Δ = -η (a + 1e-9 b) g on a noisy least-squares problem, float32). Do both move, and how
  far does the largest single hyper-step take a coefficient, as a fraction of its box?
* ``belief``: the family a new author might write, Adam ↔ AdaBelief (Zhuang et al., NeurIPS
  2020): the second moment averages s = κ g² + (1-κ)(g - m)², κ ∈ [0, 1] learned, and β1 ∈
  [0, 0.99] learned too. κ's one-step tangent passes through v and so carries a factor of
  (1-β2): its hyper-gradient is orders of magnitude below β1's. A 20-64-64-1 tanh MLP on a
  teacher network's data.
* ``padam``: Padam (Chen & Gu, 2018), its exponent p ∈ [0, 0.5] learned, on the same MLP task.
* ``spikes``: the hyper-step alone on a float32 coefficient, fed hyper-gradients whose squares
  underflow, then small ones around a loss spike: does any step jump?

Reported per task: the validation loss at the end (paired by seed against the coefficients held
fixed at their start), each coefficient's distance from its start and the largest single move,
both as fractions of its box, the median |h| of each coefficient, and the skipped hyper-steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Adam's ε for the scale-free contenders: the square root of float32's smallest normal number,
#: so that h² of any hyper-gradient above it is still a normal float32 (see the ``spikes`` task)
EPS = 1e-19
BOX = {"lr_scale": "box"}
BOUND = {"max_move": 1e-2}

#: contender -> the hyper-optimizer's fields (None: the coefficients fixed at their start;
#: "scale_free": ``OneStep.scale_free()``, the default of a family that chooses none)
CONTENDERS: dict[str, dict | str | None] = {
    "fixed": None,
    "sgd": {},  # OneStep(): the engine's default before this benchmark
    "adam-eps1e-8": {"optimizer": "adam", "lr": 1e-3, **BOX, "eps": 1e-8},
    "adam-eps1e-30": {"optimizer": "adam", "lr": 1e-3, **BOX, "eps": 1e-30},
    "adam-eps1e-30+bound": {"optimizer": "adam", "lr": 1e-3, **BOX, "eps": 1e-30, **BOUND},
    "adam": {"optimizer": "adam", "lr": 1e-3, **BOX, "eps": EPS},
    "adam+bound": {"optimizer": "adam", "lr": 1e-3, **BOX, "eps": EPS, **BOUND},
    "adam-lr3e-3+bound": {"optimizer": "adam", "lr": 3e-3, **BOX, "eps": EPS, **BOUND},
    "adam-lr1e-2+bound": {"optimizer": "adam", "lr": 1e-2, **BOX, "eps": EPS, **BOUND},
    # Adam with β1 = β2 = 0 is sign-SGD: lr · h / |h| (Rprop's sign step without its step-size
    # adaptation; Riedmiller & Braun, 1993)
    "sign": {"optimizer": "adam", "betas": (0.0, 0.0), "lr": 1e-3, **BOX, "eps": EPS},
    # the default chosen from these measurements: sign, lr 3e-3 of the box, bounded
    "default": "scale_free",
    # Adam with β1 = 0: SGD on h divided by its running RMS (RMSprop with bias correction)
    "rms": {"optimizer": "adam", "betas": (0.0, 0.999), "lr": 1e-3, **BOX, "eps": EPS},
    "rms+bound": {"optimizer": "adam", "betas": (0.0, 0.999), "lr": 1e-3, **BOX, "eps": EPS, **BOUND},
}
TASKS = ("two-scales", "belief", "padam", "spikes")


# -- the families ------------------------------------------------------------------------------
def families():
    import torch
    from pydantic import Field

    from metaopt import Coefficient, CoefficientSpace, Family, Hyperparameters

    class TwoScales(Family):
        """Δ = -η (a + 1e-9 b) g: b's hyper-gradient is 1e-9 times a's."""

        name = "two_scales"
        elementwise = True

        def __init__(self):
            self.space = CoefficientSpace(a=Coefficient(init=0.2, low=0.0, high=1.0),
                                          b=Coefficient(init=0.2, low=0.0, high=1.0))

        def init(self, param, grad, group):
            return {}

        def update(self, grad, param, state, coefficients, group, step):
            return -group["lr"] * (coefficients["a"] + 1e-9 * coefficients["b"]) * grad, {}

    class BeliefHyperparameters(Hyperparameters):
        """Adam's β2 and ε."""

        beta2: float = Field(0.999, ge=0.0, lt=1.0)
        eps: float = Field(1e-8, ge=0.0)

    class AdamToBelief(Family):
        """Adam at κ = 1, AdaBelief at κ = 0: v averages κ g² + (1-κ)(g - m)²."""

        name = "adam_to_belief"
        hyperparameters = BeliefHyperparameters
        elementwise = True

        def __init__(self):
            self.space = CoefficientSpace(kappa=Coefficient(init=0.5, low=0.0, high=1.0),
                                          beta1=Coefficient(init=0.9, low=0.0, high=0.99))

        def init(self, param, grad, group):
            return {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}

        def update(self, grad, param, state, coefficients, group, step):
            kappa, b1, b2 = coefficients["kappa"], coefficients["beta1"], group["beta2"]
            m = b1 * state["exp_avg"] + (1 - b1) * grad
            s = kappa * grad * grad + (1 - kappa) * (grad - m) ** 2
            v = b2 * state["exp_avg_sq"] + (1 - b2) * s
            m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
            return -group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]), {"exp_avg": m, "exp_avg_sq": v}

    return TwoScales, AdamToBelief


# -- one contender, in its own process ---------------------------------------------------------
def hyper_optimizer(hyper: dict | str | None):
    from metaopt import OneStep

    if hyper is None:
        return None
    return OneStep.scale_free() if hyper == "scale_free" else OneStep(**hyper)


def run_spikes(hyper: dict | None, seed: int) -> dict:
    """The hyper-step alone on a float32 coefficient in [0, 1], fed a hyper-gradient that is
    noise around a positive mean at three scales: 1e-25 (h² underflows in float32), then 1e-6,
    one spike of -1e2 (a loss spike), then 1e-6 again; 100 steps a phase."""
    import torch

    from metaopt import CoefficientSpace
    from metaopt.hyper import update as hyper_update

    phases = {"underflow": 1e-25, "small": 1e-6, "spike": None, "after": 1e-6}
    out = {"val_loss": None, "wall_s": 0.0, "skipped": 0, "coefficients": {}}
    if hyper is None:
        return out
    config = hyper_optimizer(hyper)
    space = CoefficientSpace(c={"init": 0.5, "low": 0.0, "high": 1.0})
    state = hyper_update.init_state(config, space, ("c",), torch.float32, "cpu")
    gen = torch.Generator().manual_seed(2000 + seed)
    moves: dict[str, list[float]] = {}
    for phase, scale in phases.items():
        for _ in range(1 if scale is None else 100):
            h = torch.tensor([-1e2]) if scale is None else scale * (0.5 + torch.randn(1, generator=gen))
            new = hyper_update.step(config, state, h)
            moves.setdefault(phase, []).append((new.coefficients - state.coefficients).item())
            state = new
    out["skipped"] = int(state.skipped.item())
    for phase, m in moves.items():
        out["coefficients"][phase] = {"start": 0.0, "end": sum(m), "moved": abs(sum(m)),
                                      "largest_move": max(abs(x) for x in m), "median_abs_h": 0.0}
    return out


def run_task(task: str, hyper: dict | None, seed: int, steps: int) -> dict:
    import torch

    if task == "spikes":
        return run_spikes(hyper, seed)

    from metaopt import MetaOptimizer
    from metaopt.plugins.padam import Padam

    TwoScales, AdamToBelief = families()
    gen = torch.Generator().manual_seed(1000 + seed)
    if task == "two-scales":
        x = torch.randn(5120, 16, generator=gen) * torch.logspace(0, -1, 16)
        y = x @ torch.randn(16, 1, generator=gen) + 0.1 * torch.randn(5120, 1, generator=gen)
        torch.manual_seed(seed)
        model = torch.nn.Linear(16, 1)
        family, group, batch = TwoScales(), {"lr": 0.5}, 32
    else:
        teacher = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        with torch.no_grad():
            for p in teacher.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            x = torch.randn(5120, 20, generator=gen)
            y = teacher(x)
            y = (y - y.mean()) / y.std() + 0.1 * torch.randn(5120, 1, generator=gen)
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                    torch.nn.Tanh(), torch.nn.Linear(64, 1))
        batch = 64
        family, group = (AdamToBelief(), {"lr": 3e-3}) if task == "belief" else (Padam(), {"lr": 1e-2})
    x_val, y_val, x, y = x[:1024], y[:1024], x[1024:], y[1024:]
    opt = MetaOptimizer(model.parameters(), family, hypergrad=hyper_optimizer(hyper), **group)
    names = list(family.space.learned)
    box = {n: family.space[n].high - family.space[n].low for n in names}
    path = [[opt.coefficients[n].item() for n in names]]  # the start in the coefficients' dtype
    hs: list[list[float]] = []
    order = torch.randint(0, x.shape[0], (steps, batch), generator=gen)
    start = time.perf_counter()
    for t in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[order[t]]), y[order[t]]).backward()
        opt.step()
        path.append([opt.coefficients[n].item() for n in names])
        if hyper is not None and t > 0:
            hs.append([abs(opt.last_hypergrad[n].item()) for n in names])
    wall = time.perf_counter() - start
    with torch.no_grad():
        val = torch.nn.functional.mse_loss(model(x_val), y_val).item()
    out = {"val_loss": val, "wall_s": wall,
           "skipped": int(opt.skipped_hypersteps.item()) if hyper is not None else 0, "coefficients": {}}
    for j, n in enumerate(names):
        series = [row[j] for row in path]
        moves = [abs(b - a) for a, b in zip(series, series[1:])]
        out["coefficients"][n] = {
            "start": series[0], "end": series[-1],
            "moved": abs(series[-1] - series[0]) / box[n],
            "largest_move": max(moves) / box[n],
            "median_abs_h": statistics.median(row[j] for row in hs) if hs else 0.0,
        }
    return out


def worker(name: str, seeds: int, steps: int, tasks: list[str], out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    hyper = CONTENDERS[name]
    results = {task: [run_task(task, hyper, seed, steps) for seed in range(seeds)] for task in tasks}
    out.write_text(json.dumps(results))


# -- the driver ---------------------------------------------------------------------------------
def _paired(runs: list[dict], reference: list[dict] | None) -> dict:
    """Mean ± sd of the per-seed difference in validation loss, and how many seeds are lower."""
    if reference is None or runs is reference:
        return {}
    deltas = [r["val_loss"] - f["val_loss"] for r, f in zip(runs, reference)]
    return {"mean": statistics.mean(deltas), "sd": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
            "lower": sum(d < 0 for d in deltas)}


def summarise(results: dict, tasks: list[str]) -> dict:
    summary: dict = {}
    for task in tasks:
        losses = task != "spikes"
        for name, res in results.items():
            runs = res[task]
            if not losses and CONTENDERS[name] is None:
                continue
            row: dict = {"skipped": sum(r["skipped"] for r in runs), "coefficients": {}}
            if losses:
                row["val_loss"] = statistics.mean(r["val_loss"] for r in runs)
                row["vs_fixed"] = _paired(runs, results.get("fixed", {}).get(task))
                row["vs_sgd"] = _paired(runs, results.get("sgd", {}).get(task))
            for n in runs[0]["coefficients"]:
                cs = [r["coefficients"][n] for r in runs]
                row["coefficients"][n] = {
                    "moved_min": min(c["moved"] for c in cs), "moved_mean": statistics.mean(c["moved"] for c in cs),
                    "largest_move": max(c["largest_move"] for c in cs),
                    "end_mean": statistics.mean(c["end"] for c in cs),
                    "median_abs_h": statistics.median(c["median_abs_h"] for c in cs),
                }
            summary.setdefault(task, {})[name] = row
    return summary


def _delta(d: dict, seeds: int) -> str:
    return f"{d['mean']:+.4f} ± {d['sd']:.4f} ({d['lower']}/{seeds})" if d else "—"


def table(summary: dict, seeds: int) -> str:
    lines = []
    for task, rows in summary.items():
        losses = task != "spikes"
        names = list(next(iter(rows.values()))["coefficients"])
        if losses:
            lines.append(f"\n{task}: {seeds} seeds; distance moved (mean, min over seeds) and largest single "
                         "move as fractions of the box; median |h| over steps")
            head = ["contender", "val loss", "Δ vs fixed (lower)", "Δ vs sgd (lower)"]
            head += [f"{n}: moved (min) / largest / abs(h)" for n in names] + ["skipped"]
        else:
            lines.append(f"\n{task}: {seeds} seeds; the hyper-step alone, float32 coefficient in [0, 1]; "
                         "per phase: distance moved (mean, min) / largest single move")
            head = ["contender"] + [f"{n}: moved (min) / largest" for n in names] + ["skipped"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in rows.items():
            cells = [name]
            if losses:
                cells += [f"{r['val_loss']:.4f}", _delta(r["vs_fixed"], seeds), _delta(r["vs_sgd"], seeds)]
            for c in r["coefficients"].values():
                cell = f"{c['moved_mean']:.3g} ({c['moved_min']:.2g}) / {c['largest_move']:.2g}"
                cells.append(cell + (f" / {c['median_abs_h']:.1e}" if losses else ""))
            lines.append("| " + " | ".join(cells + [str(r["skipped"])]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--json", default=str(HERE / "results" / "hyper_defaults.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    if args.worker:
        worker(args.worker, args.seeds, args.steps, tasks, Path(args.out))
        return

    from compare_commits import cpu  # the CPU's model, vector width and cores, as every benchmark names it

    from metaopt import OneStep

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    results, started = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            out = Path(tmp) / f"{len(results)}.json"
            cmd = [sys.executable, __file__, "--worker", name, "--out", str(out), "--seeds", str(args.seeds),
                   "--steps", str(args.steps), "--tasks", args.tasks]
            subprocess.run(cmd, check=True, env=env, cwd=HERE)
            results[name] = json.loads(out.read_text())
            print(f"{name}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    summary = summarise(results, tasks)
    print(table(summary, args.seeds))
    record = {
        "command": " ".join(["python benchmarks/hyper_defaults.py", *sys.argv[1:]]),
        "cpu": cpu(), "threads": 1, "seeds": args.seeds, "steps": args.steps, "contenders": CONTENDERS,
        "default": OneStep.scale_free().model_dump(exclude={"objective"}),
        "summary": summary, "runs": _per_seed(results), "wall_s": time.perf_counter() - started,
    }
    Path(args.json).write_text(_dumps(_rounded(record)))


def _dumps(record: dict) -> str:
    """The record as JSON, indented, with each contender's per-seed runs of a task on one line."""
    runs = record.pop("runs")
    text = json.dumps({**record, "runs": "RUNS"}, indent=1)
    def contender(name: str, tasks: dict) -> str:
        rows = ",\n".join(f"  {json.dumps(task)}: {json.dumps(r)}" for task, r in tasks.items())
        return f" {json.dumps(name)}: {{\n{rows}\n }}"

    lines = ",\n".join(contender(n, res) for n, res in runs.items())
    return text.replace('"RUNS"', "{\n" + lines + "\n}") + "\n"


def _per_seed(results: dict) -> dict:
    """Each run's loss, skips and coefficient moves: what the paired comparisons are made of."""
    def kept(run: dict) -> dict:
        moves = {n: {k: c[k] for k in ("end", "moved", "largest_move")} for n, c in run["coefficients"].items()}
        return {"val_loss": run["val_loss"], "skipped": run["skipped"], "coefficients": moves}

    return {name: {task: [kept(r) for r in runs] for task, runs in res.items()} for name, res in results.items()}


def _rounded(value):
    """``value`` with every float to 4 significant digits (the record stays small)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    main()
