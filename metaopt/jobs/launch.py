"""Training a job's runs outside this process: as local processes or as tasks on a Ray cluster.

A job's work is a set of independent units, one per run (optimizer, seed) of `JobConfig.units`.
Each unit trains as a job of its own (the config with that one optimizer and that one seed, and
the job's ``threads``) in a run directory of its own, ``<run dir>/units/<NNN>-<label>-seed<S>/``,
which checkpoints and resumes like any run directory. A run depends on its config, its seed and
its thread count alone, so a unit's numbers are those the run has in a job trained in one
process. When the units are done or stopped, their records are joined into the run directory's
``metrics.jsonl`` in unit order, and the summary and plots are made from them, as `metaopt
report` makes them.

What is here: the units of a run directory (`Unit`, `units_of`, `prepare_units`), training one
(`train_unit`, also ``python -m metaopt.jobs.launch UNIT_DIR``), joining them (`join_units`),
and the two launchers, `run_local` and `run_ray`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaopt.jobs.metrics import METRICS_FILE, read_metrics
from metaopt.jobs.run_state import write_text_atomic
from metaopt.jobs.schema import JobConfig, LauncherConfig

UNITS_DIR = "units"
LOG_FILE = "log.txt"  # a unit's output (local launcher)


class LaunchError(Exception):
    """A launcher cannot start (no Ray, a cluster it cannot reach) or a run directory it cannot continue."""


@dataclass(frozen=True)
class Unit:
    """One run of a job (optimizer ``label`` from ``seed``) and the run directory it trains in."""

    index: int
    label: str
    seed: int
    path: Path

    @property
    def name(self) -> str:
        """How the launchers' messages name it."""
        return f"{self.label} seed {self.seed}"


def units_of(cfg: JobConfig, run_dir: Path) -> list[Unit]:
    """The units of ``cfg`` (its `JobConfig.units`, a shard's only) and their directories in ``run_dir``."""
    out = []
    for i, (label, seed) in enumerate(cfg.units()):
        safe = re.sub(r"[^A-Za-z0-9._@=-]+", "_", label).strip("_") or "run"
        out.append(Unit(i, label, seed, run_dir / UNITS_DIR / f"{i:03d}-{safe}-seed{seed}"))
    return out


def unit_config(cfg: JobConfig, label: str, seed: int) -> JobConfig:
    """The job of one unit: ``cfg`` with only optimizer ``label``, only ``seed``, trained in one process."""
    oc = next(o for o in cfg.optimizers if o.label == label)
    return cfg.model_copy(update={
        "optimizers": [oc], "seeds": [seed], "shard": None, "launcher": LauncherConfig(), "name": f"{cfg.name}-{label}-seed{seed}",
    })


def prepare_units(cfg: JobConfig, run_dir: Path) -> list[Unit]:
    """Give each unit of ``cfg`` its directory in ``run_dir`` with its config.yaml (kept where it is there)."""
    from metaopt.jobs.train import write_config

    units = units_of(cfg, run_dir)
    for u in units:
        if not (u.path / "config.yaml").exists():
            u.path.mkdir(parents=True, exist_ok=True)
            write_config(unit_config(cfg, u.label, u.seed), u.path / "config.yaml")
    return units


def unit_finished(unit: Unit, steps: int) -> bool:
    """Whether the unit's metrics hold every step of its run."""
    metrics = unit.path / METRICS_FILE
    if not metrics.exists():
        return False
    seen = {r.get("step") for r in read_metrics(metrics) if r.get("optimizer") == unit.label and r.get("seed") == unit.seed}
    return seen >= set(range(steps + 1))


def train_unit(unit_dir: Path, *, echo: Callable[[str], None] | None = None) -> bool:
    """Train the unit in ``unit_dir`` to its end.

    From its checkpoint if it has one (a retry, a resume), from step 0 if not, not at all if it
    is finished.

    Returns:
        Whether it is finished (False: it was interrupted).
    """
    from metaopt.jobs.config import build_config, read_config_file
    from metaopt.jobs.train import Job, Progress

    cfg = build_config(read_config_file(unit_dir / "config.yaml"), name=unit_dir.name)
    job = Job(cfg)
    progress = Progress(bars=False, echo=echo or (lambda s: print(s, file=sys.stderr, flush=True)))
    plan = None
    if (unit_dir / METRICS_FILE).exists():
        plan = job.plan_resume(unit_dir)
        if all(sp.done for sp in plan.seeds.values()):
            return True
    return not job.run(unit_dir, progress=progress, resume=plan, report=False).interrupted


