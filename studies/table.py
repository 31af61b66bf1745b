"""The study's compact table from a combined ``summary.json`` (``metaopt report ... --out DIR``).

    python studies/table.py studies/default-job/results/summary.json

One row per contender, over the runs that finished: final validation loss (mean ± std over
seeds), the paired difference to the baseline (mean ± std, and per seed), and the seeds on which
the contender's final validation loss is below the baseline's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from metaopt.jobs.summary import _pm, _signed, _stats  # the summary's own statistics and formats


def table(summary: dict) -> str:
    """The compact table, from the runs that finished (an unfinished one is left out)."""
    base = summary["baseline"]
    finals = {(r["optimizer"], r["seed"]): r["final_val_loss"] for r in summary["runs"] if r["complete"]}
    seeds = summary["seeds"]
    head = ["contender", "seeds", "final val loss", f"Δ vs {base}", "wins", "Δ per seed " + ", ".join(map(str, seeds))]
    rows = [head, ["---"] * len(head)]
    for label in summary["optimizers"]:
        mine = {s: finals[(label, s)] for s in seeds if (label, s) in finals}
        deltas = {s: v - finals[(base, s)] for s, v in mine.items() if (base, s) in finals}
        rows.append([
            label, str(len(mine)), _pm(_stats(list(mine.values()))),
            "—" if label == base else _signed(_stats(list(deltas.values()))),
            "—" if label == base else f"{sum(d < 0 for d in deltas.values())}/{len(deltas)}",
            "—" if label == base else ", ".join(f"{deltas[s]:+.3f}" if s in deltas else "—" for s in seeds),
        ])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())))
