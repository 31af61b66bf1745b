"""What a job's results say about its optimizer space: the report's answers, as data.

Computed from the per-run summaries (`metaopt.jobs.summary.run_summary`) and the config, and
stored under ``summary.json``'s ``analysis`` key:

* the **roles** of the contenders: a family held fixed (``hypergrad: {mode: none}``, which every
  contender of a ``points:`` or ``grid:`` sweep is), a family that learns its coefficients, or a
  baseline (a torch optimizer of any library);
* the **best fixed point**: the fixed contender with the lowest mean final validation loss;
* each learning contender's **regret** against it and its **Δ against each baseline**;
* a **noise floor**: a family held at a named point against the torch optimizer of that name
  (``mada@adam`` fixed against ``adam``: the same update, so their differences are rounding);
* where each learning contender's **final coefficients** sit relative to the best fixed point;
* the **landscape** of each two-coefficient grid (mean final validation loss per cell).

Every comparison is paired by seed (the same seed: the same initial weights and the same
batches), over the seeds where both runs are complete with a finite final validation loss; its
95% interval is Student's t on the per-seed differences (`paired`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from metaopt.jobs.schema import JobConfig, OptimizerConfig
from metaopt.jobs.contenders import default_argument

#: the confidence level of every interval
LEVEL = 0.95

METHOD = (
    "paired t: Δ per seed = contender − reference, final validation loss, over the seeds where both runs are "
    "complete with a finite loss; mean ± t(0.975, n−1) · s / √n, s the standard deviation of the Δs "
    "(scipy.stats.t); no interval for n < 2"
)


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile ``t(p, df)`` (``scipy.stats.t.ppf``)."""
    from scipy.stats import t  # imported here: scipy loads slowly and only the report needs it

    return float(t.ppf(p, df))


def role(o: OptimizerConfig) -> str:
    """``baseline`` (a torch optimizer), ``fixed`` (a family with hypergrad mode none) or ``learning``."""
    if o.is_torch:
        return "baseline"
    return "fixed" if o.hypergrad.mode == "none" else "learning"


def scored(runs: dict[tuple[str, int], dict[str, Any]], label: str) -> dict[int, float]:
    """Seed -> final validation loss of the complete runs of ``label`` (non-finite ones included)."""
    return {
        seed: r["final_val_loss"]
        for (lb, seed), r in runs.items()
        if lb == label and r["complete"] and r["final_val_loss"] is not None
    }


def paired(a: dict[int, float], b: dict[int, float], floor: float | None = None, level: float = LEVEL) -> dict[str, Any]:
    """The paired difference ``a − b`` over the seeds both have, with its t interval.

    Args:
        a: seed -> final validation loss of the contender.
        b: seed -> final validation loss of the reference.
        floor: the noise floor (`noise_floor`), or None where the job has none.
        level: the interval's confidence level.

    Returns:
        ``n`` (pairs counted), ``seeds`` and ``deltas`` (per seed), ``mean``, ``std`` (sample
        standard deviation), ``low`` and ``high`` (the interval; None for n < 2), ``non_finite``
        (seeds on both sides left out because a loss is not finite), ``excludes_zero`` (None
        without an interval), ``below_floor`` (``|mean| < floor``; None without a floor) and
        ``resolved``: the interval excludes 0 and the mean is not below the floor.
    """
    both = sorted(set(a) & set(b))
    seeds = [s for s in both if math.isfinite(a[s]) and math.isfinite(b[s])]
    deltas = [a[s] - b[s] for s in seeds]
    n = len(deltas)
    out: dict[str, Any] = {
        "n": n, "seeds": seeds, "deltas": deltas, "mean": None, "std": None, "low": None, "high": None,
        "non_finite": len(both) - n, "excludes_zero": None, "below_floor": None, "resolved": False,
    }
    if not n:
        return out
    mean = statistics.fmean(deltas)
    out["mean"] = mean
    if n >= 2:
        std = statistics.stdev(deltas)
        half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
        out.update(std=std, low=mean - half, high=mean + half)
        out["excludes_zero"] = out["low"] > 0 or out["high"] < 0
    if floor is not None:
        out["below_floor"] = abs(mean) < floor
    out["resolved"] = out["excludes_zero"] is True and out["below_floor"] is not True
    return out


#: torch hyperparameters that leave the update's math as it is (implementations of one update)
_SAME_MATH = ("eps", "weight_decay", "foreach", "fused")