def join_units(cfg: JobConfig, run_dir: Path, units: list[Unit], *, interrupted: bool = False):
    """Join the units' records into ``run_dir``'s metrics.jsonl and report the job ``cfg``.

    The records go in unit order; the report is `metaopt.jobs.report.write_report`'s.

    Returns:
        The `metaopt.jobs.report.Report`.
    """
    from metaopt.jobs.report import write_report

    records: list[dict[str, Any]] = []
    for u in units:
        if (u.path / METRICS_FILE).exists():
            records += read_metrics(u.path / METRICS_FILE)
    write_text_atomic("".join(json.dumps(r) + "\n" for r in records), run_dir / METRICS_FILE)
    return write_report(cfg, records, run_dir, interrupted=interrupted, device=str(cfg.resolved_device()))


def _final_line(unit: Unit, steps: int) -> str:
    metrics = unit.path / METRICS_FILE
    recs = read_metrics(metrics) if metrics.exists() else []
    vals = [r for r in recs if r.get("val_loss") is not None]
    last = recs[-1]["step"] if recs else 0
    tail = f", final val loss {vals[-1]['val_loss']:.4f}" if vals and last == steps else ""
    return f"{unit.name}: step {last}/{steps}{tail}"


def run_local(cfg: JobConfig, run_dir: Path, units: list[Unit], jobs: int, *, echo: Callable[[str], None]) -> tuple[bool, list[str]]:
    """Train ``units`` as processes (``python -m metaopt.jobs.launch UNIT_DIR``), ``jobs`` at a time.

    Each writes its output to ``UNIT_DIR/log.txt``. Ctrl-C (or SIGTERM) stops them all: each
    unit gets SIGINT and keeps what it logged and its checkpoint, and ``--resume`` continues it.

    Returns:
        (interrupted, the units that failed, each with the end of its log).
    """
    todo = [u for u in units if not unit_finished(u, cfg.steps)]
    for u in units:
        if u not in todo:
            echo(f"{u.name}: finished before")
    running: dict[Unit, tuple[subprocess.Popen, Any]] = {}
    failed: list[str] = []
    interrupted = False
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        while todo or running:
            while todo and len(running) < jobs:
                u = todo.pop(0)
                log = open(u.path / LOG_FILE, "a", encoding="utf-8")  # noqa: SIM115 - closed when it ends
                # its own session: a Ctrl-C at the terminal reaches this process only, which passes it on
                p = subprocess.Popen([sys.executable, "-m", "metaopt.jobs.launch", str(u.path)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
                running[u] = (p, log)
                echo(f"{u.name}: started (pid {p.pid}, log {u.path / LOG_FILE})")
            for u, (p, log) in list(running.items()):
                if p.poll() is None:
                    continue
                log.close()
                del running[u]
                if p.returncode == 0:
                    echo(_final_line(u, cfg.steps))
                else:
                    failed.append(f"{u.name} failed (exit code {p.returncode}); the end of {u.path / LOG_FILE}:\n"
                                  + _log_tail(u.path / LOG_FILE))
                    echo(failed[-1])
            time.sleep(0.1)
    except KeyboardInterrupt:
        interrupted = True
        for p, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        for u, (p, log) in running.items():
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: wait all the same, they are saving
                p.wait()
            log.close()
            echo(f"{u.name}: stopped at {_final_line(u, cfg.steps).split(': ', 1)[1]}")
    return interrupted, failed


def _log_tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join("  " + t for t in text[-lines:])


def connect_ray(launcher: LauncherConfig) -> Any:
    """``ray.init`` for ``launcher``: the cluster at its address, or a local instance without one.

    Raises:
        LaunchError: Ray is not installed, or no cluster answers at the address (naming it).
    """
    try:
        import ray
    except ImportError:
        raise LaunchError("launcher.kind: ray needs Ray: pip install 'metaopt[ray]'") from None
    if launcher.address not in (None, "auto", "local"):
        _check_reachable(launcher.address)  # ray.init would wait minutes for an address that is not there
    if ray.is_initialized():  # a session this process opened (a notebook, a test): its tasks go there
        return ray
    try:
        if launcher.address is None:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=launcher.address, log_to_driver=False, configure_logging=False)
    except Exception as e:  # ConnectionError, a timeout, a bad address: one answer, with Ray's reason
        raise LaunchError(f"launcher.address: no Ray cluster answers at {launcher.address!r}: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse an address ``host:port`` (or ``ray://host:port``) that takes no TCP connection.

    Raises:
        LaunchError: naming ``launcher.address`` and why.
    """
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"launcher.address: {address!r} is not host:port, ray://host:port or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise LaunchError(f"launcher.address: no Ray cluster answers at {address!r}: {e.strerror or e}") from None


def _ray_train_unit(unit_dir: str) -> bool:
    """A Ray task's body: `train_unit`, with the unit's output in its log file."""
    path = Path(unit_dir)
    (path / "pid").write_text(f"{os.getpid()}\n", encoding="utf-8")  # which process trains it
    with open(path / LOG_FILE, "a", encoding="utf-8") as log:
        print(f"attempt in process {os.getpid()}", file=log, flush=True)  # a retry shows as a second one
        return train_unit(path, echo=lambda s: print(s, file=log, flush=True))


def run_ray(cfg: JobConfig, run_dir: Path, units: list[Unit], *, echo: Callable[[str], None]) -> tuple[bool, list[str]]:
    """Train ``units`` as Ray tasks, each asking for ``threads`` CPUs (and a GPU on a CUDA job).

    The workers must see ``run_dir`` (a shared file system, or a local Ray instance): each task
    trains in its unit's directory there. A task whose worker dies is tried again, up to
    ``launcher.retries`` times, and continues from the unit's last checkpoint. Ctrl-C cancels
    the tasks; what they logged and the finished units are kept.

    Returns:
        (interrupted, the units that failed).
    """
    ray = connect_ray(cfg.launcher)
    gpus = 1 if cfg.resolved_device().type == "cuda" else 0
    task = ray.remote(_ray_train_unit).options(num_cpus=cfg.threads or 1, num_gpus=gpus, max_retries=cfg.launcher.retries)
    todo = [u for u in units if not unit_finished(u, cfg.steps)]
    for u in units:
        if u not in todo:
            echo(f"{u.name}: finished before")
    refs = {task.remote(str(u.path)): u for u in todo}
    failed: list[str] = []
    interrupted = False
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                u = refs[ref]
                try:
                    ray.get(ref)
                    echo(_final_line(u, cfg.steps))
                except Exception as e:  # the task raised, or died more often than it may be retried
                    failed.append(f"{u.name} failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}; "
                                  f"the end of {u.path / LOG_FILE}:\n" + _log_tail(u.path / LOG_FILE))
                    echo(failed[-1])
    except KeyboardInterrupt:
        interrupted = True
        for ref in pending:
            ray.cancel(ref)  # a KeyboardInterrupt in the task: the unit keeps what it logged
        with contextlib.suppress(Exception, KeyboardInterrupt):
            ray.wait(pending, num_returns=len(pending), timeout=60)
        for ref in pending:
            echo(f"{refs[ref].name}: stopped at {_final_line(refs[ref], cfg.steps).split(': ', 1)[1]}")
    return interrupted, failed


def main(argv: list[str] | None = None) -> int:
    """``python -m metaopt.jobs.launch UNIT_DIR``: train one unit (the local launcher's process).

    Exit code 0: finished; 130: interrupted (SIGINT, SIGTERM), its checkpoint kept.
    """
    from metaopt.jobs.train import sigterm_as_interrupt

    (unit_dir,) = argv if argv is not None else sys.argv[1:]
    # the launcher stops its units with SIGINT: heard even where this process inherited it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with sigterm_as_interrupt():
        try:
            finished = train_unit(Path(unit_dir))
        except KeyboardInterrupt:
            return 130
    return 0 if finished else 130


if __name__ == "__main__":
    sys.exit(main())
