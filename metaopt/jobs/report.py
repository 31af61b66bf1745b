"""The report of a job: its summary and plots written from its records.

What the end of ``metaopt run`` and ``metaopt report`` write (`write_report`), and what
``metaopt report`` reads: a run directory (`load_run_dir`), or several of the same job combined
into one (`combine_run_dirs`, `write_combined`), their contenders side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import ValidationError

from metaopt.jobs.config import ConfigFileError, build_config, read_config_file
from metaopt.jobs.config_errors import format_validation_error
from metaopt.jobs.metrics import METRICS_FILE, MetricsError, read_metrics
from metaopt.jobs.schema import JobConfig
from metaopt.jobs.summary import format_table, planned_runs, summarize, write_summary

#: config fields that must agree for runs of several directories to be compared in one table
#: (the same model, data, training length and batches, and the same baseline settings)
COMPARABLE = ("model", "data", "steps", "batch_size", "eval_interval", "eval_batches", "lr", "betas")


class RunDirError(Exception):
    """A directory that is not a run directory, or run directories that cannot be combined."""


@dataclass
class Report:
    """What `write_report` wrote: the summary (as in summary.json), the plots and the table it prints."""

    summary: dict[str, Any]
    plots: list[Path] = field(default_factory=list)
    table: str = ""


def write_report(cfg: JobConfig, records: list[dict[str, Any]], target: Path, *, interrupted: bool = False,
                 device: str | None = None, planned: set[tuple[str, int]] | None = None) -> Report:
    """Write summary.json, summary.md and the plots of ``records`` (a job's, under ``cfg``) in ``target``.

    The summary is written first, so that the numbers stand even if a plot fails, then again with
    each plot's caption.
    """
    from metaopt.jobs.plots import make_plots  # matplotlib: only when plotting

    summary = summarize(cfg, records, interrupted=interrupted, device=device, planned=planned)
    write_summary(summary, target)
    plots = make_plots(cfg, records, target, summary)
    write_summary(summary, target)
    return Report(summary, plots, format_table(summary))


def load_run_dir(run_dir: Path) -> tuple[JobConfig, list[dict[str, Any]]]:
    """(validated config, metrics records) of a run directory.

    Raises:
        RunDirError: it is not a run directory (no config.yaml or metrics.jsonl), or its config
            does not read or validate (one line per problem).
        MetricsError: its metrics.jsonl has a bad line (not the last), or holds no records.
    """
    cfg_path, metrics = run_dir / "config.yaml", run_dir / METRICS_FILE
    for p in (cfg_path, metrics):
        if not p.is_file():
            raise RunDirError(f"{run_dir} is not a run directory: {p.name} is missing")
    try:
        raw = read_config_file(cfg_path)
        cfg = build_config(raw, name=run_dir.name)
    except ConfigFileError as e:
        raise RunDirError(str(e)) from None
    except ValidationError as e:
        raise RunDirError(f"invalid config {cfg_path}:\n{format_validation_error(e, raw, model=JobConfig)}") from None
    records = read_metrics(metrics)
    if not records:
        raise MetricsError(f"{metrics} holds no records")
    return cfg, records


def _last_steps(records: list[dict[str, Any]]) -> dict[tuple[str, int], int]:
    """The last step each run (optimizer, seed) of some metrics records reached."""
    last: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r["optimizer"], r["seed"])
        last[key] = max(last.get(key, 0), r["step"])
    return last


class Combined(NamedTuple):
    """Several run directories read as one job (`combine_run_dirs`)."""

    cfg: JobConfig
    records: list[dict[str, Any]]
    notes: list[str]  # one per unfinished run left out
    planned: set[tuple[str, int]]  # the runs (optimizer, seed) the directories planned between them


def combine_run_dirs(loaded: list[tuple[Path, JobConfig, list[dict[str, Any]]]]) -> Combined:
    """Several run directories of the same job as one: their contenders side by side.

    Each run is independent of the others in its config, so runs of several configs compare as
    if they were one. A contender seen before is the same contender on other seeds (one config
    split over processes): it must have identical settings. A run (optimizer, seed) in two
    directories must be finished in exactly one: the unfinished one (a kill) gives way.

    Args:
        loaded: (directory, config, records) of each, in order; the first's first optimizer is
            the combined job's baseline.

    Returns:
        The combined config (optimizers in order of first appearance, seeds merged), the
            records, one note per unfinished run left out, and the runs the directories planned
            (a contender of a 2-seed config is not missing on a 5-seed one's other seeds).

    Raises:
        RunDirError: a directory ran another job (a `COMPARABLE` field differs), a contender of
            the same name with other settings, or the same run twice.
    """
    first, cfg, records = loaded[0][0], loaded[0][1], list(loaded[0][2])
    notes: list[str] = []
    planned = planned_runs(cfg)
    for d, other, recs in loaded[1:]:
        for name in COMPARABLE:
            if getattr(other, name) != getattr(cfg, name):
                raise RunDirError(f"{d} ran another job: its {name} is {getattr(other, name)!r}, "
                                  f"{first}'s is {getattr(cfg, name)!r}")
        known = {o.label: o for o in cfg.optimizers}
        for o in other.optimizers:
            if o.label in known and known[o.label] != o:
                raise RunDirError(f"{d} has an optimizer named {o.label!r} with other settings than an earlier directory's")
        done_before, done_here = _last_steps(records), _last_steps(recs)
        drop = set()
        for run in sorted(set(done_before) & set(done_here)):
            finished = (done_before[run] >= cfg.steps, done_here[run] >= cfg.steps)
            if finished[0] == finished[1]:
                raise RunDirError(f"{d} ran {run[0]!r} on seed {run[1]} like an earlier directory; each run once "
                                  "(or unfinished in all but one)")
            drop.add((run, finished[0]))  # True: drop this directory's unfinished run
            notes.append(f"{run[0]} seed {run[1]}: the unfinished run of "
                         f"{d if finished[0] else 'an earlier directory'} left out, the finished one kept")
        gone_here = {run for run, here in drop if here}
        gone_before = {run for run, here in drop if not here}
        records = [r for r in records if (r["optimizer"], r["seed"]) not in gone_before]
        recs = [r for r in recs if (r["optimizer"], r["seed"]) not in gone_here]
        cfg = cfg.model_copy(update={
            "optimizers": [*cfg.optimizers, *(o for o in other.optimizers if o.label not in known)],
            "seeds": sorted(set(cfg.seeds) | set(other.seeds)),
        })
        records += recs
        planned |= planned_runs(other)
    return Combined(cfg, records, notes, planned)


def write_combined(out: Path, cfg: JobConfig, records: list[dict[str, Any]], sources: list[Path]) -> None:
    """Make ``out`` a run directory of the combined job.

    Its config.yaml, metrics.jsonl, and sources.txt (the directories it was made from).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.dump(), sort_keys=False), encoding="utf-8")
    with (out / METRICS_FILE).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (out / "sources.txt").write_text("".join(f"{d}\n" for d in sources), encoding="utf-8")