def _same_update(f: OptimizerConfig, b: OptimizerConfig, cfg: JobConfig) -> bool:
    """Whether the fixed family contender ``f`` and the torch contender ``b`` compute the same update."""
    name = b.optimizer_cls.__name__.lower()
    decoupled = name == f"{f.point}w"  # AdamW: decoupled weight decay, as a family's (MADA's) is
    if name != f.point and not decoupled:
        return False
    if (b.lr or cfg.lr) != (f.lr or cfg.lr) or b.schedule != f.schedule or "betas" in f.options:
        return False
    if set(b.hyperparameters) - set(_SAME_MATH) or set(f.hyperparameters) - {"eps", "weight_decay"}:
        return False
    mine = {**f.family(cfg.betas).defaults(), **f.hyperparameters}
    theirs = {k: b.hyperparameters.get(k, default_argument(b.optimizer_cls, k)) for k in ("eps", "weight_decay")}
    if mine.get("eps") != theirs["eps"] or mine.get("weight_decay", 0.0) != (theirs["weight_decay"] or 0.0):
        return False
    return decoupled or not theirs["weight_decay"]  # Adam's weight decay is L2, not decoupled


def floor_pairs(cfg: JobConfig) -> list[tuple[OptimizerConfig, OptimizerConfig]]:
    """The (family, baseline) pairs that compute the same update: the noise floor's pairs.

    A family contender held fixed at a named point (``point: adam``, no ``at:``) and a torch
    optimizer whose class has that name (``adam``: ``torch.optim.Adam``, without weight decay),
    or that name with ``w`` (``adamw``: decoupled weight decay, as a family's), at the same lr and
    schedule, with the job's betas on both, the same eps and weight decay, and no other setting
    that changes the update.
    """
    return [
        (f, b)
        for f in cfg.optimizers
        if role(f) == "fixed" and f.point is not None and not f.at
        for b in cfg.optimizers
        if b.is_torch and _same_update(f, b, cfg)
    ]


