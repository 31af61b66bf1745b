"""The job checkpoint's format: `RunState` (one run) and `SeedCheckpoint` (the file of a seed).

These two records are the format's only owners: what a checkpoint holds, how it is written
(atomically) and how it is read back and checked. ``metaopt.jobs.train`` fills a `RunState` from
a run and restores a run from one; ``metaopt.jobs.resume`` plans a resume from the
`SeedCheckpoint` s it loads.

One file per seed, ``RUN_DIR/checkpoints/seed-<seed>.pt``, holds every unfinished run of that
seed (a seed's runs are interleaved step by step, so they are checkpointed together, after the
same round). On disk it is a ``torch.save`` of plain data (format 1)::

    {"kind": KIND, "format": 1, "seed", "config", "mark", "global_rng", "metrics_bytes",
     "runs": {label: RunState's fields as a dict, or None for a run finished before}}

Fields added since format 1 was first written (``scheduler``, ``hgrads``, ``hgrads_from``,
``lrs``) may be absent: such a checkpoint resumes as the code that wrote it ran (`RunState`).
Writes are atomic: a temporary file in the same directory, flushed and fsynced, then
``os.replace`` (and the directory fsynced). A kill at any point leaves the previous checkpoint or
the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
KIND = "metaopt.jobs checkpoint"

Tensor = torch.Tensor


class CheckpointError(Exception):
    """A checkpoint file that cannot be read, is not a job checkpoint, or lacks what one holds."""


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run directory's checkpoints go: ``RUN_DIR/checkpoints``."""
    return run_dir / "checkpoints"


def checkpoint_path(run_dir: Path, seed: int) -> Path:
    """The checkpoint file of one seed: ``RUN_DIR/checkpoints/seed-<seed>.pt``."""
    return checkpoint_dir(run_dir) / f"seed-{seed}.pt"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform opens directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same directory.

    Then fsync, ``os.replace``, fsync of the directory.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically, as ``save_atomic`` does: a temporary file, fsync, ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(kw_only=True)
class RunState:
    """Everything a continued run needs to take the steps one run (optimizer, seed) would have taken.

    The field names are the keys on disk. Taken between steps (so between unrolled hyper-steps
    too). The steps done but not yet written to ``metrics.jsonl`` (``flushed``..``done``) live in
    the buffers ``losses``, ``coefs``, ``hgrads``, ``times``, ``train_times`` and ``lrs``.
    """

    done: int  #: steps taken
    flushed: int  #: its records in metrics.jsonl: steps 0..flushed
    model: dict[str, Any]  #: ``model.state_dict()``
    optimizer: dict[str, Any]  #: ``opt.state_dict()``
    #: ``sched.state_dict()``; None without a schedule (and in a checkpoint from before schedules)
    scheduler: dict[str, Any] | None = None
    generator: Tensor  #: the training batches' generator
    meta_generator: Tensor | None  #: the validation batches' of an unrolled ``meta_objective: val``
    rng: list[Tensor | None] | None  #: the run's own global-RNG stream (dropout): [cpu, cuda]
    queue: list[list[Tensor]]  #: a training batch drawn ahead (unrolled, ``meta_objective: train``)
    losses: Tensor  #: (steps,) training losses
    coefs: Tensor | None  #: (steps, coefficients) or None (torch's optimizers)
    #: (steps, learned) |h| per step, or None; None with ``hgrads_from`` None: a checkpoint from
    #: before |h| was recorded
    hgrads: Tensor | None = None
    hgrads_from: int | None = None  #: the first step whose |h| ``hgrads`` holds
    times: list[float]  #: the run's own seconds at each step
    train_times: list[float]  #: its steps' seconds at each step
    lrs: list[float] | None = None  #: the lr of each step; None: from before it was recorded (a constant lr)
    elapsed: float
    train_elapsed: float
    val: dict[int, float]  #: step -> validation loss
    last_coefs: dict[str, float]  #: the coefficients of the last record written

    def to_dict(self) -> dict[str, Any]:
        """The run's entry in the checkpoint file (plain data, ``torch.load(weights_only=True)`` reads it)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """The keys every format-1 checkpoint holds (the others came later and may be absent)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING)

    @classmethod
    def from_dict(cls, data: Any) -> RunState:
        """A run's entry of a checkpoint file, read back.

        Raises:
            CheckpointError: a key of `required` is missing (the message lists them).
        """
        missing = [k for k in cls.required() if not isinstance(data, dict) or k not in data]
        if missing:
            raise CheckpointError(f"lacks {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        state.done, state.flushed = int(state.done), int(state.flushed)
        if "hgrads" in data and "hgrads_from" not in data:  # written before hgrads_from was: all of them
            state.hgrads_from = 0
        return state


@dataclass(kw_only=True)
class SeedCheckpoint:
    """The checkpoint file of one seed: its runs' `RunState` s, after the same round.

    ``runs`` holds every label of the config: None for a run that had finished before that round.
    """

    seed: int
    config: dict[str, Any]  #: the job's config (``JobConfig.dump()``, the device resolved)
    mark: int  #: the round after which it was written (the slowest unfinished run's step)
    global_rng: list[Tensor | None]  #: the global generator after that round: [cpu, cuda]
    metrics_bytes: int  #: the size of metrics.jsonl then: its records reached the disk first
    runs: dict[str, RunState | None]

    def to_dict(self) -> dict[str, Any]:
        """The file's content."""
        return {
            "kind": KIND,
            "format": FORMAT,
            "seed": self.seed,
            "config": self.config,
            "mark": self.mark,
            "global_rng": self.global_rng,
            "metrics_bytes": self.metrics_bytes,
            "runs": {label: None if s is None else s.to_dict() for label, s in self.runs.items()},
        }

    def save(self, path: Path) -> None:
        """Write it to ``path`` atomically (`save_atomic`)."""
        save_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path, seed: int) -> SeedCheckpoint:
        """The checkpoint of ``seed`` at ``path``, checked for the layout ``save`` writes.

        Raises:
            CheckpointError: naming ``path``: it cannot be read (torn, corrupt), is not a job
                checkpoint, has another format, is for another seed, or lacks a field.
        """
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torn zip, garbage, a pickle of something else: all one answer
            why = str(e).strip().split("\n")[0].split(". ")[0]  # torch's first sentence; the rest is advice
            raise CheckpointError(f"checkpoint {path} cannot be read (corrupt or truncated?): {type(e).__name__}: {why}") from None
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise CheckpointError(f"{path} is not a metaopt job checkpoint")
        if data.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {data.get('format')!r}; this metaopt reads format {FORMAT}")
        problems = []
        if data.get("seed") != seed:
            problems.append(f"it is for seed {data.get('seed')!r}, not {seed}")
        for key in ("config", "runs", "mark", "global_rng", "metrics_bytes"):
            if key not in data:
                problems.append(f"no {key!r}")
        runs: dict[str, RunState | None] = {}
        if isinstance(data.get("runs"), dict):
            for label, entry in data["runs"].items():
                try:
                    runs[label] = None if entry is None else RunState.from_dict(entry)
                except CheckpointError as e:
                    problems.append(f"run {label!r} {e}")
        elif "runs" in data:
            problems.append("'runs' is not a mapping")
        if problems:
            raise CheckpointError(f"checkpoint {path} is malformed: {'; '.join(problems)}")
        return cls(seed=seed, config=data["config"], mark=int(data["mark"]), global_rng=data["global_rng"],
                   metrics_bytes=int(data["metrics_bytes"]), runs=runs)
