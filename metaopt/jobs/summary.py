"""The summary of a job, computed from its ``metrics.jsonl`` records.

Per run (optimizer × seed) and per optimizer (mean ± std over seeds), written as
``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import metaopt
from metaopt.jobs.analysis import analyze, role
from metaopt.jobs.schema import JobConfig, format_number


def _stats(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    out: dict[str, Any] = {"n": len(values), "values": values}
    if finite:
        out["mean"] = statistics.fmean(finite)
        out["std"] = statistics.stdev(finite) if len(finite) > 1 else None
        out["min"], out["max"] = min(finite), max(finite)
    else:
        out["mean"] = out["std"] = out["min"] = out["max"] = None
    out["non_finite"] = len(values) - len(finite)
    return out


def run_summary(records: list[dict[str, Any]], steps: int, window: int) -> dict[str, Any]:
    """What one run (one optimizer, one seed) reached.

    ``window``: how many final steps the final training loss averages over.
    """
    records = sorted(records, key=lambda r: r["step"])
    last = records[-1]
    vals = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    final_step, final_val = vals[-1] if vals else (None, None)
    finite_vals = [(v, s) for s, v in vals if math.isfinite(v)]
    best_val, best_step = min(finite_vals) if finite_vals else (None, None)
    trained = [r for r in records if r.get("train_loss") is not None]
    tail = [r["train_loss"] for r in trained[-window:]]
    steps_done = last["step"]
    train_time = last.get("train_time") or 0.0
    out = {
        "optimizer": last["optimizer"],
        "seed": last["seed"],
        "steps_done": steps_done,
        "complete": steps_done >= steps,
        "final_val_loss": final_val,
        "final_val_step": final_step,
        "best_val_loss": best_val,
        "best_val_step": best_step,
        "final_train_loss": statistics.fmean(tail) if tail else None,
        "final_train_window": len(tail),
        "train_time_s": train_time,
        "wall_time_s": last.get("time"),
        "steps_per_s": steps_done / train_time if train_time > 0 else None,
    }
    if "coefficients" in last:
        out["coefficients"] = last["coefficients"]
        skipped = [r["skipped_hypersteps"] for r in records if "skipped_hypersteps" in r]
        out["skipped_hypersteps"] = skipped[-1] if skipped else 0
    return out


def planned_runs(cfg: JobConfig) -> set[tuple[str, int]]:
    """The runs (optimizer label, seed) a config plans: every optimizer on every seed, or its shard's."""
    return set(cfg.units())


