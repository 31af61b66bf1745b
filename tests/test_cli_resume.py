"""`metaopt run --resume RUN_DIR`: a run killed with SIGKILL in the middle of its second seed,
then resumed, ends with the records and summary of an uninterrupted run of the same config (every
field but the wall-clock ones); without a checkpoint the unfinished runs start again from step 0;
a corrupt or truncated checkpoint, a changed config, an edited config.yaml are refused with an
error naming the culprit, leaving metrics.jsonl as it was. About 30-50 s on 2 CPU cores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from test_cli import invoke, only_run_dir  # noqa: E402 - the same CLI helpers

TIMING = ("time", "train_time")
SUMMARY_TIMING = ("train_time_s", "wall_time_s", "steps_per_s")

# Four contenders on a tiny GPT with dropout (each run its own stream of the global generator),
# two seeds: Adam; MADA with one-step hyper-gradients; MADA unrolled, K=2 every round, scored on
# the next training batch (drawn ahead: a checkpoint holds it), 2 steps a round, so it finishes
# at round 45, between the checkpoints of rounds 30 and 60; MADA unrolled on validation batches
# (its own generator) K=2 every 3 steps, plain steps between. Neither log_interval nor
# eval_interval divides checkpoint_every: a checkpoint holds steps not yet written. Every MADA
# learns from its first step (`warmup: 0`, `clip: false`: unset, they would take MADA's default
# warm-up of 50 steps), so that the checkpoints hold moving coefficients and hyper-optimizer state.
STEPS = 90
CONFIG = f"""\
name: tiny
model: {{n_layer: 1, n_head: 2, n_embd: 16, block_size: 16, dropout: 0.1}}
steps: {STEPS}
batch_size: 8
eval_interval: 20
eval_batches: 2
log_interval: 7
checkpoint_every: 30
seeds: [0, 1]
threads: 1
device: cpu
optimizers:
  - {{name: adam, kind: adam}}
  - {{name: mada, kind: mada, point: adam, hypergrad: {{mode: one_step, warmup: 0, clip: false}}}}
  - {{name: unrolled, kind: mada, point: adam, hypergrad: {{mode: unrolled, k: 2, lr: 0.01, warmup: 0, clip: false}}}}
  - {{name: unrolled-val, kind: mada, point: adam, hypergrad: {{mode: unrolled, k: 2, every: 3, first_order: true, meta_objective: val, warmup: 0, clip: false}}}}
"""
LABELS = ("adam", "mada", "unrolled", "unrolled-val")


def runs_of(run_dir: Path) -> dict[tuple[str, int], list[dict]]:
    """Each run's records in file order, without the wall-clock fields; the whole file must parse."""
    out: dict[tuple[str, int], list[dict]] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        for k in TIMING:
            assert isinstance(r.pop(k), float)
        out.setdefault((r["optimizer"], r["seed"]), []).append(r)
    return out


