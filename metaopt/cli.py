"""The ``metaopt`` command.

    metaopt run [CONFIG] [--quick] [--steps N] [--seeds N|a,b,c] [--out DIR] [--set KEY=VALUE ...]
    metaopt run --resume RUN_DIR
    metaopt families
    metaopt describe SPEC [-o OPTION=VALUE ...] [--json]
    metaopt check SPEC [-o OPTION=VALUE ...] [--json] [--no-compile]
    metaopt report RUN_DIR

SPEC names a family: a registered name (``mada``), ``package.module:Class`` or
``path/to/file.py:Class``.

Exit codes: 0 done; 1 a failure while running (a broken plugin, an error in training, a failed
check); 2 a bad command line, config or SPEC, or a run directory that cannot be resumed as asked
(nothing was trained, nothing in the run directory changed); 130 interrupted (Ctrl-C or SIGTERM:
metrics so far kept, summary and plots made from them).

Signals: SIGINT (Ctrl-C) and SIGTERM stop a run the same way. A signal the process was started
with ignored (SIGINT in a background job of a non-interactive shell) stays ignored, as in any
Python program: the shell asked for it, so that a Ctrl-C at the terminal does not stop its
background jobs. Such a run stops on SIGTERM (``kill PID``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from pydantic import ValidationError

import metaopt
from metaopt.registry import GROUP, FamilySpecError, load_family_spec, registered

app = typer.Typer(
    name="metaopt",
    help="Meta-optimizers for PyTorch: compare optimizers on a small GPT, inspect families.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _err(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        typer.echo(message, err=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    _err(f"error: {message}")
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"metaopt {metaopt.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Meta-optimizers for PyTorch: compare optimizers on a small GPT, inspect families."""


# -- run ----------------------------------------------------------------------------------------


