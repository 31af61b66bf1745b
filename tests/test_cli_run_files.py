"""The files of a run directory, each with one owner: ``metrics.jsonl`` read by one reader
(a torn last line skipped, a bad line elsewhere an error naming file and line, for the summary,
``metaopt report`` and ``--resume`` alike), and the checkpoint's format held by ``RunState`` and
``SeedCheckpoint`` (a checkpoint written before they existed still resumes). About 10 s."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from test_cli import invoke  # the same CLI helper

from metaopt.jobs.metrics import MetricsError, read_metrics, read_metrics_lines
from metaopt.jobs.run_state import CheckpointError, RunState, SeedCheckpoint

#: a run directory written by metaopt before RunState (commit eb4a16f): three contenders on a tiny
#: GPT with dropout, one seed, 90 steps, stopped by Ctrl-C after the checkpoint of round 30.
#: adam under a cosine schedule (a scheduler's state), MADA unrolled on the next training batch
#: (a batch drawn ahead) and on validation batches (a second generator). expected.jsonl: the
#: records of the same config run without a stop, by that commit, wall-clock fields left out.
FORMAT_1 = Path(__file__).resolve().parent / "data" / "run-dir-format-1"

#: the keys of a run's entry in a format-1 checkpoint, as the code before RunState wrote them
FORMAT_1_RUN_KEYS = [
    "done", "flushed", "model", "optimizer", "scheduler", "generator", "meta_generator", "rng", "queue", "losses",
    "coefs", "hgrads", "hgrads_from", "times", "train_times", "lrs", "elapsed", "train_elapsed", "val", "last_coefs",
]
#: and those it checked for on reading (the others came later)
FORMAT_1_REQUIRED = [
    "done", "flushed", "model", "optimizer", "generator", "meta_generator", "rng", "queue", "losses", "coefs",
    "times", "train_times", "elapsed", "train_elapsed", "val", "last_coefs",
]


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A copy of the format-1 run directory (a resume changes it)."""
    path = tmp_path / "run"
    shutil.copytree(FORMAT_1, path)
    (path / "expected.jsonl").unlink()
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


# -- metrics.jsonl: one reader ----------------------------------------------------------------------


def test_a_torn_last_line_is_skipped(tmp_path):
    a, b = json.dumps({"step": 0, "x": 1.5}), json.dumps({"step": 1, "x": 2.0})
    for torn in (b[:7], b[:-3], b):  # cut short; cut in a number (still parses); whole but no newline
        path = _write(tmp_path / "m.jsonl", f"{a}\n{torn}")
        assert read_metrics(path) == [{"step": 0, "x": 1.5}], torn
        assert [line.text for line in read_metrics_lines(path)] == [a + "\n"]
    assert read_metrics(_write(tmp_path / "m.jsonl", f"{a}\n{b}\n")) == [{"step": 0, "x": 1.5}, {"step": 1, "x": 2.0}]
    assert read_metrics(_write(tmp_path / "m.jsonl", "")) == []
    assert read_metrics(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize("bad", ['{"step": 1, "x"', "", "[1, 2]"])
def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path, bad):
    a = json.dumps({"step": 0})
    path = _write(tmp_path / "m.jsonl", f"{a}\n{bad}\n{a}\n")
    with pytest.raises(MetricsError, match=r"m\.jsonl, line 2: "):
        read_metrics(path)


def test_the_summary_the_report_and_resume_read_metrics_alike(run_dir, tmp_path):
    """A torn last line: the report summarises without it and a resume drops it; a bad line
    elsewhere: both refuse, naming the file and the line, and change nothing."""
    metrics = run_dir / "metrics.jsonl"
    good = metrics.read_text(encoding="utf-8")
    _write(metrics, good + good.splitlines()[-1][:20])  # a kill while writing
    result = invoke("report", str(run_dir))
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["expected_runs"] == 3 and summary["complete_runs"] == 0

    lines = good.splitlines(keepends=True)
    broken = "".join(lines[:5]) + lines[5][:30] + "\n" + "".join(lines[6:])
    _write(metrics, broken)
    for args in (("report", str(run_dir)), ("run", "--resume", str(run_dir), "--no-progress")):
        result = invoke(*args)
        assert result.exit_code != 0, args
        assert f"{metrics}, line 6: not a JSON record" in result.stderr, (args, result.stderr)
        assert metrics.read_text(encoding="utf-8") == broken


