"""Running a job: every optimizer of the config on the same model, data and seed; metrics
streamed to ``metrics.jsonl``; summary and plots at the end (also after Ctrl-C).

Seeds run one after the other; within a seed the optimizers are interleaved step by step (one
step of each in turn), so that a busy machine slows all of them alike (their steps/s stay
comparable) and a Ctrl-C leaves all of them at the same step. Each run's time is its own steps
(and evaluations), measured around them.

Per run (one optimizer, one seed): ``torch.manual_seed(seed)`` before the model is built (same
initial weights for every optimizer) and a ``torch.Generator`` seeded with ``seed`` draws the
training batches (same batches, in the same order, for every optimizer). Validation uses one
fixed set of batches for the whole job (``data.eval_seed``).

Nothing reads a tensor back to the host on an ordinary step: each step's training loss and
coefficients go into preallocated device buffers, which are read back every ``log_interval``
steps, when the records of those steps are written.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from metaopt import MetaOptimizer
from metaopt.jobs.config import TORCH_KINDS, JobConfig, OptimizerConfig, _has_option
from metaopt.jobs.data import CharDataset
from metaopt.jobs.gpt import GPT, GPTConfig

Tensor = torch.Tensor

#: Called after every completed step with ``{"step", "optimizer", "seed", "run"}`` (instrumentation
#: and tests: raising KeyboardInterrupt here behaves as Ctrl-C at that point).
step_hook: Callable[[dict[str, Any]], None] | None = None


# -- building blocks ---------------------------------------------------------------------------


def build_model(cfg: JobConfig, vocab_size: int, seed: int, device: torch.device) -> GPT:
    """The job's GPT, initialised from ``seed``."""
    m = cfg.model
    torch.manual_seed(seed)
    gpt_cfg = GPTConfig(
        vocab_size=vocab_size, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout
    )
    return GPT(gpt_cfg).to(device)