def summarize(cfg: JobConfig, records: list[dict[str, Any]], *, interrupted: bool = False, device: str | None = None,
              planned: set[tuple[str, int]] | None = None) -> dict[str, Any]:
    """Per-run and per-optimizer results.

    The first optimizer of the config is the baseline of the paired comparisons (same seed,
    same batches). ``planned``: the runs that were to be made (default: `planned_runs`), which
    says whether the job is complete; a report joined from several directories plans only what
    each of them planned.
    """
    by_run: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        by_run[(r["optimizer"], r["seed"])].append(r)
    window = min(cfg.eval_interval, cfg.steps)
    runs = {key: run_summary(rs, cfg.steps, window) for key, rs in by_run.items()}
    labels = [o.label for o in cfg.optimizers]
    baseline = labels[0]
    planned = planned_runs(cfg) if planned is None else planned
    expected = len(planned)
    complete = sum(1 for key, r in runs.items() if r["complete"] and key in planned)
    per_opt: dict[str, Any] = {}
    for o in cfg.optimizers:
        label = o.label
        mine = [runs[(label, s)] for s in cfg.seeds if (label, s) in runs]
        entry: dict[str, Any] = {
            "kind": o.kind,
            "role": role(o),
            "point": o.point,
            "at": dict(o.at),
            "sweep": None if o.sweep is None else o.sweep.entry,
            "hypergrad": o.hypergrad.mode if not o.is_torch else None,
            "lr": o.lr if o.lr is not None else cfg.lr,  # the peak of its schedule
            "schedule": o.schedule.describe(),
            "runs": len(mine),
            "complete_runs": sum(r["complete"] for r in mine),
            "seeds": [r["seed"] for r in mine],
        }
        for key in ("final_val_loss", "best_val_loss", "final_train_loss", "steps_per_s"):
            entry[key] = _stats([r[key] for r in mine])
        if label != baseline:
            diffs, wins = [], 0
            for r in mine:
                b = runs.get((baseline, r["seed"]))
                # paired only where both were scored at the same step
                if b and r["final_val_loss"] is not None and b["final_val_loss"] is not None and r["final_val_step"] == b["final_val_step"]:
                    d = r["final_val_loss"] - b["final_val_loss"]
                    diffs.append(d)
                    wins += d < 0
            entry["delta_final_val_vs_baseline"] = _stats(diffs)
            entry["wins_vs_baseline"] = {"wins": wins, "paired": len(diffs)}
        learned = list(o.learned_keys()) if not o.is_torch else []
        if learned:
            entry["learned"] = learned
            entry["final_coefficients"] = {
                n: _stats([r["coefficients"][n] for r in mine if "coefficients" in r and n in r["coefficients"]]) for n in learned
            }
            entry["skipped_hypersteps"] = sum(r.get("skipped_hypersteps", 0) for r in mine)
        per_opt[label] = entry
    return {
        "name": cfg.name,
        "interrupted": interrupted or complete < expected,
        "complete_runs": complete,
        "expected_runs": expected,
        "steps": cfg.steps,
        "seeds": list(cfg.seeds),
        "baseline": baseline,
        "final_train_window": window,
        "device": device,
        "versions": {"metaopt": metaopt.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "optimizers": per_opt,
        "analysis": analyze(cfg, runs, baseline),
        "plots": [],  # filled in by make_plots: {"file", "caption"} per plot
        "runs": [runs[k] for k in sorted(runs, key=lambda k: (cfg.seeds.index(k[1]) if k[1] in cfg.seeds else 0, labels.index(k[0]) if k[0] in labels else 0))],
    }


def _pm(s: dict[str, Any], digits: int = 4) -> str:
    if s.get("mean") is None:
        return "nan" if s.get("n") else "—"
    text = f"{s['mean']:.{digits}f}"
    if s.get("std") is not None:
        text += f" ± {s['std']:.{digits}f}"
    if s.get("non_finite"):
        text += f" ({s['non_finite']} nan)"
    return text


def _signed(s: dict[str, Any] | None) -> str:
    if s is None or s.get("mean") is None:
        return "—"
    return f"{s['mean']:+.4f}" + (f" ± {s['std']:.4f}" if s.get("std") is not None else "")


def format_table(summary: dict[str, Any]) -> str:
    """The per-optimizer table (Markdown; reads well in a terminal too)."""
    base = summary["baseline"]
    head = ["optimizer", "runs", "final val loss", "best val loss", "final train loss", f"Δ final val vs {base}", "wins", "steps/s", "learned coefficients (final)"]
    rows = []
    for label, e in summary["optimizers"].items():
        delta = e.get("delta_final_val_vs_baseline")
        wins = e.get("wins_vs_baseline")
        coefs = ", ".join(f"{n} {_pm(s, 4)}" for n, s in e.get("final_coefficients", {}).items())
        rows.append([
            label,
            f"{e['complete_runs']}/{e['runs']}" if e["complete_runs"] != e["runs"] else str(e["runs"]),
            _pm(e["final_val_loss"]),
            _pm(e["best_val_loss"]),
            _pm(e["final_train_loss"]),
            _signed(delta),
            "—" if wins is None else f"{wins['wins']}/{wins['paired']}",
            _pm(e["steps_per_s"], 1),
            coefs or "—",
        ])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def format_runs_table(summary: dict[str, Any]) -> str:
    """The per-run table (Markdown): one row per (optimizer, seed), its losses, speed and final coefficients."""
    head = ["optimizer", "seed", "steps", "final val loss", "best val loss (step)", "final train loss", "steps/s", "coefficients (final, learned)"]
    rows = []
    for r in summary["runs"]:
        learned = summary["optimizers"].get(r["optimizer"], {}).get("learned", [])
        coefs = ", ".join(f"{n} {r['coefficients'][n]:.4f}" for n in learned if n in r.get("coefficients", {}))
        f = lambda v, d=4: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
        rows.append([
            r["optimizer"], str(r["seed"]), str(r["steps_done"]), f(r["final_val_loss"]),
            f"{f(r['best_val_loss'])} ({r['best_val_step']})", f(r["final_train_loss"]), f(r["steps_per_s"], 1), coefs or "—",
        ])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def format_markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: the job's title, how to read the numbers, the per-optimizer, contender and per-run tables."""
    status = (
        f"**interrupted**: {summary['complete_runs']} of {summary['expected_runs']} runs complete; "
        "the numbers below are from what was logged.\n\n"
        if summary["interrupted"]
        else ""
    )
    return (
        f"# {summary['name']}\n\n{status}"
        f"{summary['steps']} steps, seeds {summary['seeds']}, device {summary['device']}; mean ± std over seeds. "
        f"Final val loss: at the last evaluation; final train loss: mean over the last "
        f"{summary['final_train_window']} steps; Δ and wins: paired by seed against {summary['baseline']} "
        f"(negative Δ = lower loss than {summary['baseline']}).\n\n"
        f"{format_table(summary)}\n\n"
        + (f"{format_analysis(summary)}\n\n" if "analysis" in summary else "")
        + (f"{format_plots(summary)}\n\n" if summary.get("plots") else "")
        + f"## Contenders\n\n{format_contenders_table(summary)}\n\n"
        f"## Runs\n\n{format_runs_table(summary)}\n"
    )


def _signed4(x: float, digits: int = 4) -> str:
    """``+0.0123``; a value that would round to 0 there in two significant digits (``+3.1e-07``), 0 as ``0``."""
    if x == 0:
        return "0"
    return f"{x:+.{digits}f}" if abs(x) >= 0.5 * 10**-digits else f"{x:+.1e}"


def _interval(d: dict[str, Any]) -> str:
    return "—" if d.get("low") is None else f"[{_signed4(d['low'])}, {_signed4(d['high'])}]"


def verdict(d: dict[str, Any]) -> str:
    """How a paired Δ reads: resolved lower or higher, or why it is not resolved."""
    if not d["n"]:
        return "no paired seeds"
    if d["low"] is None:
        return f"no interval (n={d['n']})"
    if d["below_floor"]:
        return "not resolved: below the noise floor"
    if not d["excludes_zero"]:
        return "not resolved: the interval includes 0"
    return "lower, resolved" if d["mean"] < 0 else "higher, resolved"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def _values(values: dict[str, float]) -> str:
    return ", ".join(f"{n}={format_number(round(v, 6))}" for n, v in values.items())


def format_analysis(summary: dict[str, Any]) -> str:
    """The report's answers (Markdown): best fixed point, noise floor, regret and Δs, where the learned coefficients end."""
    a = summary["analysis"]
    roles = "; ".join(f"{r}: {', '.join(f'`{lb}`' for lb in lbs)}" for r, lbs in a["roles"].items() if lbs)
    out = ["## What the results say", "",
           f"Method: {a['method']}. Seeds on one side only are left out; n says how many pairs count.", "",
           f"Roles: {roles}.", ""]
    best = a["best_fixed"]
    if best is None:
        out.append("**Best fixed point**: none (no family contender is held fixed with a complete run: add a "
                   "`points:` or `grid:` sweep, or an entry with `hypergrad: {mode: none}`).")
    else:
        where = best["kind"] + (f" at {best['point']}" if best["point"] else "") + (
            f", {_values(best['at'])}" if best["at"] else "")
        chosen = (f"the seeds every fixed contender completed, {best['common_seeds']}" if best["common_seeds"]
                  else "each one's own seeds (the fixed contenders share no seed)")
        out.append(
            f"**Best fixed point**: `{best['optimizer']}` ({where}): final val loss {best['final_val_loss']:.4f}, "
            f"the lowest mean of {best['candidates']} fixed contender{'s' if best['candidates'] > 1 else ''}, "
            f"over {chosen}. Its coefficients: {_values(best.get('coefficients', {})) or '—'}. It is chosen and scored "
            "on the same seeds: with many candidates its mean is optimistic, and the regrets below lean high."
        )
    out.append("")
    nf = a["noise_floor"]
    if not nf["pairs"]:
        out.append("**Noise floor**: none measured. It needs a family held at a named point beside the torch "
                   "optimizer of that name, at the same lr and schedule (`{kind: mada, points: [adam]}` with "
                   "`{kind: adam}`): the same update, so their differences are float rounding. No Δ below is "
                   "checked against a floor.")
    else:
        lines = [f"`{p['family']}` against `{p['baseline']}`: Δ per seed "
                 f"{', '.join(_signed4(d) for d in p['paired']['deltas'])} (n={p['paired']['n']}), "
                 f"RMS {_signed4(p['rms']).lstrip('+')}"
                 for p in nf["pairs"]]
        out.append(f"**Noise floor**: {'; '.join(lines)}. These pairs compute the same update, so their differences "
                   f"are float rounding grown over training. The floor is the largest RMS, "
                   f"**{_signed4(nf['floor']).lstrip('+')}**: a Δ whose mean is smaller is marked *below the noise "
                   "floor* (not resolved)."
                   + (" Here the pairs ran bit for bit alike, so the floor is 0 and says nothing about rounding on "
                      "another machine, thread count or longer run." if nf["floor"] == 0 else ""))
    out.append("")
    if not a["learning"]:
        out.append("No contender learns its coefficients: no regret to report.")
        return "\n".join(out)
    rows = []
    for label, e in a["learning"].items():
        comparisons = []
        if e["regret"] is not None:
            comparisons.append((f"best fixed `{best['optimizer']}` (regret)", e["regret"]))
        comparisons += [(f"`{b}`", d) for b, d in e["vs_baselines"].items()]
        for against, d in comparisons:
            rows.append([f"`{label}`", against, str(d["n"]), "—" if d["mean"] is None else _signed4(d["mean"]),
                         _interval(d), verdict(d)])
    out += ["### Learning contenders: regret and Δ", "",
            "Δ = the learning contender − the other, final validation loss (negative: the learning contender is "
            "lower); regret: its Δ against the best fixed point.", "",
            _md_table(["contender", "against", "n", "Δ (mean)", "95% interval", "verdict"], rows), ""]
    rows, distances = [], []
    for label, e in a["learning"].items():
        pos = e["position"]
        if pos is None:
            continue
        if not pos["comparable"]:
            distances.append(f"`{label}`: not compared ({pos['reason']})")
            continue
        for key, c in pos["coefficients"].items():
            rows.append([f"`{label}`", key, f"{c['final']:.4f}", f"{c['best']:.4f}", _signed4(c["offset"]),
                         f"[{c['box'][0]:g}, {c['box'][1]:g}]", "—" if c["offset_box"] is None else _signed4(c["offset_box"], 3)])
        distances.append(f"`{label}` {_signed4(pos['distance_box'], 3).lstrip('+')}")
    if rows or distances:
        out += ["### Where the learned coefficients end, against the best fixed point", ""]
        if rows:
            out += [_md_table(["contender", "coefficient", "final (mean over seeds)", "best fixed", "offset", "box",
                               "offset / box width"], rows), ""]
        out.append("Distance in box units (√Σ (offset / box width)² over the coefficients): " + "; ".join(distances) + ".")
    return "\n".join(out)


def format_plots(summary: dict[str, Any]) -> str:
    """The plots of the run directory (Markdown), one caption line each, and the landscapes not drawn."""
    lines = ["## Plots", ""]
    lines += [f"- `{p['file']}`: {p['caption']}" for p in summary["plots"]]
    lines += [f"- no landscape: {why}" for why in summary.get("analysis", {}).get("landscape_skipped", [])]
    return "\n".join(lines)


def format_contenders_table(summary: dict[str, Any]) -> str:
    """What each contender ran (Markdown): its kind (with its point and ``at`` values), peak lr and lr schedule."""
    head = ["optimizer", "kind", "lr (peak)", "schedule"]
    rows = [
        [label,
         f"{e['kind']}" + (f" @{e['point']}" if e.get("point") else "") + (f" {{{_values(e['at'])}}}" if e.get("at") else ""),
         "—" if e.get("lr") is None else f"{e['lr']:g}", e.get("schedule") or "constant"]
        for label, e in summary["optimizers"].items()
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def write_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """Write ``summary.json`` and ``summary.md`` into ``run_dir``."""
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (run_dir / "summary.md").write_text(format_markdown(summary), encoding="utf-8")
