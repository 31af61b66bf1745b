"""The files of a run directory, each with one owner: ``metrics.jsonl`` read by one reader
(a torn last line skipped, a bad line elsewhere an error naming file and line, for the summary,
``metaopt report`` and ``--resume`` alike). About 10 s."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_cli import invoke  # the same CLI helper

from metaopt.jobs.metrics import MetricsError, read_metrics, read_metrics_lines

#: a run directory written by metaopt at commit eb4a16f: three contenders on a tiny
#: GPT with dropout, one seed, 90 steps, stopped by Ctrl-C after the checkpoint of round 30.
#: adam under a cosine schedule (a scheduler's state), MADA unrolled on the next training batch
#: (a batch drawn ahead) and on validation batches (a second generator). expected.jsonl: the
#: records of the same config run without a stop, by that commit, wall-clock fields left out.
FORMAT_1 = Path(__file__).resolve().parent / "data" / "run-dir-format-1"


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
