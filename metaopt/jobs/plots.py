"""PNG plots of a job from its ``metrics.jsonl`` records (matplotlib, Agg: no display needed).

* ``val_loss.png``: validation loss against step, one line per optimizer (mean over seeds) with
  its min–max band; left the whole run, right the second half zoomed in.
* ``train_loss.png``: training loss (moving average) against step, same convention.
* ``coefficients.png``: one panel per learned coefficient, the trajectory of every metaopt
  optimizer that learns it (mean over seeds, min–max band).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere; we draw on Figure objects only
from matplotlib.figure import Figure  # noqa: E402

from metaopt.jobs.config import JobConfig  # noqa: E402

#: line styles of an optimizer's param groups (coefficients per group), in the groups' order
GROUP_STYLES = ["-", "--", ":", "-."]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def _band(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, mean, min and max over the seeds' series ({step: value}) present at each step."""
    steps = sorted(set().union(*series)) if series else []
    mean, lo, hi = [], [], []
    for s in steps:
        vals = [d[s] for d in series if s in d and d[s] is not None and math.isfinite(d[s])]
        if vals:
            mean.append(sum(vals) / len(vals))
            lo.append(min(vals))
            hi.append(max(vals))
        else:
            mean.append(math.nan)
            lo.append(math.nan)
            hi.append(math.nan)
    return steps, mean, lo, hi


def _series(records: list[dict[str, Any]], label: str, value) -> list[dict[int, float]]:
    per_seed: dict[int, dict[int, float]] = defaultdict(dict)
    for r in records:
        if r["optimizer"] == label:
            v = value(r)
            if v is not None:
                per_seed[r["seed"]][r["step"]] = v
    return [per_seed[s] for s in sorted(per_seed)]


def _moving_average(d: dict[int, float], window: int) -> dict[int, float]:
    steps = sorted(d)
    out, acc, q = {}, 0.0, []
    for s in steps:
        v = d[s]
        if not math.isfinite(v):
            continue
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out[s] = acc / len(q)
    return out


def _draw(ax, steps, mean, lo, hi, color, label, n_seeds, marker=None, linestyle="-") -> None:
    ax.plot(steps, mean, color=color, label=f"{label} (n={n_seeds})" if n_seeds > 1 else label, marker=marker, markersize=3,
            linewidth=1.4, linestyle=linestyle)
    if n_seeds > 1:
        ax.fill_between(steps, lo, hi, color=color, alpha=0.18, linewidth=0)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_val_loss(cfg: JobConfig, records: list[dict[str, Any]], path: Path) -> Path:
    """Validation loss per optimizer (mean over seeds, min–max band), whole run and second half; written to ``path``."""
    fig = Figure(figsize=(11, 4.2))
    full, zoom = fig.subplots(1, 2)
    zoom_ys: list[float] = []
    for i, o in enumerate(cfg.optimizers):
        series = _series(records, o.label, lambda r: r.get("val_loss"))
        if not series:
            continue
        steps, mean, lo, hi = _band(series)
        color = COLORS[i % len(COLORS)]
        for ax in (full, zoom):
            _draw(ax, steps, mean, lo, hi, color, o.label, len(series), marker="o")
        half = max(steps) / 2 if steps else 0
        zoom_ys += [v for s, a, b in zip(steps, lo, hi) if s >= half for v in (a, b) if math.isfinite(v)]
    last = max((r["step"] for r in records), default=cfg.steps)
    zoom.set_xlim(last / 2, last * 1.02 if last else 1)
    if zoom_ys:
        pad = (max(zoom_ys) - min(zoom_ys)) * 0.1 or 0.01
        zoom.set_ylim(min(zoom_ys) - pad, max(zoom_ys) + pad)
    n = len(cfg.seeds)
    full.set_title("validation loss" + (f" (mean of {n} seeds, band: min–max)" if n > 1 else ""))
    zoom.set_title("second half")
    for ax in (full, zoom):
        ax.set_xlabel("step")
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    if full.lines:
        full.legend()
    fig.suptitle(f"{cfg.name}: {cfg.model.n_layer}L/{cfg.model.n_head}H/{cfg.model.n_embd}d GPT, batch {cfg.batch_size}×{cfg.model.block_size}, lr {cfg.lr:g}", fontsize=10)
    return _save(fig, path)


def plot_train_loss(cfg: JobConfig, records: list[dict[str, Any]], path: Path) -> Path:
    """Training loss per optimizer as a moving average (mean over seeds, min–max band); written to ``path``."""
    window = max(1, min(50, cfg.steps // 20))
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for i, o in enumerate(cfg.optimizers):
        series = [_moving_average(d, window) for d in _series(records, o.label, lambda r: r.get("train_loss"))]
        if series:
            _draw(ax, *_band(series), COLORS[i % len(COLORS)], o.label, len(series))
    ax.set_title(f"training loss (moving average over {window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    return _save(fig, path)


def plot_coefficients(cfg: JobConfig, records: list[dict[str, Any]], path: Path) -> Path:
    """Each learned coefficient over the run, one panel per name (a line per param group where they differ)."""
    learned = {o.label: o.learned() for o in cfg.optimizers if not o.is_torch}
    names: list[str] = []
    for ns in learned.values():
        names += [n for n in ns if n not in names]
    if not names:
        fig = Figure(figsize=(6, 2))
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no optimizer of this job learns coefficients", ha="center", va="center")
        return _save(fig, path)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        for i, o in enumerate(cfg.optimizers):
            if name not in learned.get(o.label, ()):
                continue
            # one line per param group where the groups have coefficients of their own
            keys = [k for k in o.learned_keys() if k.rsplit("/", 1)[-1] == name]
            for j, key in enumerate(keys):
                series = _series(records, o.label, lambda r, n=key: (r.get("coefficients") or {}).get(n))
                label = o.label if key == name else f"{o.label} {key.rsplit('/', 1)[0]}"
                if series:
                    _draw(ax, *_band(series), COLORS[i % len(COLORS)], label, len(series),
                          linestyle=GROUP_STYLES[j % len(GROUP_STYLES)])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in axes[len(names):]:
        ax.axis("off")
    fig.suptitle("learned coefficients" + (f" (mean of {len(cfg.seeds)} seeds, band: min–max)" if len(cfg.seeds) > 1 else ""), fontsize=10)
    return _save(fig, path)


def make_plots(cfg: JobConfig, records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """val_loss.png, train_loss.png and coefficients.png of a run in ``run_dir``; returns their paths."""
    return [
        plot_val_loss(cfg, records, run_dir / "val_loss.png"),
        plot_train_loss(cfg, records, run_dir / "train_loss.png"),
        plot_coefficients(cfg, records, run_dir / "coefficients.png"),
    ]
