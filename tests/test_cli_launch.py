"""`metaopt run` beyond one process: --jobs (local processes), --launcher ray, --shard, and the
refusals before anything starts. Each launched job is compared with the same job trained in one
process: a run depends on its config, seed and thread count alone, so every number but the
timings must be equal. About 1-2 minutes on 2 CPU cores, most of it Ray's start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from test_cli import invoke, only_run_dir, runner, trained  # noqa: E402 - the same CLI helpers

from metaopt.cli import app  # noqa: E402

TIMINGS = ("steps_per_s", "wall_time_s", "train_time_s")
#: a quick job with 2 seeds and one thread per run (bit-identical wherever it runs)
BASE = ("--quick", "--seeds", "2", "--set", "threads=1", "--no-progress")


def numbers(run_dir: Path) -> dict:
    """summary.json without its timings, name and plot captions (the numbers a launcher must not change)."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in (*TIMINGS, "name", "plots")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(json.loads((run_dir / "summary.json").read_text()))


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The job trained in one process, the reference."""
    return trained(tmp_path_factory.mktemp("sequential"), *BASE)


def test_jobs_2_equals_one_process_and_resumes_a_lost_unit(sequential, tmp_path):
    result = invoke("run", *BASE, "--jobs", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    run_dir = only_run_dir(tmp_path)
    assert numbers(run_dir) == numbers(sequential)
    units = sorted((run_dir / "units").iterdir())
    assert [u.name for u in units] == ["000-adam-seed0", "001-mada-seed0", "002-adam-seed1", "003-mada-seed1"]
    # the records of a run are those of the run in one process, step for step
    seq = [json.loads(line) for line in (sequential / "metrics.jsonl").read_text().splitlines()]
    par = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    key = lambda r: (r["seed"], r["optimizer"], r["step"])  # noqa: E731
    drop = lambda r: {k: v for k, v in r.items() if k not in ("time", "train_time")}  # noqa: E731
    assert sorted(map(key, seq)) == sorted(map(key, par))
    assert {key(r): drop(r) for r in seq} == {key(r): drop(r) for r in par}

    # a unit lost (its metrics gone): --resume trains it again, the others stay as they are
    (units[3] / "metrics.jsonl").unlink()
    kept = (units[0] / "metrics.jsonl").read_bytes()
    result = invoke("run", "--resume", str(run_dir), "--jobs", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "adam seed 0: finished before" in result.output
    assert (units[0] / "metrics.jsonl").read_bytes() == kept
    assert numbers(run_dir) == numbers(sequential)


def test_shards_joined_by_report_equal_the_whole(sequential, tmp_path):
    for i in (0, 1):
        result = invoke("run", *BASE, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}"))
        assert result.exit_code == 0, result.output
        shard = only_run_dir(tmp_path / f"s{i}")
        summary = json.loads((shard / "summary.json").read_text())
        # runs in seed order, then the optimizers': shard 0 has adam, shard 1 mada, on both seeds
        assert {(r["optimizer"], r["seed"]) for r in summary["runs"]} == {(["adam", "mada"][i], s) for s in (0, 1)}
        assert not summary["interrupted"] and summary["expected_runs"] == 2
    result = invoke("report", str(only_run_dir(tmp_path / "s0")), str(only_run_dir(tmp_path / "s1")),
                    "--out", str(tmp_path / "whole"), "--name", "quick")
    assert result.exit_code == 0, result.output
    assert numbers(tmp_path / "whole") == numbers(sequential)


def test_bad_launch_settings_are_refused_before_anything_starts(tmp_path):
    out = tmp_path / "never"
    cases = [
        (("--jobs", "5"), "--jobs 5 (launcher.jobs): the job has only 4 runs"),
        (("--shard", "2/2"), "shard 2/2 is out of range: I must be 0..1"),
        (("--shard", "1-2"), "a shard is I/N"),
        (("--shard", "4/5"), "shard 4/5 holds no run: the job has only 4"),
        (("--launcher", "ray", "--jobs", "2"), "jobs applies to the local launcher, not 'ray'"),
        (("--launcher", "slurm"), "launcher.kind"),
        (("--address", "127.0.0.1:1"), "launcher.address: no Ray cluster answers at '127.0.0.1:1'"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["run", *BASE, "--out", str(out), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    assert not out.exists()


def test_resume_refuses_another_layout(sequential, tmp_path):
    result = runner.invoke(app, ["run", "--resume", str(sequential), "--jobs", "2"])
    assert result.exit_code == 2 and "its runs trained in one process" in result.output, result.output
    result = invoke("run", *BASE, "--jobs", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    run_dir = only_run_dir(tmp_path)
    result = runner.invoke(app, ["run", "--resume", str(run_dir), "--launcher", "inline"])
    assert result.exit_code == 2 and "resume it with --jobs N or --launcher ray" in result.output, result.output
    result = invoke("run", "--resume", str(run_dir), "--no-progress")  # its config.yaml names its launcher
    assert result.exit_code == 0 and "adam seed 0: finished before" in result.output, result.output


def _first_checkpoint(run_dir_parent: Path, deadline: float) -> Path | None:
    while time.monotonic() < deadline:
        for p in run_dir_parent.glob("*/units/*/checkpoints/*.pt"):
            return p
        time.sleep(0.05)
    return None


@pytest.mark.slow
def test_ctrl_c_stops_every_unit_and_resume_ends_equal(tmp_path):
    """A real SIGINT to `metaopt run --jobs 2`: each unit process gets it, keeps its checkpoint,
    the command exits 130; --resume then ends with the numbers of an uninterrupted run."""
    args = ["--quick", "--steps", "400", "--set", "threads=1", "--set", "checkpoint_every=20", "--no-progress"]
    ref = invoke("run", *args, "--out", str(tmp_path / "ref"))
    assert ref.exit_code == 0, ref.output
    out = tmp_path / "runs"
    child = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from metaopt.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", child, "run", *args, "--jobs", "2", "--out", str(out)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _first_checkpoint(out, time.monotonic() + 120) is not None, "no unit checkpointed in 120 s"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "stopped at step" in output, output
    run_dir = only_run_dir(out)
    assert json.loads((run_dir / "summary.json").read_text())["interrupted"] is True
    result = invoke("run", "--resume", str(run_dir), "--no-progress", "--jobs", "2")
    assert result.exit_code == 0, result.output
    assert numbers(run_dir) == numbers(only_run_dir(tmp_path / "ref"))


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_launcher_equals_one_process_and_retries_a_killed_unit(ray_local, tmp_path):
    """On a local Ray instance: the summary of one process; a unit whose worker is killed
    (SIGKILL) mid-run is tried again from its checkpoint and ends with the same numbers."""
    args = ["--quick", "--steps", "300", "--set", "threads=1", "--set", "checkpoint_every=20", "--no-progress"]
    ref = invoke("run", *args, "--out", str(tmp_path / "ref"))
    assert ref.exit_code == 0, ref.output
    out = tmp_path / "ray"
    killed: list[int] = []

    def kill_first_unit():
        ckpt = _first_checkpoint(out, time.monotonic() + 120)
        if ckpt is not None:
            unit = ckpt.parent.parent
            pid = int((unit / "pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    watcher = threading.Thread(target=kill_first_unit)
    watcher.start()
    result = invoke("run", *args, "--launcher", "ray", "--out", str(out))
    watcher.join()
    assert result.exit_code == 0, result.output
    assert killed, "no unit checkpointed: nothing was killed"
    run_dir = only_run_dir(out)
    attempts = [line for u in (run_dir / "units").iterdir() for line in (u / "log.txt").read_text().splitlines()
                if line.startswith("attempt in process")]
    assert len(attempts) == 3 and f"attempt in process {killed[0]}" in attempts, attempts  # 2 units, one tried twice
    assert numbers(run_dir) == numbers(only_run_dir(tmp_path / "ref"))