def _mean_coefficients(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = sorted(set().union(*(r.get("coefficients", {}) for r in runs))) if runs else []
    out = {}
    for k in keys:
        vals = [r["coefficients"][k] for r in runs if k in r.get("coefficients", {})]
        if vals:
            out[k] = statistics.fmean(vals)
    return out


def position(cfg: JobConfig, learner: OptimizerConfig, best: OptimizerConfig,
             learner_runs: list[dict[str, Any]], best_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a learning contender's final coefficients sit relative to the best fixed point.

    Returns:
        ``comparable`` (False, with a ``reason``, for another family or other options);
        otherwise per coefficient (``<group>/<name>`` per group) its ``final`` value (mean over
        the complete runs), the ``best`` point's, ``offset`` = final − best, the ``box`` and
        ``offset_box`` = offset / (high − low); and ``distance_box``, the Euclidean norm of
        the ``offset_box`` values.
    """
    if learner.kind != best.kind or learner.options != best.options:
        return {"comparable": False, "reason": f"another family or other options than {best.label!r}"}
    final = _mean_coefficients(learner_runs)
    at_best = _mean_coefficients(best_runs)
    if not final or not at_best:
        return {"comparable": False, "reason": "no complete run records its coefficients"}
    space = learner.family(cfg.betas).space
    coefs: dict[str, Any] = {}
    squares = 0.0
    for key, value in final.items():
        name = key.rsplit("/", 1)[-1]
        if name not in at_best or name not in space:
            continue
        c = space[name]
        width = c.high - c.low
        offset = value - at_best[name]
        scaled = offset / width if width > 0 else None
        coefs[key] = {"final": value, "best": at_best[name], "offset": offset, "box": [c.low, c.high], "offset_box": scaled}
        squares += (scaled or 0.0) ** 2
    return {"comparable": True, "coefficients": coefs, "distance_box": math.sqrt(squares)}


def landscapes(cfg: JobConfig, runs: dict[tuple[str, int], dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The mean final validation loss over each grid of exactly two coefficients.

    Returns:
        The landscapes: per grid its ``sweep`` (the entry's label), ``over`` (the two
        coefficients: x, then y), ``x`` and ``y`` (their values, ascending), ``values``
        (``values[i][j]``: mean final validation loss at y[i], x[j] over the cell's complete runs
        with finite losses; None where it has none), ``labels`` (the cells' contenders), ``n``
        (runs per cell) and ``paths`` (the learning contenders of the same family and options,
        whose coefficient paths the plot draws over it); and one reason per grid not drawn.
    """
    grids: dict[str, list[OptimizerConfig]] = {}
    for o in cfg.optimizers:
        if o.sweep is not None and o.sweep.by == "grid":
            grids.setdefault(o.sweep.entry, []).append(o)
    out, skipped = [], []
    for entry, members in grids.items():
        over = list(members[0].sweep.over)  # type: ignore[union-attr]
        if len(over) != 2:
            skipped.append(f"the grid {entry!r} sweeps {len(over)} coefficient{'s' if len(over) != 1 else ''} "
                           f"({', '.join(over)}); a landscape is drawn over exactly two")
            continue
        xs = sorted({o.at[over[0]] for o in members})
        ys = sorted({o.at[over[1]] for o in members})
        values: list[list[float | None]] = [[None] * len(xs) for _ in ys]
        labels: list[list[str | None]] = [[None] * len(xs) for _ in ys]
        counts: list[list[int]] = [[0] * len(xs) for _ in ys]
        for o in members:
            i, j = ys.index(o.at[over[1]]), xs.index(o.at[over[0]])
            finite = [v for v in scored(runs, o.label).values() if math.isfinite(v)]
            values[i][j] = statistics.fmean(finite) if finite else None
            labels[i][j], counts[i][j] = o.label, len(finite)
        first = members[0]
        paths = [o.label for o in cfg.optimizers
                 if role(o) == "learning" and o.kind == first.kind and o.options == first.options]
        out.append({"sweep": entry, "over": over, "x": xs, "y": ys, "values": values, "labels": labels, "n": counts,
                    "paths": paths})
    if not grids:
        skipped.append("no grid: a landscape is drawn over a `grid:` of two coefficients")
    return out, skipped


def analyze(cfg: JobConfig, runs: dict[tuple[str, int], dict[str, Any]], baseline: str) -> dict[str, Any]:
    """The report's answers for a job (``summary.json``'s ``analysis``; docs/cli.md lists its fields).

    Args:
        cfg: the job's config (its contenders expanded).
        runs: (label, seed) -> that run's summary (`metaopt.jobs.summary.run_summary`).
        baseline: the label every contender's ``vs_baseline`` Δ is taken against (the first
            contender).

    Returns:
        The analysis: ``method``, ``level``, ``roles``, ``best_fixed``, ``noise_floor``,
        ``vs_baseline``, ``learning``, ``landscapes`` and ``landscape_skipped``.
    """
    by_label = {o.label: o for o in cfg.optimizers}
    roles = {r: [o.label for o in cfg.optimizers if role(o) == r] for r in ("fixed", "learning", "baseline")}
    scores = {o.label: scored(runs, o.label) for o in cfg.optimizers}

    pairs = []
    for f, b in floor_pairs(cfg):
        d = paired(scores[f.label], scores[b.label])
        if d["n"]:
            rms = math.sqrt(statistics.fmean(x * x for x in d["deltas"]))
            pairs.append({"family": f.label, "baseline": b.label, "point": f.point, "rms": rms, "paired": d})
    floor = max((p["rms"] for p in pairs), default=None)

    best = _best_fixed(roles["fixed"], scores, by_label)
    if best is not None:
        best["coefficients"] = _mean_coefficients(
            [r for (lb, _), r in runs.items() if lb == best["optimizer"] and r["complete"]])
    learning: dict[str, Any] = {}
    for label in roles["learning"]:
        entry: dict[str, Any] = {
            "regret": None if best is None else paired(scores[label], scores[best["optimizer"]], floor),
            "vs_baselines": {b: paired(scores[label], scores[b], floor) for b in roles["baseline"]},
            "position": None,
        }
        if best is not None:
            b_label = best["optimizer"]
            entry["position"] = position(
                cfg, by_label[label], by_label[b_label],
                [r for (lb, _), r in runs.items() if lb == label and r["complete"]],
                [r for (lb, _), r in runs.items() if lb == b_label and r["complete"]],
            )
        learning[label] = entry
    maps, skipped = landscapes(cfg, runs)
    return {
        "statistic": "final_val_loss",
        "method": METHOD,
        "level": LEVEL,
        "roles": roles,
        "best_fixed": best,
        "noise_floor": {"floor": floor, "pairs": pairs},
        "vs_baseline": {o.label: paired(scores[o.label], scores[baseline], floor)
                        for o in cfg.optimizers if o.label != baseline and baseline in scores},
        "learning": learning,
        "landscapes": maps,
        "landscape_skipped": skipped,
    }


def _best_fixed(fixed: list[str], scores: dict[str, dict[int, float]], by_label: dict[str, OptimizerConfig]) -> dict[str, Any] | None:
    """The fixed contender with the lowest mean final validation loss, chosen on the seeds all of them completed.

    Fixed contenders with a non-finite loss on one of those seeds are not candidates. Where the
    fixed contenders share no seed, each is scored on its own seeds (``common_seeds`` is then
    empty).
    """
    have = [lb for lb in fixed if scores[lb]]
    if not have:
        return None
    common = sorted(set.intersection(*(set(scores[lb]) for lb in have)))
    means: dict[str, float] = {}
    for lb in have:
        seeds = common or sorted(scores[lb])
        vals = [scores[lb][s] for s in seeds]
        if all(math.isfinite(v) for v in vals):
            means[lb] = statistics.fmean(vals)
    if not means:
        return None
    label = min(means, key=lambda lb: (means[lb], fixed.index(lb)))  # a tie: the first in the config
    o = by_label[label]
    return {
        "optimizer": label,
        "kind": o.kind,
        "point": o.point,
        "at": dict(o.at),
        "final_val_loss": means[label],
        "seeds": common or sorted(scores[label]),
        "common_seeds": common,
        "candidates": len(means),
        "ranking": sorted(means.items(), key=lambda kv: kv[1]),
    }