def summary_of(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    for r in s["runs"]:
        for k in SUMMARY_TIMING:
            r.pop(k)
    for e in s["optimizers"].values():
        e.pop("steps_per_s")
    return s


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    got, want = runs_of(run_dir), runs_of(reference)
    assert sorted(got) == sorted(want)
    for key in want:
        assert [r["step"] for r in got[key]] == list(range(STEPS + 1)), key  # every step once, in order
        assert got[key] == want[key], key  # losses, validation losses, coefficients: exactly
    assert summary_of(run_dir) == summary_of(reference)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["interrupted"] is False and s["complete_runs"] == 8
    assert not (run_dir / "checkpoints").exists()  # removed once a seed is complete


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # the config sets threads: 1 in this process
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("reference")
    result = invoke("run", str(config), "--out", str(out), "--no-progress")
    torch.set_num_threads(n)
    assert result.exit_code == 0, result.output
    return only_run_dir(out)


def _records_so_far(path: Path) -> dict[tuple[str, int], int]:
    """The last step logged per run, read while the run writes (a line being written is skipped)."""
    last: dict[tuple[str, int], int] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            last[(r["optimizer"], r["seed"])] = r["step"]
    return last


@pytest.fixture(scope="module")
def killed(config, tmp_path_factory) -> dict:
    """`python -m metaopt.cli run` killed with SIGKILL in seed 1, after its checkpoint of round 30
    and after its run `unrolled` finished (at round 45), before the next checkpoint (round 60):
    the resume must drop the records past the checkpoint of three runs and keep the fourth's."""
    out = tmp_path_factory.mktemp("killed")
    err = out.parent / f"{out.name}-stderr.txt"
    cmd = [sys.executable, "-m", "metaopt.cli", "run", str(config), "--out", str(out), "--no-progress"]
    with open(err, "wb") as se:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=se)
    try:
        deadline, ckpt, logged = time.monotonic() + 180, None, {}
        while time.monotonic() < deadline and proc.poll() is None:
            dirs = [p for p in out.iterdir() if p.is_dir()]
            path = dirs[0] / "checkpoints" / "seed-1.pt" if dirs else None
            if path is not None and path.exists():
                # always whole (written to a temporary file, then renamed): it loads while the run goes on
                ckpt = torch.load(path, weights_only=True)
                logged = _records_so_far(dirs[0] / "metrics.jsonl")
                if ckpt["runs"]["unrolled"] is None:
                    break  # too late: the round-60 checkpoint was written
                if logged.get(("unrolled", 1)) == STEPS:
                    proc.kill()  # SIGKILL: no handler runs, nothing is flushed or summarised
                    break
            time.sleep(0.01)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == -9, f"exit code {code} (not killed in time?):\n{err.read_text()}"
    run_dir = only_run_dir(out)
    ckpt = torch.load(run_dir / "checkpoints" / "seed-1.pt", weights_only=True)  # the last one written
    logged = _records_so_far(run_dir / "metrics.jsonl")
    assert not (run_dir / "summary.json").exists()
    # seed 0 complete, its checkpoint gone; seed 1 under way, past its checkpoint
    assert not (run_dir / "checkpoints" / "seed-0.pt").exists()
    assert all(logged[(lb, 0)] == STEPS for lb in LABELS)
    assert ckpt["mark"] == 30 and ckpt["runs"]["adam"]["done"] == 30
    assert ckpt["runs"]["adam"]["flushed"] == 28  # steps 29, 30 only in the checkpoint
    assert len(ckpt["runs"]["unrolled"]["queue"]) == 1  # the batch drawn ahead
    assert logged[("unrolled", 1)] == STEPS and ckpt["runs"]["unrolled"]["done"] < STEPS  # finished since
    for lb in ("adam", "mada", "unrolled-val"):
        assert logged[(lb, 1)] > ckpt["runs"][lb]["flushed"], lb  # records to drop
    return {"run_dir": run_dir, "ckpt": ckpt}


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / run_dir.name
    shutil.copytree(run_dir, dest)
    return dest


def test_sigkill_then_resume_equals_an_uninterrupted_run(killed, reference, tmp_path):
    run_dir = copy_of(killed["run_dir"], tmp_path)
    ckpt = killed["ckpt"]
    cmd = [sys.executable, "-m", "metaopt.cli", "run", "--resume", str(run_dir), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    # the plan it announced: seed 0 skipped, seed 1 from the checkpoint's steps
    assert "resume seed 0: adam finished, mada finished, unrolled finished, unrolled-val finished" in out.stderr
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("resume seed 1:"))
    vdone = ckpt["runs"]["unrolled-val"]["done"]
    assert line == f"resume seed 1: adam from step 30, mada from step 30, unrolled finished, unrolled-val from step {vdone} (checkpoint seed-1.pt)", line
    assert "| unrolled-val" in out.stdout
    assert_same_as_reference(run_dir, reference)


