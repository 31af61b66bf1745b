"""`metaopt run` over several processes: torchrun with DDP and FSDP2 on 2 CPU processes (gloo).

Each run of the job is trained by both processes together, each on its half of every batch; the
reference is one process on the whole batch. Rank 0 alone writes. A run killed (every process,
SIGKILL) after a checkpoint resumes to the numbers of an uninterrupted run. The refusals
(devices, world sizes, what several processes cannot do) come before anything starts. About
45 s on 2 CPU cores, most of it torchrun and process start-up.

How close is close: every process computes the same model from the same seed, so the only
difference from one process is where the float32 sums are cut. A step's gradient is the mean of
the two halves' mean gradients (all-reduced, then divided) instead of one mean over the whole
batch; each sum is rounded differently, by a few units in the last place (float32: 2^-24 ≈
6e-8 relative). Adam and MADA normalise the step, so such a difference moves the parameters by
about that relative amount per step, and does not grow over these 100 steps: the
losses (near 3) measured 2 units in the last place apart (4.8e-7) at most. ATOL is 40 units
(1.5e-5): far above that, and far below what a wrong share of the batch makes (two halves of one
batch differ in loss by about 1e-2, see `test_the_halves_of_a_batch_differ`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.distributed as dist

matplotlib.use("Agg")

from test_cli import invoke, only_run_dir, records, trained  # noqa: E402 - the same CLI helpers


pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1.5e-5  # 40 float32 units in the last place of a loss near 3: the module docstring says why
#: the quick job, long enough to be killed between its checkpoint and its end, one thread per process
ARGS = ("--quick", "--steps", "100", "--set", "checkpoint_every=25", "--set", "threads=1", "--no-progress")
KEY = lambda r: (r["seed"], r["optimizer"], r["step"])  # noqa: E731


def metaopt(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m metaopt ARGS`` in a fresh process (torchrun needs real processes)."""
    return finished([sys.executable, "-m", "metaopt", *args], timeout)


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m metaopt ARGS``, as a user types it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "metaopt", *args]
    return finished(cmd, timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finished(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``cmd`` run to its end; past ``timeout``, it and every process it started (torchrun's
    workers run in sessions of their own) are killed, so that a hung run cannot outlive its test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in process_tree(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def by_step(run_dir: Path) -> dict:
    return {KEY(r): r for r in records(run_dir)}


def untimed(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("time", "train_time")}


def assert_close_to(run_dir: Path, reference: Path) -> None:
    """The same records as one process's, each loss and coefficient within ATOL."""
    # every record once, as a list (a dict would fold a second rank's copies away): rank 0 wrote, the other did not
    assert sorted(map(KEY, records(run_dir))) == sorted(map(KEY, records(reference)))
    got, ref = by_step(run_dir), by_step(reference)
    worst = 0.0
    for k, r in ref.items():
        g = got[k]
        for field in ("train_loss", "val_loss"):
            assert (g[field] is None) == (r[field] is None), (k, field)
            if r[field] is not None:
                worst = max(worst, abs(g[field] - r[field]))
        for name, v in r.get("coefficients", {}).items():
            worst = max(worst, abs(g["coefficients"][name] - v))
        assert g.get("lr") == r.get("lr")
    assert worst <= ATOL, worst


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("one"), *ARGS)


def test_torchrun_ddp_equals_one_process_on_the_same_global_batch(one_process, tmp_path):
    done = torchrun("run", *ARGS, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert_close_to(run_dir, one_process)
    # rank 0 alone speaks: one summary line, one table
    assert done.stderr.count("each over 2 processes (DDP); per step each process takes 8 sequences") == 1, done.stderr
    assert done.stdout.count("| optimizer |") == 1
    saved = (run_dir / "config.yaml").read_text()
    assert "distributed: {nproc: 2, strategy: ddp}" in saved and "device: cpu" in saved
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete_runs"] == 2 and not summary["interrupted"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_nproc_fsdp2_equals_one_process_and_resumes_after_a_kill_to_the_same_numbers(one_process, tmp_path):
    """Killed (SIGKILL, every process: the command, torchrun, both ranks) past its checkpoint at step 50.

    The records it wrote after the checkpoint are trained again on resume: they must come out
    the same, bit for bit; and the whole run must match one process.
    """
    out = tmp_path / "killed"
    args = (*ARGS, "--set", "checkpoint_every=50", "--nproc", "2", "--set", "distributed.strategy=fsdp2", "--out", str(out))
    proc = subprocess.Popen([sys.executable, "-m", "metaopt", "run", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not past(out, 60):  # every run's records beyond the checkpoint (step 50) on disk
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for pid in process_tree(proc.pid):
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    run_dir = only_run_dir(out)
    before = {KEY(r): r for r in whole_lines(run_dir)}
    assert max(k[2] for k in before) < 100  # stopped midway

    resumed = metaopt("run", "--resume", str(run_dir), "--no-progress")  # config.yaml says 2 processes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "adam from step 50, mada from step 50" in resumed.stderr and "starting 2 processes" in resumed.stderr
    after = by_step(run_dir)
    assert {k: untimed(after[k]) for k in before} == {k: untimed(r) for k, r in before.items()}
    assert_close_to(run_dir, one_process)


def whole_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records, without a last line a kill may have cut."""
    found = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return found


def past(out: Path, step: int) -> bool:
    """Whether every run of the job under ``out`` has written its records up to ``step``."""
    dirs = list(out.glob("*/metrics.jsonl")) if out.exists() else []
    if not dirs:
        return False
    last: dict[str, int] = {}
    for r in whole_lines(dirs[0].parent):
        last[r["optimizer"]] = max(last.get(r["optimizer"], 0), r["step"])
    return len(last) == 2 and min(last.values()) >= step


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc: torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def test_the_halves_of_a_batch_differ():
    """What ATOL must stay far below: a process that trained on the wrong rows would be this far off."""
    from metaopt.jobs.config import build_config, read_config_file, resolve_config_path
    from metaopt.jobs.train import Job, build_model, lm_loss

    cfg = build_config(read_config_file(resolve_config_path("quick")))
    job = Job(cfg)
    model = build_model(cfg, job.data.vocab_size, 0, job.device)
    x, y = job.data.batch("train", cfg.batch_size, cfg.model.block_size, torch.Generator().manual_seed(0))
    half = cfg.batch_size // 2
    with torch.no_grad():
        whole = lm_loss(model, (x, y))
        first, second = lm_loss(model, (x[:half], y[:half])), lm_loss(model, (x[half:], y[half:]))
    assert abs(float(first) - float(second)) > 100 * ATOL
    assert abs(float((first + second) / 2) - float(whole)) < 1e-6  # equal halves: the mean of means


# -- refused before anything starts --------------------------------------------------------------


def test_nproc_without_the_devices_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    result = invoke("run", "--quick", "--nproc", "4", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "--nproc 4 (distributed.nproc): this machine has 2 CPU cores" in result.output
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = invoke("run", "--quick", "--nproc", "2", "--device", "cuda", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "--nproc 2 (distributed.nproc): this machine has 1 CUDA device, and each process needs one" in result.output
    assert not any(tmp_path.iterdir())  # nothing made


def test_a_config_for_another_world_size_is_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("run", "--quick", "--set", "distributed.nproc=4", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "distributed.nproc is 4, but torchrun started 2 processes" in result.output
    result = invoke("run", "--quick", "--set", "batch_size=15", "--out", str(tmp_path))  # 15 rows do not halve
    assert result.exit_code == 2
    assert "batch_size 15 does not split into distributed.nproc (2)" in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("override", "field", "says"), [
    ("optimizers.mada.hypergrad.mode=unrolled", "optimizers.1.hypergrad.mode", "the unrolled mode takes whole batches"),
    ("model.dropout=0.1", "model.dropout", "one shared dropout stream"),
    ("launcher.kind=local", "distributed.nproc", "fan a job out over machines with --shard"),
    ("device=cuda:1", "device", "names one device"),
])
def test_what_several_processes_cannot_do_is_refused_with_the_field(override, field, says, tmp_path):
    result = invoke("run", "--quick", "--nproc", "2", "--set", override, "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert field in result.output and says in result.output
    assert not any(tmp_path.iterdir())


def test_fsdp2_refuses_a_family_that_mixes_coordinates(tmp_path):
    """Each process would run its rule on one shard of each parameter (the engine refuses it too)."""
    out = tmp_path / "runs"
    family = Path(__file__).with_name("_util.py")  # its NormalisedSGD, as a family file
    result = invoke("run", "--quick", "--nproc", "2", "--set", f"optimizers.mada.kind={family}:NormalisedSGD",
                    "--set", "optimizers.mada.point=null", "--set", "distributed.strategy=fsdp2", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "distributed.strategy: optimizer 'mada': its family's rule mixes coordinates" in result.output
    assert not out.exists()


def test_gradient_accumulation_equals_the_whole_batch(one_process, tmp_path):
    """Two micro-batches of 8 in one process: their gradients add up to the batch of 16's."""
    result = invoke("run", *ARGS, "--set", "gradient_accumulation=2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert_close_to(only_run_dir(tmp_path), one_process)


def test_gpt2_124m_study_config_validates_with_dry_run(tmp_path):
    """studies/gpt2-124m/config.yaml (8 GPUs) checked here: a note for the missing GPUs, the rest set up on the CPU."""
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 50_000), ("val.bin", 5_000)):  # stand-in OpenWebText: GPT-2 token ids
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(tmp_path / name)
    result = invoke("run", str(ROOT / "studies" / "gpt2-124m" / "config.yaml"), "--dry-run", "--set", f"data.tokens={tmp_path}")
    assert result.exit_code == 0, result.output
    assert "124,475,904 parameters" in result.output
    assert "each over 8 processes (DDP); per step each process takes 12 sequences x 5 micro-batches" in result.output
    assert "the dry run checks the rest here" in result.output or torch.cuda.device_count() >= 8
    assert "distributed: {nproc: 8, strategy: ddp}" in result.output and "device: cuda" in result.output