def _parse_seeds(text: str) -> Any:
    """'3' → 3 (a count: seeds 0, 1, 2); '0,4,7' → [0, 4, 7].

    Anything else is left for the config validation to reject with the field's name.
    """
    text = text.strip()
    if "," in text:
        try:
            return [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            return text
    try:
        return int(text)
    except ValueError:
        return text


def _run_dir(out_dir: str, name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "job"
    base = Path(out_dir).expanduser() / f"{stamp}-{safe}"
    path, i = base, 2
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def _saved_config(run_dir: Path):
    """The config a run directory was started with (its config.yaml)."""
    from metaopt.jobs.config import ConfigFileError, build_config, read_config_file
    from metaopt.jobs.config_errors import format_validation_error
    from metaopt.jobs.schema import JobConfig

    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise _fail(f"cannot resume {run_dir}: no such directory")
    if not path.is_file():
        raise _fail(f"cannot resume {run_dir}: not a run directory (config.yaml is missing)")
    try:
        raw = read_config_file(path)
        return build_config(raw, name=run_dir.name)
    except ConfigFileError as e:
        raise _fail(f"cannot resume {run_dir}: {e}") from None
    except ValidationError as e:
        raise _fail(f"cannot resume {run_dir}: invalid config {path}:\n{format_validation_error(e, raw, model=JobConfig)}") from None


@app.command()
def run(
    config: Optional[str] = typer.Argument(
        None, help="A YAML (.yaml/.yml) or TOML (.toml) config, or a packaged one: 'default', 'quick'. Default: the embedded default job."
    ),
    quick: bool = typer.Option(
        False, "--quick",
        help="Run the packaged tiny config (quick.yaml): the whole pipeline in seconds. With a CONFIG: its optimizers "
        "at the quick job's size (model, steps, batches, intervals, seeds from quick.yaml).",
    ),
    steps: Optional[int] = typer.Option(None, "--steps", help="Override steps."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Override seeds: N (seeds 0..N-1) or a list 0,4,7."),
    out: Optional[Path] = typer.Option(None, "--out", help="Override out_dir, the parent of the run directory."),
    device: Optional[str] = typer.Option(None, "--device", help="Override device (auto, cpu, cuda, cuda:1, ...)."),
    name: Optional[str] = typer.Option(None, "--name", help="Override the run name."),
    set_: list[str] = typer.Option(
        [], "--set", "-s", help="Override any field: KEY=VALUE, dotted (model.n_layer=2, optimizers.mada.lr=0.001); the value is read as YAML."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved config; train nothing."),
    no_progress: bool = typer.Option(False, "--no-progress", help="One line per evaluation instead of progress bars."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", metavar="RUN_DIR",
        help="Continue the unfinished runs of RUN_DIR from their last checkpoint (from step 0 without one) with its "
        "config.yaml; a CONFIG or overrides given too must agree with it.",
    ),
    jobs: Optional[int] = typer.Option(
        None, "--jobs", "-j", metavar="N",
        help="Train each run (optimizer × seed) in a process of its own, N at a time (launcher.kind: local).",
    ),
    launcher: Optional[str] = typer.Option(
        None, "--launcher", metavar="KIND", help="Where the runs train: inline (this process), local (processes), ray (a Ray cluster).",
    ),
    address: Optional[str] = typer.Option(
        None, "--address", metavar="ADDR", help="The Ray cluster's address (launcher.address; none: a local Ray instance).",
    ),
    shard: Optional[str] = typer.Option(
        None, "--shard", metavar="I/N", help="Train only every N-th run from the I-th on; `metaopt report` joins the shards.",
    ),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", metavar="N", min=1,
        help="Train each run on N processes of this machine, data parallel (starts torchrun; distributed.nproc).",
    ),
    run_dir_given: Optional[Path] = typer.Option(None, "--run-dir", hidden=True, help="(--nproc) the fresh run directory"),
) -> None:
    """Train every optimizer of a config on a character-level GPT and compare them.

    Writes runs/<timestamp>-<name>/: config.yaml, families.json, metrics.jsonl, summary.json, summary.md,
    val_loss.png, train_loss.png, coefficients.png, deltas.png, a landscape-<grid>.png per two-coefficient
    grid, and checkpoints/ while it runs. Ctrl-C stops
    early and keeps what was logged (exit code 130); --resume RUN_DIR continues it.
    """
    from metaopt.jobs.config import (
        ConfigFileError,
        build_config,
        parse_assignment,
        quick_sized,
        read_config_file,
        resolve_config_path,
        set_path,
    )
    from metaopt.jobs.config_errors import format_validation_error
    from metaopt.jobs.schema import JobConfig

    if quick and config == "quick":
        raise _fail("'quick' is the quick job already; drop --quick (or give another CONFIG to run at its size)")
    saved = None
    if resume is not None:
        if out is not None:
            raise _fail("--out does not apply with --resume: the run continues in RUN_DIR")
        saved = _saved_config(resume)
    spec = config or ("quick" if quick else "default")
    try:
        if saved is not None and not quick and config is None:
            path = resume / "config.yaml"  # overrides apply to the run's own config
        else:
            path = resolve_config_path(spec)
        raw = read_config_file(path)  # its family files: relative to its directory
        if quick and config is not None:
            raw = quick_sized(raw, path.stem)
        for assignment in set_:  # a family file given here: relative to the current directory
            set_path(raw, *parse_assignment(assignment))
        for key, value in (("steps", steps), ("out_dir", None if out is None else str(out)), ("device", device), ("name", name)):
            if value is not None:
                raw[key] = value
        if seeds is not None:
            raw["seeds"] = _parse_seeds(seeds)
        if shard is not None:
            raw["shard"] = shard
        if nproc is not None:
            how = raw.get("distributed")
            raw["distributed"] = {**(how if isinstance(how, dict) else {}), "nproc": nproc}
        if jobs is not None or launcher is not None or address is not None:
            how = dict(raw.get("launcher") or {}) if isinstance(raw.get("launcher"), dict) else {}
            kind = launcher or ("local" if jobs is not None else "ray")
            if how.get("kind", "inline") != kind:  # another launcher: the config's settings for its own go
                how = {}
            how["kind"] = kind
            for key, value in (("jobs", jobs), ("address", address)):
                if value is not None:
                    how[key] = value
            raw["launcher"] = how
    except ConfigFileError as e:
        raise _fail(str(e)) from None
    try:
        cfg = build_config(raw, name=path.stem)
    except ValidationError as e:
        n = e.error_count()
        _err(f"error: invalid config {path} ({n} problem{'s' if n > 1 else ''}):\n{format_validation_error(e, raw, model=JobConfig)}")
        raise typer.Exit(2) from None
    if saved is not None:
        from metaopt.jobs.resume import config_differences, format_differences

        given = cfg.model_copy(update={"device": str(cfg.resolved_device())}).dump()
        # where the runs train may change on a resume: it changes no number (threads aside, a field of its own)
        given.pop("launcher", None)
        diffs = config_differences({k: v for k, v in saved.dump().items() if k != "launcher"}, given)
        if diffs:
            n = len(diffs)
            raise _fail(
                f"cannot resume {resume}: the config differs from the one it started with ({resume / 'config.yaml'}) "
                f"in {n} field{'s' if n > 1 else ''}:\n" + format_differences(diffs, "there", "given")
            )
        cfg = saved.model_copy(update={"launcher": cfg.launcher}) if launcher_given(raw, saved) else saved
    cfg = _launch_checks(cfg, resume)

    from metaopt.jobs import data_parallel as dp

    if dp.under_torchrun():
        cfg = _torchrun_config(cfg, path)
    elif cfg.distributed.nproc > 1 and not dry_run:  # this process starts torchrun, which runs this command N times
        _start_torchrun(cfg, resume, no_progress=no_progress)
        return
    shown = cfg  # what a dry run prints
    if cfg.distributed.nproc > 1 and dry_run and not dp.under_torchrun():
        shown, cfg = _dry_run_devices(cfg)
    world = dp.environment_world(cfg.distributed.strategy)
    with dp.joined(world, cfg.resolved_device()):
        _run_here(cfg, world, resume, dry_run=dry_run, no_progress=no_progress, run_dir_given=run_dir_given, shown=shown)


def _dry_run_devices(cfg: Any) -> tuple[Any, Any]:
    """``--dry-run`` of a run over several processes: the devices checked, but a machine without them only noted.

    A config for 8 GPUs can then be checked on a laptop: the job (data, model, every contender's
    optimizer) is set up on this machine's CPU when it lacks the config's devices.

    Returns:
        The config to print, and the one to set the job up with here.
    """
    from metaopt.jobs import data_parallel as dp

    try:
        dp.check_devices(cfg)
    except ValueError as e:
        _err(f"note: {e}; the dry run checks the rest here, on the CPU")
        return cfg, cfg.model_copy(update={"device": "cpu"})
    return cfg, cfg


def _run_here(cfg: Any, world: Any, resume: Optional[Path], *, dry_run: bool, no_progress: bool,
              run_dir_given: Optional[Path], shown: Any) -> None:
    """``metaopt run`` in this process: one of torchrun's N (``world``), or the only one; ``shown``: the config a dry run prints."""
    from metaopt.jobs import data_parallel as dp
    from metaopt.jobs.train import Job, Progress, betas_note, contender_notes, sigterm_as_interrupt

    try:
        job = Job(cfg, world)
    except (ValueError, OSError) as e:
        raise _fail(f"cannot set up the job: {e}") from None
    pairs = len(cfg.optimizers) * len(cfg.seeds)
    mine = len(cfg.units())
    _err(
        f"{cfg.name}: GPT {cfg.model.n_layer}L/{cfg.model.n_head}H/{cfg.model.n_embd}d, "
        f"{job.num_parameters():,} parameters, {cfg.steps} steps x {len(cfg.optimizers)} optimizers "
        f"({', '.join(o.label for o in cfg.optimizers)}) x {len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''} "
        f"= {pairs} run{'s' if pairs > 1 else ''} on {job.device}"
        + (f"; shard {cfg.shard}: {mine} of them" if cfg.shard is not None else "")
        + {"inline": "", "local": f", {cfg.launcher.jobs or 1} at a time in processes of {cfg.threads} thread{'s' if cfg.threads != 1 else ''}",
           "ray": f", as Ray tasks of {cfg.threads} CPU{'s' if cfg.threads != 1 else ''}"}[cfg.launcher.kind]
        + (f", each over {cfg.distributed.nproc} processes ({cfg.distributed.strategy.upper()})" if cfg.distributed.nproc > 1 else "")
        + (f"; per step each process takes {cfg.batch_size // cfg.parts} sequences x {cfg.gradient_accumulation} micro-batches"
           if cfg.gradient_accumulation > 1 else f"; per step each process takes {cfg.batch_size // cfg.parts} sequences"
           if cfg.distributed.nproc > 1 else "")
    )
    for o in cfg.optimizers:  # once per contender, before anything trains
        note = betas_note(o, cfg)
        if note:
            _err(note)
        for note in contender_notes(o, cfg):
            _err(note)
    plan = None
    if cfg.launcher.kind != "inline":
        if dry_run:
            typer.echo(yaml.safe_dump(cfg.dump(), sort_keys=False, default_flow_style=None), nl=False)
            return
        _run_launched(cfg, job, resume)
        return
    if resume is not None:
        from metaopt.jobs.resume import ResumeError

        try:
            plan = job.plan_resume(resume)
        except ResumeError as e:
            raise _fail(f"cannot resume {resume}: {e}") from None
        for note in plan.notes:
            _err(f"note: {note}")
        for line in plan.describe():
            _err(f"resume {line}")
    if dry_run:
        if world.writes:
            typer.echo(yaml.safe_dump(shown.dump(), sort_keys=False, default_flow_style=None), nl=False)
        return
    run_dir = resume if resume is not None else run_dir_given or dp.broadcast(world, _run_dir(cfg.out_dir, cfg.name))
    _err(f"run directory: {run_dir}")
    bars = not no_progress and sys.stderr.isatty() and world.writes
    if bars:
        from tqdm.auto import tqdm

        echo = lambda s: tqdm.write(s, file=sys.stderr)  # noqa: E731
    else:
        echo = _err
    if not world.writes:
        echo = lambda s: None  # noqa: E731
    with sigterm_as_interrupt():
        try:
            result = job.run(run_dir, progress=Progress(bars=bars, echo=echo), resume=plan)
        except KeyboardInterrupt:  # a second Ctrl-C while the summary is being made
            raise _fail(f"interrupted again while writing the summary; metrics are in {run_dir / 'metrics.jsonl'}", 130) from None
    if not world.writes:
        if result.interrupted:
            raise typer.Exit(130)
        return
    typer.echo(result.table)
    files = ", ".join(p.name for p in result.plots)
    made = [n for n in ("config.yaml", "families.json", "metrics.jsonl", "summary.json", "summary.md") if (run_dir / n).exists()]
    typer.echo(f"\nrun directory: {run_dir}\n  {', '.join(made)}, {files}")
    if result.interrupted:
        s = result.summary
        _err(f"interrupted: {s['complete_runs']} of {s['expected_runs']} runs complete; summary and plots are from what was logged")
        raise typer.Exit(130)


def _torchrun_config(cfg: Any, path: Path) -> Any:
    """The config of one of torchrun's processes: ``distributed.nproc`` is torchrun's world size.

    A config that names another is refused (it was written for another world); each process's
    ``threads``, unset, is its share of the machine's cores.
    """
    from metaopt.jobs import data_parallel as dp
    from metaopt.jobs.config_errors import format_validation_error
    from metaopt.jobs.schema import JobConfig

    world = dp.environment_world()
    nproc = cfg.distributed.nproc
    if nproc not in (1, world.size):
        raise _fail(f"distributed.nproc is {nproc}, but torchrun started {world.size} processes; run "
                    f"torchrun with {nproc} in all (--nnodes × --nproc-per-node), or set distributed.nproc: {world.size}")
    raw = {**cfg.dump(), "distributed": {**cfg.distributed.model_dump(), "nproc": world.size}}
    if cfg.threads is None and cfg.resolved_device().type == "cpu":
        raw["threads"] = max(1, (os.cpu_count() or 1) // world.local_size)
        _err(f"note: threads is not set; each process trains with {raw['threads']} (set threads: to choose)")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise _fail(f"invalid config {path} for {world.size} processes:\n{format_validation_error(e, raw, model=JobConfig)}") from None


def _start_torchrun(cfg: Any, resume: Optional[Path], *, no_progress: bool) -> None:
    """``metaopt run --nproc N``: refuse it without N devices, else start torchrun on this machine and wait.

    torchrun runs ``metaopt run`` N times: in a fresh run directory made here (its
    ``config.yaml`` the resolved config), or with ``--resume``. Ctrl-C reaches torchrun's processes
    from the terminal; SIGTERM is passed on to torchrun, which passes it on to them.
    """
    import signal
    import subprocess

    from metaopt.jobs import data_parallel as dp
    from metaopt.jobs.train import write_config

    try:
        dp.check_devices(cfg)
    except ValueError as e:
        raise _fail(str(e)) from None
    n = cfg.distributed.nproc
    if resume is None:
        run_dir = _run_dir(cfg.out_dir, cfg.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg.model_copy(update={"device": cfg.resolved_device().type}), run_dir / "config.yaml")
        args = [str(run_dir / "config.yaml"), "--run-dir", str(run_dir)]
    else:
        run_dir, args = resume, ["--resume", str(resume)]
    command = dp.torchrun_command(n) + ["-m", "metaopt", "run", *args] + (["--no-progress"] if no_progress else [])
    _err(f"run directory: {run_dir}; starting {n} processes: {' '.join(command[1:])}")
    interrupted = False

    def on_signal(signum, frame):
        nonlocal interrupted
        interrupted = True
        if signum == signal.SIGTERM:
            proc.send_signal(signal.SIGTERM)

    env = dict(os.environ)
    if cfg.threads is not None:  # else torchrun sets 1 (each process then sets its share of the cores)
        env.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    proc = subprocess.Popen(command, env=env)
    # a signal this process was started with ignored stays ignored (as sigterm_as_interrupt keeps it)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted:
        raise _fail(f"interrupted; --resume {run_dir} continues the runs on {n} processes", 130)
    if code:
        raise _fail(f"torchrun exited with {code} (the processes' messages are above); run directory: {run_dir}", 1)


def launcher_given(raw: dict[str, Any], saved: Any) -> bool:
    """Whether the command (or the config given with ``--resume``) names a launcher other than the saved one."""
    return isinstance(raw.get("launcher"), dict) and raw["launcher"] != saved.dump().get("launcher", {})


def _launch_checks(cfg: Any, resume: Optional[Path]) -> Any:
    """Refuse, before anything starts, a launcher that cannot run this job; fill in its threads.

    ``--jobs`` larger than the runs, a run directory laid out for another launcher, a Ray
    cluster that does not answer. Without ``threads``, a local launcher gives each of its
    processes an equal share of the cores, and Ray gives each task one.
    """
    from metaopt.jobs.launch import UNITS_DIR, LaunchError, connect_ray

    kind, units = cfg.launcher.kind, len(cfg.units())
    if resume is not None:
        launched = (resume / UNITS_DIR).is_dir()
        if launched and kind == "inline":
            raise _fail(f"cannot resume {resume} in one process: its runs trained as units ({resume / UNITS_DIR}); "
                        "resume it with --jobs N or --launcher ray")
        if not launched and kind != "inline" and (resume / "metrics.jsonl").exists():
            raise _fail(f"cannot resume {resume} with launcher {kind}: its runs trained in one process; resume it without --jobs or --launcher")
    if kind == "inline":
        return cfg
    jobs = cfg.launcher.jobs or 1
    if kind == "local" and jobs > units:
        raise _fail(f"--jobs {jobs} (launcher.jobs): the job has only {units} run{'s' if units > 1 else ''} (optimizers × seeds"
                    f"{', in its shard' if cfg.shard else ''}), so at most {units} can train at once")
    if cfg.threads is None:
        threads = max(1, (os.cpu_count() or 1) // jobs) if kind == "local" else 1
        _err(f"note: threads is not set; each run trains with {threads} thread{'s' if threads > 1 else ''} (set threads: to choose)")
        cfg = cfg.model_copy(update={"threads": threads})
    if kind == "ray":
        try:
            connect_ray(cfg.launcher)
        except LaunchError as e:
            raise _fail(str(e)) from None
    return cfg


def _run_launched(cfg: Any, job: Any, resume: Optional[Path]) -> None:
    """Train the job's runs as units (`metaopt.jobs.launch`) and report them, as ``run`` does in one process."""
    from metaopt.jobs.launch import join_units, prepare_units, run_local, run_ray
    from metaopt.jobs.resume import write_families
    from metaopt.jobs.train import sigterm_as_interrupt, write_config

    resolved = cfg.model_copy(update={"device": str(job.device)})
    run_dir = resume if resume is not None else _run_dir(cfg.out_dir, cfg.name)
    _err(f"run directory: {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(resolved, run_dir / "config.yaml")  # a resume may have named another launcher
    if resume is None:
        write_families(run_dir, job.sources())
    units = prepare_units(resolved, run_dir)
    with sigterm_as_interrupt():
        try:
            if cfg.launcher.kind == "local":
                interrupted, failed = run_local(resolved, run_dir, units, cfg.launcher.jobs or 1, echo=_err)
            else:
                interrupted, failed = run_ray(resolved, run_dir, units, echo=_err)
            report = join_units(resolved, run_dir, units, interrupted=interrupted)
        except KeyboardInterrupt:
            raise _fail(f"interrupted again; the runs' metrics are in {run_dir / 'units'}", 130) from None
    typer.echo(report.table)
    typer.echo(f"\nrun directory: {run_dir}\n  config.yaml, families.json, metrics.jsonl, summary.json, summary.md, "
               f"{', '.join(p.name for p in report.plots)}, units/")
    if failed:
        raise _fail(f"{len(failed)} run{'s' if len(failed) > 1 else ''} failed (above); --resume {run_dir} tries them again", 1)
    if interrupted or report.summary["interrupted"]:
        s = report.summary
        _err(f"interrupted: {s['complete_runs']} of {s['expected_runs']} runs complete; --resume {run_dir} continues them")
        raise typer.Exit(130)


# -- families and describe -----------------------------------------------------------------------


@app.command()
def families() -> None:
    """List the registered families (entry-point group metaopt.families) and their coefficients."""
    eps = registered()
    if not eps:
        raise _fail(f"no families registered (entry-point group {GROUP!r})", 1)
    shown = 0
    for name, ep in eps.items():
        try:
            text = ep.load()().describe()
        except Exception as e:  # a broken plugin must not hide the others
            _err(f"{name}: failed to load {ep.value}: {type(e).__name__}: {e}")
            continue
        if shown:
            typer.echo("")
        typer.echo(text if text.startswith(name) else f"{name} — {text}")
        shown += 1
    if not shown:
        raise typer.Exit(1)


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def describe_family(spec: str, options: dict[str, Any]) -> dict[str, Any]:
    """Everything ``metaopt describe`` shows, as data: where the family comes from, then its `Family.description`.

    Args:
        spec: a family spec (a registered name, ``package.module:Class``, ``path/file.py:Class``).
        options: the family's options.

    Returns:
        The spec, entry point and source record of the family, then its own description
            (summary, coefficients, options, hyperparameters, points, default hyper-optimizer,
            paths).

    Raises:
        metaopt.registry.FamilySpecError: a spec that leads to no family.
        pydantic.ValidationError, TypeError, ValueError: options the family refuses.
    """
    source = load_family_spec(spec)
    family = source.build(**options)
    return {"name": spec, "entry_point": source.entry_point, "source": source.record(), **family.description()}


def _table(rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_show(x) for x in v) + ")"
    return repr(v) if isinstance(v, str) else str(v)


def format_description(info: dict[str, Any]) -> str:
    """``metaopt describe``'s text from ``describe``'s data: coefficients, options, hyperparameters, points, fast paths."""
    src = info["source"]
    where = {"entry point": f"entry point {info['entry_point']}", "module": f"module {src['target']}",
             "file": f"file {src['target']}"}[src["origin"]]
    if src["origin"] == "module" and src["path"]:
        where += f" ({src['path']})"
    if src["sha256"] and src["origin"] != "entry point":
        where += f", sha256 {src['sha256'][:16]}"
    out = [f"{info['name']} — {info['summary']}", f"  {where}", "", "Coefficients"]
    rows = [["name", "init", "box", "learned"]]
    for c in info["coefficients"]:
        rows.append([c["name"], f"{c['init']:g}", f"[{c['low']:g}, {c['high']:.6g}]", "learned" if c["learned"] else "fixed"])
    out.append(_table(rows))
    if info["options"] is not None:
        out += ["", f"Options ({info['options_model']}; set with -o NAME=VALUE, or `options:` in a run config)"]
        rows = [["name", "type", "default", "value", "constraints"]]
        for f in info["options"]:
            rows.append([f["name"], f["type"], _show(f["default"]), _show(f["value"]), f["constraints"]])
        out.append(_table(rows))
    out += ["", f"Hyperparameters per param group ({info['hyperparameters_model']}; `hyperparameters:` in a run config)"]
    rows = [["name", "type", "default", "constraints"]]
    for f in info["hyperparameters"]:
        rows.append([f["name"], f["type"], _show(f["default"]), f["constraints"]])
    out.append(_table(rows))
    out += ["", "Named points (`point:` in a run config, family.at(NAME) in Python)"]
    if info["points"]:
        out.append(_table([[p, " ".join(f"{k}={v:g}" for k, v in vals.items())] for p, vals in info["points"].items()]))
    else:
        out.append("  (none)")
    hyper = info["default_hypergrad"]
    out += ["", "Default hyper-optimizer (family.default_hypergrad(); `hypergrad:` settings left unset in a run config "
            "take these)"]
    if hyper is None:
        out.append("  (none: the coefficients stay fixed)")
    else:
        fields = [[k, _show(tuple(v) if isinstance(v, list) else v)] for k, v in hyper.items() if k != "mode"]
        out.append(f"  {hyper['mode']}")
        out.append(_table(fields, indent="    "))
    out += [
        "",
        "Engine: " + ("elementwise rule (all tangents from one reverse pass)" if info["elementwise"] else "non-elementwise rule (tangents by forward mode)")
        + ("; hand-derived fast path (path='fused', compile=True)" if info["fast_path"] else "; no fast path")
        + ("; native CPU kernel (the default path on CPU)" if info["native_kernel"] else ""),
    ]
    return "\n".join(out)


SPEC_HELP = "A family: a registered name (see `metaopt families`), package.module:Class, or path/to/file.py:Class."
OPTION_HELP = "A family option NAME=VALUE (value read as YAML), e.g. -o lion=true."


def _parse_options(option: list[str]) -> dict[str, Any]:
    """``-o NAME=VALUE`` options, each value read as YAML; a malformed one exits 2."""
    options: dict[str, Any] = {}
    for o in option:
        if "=" not in o:
            raise _fail(f"-o expects NAME=VALUE, got {o!r}")
        k, v = o.split("=", 1)
        try:
            options[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise _fail(f"-o {o}: cannot parse the value: {e}") from None
    return options


def _build_family(spec: str, options: dict[str, Any]):
    """(source, family) for a SPEC and its options; a bad spec or bad options exit 2."""
    try:
        source = load_family_spec(spec)
    except FamilySpecError as e:
        raise _fail(str(e)) from None
    try:
        return source, source.build(**options)
    except FamilySpecError as e:
        raise _fail(str(e)) from None
    except ValidationError as e:
        lines = "\n".join(f"  {'.'.join(map(str, x['loc'])) or '(options)'}: {x['msg'].removeprefix('Value error, ')}" for x in e.errors())
        raise _fail(f"invalid options for {spec}:\n{lines}") from None
    except (TypeError, ValueError) as e:
        raise _fail(f"invalid options for {spec}: {e}") from None
    except Exception as e:  # the family's own code raising: not the command line's fault
        raise _fail(f"family {spec!r} ({source.describe()}) failed to build: {type(e).__name__}: {e}", 1) from None


@app.command()
def describe(
    family: str = typer.Argument(..., metavar="SPEC", help=SPEC_HELP),
    option: list[str] = typer.Option([], "--option", "-o", help=OPTION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show one family: coefficients (init, box, learned), options, hyperparameters, named points, default hyper-optimizer."""
    options = _parse_options(option)
    _build_family(family, options)  # a bad spec or bad options: exit 2, with the fix
    try:
        info = describe_family(family, options)
    except Exception as e:
        raise _fail(f"family {family!r} cannot be described: {type(e).__name__}: {e}", 1) from None
    typer.echo(json.dumps(_jsonable(info), indent=2) if as_json else format_description(info))


# -- check ---------------------------------------------------------------------------------------


@app.command()
def check(
    family: str = typer.Argument(..., metavar="SPEC", help=SPEC_HELP),
    option: list[str] = typer.Option([], "--option", "-o", help=OPTION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (progress lines go to stderr)."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Skip the compiled path (no torch.compile: faster)."),
) -> None:
    """Check a family against the engine's contract: hyper-gradients, paths, checkpoints, points.

    One line per check as it completes (a failure with its fix on the next line), then a
    summary. Exit code 0 when every check passed (or was skipped), 1 when one failed, 2 for a
    bad SPEC or options.
    """
    from metaopt import check as checks

    _, fam = _build_family(family, _parse_options(option))
    shown: list[Any] = []

    def progress(result) -> None:
        shown.append(result)
        typer.echo(str(result), err=as_json)

    try:
        report = checks.check_family(fam, compile=not no_compile, progress=progress)
    except NotImplementedError:
        raise _fail("metaopt.check.check_family is not implemented in this build of metaopt; update metaopt", 1) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    except Exception as e:
        raise _fail(f"checking {family!r} stopped: {type(e).__name__}: {e}", 1) from None
    for result in report.checks:  # any the callback did not see, so that every check is shown
        if not any(result is r for r in shown):
            typer.echo(str(result), err=as_json)
    if as_json:
        typer.echo(json.dumps(_jsonable(report.to_dict()), indent=2))
    else:
        typer.echo(str(report).rsplit("\n", 1)[-1])  # the summary line
    if not report.ok:
        raise typer.Exit(1)


# -- report --------------------------------------------------------------------------------------


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (each holds config.yaml and metrics.jsonl)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="With several run directories: where the combined summary and plots go (required)."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="With several run directories: the combined job's name (default: --out's folder name)."
    ),
) -> None:
    """Re-make summary.json, summary.md and the plots of a run directory from its metrics.

    Or combine several run directories of the same job (model, data, steps, batches, lr) into one
    table and one set of plots in --out, their optimizers side by side (each run is independent
    of the others in its config, so runs of several configs compare as if they were one), the
    first directory's first optimizer the baseline.
    """
    from metaopt.jobs.metrics import MetricsError
    from metaopt.jobs.report import RunDirError, combine_run_dirs, load_run_dir, write_combined, write_report

    if len(run_dirs) > 1 and out is None:
        raise _fail("several run directories: say where the combined report goes with --out DIR")
    try:
        loaded = [(d, *load_run_dir(d)) for d in run_dirs]
        cfg, records, notes, planned = combine_run_dirs(loaded)
    except RunDirError as e:
        raise _fail(str(e)) from None
    except MetricsError as e:  # a damaged or empty metrics.jsonl: nothing to report
        raise _fail(str(e), 1) from None
    for note in notes:
        typer.echo(note)
    target = out or run_dirs[0]
    if out is not None:
        if len(run_dirs) > 1:  # the combined job: its own name, in titles and summary
            cfg = cfg.model_copy(update={"name": name or out.resolve().name})
        # so that `metaopt report --out`'s directory is itself a run directory
        write_combined(out, cfg, records, run_dirs)
    result = write_report(cfg, records, target, device=cfg.device, planned=planned)
    typer.echo(result.table)
    typer.echo(f"\nwrote summary.json, summary.md, {', '.join(p.name for p in result.plots)} in {target}")


def main() -> None:
    """The ``metaopt`` console script: run the command-line app."""
    app()


if __name__ == "__main__":
    main()
