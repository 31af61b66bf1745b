"""PNG plots of a job from its ``metrics.jsonl`` records (matplotlib, Agg: no display needed).

* ``val_loss.png``: validation loss against step, one line per optimizer (mean over seeds) with
  its min–max band; left the whole run, right the second half zoomed in.
* ``train_loss.png``: training loss (moving average) against step, same convention.
* ``coefficients.png``: one panel per learned coefficient, the trajectory of every metaopt
  optimizer that learns it (mean over seeds, min–max band).
* ``deltas.png``: every contender's paired Δ of final validation loss against the baseline, with
  its 95% interval (``summary.json``'s ``analysis.vs_baseline``).
* ``landscape-<grid>.png``: per grid of two coefficients, the mean final validation loss of each
  cell as a heat map, with the coefficient paths of the learning contenders of that family drawn
  over it (``analysis.landscapes``).

``make_plots`` records each file with its caption in the summary (``plots``), which
``summary.md`` lists.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere; we draw on Figure objects only
from matplotlib.figure import Figure  # noqa: E402

from metaopt.jobs.schema import JobConfig  # noqa: E402

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


ROLE_COLORS = {"baseline": "#7f7f7f", "fixed": "#1f77b4", "learning": "#d62728"}


def plot_deltas(summary: dict[str, Any], path: Path) -> Path:
    """Every contender's paired Δ of final validation loss against the baseline, with its interval; written to ``path``.

    One row per contender with a paired seed, sorted by mean Δ (lowest at the top): a dot at the
    mean, a bar over the 95% interval (none for n = 1), colored by role; a shaded band of ± the
    noise floor where the job measured one.
    """
    a = summary["analysis"]
    roles = {lb: r for r, lbs in a["roles"].items() for lb in lbs}
    rows = sorted(((lb, d) for lb, d in a["vs_baseline"].items() if d["mean"] is not None), key=lambda x: x[1]["mean"])
    fig = Figure(figsize=(7.5, 1.4 + 0.32 * max(len(rows), 1)))
    ax = fig.subplots()
    floor = a["noise_floor"]["floor"]
    if floor is not None:
        ax.axvspan(-floor, floor, color="#bbbbbb", alpha=0.35, linewidth=0, label=f"noise floor ±{floor:.2g}")
    ax.axvline(0.0, color="black", linewidth=0.8)
    seen: set[str] = set()
    for y, (label, d) in enumerate(reversed(rows)):
        r = roles.get(label, "baseline")
        color = ROLE_COLORS.get(r, "#7f7f7f")
        if d["low"] is not None:
            ax.plot([d["low"], d["high"]], [y, y], color=color, linewidth=2.0, solid_capstyle="butt")
        ax.plot([d["mean"]], [y], "o", color=color, markersize=5, label=r if r not in seen else None)
        seen.add(r)
    labels = [f"{lb} (n={d['n']})" for lb, d in reversed(rows)]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylim(-0.8, max(len(rows), 1) - 0.2)
    ax.set_xlabel(f"Δ final val loss vs {summary['baseline']} (negative: lower)")
    ax.set_title(f"paired by seed, 95% t interval: Δ against {summary['baseline']}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if not rows:
        ax.text(0.5, 0.5, "no contender has a seed paired with the baseline", ha="center", va="center",
                transform=ax.transAxes)
    if ax.get_legend_handles_labels()[0]:  # beside the rows, not over them
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def _edges(values: list[float]) -> list[float]:
    """Cell edges around sorted values: midway between neighbours, as far out again at the ends."""
    if len(values) == 1:
        return [values[0] - 0.05, values[0] + 0.05]
    mids = [(a + b) / 2 for a, b in zip(values, values[1:])]
    return [values[0] - (mids[0] - values[0]), *mids, values[-1] + (values[-1] - mids[-1])]


def plot_landscape(cfg: JobConfig, records: list[dict[str, Any]], landscape: dict[str, Any], path: Path) -> Path:
    """A grid's mean final validation loss as a heat map, the learning contenders' coefficient paths over it.

    ``landscape`` is one of ``analysis.landscapes``: the cells' values are drawn as they are
    there (each written in its cell), the best cell starred. Each learning contender of the
    grid's family (``paths``) is drawn seed by seed from its ``metrics.jsonl`` coefficients: a
    line from ○ (step 0) to ● (its last step); with coefficients per group, one line per group.
    """
    xname, yname = landscape["over"]
    xs, ys, values = landscape["x"], landscape["y"], landscape["values"]
    fig = Figure(figsize=(7.2, 5.6))
    ax = fig.subplots()
    grid = [[math.nan if v is None else v for v in row] for row in values]
    y_edges = _edges(ys)
    mesh = ax.pcolormesh(_edges(xs), y_edges, grid, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label="final val loss (mean over seeds)")
    finite = [(v, i, j) for i, row in enumerate(grid) for j, v in enumerate(row) if math.isfinite(v)]
    if len(xs) * len(ys) <= 64 and finite:
        lo, hi = min(v for v, _, _ in finite), max(v for v, _, _ in finite)
        for v, i, j in finite:
            # in the lower part of the cell, clear of a star or a path at its centre; dark on the light colours
            light = hi > lo and (v - lo) / (hi - lo) > 0.6
            ax.text(xs[j], ys[i] - 0.3 * (y_edges[i + 1] - y_edges[i]), f"{v:.4f}", ha="center", va="center",
                    fontsize=7, color="black" if light else "white")
    if finite:
        _, i, j = min(finite)
        # hollow, under the paths: a path that ends on the best cell stays visible
        ax.plot([xs[j]], [ys[i]], marker="*", markersize=22, markerfacecolor="none", markeredgecolor="#ffd400",
                markeredgewidth=2.0, linestyle="none", label=f"best cell {landscape['labels'][i][j]}", zorder=2)
    for k, label in enumerate(landscape["paths"]):
        color = COLORS[(k + 1) % len(COLORS)]
        per_seed: dict[int, list[tuple[int, dict[str, float]]]] = defaultdict(list)
        for r in records:
            if r["optimizer"] == label and r.get("coefficients"):
                per_seed[r["seed"]].append((r["step"], r["coefficients"]))
        named = False
        for seed in sorted(per_seed):
            path_records = [c for _, c in sorted(per_seed[seed], key=lambda t: t[0])]
            keys = sorted({key.rsplit("/", 1)[0] for key in path_records[0] if "/" in key}) or [None]
            for g, group in enumerate(keys):
                kx, ky = (xname, yname) if group is None else (f"{group}/{xname}", f"{group}/{yname}")
                pts = [(c[kx], c[ky]) for c in path_records if kx in c and ky in c]
                if not pts:
                    continue
                px, py = zip(*pts)
                ax.plot(px, py, color=color, linewidth=1.6, linestyle=GROUP_STYLES[g % len(GROUP_STYLES)],
                        label=None if named else label, zorder=3)
                ax.plot([px[0]], [py[0]], "o", color=color, markerfacecolor="white", markersize=6, zorder=4)
                ax.plot([px[-1]], [py[-1]], "o", color=color, markersize=5, zorder=4)
                named = True
    ax.set_xlabel(xname)
    ax.set_ylabel(yname)
    n = sorted({c for row in landscape["n"] for c in row})
    ax.set_title(f"{landscape['sweep']}: final val loss over {xname} × {yname} "
                 f"({'/'.join(map(str, n))} seed{'s' if n != [1] else ''} per cell)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:  # below the axes, not over a cell
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3)
    return _save(fig, path)


def landscape_file(sweep: str) -> str:
    """The file name of a grid's landscape: ``landscape-<grid's label, made file-safe>.png``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", sweep).strip("_") or "grid"
    return f"landscape-{safe}.png"


