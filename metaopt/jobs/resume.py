"""``metaopt run --resume RUN_DIR``: planning a resume, and what a run directory records for it.

A resume continues each unfinished run of a run directory from its seed's checkpoint (the format:
``metaopt.jobs.run_state``), or from step 0 without one; finished runs are skipped. Runs do not
share state (each has its own generators, and its own global-RNG stream where dropout draws from
it), so a run continued from a checkpoint takes the steps it would have taken, whatever the other
runs of its seed do. A checkpoint writes nothing to ``metrics.jsonl``, so the records of a job do
not depend on ``checkpoint_every``.

Resuming is planned (``plan``) before anything changes: a config that differs from the run
directory's, a checkpoint that cannot be read or does not fit the config or ``metrics.jsonl``
raise ``ResumeError`` naming the file and leave the directory as it was. Also here:
``families.json`` (the code each family contender ran, checked on resume) and the comparison of
a saved config with a given one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from metaopt.jobs.metrics import METRICS_FILE, MetricsError, MetricsLine, read_metrics_lines
from metaopt.jobs.run_state import CheckpointError, RunState, SeedCheckpoint, checkpoint_path, write_text_atomic

#: fields of the config a resume may change: where new run directories go has no effect here
IGNORED_FIELDS = ("out_dir",)


class ResumeError(Exception):
    """A run directory that cannot be resumed as asked; the message names the file and why."""


# -- families.json: the code each family contender ran --------------------------------------------

#: the run directory's record of where each family contender's code came from
FAMILIES_FILE = "families.json"


def write_families(run_dir: Path, sources: dict[str, Any]) -> None:
    """Write ``RUN_DIR/families.json``: per family contender, where its family came from.

    Its spec, entry point, module or file, and the SHA-256 of the file that defines it
    (`metaopt.registry.FamilySource.record`), so that the run says which code it ran and
    ``--resume`` can tell when that code changed.

    Args:
        run_dir: the run directory.
        sources: optimizer label -> its `metaopt.registry.FamilySource`.
    """
    data = {"format": 1, "families": {label: src.record() for label, src in sources.items()}}
    write_text_atomic(json.dumps(data, indent=2) + "\n", run_dir / FAMILIES_FILE)


def check_families(run_dir: Path, sources: dict[str, Any]) -> list[str]:
    """Refuse to resume where a family's file changed since the run started.

    Compares the SHA-256 that ``families.json`` recorded with the file's now. A family named by
    its file (``path/to/file.py:Class``) must be the same file, byte for byte: the config names
    that file, and a resumed run would otherwise mix two versions of its rule. A family of an
    installed package (a registered name, ``package.module:Class``) is what the environment
    installs under that name, so a change there (an upgrade, an edit of an editable install) is
    reported, not refused. A run directory without ``families.json`` (from before it was
    written) is not checked.

    Args:
        run_dir: the run directory.
        sources: optimizer label -> its `metaopt.registry.FamilySource` as loaded now.

    Returns:
        One note per family of a package whose defining file changed.

    Raises:
        ResumeError: a family file changed (or another file is named now), naming it, both
            hashes and the fix.
    """
    path = run_dir / FAMILIES_FILE
    if not path.exists():
        return []
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["families"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"{path} cannot be read ({type(e).__name__}: {e}); it records which code each family ran, "
                          "so a resume without it cannot tell whether that code changed") from None
    notes = []
    for label, src in sources.items():
        then = recorded.get(label)
        if not isinstance(then, dict) or not then.get("sha256"):
            continue
        now_path = None if src.path is None else str(src.path)
        if then.get("path") == now_path and then.get("sha256") == src.sha256:
            continue
        what = (f"{then.get('path')} changed since the run started (sha256 {str(then.get('sha256'))[:16]} then, "
                f"{str(src.sha256)[:16]} now)" if then.get("path") == now_path else
                f"now comes from {now_path}, not {then.get('path')} as when the run started")
        if src.origin != "file":
            notes.append(f"the family of optimizer {label!r} ({src.describe().split(' (')[0]}): {what}; the "
                         "resumed steps run the code installed now")
            continue
        raise ResumeError(
            f"the family file of optimizer {label!r}: {what}. Continuing would mix two versions of its rule in one "
            f"run. Put the file back as it was (from version control or a backup) to resume, or start a new run "
            f"with the new code: metaopt run {run_dir / 'config.yaml'}"
        )
    return notes


# -- configs --------------------------------------------------------------------------------------


def config_differences(saved: Any, given: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted field, saved value, given value)`` for every field that differs.

    Optimizers are named by their label (``optimizers.mada.lr``, as ``--set`` names them) where
    both lists hold the same labels in the same order.
    """
    if isinstance(saved, dict) and isinstance(given, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in dict.fromkeys([*saved, *given]):
            if not prefix and key in IGNORED_FIELDS:
                continue
            sub = f"{prefix}.{key}" if prefix else str(key)
            out += config_differences(saved.get(key, "(unset)"), given.get(key, "(unset)"), sub)
        return out
    if isinstance(saved, list) and isinstance(given, list) and prefix == "optimizers":
        labels = lambda items: [o.get("name") if isinstance(o, dict) else None for o in items]  # noqa: E731
        if labels(saved) != labels(given):
            return [("optimizers", labels(saved), labels(given))]
        out = []
        for name, a, b in zip(labels(saved), saved, given):
            out += config_differences(a, b, f"optimizers.{name}")
        return out
    return [] if saved == given else [(prefix, saved, given)]


def format_differences(diffs: list[tuple[str, Any, Any]], there: str, here: str) -> str:
    """One line per difference: the field, its saved value ``there`` and its given value ``here``."""
    return "\n".join(f"  {path}: {json.dumps(a)} {there}, {json.dumps(b)} {here}" for path, a, b in diffs)


# -- the plan --------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """What a resume does with one (optimizer, seed) run."""

    label: str
    seed: int
    action: Literal["skip", "checkpoint", "restart"]
    step: int  # the step it continues from (checkpoint), its last step (skip), 0 (restart)
    keep: int  # its records kept in metrics.jsonl: steps 0..keep (-1: none)
    state: RunState | None = None


@dataclass
class SeedPlan:
    """What a resume does with one seed: its runs' plans and the checkpoint they continue from."""

    seed: int
    runs: dict[str, RunPlan]
    checkpoint: Path | None = None
    global_rng: Any = None
    mark: int = 0

    @property
    def done(self) -> bool:
        """Whether every run of the seed is finished (skipped)."""
        return all(r.action == "skip" for r in self.runs.values())


@dataclass
class ResumePlan:
    """The whole resume of a run directory: each seed's plan and the lines of ``metrics.jsonl``."""

    run_dir: Path
    seeds: dict[int, SeedPlan]
    lines: list[MetricsLine] = field(repr=False, default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the resume should say before it starts

    def describe(self) -> list[str]:
        """One line per seed saying where each run continues from (finished, a step, or step 0)."""
        out = []
        for sp in self.seeds.values():
            parts = []
            for r in sp.runs.values():
                if r.action == "skip":
                    parts.append(f"{r.label} finished")
                elif r.action == "checkpoint":
                    parts.append(f"{r.label} from step {r.step}")
                else:
                    parts.append(f"{r.label} from step 0")
            src = f" (checkpoint {sp.checkpoint.name})" if sp.checkpoint is not None and not sp.done else ""
            out.append(f"seed {sp.seed}: " + ", ".join(parts) + src)
        return out

    def kept_text(self) -> str:
        """``metrics.jsonl`` as the resume continues it.

        Every record of a skipped run, those of a run continued from a checkpoint up to that
        checkpoint, none of a restarted run; a torn last line dropped. Kept lines are kept byte
        for byte.
        """
        keep = {(r.label, r.seed): r.keep for sp in self.seeds.values() for r in sp.runs.values()}
        out = []
        for line in self.lines:
            rec = line.record
            limit = keep.get((rec.get("optimizer"), rec.get("seed")))
            if limit is None or rec.get("step", -1) <= limit:
                out.append(line.text)
        return "".join(out)


def plan(cfg, run_dir: Path) -> ResumePlan:
    """How to resume ``run_dir`` (whose config is ``cfg``); reads, changes nothing."""
    metrics = run_dir / METRICS_FILE
    try:
        lines = read_metrics_lines(metrics)
    except MetricsError as e:
        raise ResumeError(str(e)) from None
    steps_of: dict[tuple[str, int], list[int]] = {}
    for line in lines:
        rec = line.record
        if isinstance(rec.get("step"), int):
            steps_of.setdefault((rec.get("optimizer"), rec.get("seed")), []).append(rec["step"])
    size = metrics.stat().st_size if metrics.exists() else 0
    saved_cfg = cfg.dump()
    seeds: dict[int, SeedPlan] = {}
    units = cfg.units()
    for seed in cfg.seeds:
        labels = [o.label for o in cfg.optimizers if (o.label, seed) in units]  # a shard's
        if not labels:
            continue
        finished = {lb for lb in labels if sorted(steps_of.get((lb, seed), [])) == list(range(cfg.steps + 1))}
        sp = SeedPlan(seed, {})
        seeds[seed] = sp
        ckpt = None
        path = checkpoint_path(run_dir, seed)
        if len(finished) < len(labels) and path.exists():
            try:
                ckpt = SeedCheckpoint.load(path, seed)
            except CheckpointError as e:
                raise ResumeError(str(e)) from None
            diffs = config_differences(_as_now(ckpt.config), saved_cfg)
            if diffs:
                raise ResumeError(
                    f"checkpoint {path} was written under another config than {run_dir / 'config.yaml'} holds now:\n"
                    + format_differences(diffs, "in the checkpoint", "in config.yaml")
                )
            if sorted(ckpt.runs) != sorted(labels):
                raise ResumeError(f"checkpoint {path} holds runs {sorted(ckpt.runs)}, the config runs {sorted(labels)}")
            if size < ckpt.metrics_bytes:
                raise ResumeError(
                    f"{metrics} holds {size} bytes, fewer than the {ckpt.metrics_bytes} it held when checkpoint {path} "
                    "was written: it was cut or replaced since"
                )
            sp.checkpoint, sp.global_rng, sp.mark = path, ckpt.global_rng, ckpt.mark
        for lb in labels:
            if lb in finished:
                sp.runs[lb] = RunPlan(lb, seed, "skip", cfg.steps, cfg.steps)
                continue
            if ckpt is None:
                sp.runs[lb] = RunPlan(lb, seed, "restart", 0, -1)
                continue
            state = ckpt.runs[lb]
            if state is None:
                raise ResumeError(
                    f"checkpoint {path} records run {lb!r} (seed {seed}) as finished, but {metrics} lacks some of its records"
                )
            done, flushed = state.done, state.flushed
            have = sorted(s for s in steps_of.get((lb, seed), []) if s <= flushed)
            if have != list(range(flushed + 1)) or not 0 <= flushed <= done < cfg.steps:
                raise ResumeError(
                    f"{metrics} does not match checkpoint {path}: run {lb!r} (seed {seed}) was checkpointed with steps "
                    f"0..{flushed} written, the file holds {_span(have)} of them"
                )
            sp.runs[lb] = RunPlan(lb, seed, "checkpoint", done, flushed, state)
    return ResumePlan(run_dir, seeds, lines)


def _as_now(config: Any) -> Any:
    """A checkpoint's config as this metaopt validates it: a field added since it was written takes its default.

    So a run directory of an earlier version (without ``schedule:``, say) resumes; a config that
    no longer validates is compared as it is, and its differences are listed.
    """
    from metaopt.jobs.schema import JobConfig

    try:
        return JobConfig.model_validate(config).dump()
    except Exception:  # noqa: BLE001 - whatever it is, the comparison names the fields
        return config


def _span(steps: list[int]) -> str:
    if not steps:
        return "none"
    if steps == list(range(steps[0], steps[-1] + 1)):
        return f"steps {steps[0]}..{steps[-1]}"
    return f"{len(steps)} records (steps {steps[0]}..{steps[-1]}, with gaps or repeats)"