def build_optimizer(oc: OptimizerConfig, cfg: JobConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``torch.optim.Adam/AdamW`` or a :class:`MetaOptimizer` as ``oc`` says. The job's ``lr``
    and ``betas`` apply unless the optimizer sets its own."""
    lr = oc.lr if oc.lr is not None else cfg.lr
    hp = dict(oc.hyperparameters)
    if oc.is_torch:
        hp["betas"] = tuple(hp.get("betas", cfg.betas))
        return TORCH_KINDS[oc.kind](model.parameters(), lr=lr, **hp)
    family = oc.family(cfg.betas)
    if "betas" in family.hyperparameters.model_fields and "betas" not in hp and not _has_option(family, "betas"):
        hp["betas"] = tuple(cfg.betas)
    return MetaOptimizer(model.parameters(), family, hypergrad=oc.hypergrad.build(), lr=lr, compile=oc.compile, **hp)


def lm_loss(model: torch.nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return model(*batch)[1]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Mean loss over ``batches`` in eval mode (one read-back)."""
    was_training = model.training
    model.eval()
    total = sum(lm_loss(model, b) for b in batches)
    model.train(was_training)
    return float(total / len(batches))


class MetricsLog:
    """``metrics.jsonl``, appended and flushed window by window (what was written survives a
    crash or Ctrl-C)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict[str, Any]]) -> None:
        if records:
            self._f.write("".join(json.dumps(r) + "\n" for r in records))
            self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a killed process) is skipped."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a block runs (a record window being written), then
    deliver them to the handlers in force before. SIGTERM too: the command turns it into an
    interrupt, and one landing between writing a window and marking it written wrote it twice."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    except ValueError:  # not in the main interpreter
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:  # as if it came now: Ctrl-C raises KeyboardInterrupt, SIGTERM does what it did
            signal.raise_signal(caught[0])


def _math_attention():
    """``scaled_dot_product_attention`` through its math kernel (plain differentiable ops): the
    fused CPU/CUDA kernels have no double backward, which second-order unrolling needs."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: fall back to the default kernels
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _fmt_coefs(values: dict[str, float], names) -> str:
    return " ".join(f"{n}={values[n]:.4f}" for n in names if n in values)


# -- one run -----------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where runs report: tqdm bars (interactive) or one line per evaluation."""

    bars: bool = True
    echo: Callable[[str], None] = print
    position: str = ""


class _Run:
    """One optimizer trained from one seed, advanced a step at a time (the runs of a seed are
    interleaved step by step, so that machine load, and a Ctrl-C, fall on all alike)."""

    def __init__(self, job: Job, oc: OptimizerConfig, seed: int, log: MetricsLog, progress: Progress, slot: int = 0) -> None:
        self.job, self.oc, self.seed, self.log, self.progress, self.slot = job, oc, seed, log, progress, slot
        cfg = job.cfg
        self.cfg = cfg
        self.device = job.device
        self.model = build_model(cfg, job.data.vocab_size, seed, job.device)
        self.model.train()
        # dropout draws from the global generator: give each run its own stream, as if it ran alone
        self.rng = _rng_state(self.device) if cfg.model.dropout > 0 else None
        self.opt = build_optimizer(oc, cfg, self.model)
        self.meta = isinstance(self.opt, MetaOptimizer)
        self.names = list(self.opt.coefficients) if self.meta else []
        self.learned = list(self.opt.learned) if self.meta else []
        self.gen = torch.Generator().manual_seed(seed)
        self.queue: collections.deque = collections.deque()
        self.losses = torch.zeros(cfg.steps, device=job.device)
        self.coefs = torch.zeros(cfg.steps, len(self.names), device=job.device) if self.names else None
        self.times = [0.0] * cfg.steps
        self.train_times = [0.0] * cfg.steps
        self.elapsed = 0.0  # this run's own seconds: its steps and its evaluations
        self.train_elapsed = 0.0  # its steps only
        self.val: dict[int, float] = {}
        self.done = 0
        self.flushed = 0
        self.last_coefs: dict[str, float] = {}
        self.base = {"optimizer": oc.label, "seed": seed}
        self.bar = None

    @property
    def finished(self) -> bool:
        return self.done >= self.cfg.steps

    # data
    def _next_batch(self):
        if self.queue:
            return self.queue.popleft()
        return self.job.data.batch("train", self.cfg.batch_size, self.cfg.model.block_size, self.gen)

    def _peek_batch(self):
        if not self.queue:
            self.queue.append(self.job.data.batch("train", self.cfg.batch_size, self.cfg.model.block_size, self.gen))
        return self.queue[0]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _evaluate(self) -> float:
        t = time.perf_counter()
        v = evaluate(self.model, self.job.val_batches)
        self.elapsed += time.perf_counter() - t
        return v

    def _coef_values(self) -> dict[str, float]:
        return {n: float(v) for n, v in self.opt.coefficients.items()}

    # records
    def flush(self) -> list[float]:
        """Write the records of the steps done since the last flush (one read-back)."""
        lo, hi = self.flushed, self.done
        if hi <= lo:
            return []
        with deferred_interrupt():
            losses = self.losses[lo:hi].tolist()
            coefs = self.coefs[lo:hi].tolist() if self.coefs is not None else None
            records = []
            for j in range(lo, hi):
                step = j + 1
                r = {
                    "step": step, **self.base, "train_loss": losses[j - lo], "val_loss": self.val.get(step),
                    "time": round(self.times[j], 4), "train_time": round(self.train_times[j], 4),
                }
                if coefs is not None:
                    r["coefficients"] = dict(zip(self.names, coefs[j - lo]))
                records.append(r)
            if self.meta:
                records[-1]["skipped_hypersteps"] = int(self.opt.skipped_hypersteps)
                self.last_coefs = records[-1]["coefficients"]
            self.log.write(records)
            self.flushed = hi
        return losses

    def _step(self) -> int:
        """One plain step, or one unrolled hyper-step of K steps; returns how many steps."""
        hg = self.oc.hypergrad
        if self.meta and hg.mode == "unrolled" and self.done % hg.interval == 0 and self.done + hg.k <= self.cfg.steps:
            batches = [self._next_batch() for _ in range(hg.k)]
            if hg.meta_objective == "val":
                meta_batch = self.job.data.batch("val", self.cfg.batch_size, self.cfg.model.block_size, self.job.meta_gen(self.seed))
            else:  # the next training batch, which the next step then trains on
                meta_batch = self._peek_batch()
            inner: list[Tensor] = []

            def loss_fn(net, batch):
                loss = lm_loss(net, batch)
                inner.append(loss.detach())
                return loss

            # second order needs attention that can be differentiated twice: the math kernel
            with contextlib.nullcontext() if hg.first_order else _math_attention():
                self.opt.unrolled_step(self.model, batches, loss_fn, meta_batch, meta_loss_fn=lm_loss)
            self.losses[self.done : self.done + hg.k] = torch.stack(inner[: hg.k])
            return hg.k
        x, y = self._next_batch()
        self.opt.zero_grad(set_to_none=True)
        _, loss = self.model(x, y)
        loss.backward()
        self.opt.step()
        self.losses[self.done] = loss.detach()
        return 1

    def start(self) -> None:
        """Step 0: the validation loss (and coefficients) before training."""
        self.val[0] = v0 = evaluate(self.model, self.job.val_batches)
        rec0 = {"step": 0, **self.base, "train_loss": None, "val_loss": v0, "time": 0.0, "train_time": 0.0}
        if self.meta:
            rec0["coefficients"] = self.last_coefs = self._coef_values()
        self.log.write([rec0])
        if self.progress.bars:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.cfg.steps, desc=f"{self.progress.position}seed {self.seed} {self.oc.label}", unit="step",
                position=self.slot, leave=True, dynamic_ncols=True, file=sys.stderr,
            )

    def advance(self) -> None:
        """One step (K with an unrolled hyper-step), then evaluation, flush and report as due."""
        cfg = self.cfg
        if self.rng is not None:
            _set_rng_state(self.device, self.rng)
        t = time.perf_counter()
        k = self._step()
        if self.coefs is not None:
            self.coefs[self.done : self.done + k] = torch.stack(list(self.opt.coefficients.values()))
        self._sync()  # (CUDA) so that each optimizer is timed on its own work
        dt = time.perf_counter() - t
        if self.rng is not None:
            self.rng = _rng_state(self.device)
        self.elapsed += dt
        self.train_elapsed += dt
        for j in range(self.done, self.done + k):
            self.times[j], self.train_times[j] = self.elapsed, self.train_elapsed
        prev, self.done = self.done, self.done + k
        evaluated = self.done // cfg.eval_interval > prev // cfg.eval_interval or self.done == cfg.steps
        if evaluated:
            self.val[self.done] = self._evaluate()
        if evaluated or self.done // cfg.log_interval > prev // cfg.log_interval:
            self._report(self.flush(), evaluated)
        if step_hook is not None:
            step_hook({"step": self.done, "optimizer": self.oc.label, "seed": self.seed, "run": self})

    def close(self) -> None:
        """Flush what is left (also after Ctrl-C) and close the bar."""
        self.flush()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def final_line(self) -> str:
        last_val = self.val[max(self.val)]
        coefs = f"  {_fmt_coefs(self.last_coefs, self.learned)}" if self.learned else ""
        return (
            f"{self.progress.position}seed {self.seed} {self.oc.label}: val loss {last_val:.4f} "
            f"(best {min(self.val.values()):.4f}), {self.done / max(self.train_elapsed, 1e-9):.1f} steps/s{coefs}"
        )

    def _report(self, losses: list[float], evaluated: bool) -> None:
        train = sum(losses) / len(losses) if losses else math.nan
        val = self.val[max(self.val)]
        coefs = _fmt_coefs(self.last_coefs, self.learned)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={train:.4f} val={val:.4f} {coefs}".strip(), refresh=False)
            self.bar.update(self.done - self.bar.n)
        elif evaluated:
            self.progress.echo(
                f"{self.progress.position}seed {self.seed} {self.oc.label} step {self.done}/{self.cfg.steps}: "
                f"train {train:.4f} val {val:.4f} {coefs} ({self.done / max(self.train_elapsed, 1e-9):.1f} steps/s)".replace("  ", " ")
            )


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# -- the job -----------------------------------------------------------------------------------


