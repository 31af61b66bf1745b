"""The study's compact table from a combined ``summary.json`` (``metaopt report ... --out DIR``).

    python studies/table.py studies/default-job/results/summary.json

One row per contender: final validation loss (mean ± std over seeds), the paired difference to
the baseline (mean ± std, and per seed), and the seeds on which the contender's final
validation loss is below the baseline's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pm(stats: dict, digits: int = 4, signed: bool = False) -> str:
    if stats.get("mean") is None:
        return "—"
    mean = f"{stats['mean']:+.{digits}f}" if signed else f"{stats['mean']:.{digits}f}"
    return mean + (f" ± {stats['std']:.{digits}f}" if stats.get("std") is not None else "")


def table(summary: dict) -> str:
    base = summary["baseline"]
    finals = {(r["optimizer"], r["seed"]): r["final_val_loss"] for r in summary["runs"]}
    seeds = summary["seeds"]
    head = ["contender", "seeds", "final val loss", f"Δ vs {base}", "wins", "Δ per seed " + ", ".join(map(str, seeds))]
    rows = [head, ["---"] * len(head)]
    for label, e in summary["optimizers"].items():
        wins = e.get("wins_vs_baseline")
        per_seed = []
        for s in seeds:
            mine, theirs = finals.get((label, s)), finals.get((base, s))
            per_seed.append("—" if mine is None or theirs is None or label == base else f"{mine - theirs:+.3f}")
        rows.append([
            label, str(e["complete_runs"]), _pm(e["final_val_loss"]),
            "—" if label == base else _pm(e["delta_final_val_vs_baseline"], signed=True),
            "—" if wins is None else f"{wins['wins']}/{wins['paired']}",
            "—" if label == base else ", ".join(per_seed),
        ])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())))
