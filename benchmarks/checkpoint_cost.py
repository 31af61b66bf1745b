"""What a checkpoint of the default job costs: one write of the seed's checkpoint (Adam and MADA:
models, optimizer states, generators, buffers; torch.save to a temporary file, fsync, os.replace)
against one round of training (one step of each: forward, backward, optimizer step).

    python benchmarks/checkpoint_cost.py                 # 20 rounds, a checkpoint after each
    python benchmarks/checkpoint_cost.py --rounds 40 --json out.json

Rounds and checkpoints alternate, so that machine load falls on both alike; medians, and the
share of the training time at a few values of checkpoint_every (one write per that many rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from compare_commits import cpu  # the CPU's model, vector width and cores

from metaopt.jobs.schema import JobConfig
from metaopt.jobs.metrics import MetricsLog
from metaopt.jobs.run_state import checkpoint_path
from metaopt.jobs.train import Job, Progress, Run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    cfg = JobConfig(name="default")
    job = Job(cfg)
    rounds, writes = [], []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        run_dir = Path(tmp)
        with MetricsLog(run_dir / "metrics.jsonl") as log:
            runs = [Run(job, oc, 0, log, Progress(bars=False), i) for i, oc in enumerate(cfg.optimizers)]
            for r in runs:
                r.start()
            for _ in range(args.warmup):
                for r in runs:
                    r.advance()
            for _ in range(args.rounds):
                t = time.perf_counter()
                for r in runs:
                    r.advance()
                rounds.append(time.perf_counter() - t)
                t = time.perf_counter()
                job._checkpoint(run_dir, 0, runs, log, 0)
                writes.append(time.perf_counter() - t)
            size = checkpoint_path(run_dir, 0).stat().st_size
    rd, wr = statistics.median(rounds), statistics.median(writes)
    out = {
        "cpu": cpu(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "optimizers": [o.label for o in cfg.optimizers],
        "checkpoint_bytes": size,
        "round_ms": {"median": rd * 1e3, "min": min(rounds) * 1e3, "all": [round(x * 1e3, 1) for x in rounds]},
        "checkpoint_ms": {"median": wr * 1e3, "min": min(writes) * 1e3, "all": [round(x * 1e3, 1) for x in writes]},
        "share_of_training": {every: wr / (every * rd) for every in (10, 50, 100, 250)},
    }
    print(f"{out['cpu']}, {out['threads']} threads, torch {out['torch']}")
    print(f"one round (a step of {' and '.join(out['optimizers'])}): median {rd * 1e3:.1f} ms (min {min(rounds) * 1e3:.1f})")
    print(f"one checkpoint ({size / 1e6:.1f} MB, fsynced): median {wr * 1e3:.1f} ms (min {min(writes) * 1e3:.1f})")
    for every, share in out["share_of_training"].items():
        print(f"  checkpoint_every={every}: {100 * share:.2f}% of the training time")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