@dataclass
class JobResult:
    run_dir: Path
    summary: dict[str, Any]
    interrupted: bool
    table: str = ""
    plots: list[Path] = field(default_factory=list)


class Job:
    """A validated config with its data loaded; :meth:`run` trains and reports.

    Everything that can fail because of the config (the text file, a split shorter than the
    context) fails in the constructor, before a run directory is made."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.device = cfg.resolved_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r}: CUDA is not available here")
        self.data = CharDataset.from_source(cfg.data.path, cfg.data.val_fraction, self.device)
        self.val_batches = self.data.fixed_batches(
            "val", cfg.eval_batches, cfg.batch_size, cfg.model.block_size, cfg.data.eval_seed
        )
        self.data.batch("train", 1, cfg.model.block_size, torch.Generator().manual_seed(0))  # long enough?
        self._meta_gens: dict[int, torch.Generator] = {}

    def meta_gen(self, seed: int) -> torch.Generator:
        """Draws the validation batches of an unrolled validation meta-objective."""
        if seed not in self._meta_gens:
            self._meta_gens[seed] = torch.Generator().manual_seed(10_000_019 + seed)
        return self._meta_gens[seed]

    def num_parameters(self) -> int:
        m = self.cfg.model
        with torch.device("meta"):
            gpt = GPT(GPTConfig(self.data.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd, m.dropout))
        return gpt.num_parameters()

    def run(self, run_dir: Path, *, progress: Progress | None = None) -> JobResult:
        """Train every optimizer for every seed, then write the summary and plots. Ctrl-C stops
        the training; what was logged is summarised and plotted, and ``interrupted`` is set."""
        cfg = self.cfg
        progress = progress or Progress()
        run_dir.mkdir(parents=True, exist_ok=True)
        # "auto" resolved: the run directory records the device the job ran on
        write_config(cfg.model_copy(update={"device": str(self.device)}), run_dir / "config.yaml")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        interrupted = False
        with MetricsLog(run_dir / "metrics.jsonl") as log:
            try:
                for i, seed in enumerate(cfg.seeds):
                    progress.position = f"[{i + 1}/{len(cfg.seeds)}] " if len(cfg.seeds) > 1 else ""
                    self._run_seed(seed, log, progress)
            except KeyboardInterrupt:
                interrupted = True
            except BaseException:
                with contextlib.suppress(Exception):  # best effort: summarise what was logged
                    self._report(run_dir, interrupted=True)
                raise
        return self._report(run_dir, interrupted=interrupted)

    def _run_seed(self, seed: int, log: MetricsLog, progress: Progress) -> None:
        """Every optimizer from this seed, interleaved step by step."""
        runs: list[_Run] = []
        try:
            for slot, oc in enumerate(self.cfg.optimizers):
                runs.append(_Run(self, oc, seed, log, progress, slot))
            for run in runs:
                run.start()
            while not all(r.finished for r in runs):
                for run in runs:
                    if not run.finished:
                        run.advance()
        finally:
            with deferred_interrupt():
                for run in runs:
                    run.close()  # the steps done so far, also on Ctrl-C
        for run in runs:
            progress.echo(run.final_line())

    def _report(self, run_dir: Path, *, interrupted: bool) -> JobResult:
        from metaopt.jobs.plots import make_plots
        from metaopt.jobs.summary import format_table, summarize, write_summary

        records = read_metrics(run_dir / "metrics.jsonl")
        summary = summarize(self.cfg, records, interrupted=interrupted, device=str(self.device))
        write_summary(summary, run_dir)
        plots = make_plots(self.cfg, records, run_dir)
        return JobResult(run_dir, summary, interrupted, format_table(summary), plots)


def write_config(cfg: JobConfig, path: Path) -> None:
    header = (
        "# The resolved config of this run (defaults filled in, command-line overrides applied).\n"
        f"# Re-run it with:  metaopt run {path}\n"
    )
    path.write_text(header + yaml.safe_dump(cfg.dump(), sort_keys=False, default_flow_style=None), encoding="utf-8")