def make_plots(cfg: JobConfig, records: list[dict[str, Any]], run_dir: Path, summary: dict[str, Any] | None = None) -> list[Path]:
    """The plots of a run in ``run_dir``; returns their paths.

    val_loss.png, train_loss.png and coefficients.png; with ``summary`` (`metaopt.jobs.summary.summarize`'s)
    also deltas.png and a landscape per two-coefficient grid, and each plot's file and caption
    go into ``summary["plots"]``.
    """
    n = len(cfg.seeds)
    over = f"mean over {n} seeds, band: min–max" if n > 1 else "one seed"
    plots = [
        (plot_val_loss(cfg, records, run_dir / "val_loss.png"),
         f"validation loss against step per contender ({over}); right: the second half"),
        (plot_train_loss(cfg, records, run_dir / "train_loss.png"),
         f"training loss against step, moving average ({over})"),
        (plot_coefficients(cfg, records, run_dir / "coefficients.png"),
         f"each learned coefficient against step ({over})"),
    ]
    if summary is not None and "analysis" in summary:
        a = summary["analysis"]
        floor = a["noise_floor"]["floor"]
        plots.append((plot_deltas(summary, run_dir / "deltas.png"),
                      f"every contender's Δ final val loss against {summary['baseline']}, paired by seed: dot the mean, "
                      "bar the 95% t interval (none for n = 1), sorted lowest first, colored by role (baseline, fixed, "
                      "learning)" + (f"; shaded: ± the noise floor {floor:.2g}" if floor is not None else "")))
        for land in a["landscapes"]:
            xname, yname = land["over"]
            paths = ", ".join(land["paths"]) or "none"
            plots.append((plot_landscape(cfg, records, land, run_dir / landscape_file(land["sweep"])),
                          f"the landscape of the grid '{land['sweep']}': mean final val loss of each cell over {xname} (x) "
                          f"and {yname} (y), ★ the best cell; lines: the coefficient paths of the learning contenders "
                          f"of the family ({paths}), one per seed, ○ step 0, ● the last step"))
        summary["plots"] = [{"file": p.name, "caption": c} for p, c in plots]
    return [p for p, _ in plots]
