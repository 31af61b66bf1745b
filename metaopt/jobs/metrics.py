"""``metrics.jsonl``, a job's step-by-step records: the writer (`MetricsLog`) and the one reader.

One JSON object per line, each line ending in a newline, appended window by window by the runs of
a job. A process killed while writing leaves a *torn last line* (cut short, or without its
newline): every reader skips it, since it is the record of a step that was not finished being
written. A bad line anywhere else was not made by a kill (an edited or damaged file) and is an
error naming the file and the line: `read_metrics_lines` and `read_metrics` are the only readers
of the file, so the summary, the report and ``--resume`` agree on what it holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the name of the records' file in a run directory
METRICS_FILE = "metrics.jsonl"


class MetricsError(ValueError):
    """A ``metrics.jsonl`` line other than the last that is not a JSON record; names file and line."""


@dataclass(frozen=True)
class MetricsLine:
    """One line of ``metrics.jsonl``: its text as on disk (with its newline) and its record."""

    text: str
    record: dict[str, Any]


def read_metrics_lines(path: Path) -> list[MetricsLine]:
    """Every complete line of a ``metrics.jsonl``, in file order; none for a missing file.

    A torn last line (without its newline, or not a JSON object: a killed writer) is skipped.
    A last line without newline that parses is skipped too: a number cut short still parses.

    Raises:
        MetricsError: a line before the last that is not a JSON object, naming the file and the
            line number.
    """
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        texts = f.readlines()
    out = []
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            if last:
                break
            raise MetricsError(f"{path}, line {i + 1}: not a JSON record ({e.msg}); only the last line may be torn") from None
        if not isinstance(record, dict):
            if last:
                break
            raise MetricsError(f"{path}, line {i + 1}: a JSON {type(record).__name__}, not a record")
        if last and not text.endswith("\n"):
            break
        out.append(MetricsLine(text, record))
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (`read_metrics_lines`' rules: a torn last line skipped)."""
    return [line.record for line in read_metrics_lines(path)]


class MetricsLog:
    """``metrics.jsonl``, appended and flushed window by window.

    What was written survives a crash or Ctrl-C.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append ``records``, one JSON line each, and flush."""
        if records:
            self._f.write("".join(json.dumps(r) + "\n" for r in records))
            self._f.flush()

    def sync(self) -> int:
        """Everything written on disk (before a checkpoint that counts on it); the file's size."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullLog:
    """A `MetricsLog` that writes nothing: a process other than rank 0 of a run over several."""

    def write(self, records: list[dict[str, Any]]) -> None:
        """Nothing: rank 0 writes the records."""

    def sync(self) -> int:
        """Nothing written: 0."""
        return 0

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> NullLog:
        return self

    def __exit__(self, *exc) -> None:
        pass