# -- the checkpoint: one format -----------------------------------------------------------------------


def test_run_state_writes_the_format_1_layout():
    """RunState's fields are format 1's keys, in its order; it requires what format 1 always held."""
    fields = {k: None for k in FORMAT_1_RUN_KEYS}
    assert list(RunState(**fields).to_dict()) == FORMAT_1_RUN_KEYS
    assert list(RunState.required()) == FORMAT_1_REQUIRED
    saved = torch.load(FORMAT_1 / "checkpoints" / "seed-0.pt", weights_only=True)
    assert sorted(saved) == sorted(SeedCheckpoint.load(FORMAT_1 / "checkpoints" / "seed-0.pt", 0).to_dict())
    for entry in saved["runs"].values():
        assert list(entry) == FORMAT_1_RUN_KEYS


def test_a_run_state_from_before_schedules_and_hypergradients_reads_as_that_code_ran():
    entry = torch.load(FORMAT_1 / "checkpoints" / "seed-0.pt", weights_only=True)["runs"]["unrolled"]
    state = RunState.from_dict(entry)
    assert (state.done, state.flushed, state.hgrads_from) == (60, 60, 0) and state.lrs is not None
    for key in ("scheduler", "hgrads", "hgrads_from", "lrs"):
        del entry[key]
    old = RunState.from_dict(entry)
    assert old.scheduler is None and old.hgrads is None and old.hgrads_from is None and old.lrs is None
    del entry["model"], entry["val"]
    with pytest.raises(CheckpointError, match="lacks model, val"):
        RunState.from_dict(entry)


def test_a_malformed_checkpoint_names_the_run_and_what_it_lacks(tmp_path):
    saved = torch.load(FORMAT_1 / "checkpoints" / "seed-0.pt", weights_only=True)
    del saved["runs"]["adam"]["losses"]
    del saved["metrics_bytes"]
    torch.save(saved, tmp_path / "seed-0.pt")
    with pytest.raises(CheckpointError, match=r"malformed: no 'metrics_bytes'; run 'adam' lacks losses"):
        SeedCheckpoint.load(tmp_path / "seed-0.pt", 0)
    with pytest.raises(CheckpointError, match="it is for seed 0, not 3"):
        SeedCheckpoint.load(FORMAT_1 / "checkpoints" / "seed-0.pt", 3)


def _close(a, b) -> bool:
    """Equal, floats to 1e-4 relative: the part of expected.jsonl after the checkpoint is
    recomputed here, and another CPU may round the tiny GPT's steps otherwise (on the machine
    that wrote it they were equal bit for bit)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


def test_a_checkpoint_written_before_run_state_resumes(run_dir):
    """The run directory of the code before RunState resumes to that code's uninterrupted records."""
    result = invoke("run", "--resume", str(run_dir), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "adam from step 30, unrolled from step 60, unrolled-val from step 45 (checkpoint seed-0.pt)" in result.stderr
    got = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in got:
        del r["time"], r["train_time"]
    want = [json.loads(line) for line in (FORMAT_1 / "expected.jsonl").read_text().splitlines()]
    key = lambda r: (r["optimizer"], r["step"])  # noqa: E731
    got, want = sorted(got, key=key), sorted(want, key=key)
    assert [key(r) for r in got] == [key(r) for r in want]  # every step of every run once
    for g, w in zip(got, want):
        assert _close(g, w), (g, w)
    assert not (run_dir / "checkpoints").exists()