def test_without_a_checkpoint_unfinished_runs_start_again(killed, reference, tmp_path):
    run_dir = copy_of(killed["run_dir"], tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    result = invoke("run", "--resume", str(run_dir), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "resume seed 1: adam from step 0, mada from step 0, unrolled finished, unrolled-val from step 0\n" in result.stderr
    assert_same_as_reference(run_dir, reference)


def test_resuming_a_finished_run_only_remakes_its_summary(reference, tmp_path):
    run_dir = copy_of(reference, tmp_path)
    before = (run_dir / "metrics.jsonl").read_bytes()
    (run_dir / "summary.json").unlink()
    result = invoke("run", "--resume", str(run_dir), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "resume seed 1: adam finished" in result.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())


def _refused(run_dir: Path, *args: str) -> str:
    """Resume ``run_dir``: refused with exit code 2, a one-screen error, nothing changed."""
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = invoke("run", "--resume", str(run_dir), "--no-progress", *args)
    assert result.exit_code == 2, result.output
    assert "\nerror: cannot resume" in "\n" + result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files  # metrics.jsonl too
    return result.stderr


@pytest.mark.parametrize("damage", ["truncated", "garbage", "someone else's"])
def test_a_corrupt_checkpoint_is_refused_naming_it(killed, tmp_path, damage):
    run_dir = copy_of(killed["run_dir"], tmp_path)
    path = run_dir / "checkpoints" / "seed-1.pt"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    else:
        torch.save({"model": {}, "step": 3}, path)
    err = _refused(run_dir)
    assert str(path) in err, err
    assert ("is not a metaopt job checkpoint" if damage == "someone else's" else "cannot be read") in err


def test_a_changed_config_is_refused_naming_the_fields(killed, config, tmp_path):
    run_dir = copy_of(killed["run_dir"], tmp_path)
    err = _refused(run_dir, "--steps", "100", "--set", "optimizers.mada.hypergrad.lr=0.01")
    assert "in 2 fields" in err
    assert f"  steps: {STEPS} there, 100 given" in err
    assert "  optimizers.mada.hypergrad.lr: 0.0025 there, 0.01 given" in err  # saved resolved: the value it ran with

    changed = tmp_path / "tiny.yaml"
    changed.write_text(config.read_text().replace("lr: 0.01,", "lr: 0.02,").replace("dropout: 0.1", "dropout: 0.2"))
    assert changed.read_text() != config.read_text()
    err = _refused(run_dir.parent / run_dir.name, str(changed))
    assert "model.dropout: 0.1 there, 0.2 given" in err and "optimizers.unrolled.hypergrad.lr: 0.01 there, 0.02 given" in err
    assert "steps" not in err

    # the same config given again is accepted (dry run: the plan, nothing trained or changed)
    before = (run_dir / "metrics.jsonl").read_bytes()
    result = invoke("run", str(config), "--resume", str(run_dir), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "resume seed 1: adam from step" in result.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_config_yaml_edited_since_the_checkpoint_is_refused(killed, tmp_path):
    run_dir = copy_of(killed["run_dir"], tmp_path)
    cfg = run_dir / "config.yaml"
    cfg.write_text(cfg.read_text().replace("eval_interval: 20", "eval_interval: 25"))
    err = _refused(run_dir)
    assert "seed-1.pt" in err and "config.yaml" in err and "eval_interval: 20 in the checkpoint, 25 in config.yaml" in err


def test_metrics_cut_behind_the_checkpoint_is_refused(killed, tmp_path):
    run_dir = copy_of(killed["run_dir"], tmp_path)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(ln for ln in lines if not ('"optimizer": "mada", "seed": 1' in ln and '"step": 1,' in ln)))
    err = _refused(run_dir)
    assert "metrics.jsonl does not match checkpoint" in err and "'mada'" in err


def test_not_a_run_directory(tmp_path):
    assert "no such directory" in _refused_missing(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "config.yaml is missing" in _refused_missing(tmp_path / "empty")
    result = invoke("run", "--resume", str(tmp_path / "empty"), "--out", str(tmp_path))
    assert result.exit_code == 2 and "--out" in result.stderr


def _refused_missing(path: Path) -> str:
    result = invoke("run", "--resume", str(path))
    assert result.exit_code == 2 and "\nerror: cannot resume" in "\n" + result.stderr, result.output
    return result.stderr
