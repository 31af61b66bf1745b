"""Running a job: every optimizer of the config on the same model, data and seed.

What is here: the building blocks of a run (`build_model`, `build_optimizer`, the notes
``metaopt run`` prints about a contender), one `Run` (an optimizer trained from a seed) made of
its `RunBatches`, `Evaluator`, `RunRecords` and `RunDisplay`, and the `Job` that interleaves the
runs of each seed, checkpoints them and writes the report.

Metrics are streamed to ``metrics.jsonl``; summary and plots at the end (also after Ctrl-C).

Seeds run one after the other; within a seed the optimizers are interleaved step by step (one
step of each in turn), so that a busy machine slows all of them alike (their steps/s stay
comparable) and a Ctrl-C leaves all of them at the same step. Each run's time is its own steps
(and evaluations), measured around them.

Per run (one optimizer, one seed): ``torch.manual_seed(seed)`` before the model is built (same
initial weights for every optimizer) and a ``torch.Generator`` seeded with ``seed`` draws the
training batches (same batches, in the same order, for every optimizer). Validation uses one
fixed set of batches for the whole job (``data.eval_seed``).

Nothing reads a tensor back to the host on an ordinary step: each step's training loss,
coefficients and hyper-gradient magnitudes go into preallocated device buffers, which are read
back every ``log_interval`` steps, when the records of those steps are written.

Every ``checkpoint_every`` steps the runs of a seed are checkpointed together (one file per seed,
after the same round; its format: ``metaopt.jobs.run_state``), and ``metaopt run --resume``
continues them from there with the numbers an uninterrupted run has. Runs share no state to make
that hold: each has its own batch generator, its own validation generator for an unrolled
validation meta-objective, and (with dropout) its own stream of the global generator.
"""

from __future__ import annotations

import collections
import contextlib
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
from metaopt.jobs import resume as _resume
from metaopt.jobs.schema import GPT_GROUPS, JobConfig, OptimizerConfig
from metaopt.jobs.contenders import build_torch_optimizer, default_argument, has_modes, has_modes_class
from metaopt.jobs import data_parallel as dp
from metaopt.jobs.data import CharDataset, TokenDataset, load_dataset
from metaopt.jobs.data_parallel import World
from metaopt.jobs.gpt import GPT, GPTConfig
from metaopt.jobs.metrics import METRICS_FILE, MetricsLog, NullLog, read_metrics
from metaopt.jobs.report import write_report
from metaopt.jobs.resume import ResumeError, ResumePlan, SeedPlan
from metaopt.jobs.run_state import RunState, SeedCheckpoint, checkpoint_path, write_text_atomic
from metaopt.jobs.schedule import build_scheduler

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
    """A torch optimizer (``torch.optim.Adam``, any ``module:Class``) or a [`MetaOptimizer`][metaopt.MetaOptimizer].

    The job's ``lr`` applies unless the optimizer sets its own. The job's ``betas`` go to a torch
    optimizer whose constructor takes ``betas`` (unless ``hyperparameters`` sets them), and to a
    family only through its ``betas`` option (`OptimizerConfig.family`); a family without one
    keeps its own values (`betas_note` says so). A torch optimizer gets ``hyperparameters`` as
    constructor arguments. The hyper-optimizer is the config's, its unset settings the family's
    default's. The schedule is not applied here (`metaopt.jobs.schedule.build_scheduler`).
    """
    lr = oc.lr if oc.lr is not None else cfg.lr
    hp = dict(oc.hyperparameters)
    if oc.is_torch:
        return build_torch_optimizer(oc.optimizer_cls, model.parameters(), hp, lr, cfg.betas)
    family = oc.family(cfg.betas)
    hypergrad = oc.hypergrad.build(family.default_hypergrad())
    if oc.coefficients == "per_group":
        groups = model.param_groups()
        assert tuple(g["name"] for g in groups) == GPT_GROUPS
        return MetaOptimizer(groups, family, hypergrad=hypergrad, lr=lr, compile=oc.compile,
                             coefficients="per_group", **hp)
    return MetaOptimizer(model.parameters(), family, hypergrad=hypergrad, lr=lr, compile=oc.compile, **hp)


def betas_note(oc: OptimizerConfig, cfg: JobConfig) -> str | None:
    """The note ``metaopt run`` prints for a family contender the job's ``betas`` do not reach.

    Returns:
        None where they reach it (torch's optimizers, a family with a ``betas`` option, or a
            contender that sets ``betas`` in ``options`` or ``hyperparameters`` itself).
    """
    if oc.is_torch or "betas" in oc.hyperparameters or oc.takes_betas():
        return None
    betas = ", ".join(f"{b:g}" for b in cfg.betas)
    return (
        f"note: optimizer {oc.label!r} (kind {oc.kind}) ignores the job's betas ({betas}): the family has no "
        "`betas` option; its own values apply (set them in `options:` or `hyperparameters:`)"
    )


def contender_notes(oc: OptimizerConfig, cfg: JobConfig) -> list[str]:
    """The notes ``metaopt run`` prints for a torch contender whose settings look unintended.

    * An optimizer with a train and an eval mode (Schedule-Free) under a decaying schedule:
      such an optimizer is built to run without one (its authors: a constant lr, with its own
      ``warmup_steps``); the run goes ahead, since comparing it with a decay is a fair question.
    * An optimizer whose constructor's default lr is 1 or more (Prodigy, D-Adaptation: the lr
      scales a step size they estimate; Schedule-Free SGD) running at the job's smaller lr
      because the entry sets none.
    """
    if not oc.is_torch:
        return []
    notes = []
    cls = oc.optimizer_cls
    if oc.schedule.decays and has_modes_class(cls):
        notes.append(
            f"note: optimizer {oc.label!r} ({oc.kind}) has train/eval modes (Schedule-Free), which stand in for a "
            f"decaying schedule, and runs under schedule {oc.schedule.describe()}; it is meant to run at a constant "
            "lr (`schedule: constant`, warm-up by its `warmup_steps` hyperparameter or the schedule's `warmup`)"
        )
    default_lr = default_argument(cls, "lr")
    if oc.lr is None and isinstance(default_lr, (int, float)) and default_lr >= 1.0 and cfg.lr < default_lr:
        notes.append(
            f"note: optimizer {oc.label!r} ({oc.kind}) runs at the job's lr {cfg.lr:g}, far below its default lr "
            f"{default_lr:g} (Prodigy and D-Adaptation scale a step size they estimate by lr); set `lr:` in its "
            f"entry (`lr: {default_lr:g}`, its default) unless the job's lr is what you meant"
        )
    return notes


def coefficient_names(opt: MetaOptimizer) -> list[str]:
    """The metrics' keys of an optimizer's coefficients.

    Their names, or with coefficients per group ``"<group>/<name>"`` group by group.
    """
    if not opt.per_group:
        return list(opt.coefficients)
    return [f"{g.get('name', gi)}/{n}" for gi, g in enumerate(opt.param_groups) for n in opt.coefficients]


def coefficient_vector(opt: MetaOptimizer) -> Tensor:
    """The coefficients in ``coefficient_names``' order, on the device (no read-back)."""
    values = torch.stack(list(opt.coefficients.values()), -1)  # (n,) or (groups, n)
    return values.reshape(-1)


def hypergrad_names(opt: MetaOptimizer) -> list[str]:
    """The metrics' keys of the learned coefficients' hyper-gradients, as ``coefficient_names``'."""
    if not opt.per_group:
        return list(opt.learned)
    return [f"{g.get('name', gi)}/{n}" for gi, g in enumerate(opt.param_groups) for n in opt.learned]


def hypergrad_vector(opt: MetaOptimizer) -> Tensor:
    """|h| of each learned coefficient's last hyper-gradient, in ``hypergrad_names``' order, on the device."""
    values = torch.stack(list(opt.last_hypergrad.values()), -1)  # (k,) or (groups, k)
    return values.reshape(-1).abs()


def lm_loss(model: torch.nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The model's language-modelling loss on an ``(inputs, targets)`` batch."""
    return model(*batch)[1]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[Tensor, Tensor]], parts: int = 1, world: World = World()) -> float:
    """Mean loss over ``batches`` in eval mode (one read-back).

    ``parts``: each batch taken in that many equal micro-batches (their mean is the batch's);
    ``world``: each process holds its rows of every batch, and the mean is over processes too.
    """
    was_training = model.training
    model.eval()
    if parts == 1:
        total = sum(lm_loss(model, b) for b in batches)
    else:
        total = sum(sum(lm_loss(model, m) for m in zip(x.chunk(parts), y.chunk(parts))) / parts for x, y in batches)
    model.train(was_training)
    return float(dp.mean_over_ranks(world, total / len(batches)))


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a job scheduler, `kill`) stops the run like Ctrl-C: summary and plots still made.

    Unless the process was started with SIGTERM ignored: an ignored signal stays ignored.
    """

    def handler(signum, frame):
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a block runs (a record window being written).

    Then deliver them to the handlers in force before. SIGTERM too: the command turns it into an
    interrupt, and one landing between writing a window and marking it written wrote it twice.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # ignored by whoever started the process (a background job): it stays ignored
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
    """``scaled_dot_product_attention`` through its math kernel (plain differentiable ops).

    The fused CPU/CUDA kernels have no double backward, which second-order unrolling needs.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: fall back to the default kernels
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _fmt_coefs(values: dict[str, float], names) -> str:
    return " ".join(f"{n}={values[n]:.4f}" for n in names if n in values)


def _fmt_hypergrad(values: dict[str, float], learned, skipped: int | None) -> str:
    """The hyper-gradients' part of a progress line: ``|h| 3.1e-04/2.0e-03/1.2e-05 skip 0``.

    Each learned coefficient's last |h| (per group: the largest over the groups), in the order
    the coefficients are shown, and how many hyper-steps were skipped.
    """
    if not values or skipped is None:
        return ""
    sizes = [max((v for k, v in values.items() if k == n or k.endswith(f"/{n}")), default=0.0) for n in learned]
    return f"|h| {'/'.join(f'{x:.1e}' for x in sizes)} skip {skipped}"


# -- one run -----------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where runs report: tqdm bars (interactive) or one line per evaluation."""

    bars: bool = True
    echo: Callable[[str], None] = print
    position: str = ""


class RunBatches:
    """A run's own batches: training batches from its generator, one drawn ahead when peeked.

    With an unrolled validation meta-objective, also validation batches from a second generator
    of its own. Runs share no generator, so a run takes the batches it would take alone.
    """

    def __init__(self, data: CharDataset | TokenDataset, cfg: JobConfig, seed: int, *, meta_val: bool,
                 rows: slice | None = None) -> None:
        self.data, self.batch_size, self.block_size = data, cfg.batch_size, cfg.model.block_size
        self.rows = rows  # this process's share of every batch (None: all of it)
        self.generator = torch.Generator().manual_seed(seed)
        self.meta_generator = torch.Generator().manual_seed(10_000_019 + seed) if meta_val else None
        self.queue: collections.deque = collections.deque()  # a training batch drawn ahead

    def next(self) -> tuple[Tensor, Tensor]:
        """The next training batch (the one drawn ahead, if any)."""
        if self.queue:
            return self.queue.popleft()
        return self.data.batch("train", self.batch_size, self.block_size, self.generator, self.rows)

    def peek(self) -> tuple[Tensor, Tensor]:
        """The next training batch, left for `next` to return."""
        if not self.queue:
            self.queue.append(self.data.batch("train", self.batch_size, self.block_size, self.generator, self.rows))
        return self.queue[0]

    def meta_batch(self) -> tuple[Tensor, Tensor]:
        """A validation batch for the unrolled validation meta-objective."""
        return self.data.batch("val", self.batch_size, self.block_size, self.meta_generator, self.rows)

    def state(self) -> dict[str, Any]:
        """Its part of a `RunState`: both generators and the batch drawn ahead."""
        return {
            "generator": self.generator.get_state(),
            "meta_generator": None if self.meta_generator is None else self.meta_generator.get_state(),
            "queue": [list(b) for b in self.queue],
        }

    def load(self, state: RunState, device: torch.device) -> None:
        """Continue from ``state``'s generators and batch drawn ahead."""
        self.generator.set_state(state.generator)
        if (self.meta_generator is None) != (state.meta_generator is None):
            raise ValueError("the validation generator of an unrolled validation meta-objective does not match")
        if self.meta_generator is not None:
            self.meta_generator.set_state(state.meta_generator)
        self.queue = collections.deque(tuple(t.to(device) for t in b) for b in state.queue)


class Evaluator:
    """A run's validation loss on the job's fixed batches.

    An optimizer with train and eval modes (Schedule-Free) is put in train mode here and stays
    in it between steps; it is switched to eval mode only while evaluating (at x, not y).
    """

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]],
                 parts: int = 1, world: World = World()) -> None:
        self.model, self.opt, self.batches = model, opt, batches
        self.parts, self.world = parts, world  # as `evaluate` takes them
        self.modes = has_modes(opt)
        if self.modes:
            opt.train()

    def __call__(self) -> float:
        """The mean validation loss (one read-back)."""
        if not self.modes:
            return evaluate(self.model, self.batches, self.parts, self.world)
        self.opt.eval()
        try:
            return evaluate(self.model, self.batches, self.parts, self.world)
        finally:
            self.opt.train()


class RunRecords:
    """A run's per-step records, held until written to ``metrics.jsonl`` window by window.

    Each step's training loss, coefficients and hyper-gradient magnitudes go into preallocated
    device buffers (no read-back on an ordinary step); `flush` reads a window back and writes
    its records. Also the run's clock (its own seconds: steps, and steps plus evaluations), the
    lr of each step and the validation losses.
    """

    def __init__(self, log: MetricsLog, label: str, seed: int, steps: int, opt: torch.optim.Optimizer, device: torch.device) -> None:
        self.log = log
        self.base = {"optimizer": label, "seed": seed}
        self.opt = opt if isinstance(opt, MetaOptimizer) else None  # its coefficients are recorded
        self.names = coefficient_names(opt) if self.opt is not None else []
        self.hnames = hypergrad_names(opt) if self.opt is not None and opt.learned else []
        self.losses = torch.zeros(steps, device=device)
        self.coefs = torch.zeros(steps, len(self.names), device=device) if self.names else None
        self.hgrads = torch.zeros(steps, len(self.hnames), device=device) if self.hnames else None
        self.hgrads_from = 0  # the first step whose |h| the buffer holds (a checkpoint without them: later)
        self.times = [0.0] * steps
        self.train_times = [0.0] * steps
        self.lrs = [0.0] * steps  # the lr each step ran at (first param group), a Python float
        self.elapsed = 0.0  # the run's own seconds: its steps and its evaluations
        self.train_elapsed = 0.0  # its steps only
        self.val: dict[int, float] = {}
        self.flushed = 0
        self.last_coefs: dict[str, float] = {}
        self.last_hgrads: dict[str, float] = {}
        self.last_skipped: int | None = None

    def coefficient_values(self) -> dict[str, float]:
        """The optimizer's coefficients now, by metrics key (one read-back)."""
        return dict(zip(self.names, coefficient_vector(self.opt).tolist()))

    def start(self, val_loss: float) -> None:
        """Write step 0: the validation loss (and coefficients) before training."""
        self.val[0] = val_loss
        rec0 = {"step": 0, **self.base, "train_loss": None, "val_loss": val_loss, "time": 0.0, "train_time": 0.0}
        if self.opt is not None:
            rec0["coefficients"] = self.last_coefs = self.coefficient_values()
        self.log.write([rec0])

    def record(self, start: int, k: int, losses: Tensor, lrs: list[float]) -> None:
        """Steps ``start``..``start + k``: their losses and lrs, and the coefficients and |h| now (on the device)."""
        self.losses[start : start + k] = losses
        self.lrs[start : start + k] = lrs
        if self.coefs is not None:
            self.coefs[start : start + k] = coefficient_vector(self.opt)
        if self.hgrads is not None:
            self.hgrads[start : start + k] = hypergrad_vector(self.opt)

    def clock(self, start: int, k: int, seconds: float) -> None:
        """Steps ``start``..``start + k`` took ``seconds``."""
        self.elapsed += seconds
        self.train_elapsed += seconds
        for j in range(start, start + k):
            self.times[j], self.train_times[j] = self.elapsed, self.train_elapsed

    def flush(self, done: int) -> list[float]:
        """Write the records of the steps up to ``done`` not yet written (one read-back); their losses."""
        lo, hi = self.flushed, done
        if hi <= lo:
            return []
        with deferred_interrupt():
            losses = self.losses[lo:hi].tolist()
            coefs = self.coefs[lo:hi].tolist() if self.coefs is not None else None
            hgrads = self.hgrads[lo:hi].tolist() if self.hgrads is not None else None
            records = []
            for j in range(lo, hi):
                step = j + 1
                r = {
                    "step": step, **self.base, "train_loss": losses[j - lo], "val_loss": self.val.get(step),
                    "time": round(self.times[j], 4), "train_time": round(self.train_times[j], 4),
                    "lr": self.lrs[j],
                }
                if coefs is not None:
                    r["coefficients"] = dict(zip(self.names, coefs[j - lo]))
                if hgrads is not None and j >= self.hgrads_from:
                    r["hypergrad"] = dict(zip(self.hnames, hgrads[j - lo]))
                records.append(r)
            if self.opt is not None:
                records[-1]["skipped_hypersteps"] = self.last_skipped = int(self.opt.skipped_hypersteps)
                self.last_coefs = records[-1]["coefficients"]
                self.last_hgrads = records[-1].get("hypergrad", {})
            self.log.write(records)
            self.flushed = hi
        return losses

    def state(self) -> dict[str, Any]:
        """Its part of a `RunState`: the buffers (the steps not yet written live there) and counters."""
        return {
            "flushed": self.flushed,
            "losses": self.losses,
            "coefs": self.coefs,
            "hgrads": self.hgrads,
            "hgrads_from": self.hgrads_from,
            "times": list(self.times),
            "train_times": list(self.train_times),
            "lrs": list(self.lrs),
            "elapsed": self.elapsed,
            "train_elapsed": self.train_elapsed,
            "val": dict(self.val),
            "last_coefs": dict(self.last_coefs),
        }

    def load(self, state: RunState, lr: float) -> None:
        """Continue from ``state``'s buffers and counters; ``lr``: the lr of a checkpoint from before lrs were kept."""
        steps = len(self.times)
        if state.losses.shape != self.losses.shape:
            raise ValueError(f"loss buffer of {tuple(state.losses.shape)}, this run has {tuple(self.losses.shape)}")
        self.losses.copy_(state.losses)
        if (self.coefs is None) != (state.coefs is None):
            raise ValueError("coefficient buffer does not match")
        if self.coefs is not None:
            if state.coefs.shape != self.coefs.shape:
                raise ValueError(f"coefficient buffer of {tuple(state.coefs.shape)}, this run has {tuple(self.coefs.shape)}")
            self.coefs.copy_(state.coefs)
        if state.hgrads_from is not None:
            if (self.hgrads is None) != (state.hgrads is None):
                raise ValueError("hyper-gradient buffer does not match")
            if self.hgrads is not None:
                if state.hgrads.shape != self.hgrads.shape:
                    raise ValueError(f"hyper-gradient buffer of {tuple(state.hgrads.shape)}, this run has "
                                     f"{tuple(self.hgrads.shape)}")
                self.hgrads.copy_(state.hgrads)
            self.hgrads_from = state.hgrads_from
        else:  # a checkpoint from before |h| was recorded: the steps it holds unwritten go without
            self.hgrads_from = state.done
        if len(state.times) != steps or len(state.train_times) != steps:
            raise ValueError("timing buffers of another length")
        self.times, self.train_times = list(state.times), list(state.train_times)
        # a checkpoint from before the lr was recorded ran at a constant lr: the one it holds
        self.lrs = list(state.lrs) if state.lrs is not None else [lr] * steps
        if len(self.lrs) != steps:
            raise ValueError("lr buffer of another length")
        self.elapsed, self.train_elapsed = float(state.elapsed), float(state.train_elapsed)
        self.val = {int(k): float(v) for k, v in state.val.items()}
        self.last_coefs = dict(state.last_coefs)
        self.flushed = state.flushed


class RunDisplay:
    """How a run shows its progress: a tqdm bar, or one line per evaluation; and its final line."""

    def __init__(self, progress: Progress, label: str, seed: int, steps: int, learned: list[str], slot: int) -> None:
        self.progress, self.label, self.seed, self.steps, self.learned, self.slot = progress, label, seed, steps, learned, slot
        self.bar = None

    def start(self, done: int) -> None:
        """Open the bar (with bars), at step ``done``."""
        if self.progress.bars:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.steps, initial=done, desc=f"{self.progress.position}seed {self.seed} {self.label}",
                unit="step", position=self.slot, leave=True, dynamic_ncols=True, file=sys.stderr,
            )

    def update(self, done: int, losses: list[float], evaluated: bool, records: RunRecords, lr: float | None) -> None:
        """After a flush (``losses``: the flushed steps'): the bar's numbers, or a line where ``evaluated``."""
        train = sum(losses) / len(losses) if losses else math.nan
        val = records.val[max(records.val)]
        coefs = _fmt_coefs(records.last_coefs, self.learned)
        hyper = _fmt_hypergrad(records.last_hgrads, self.learned, records.last_skipped)
        # under a schedule, the lr of the last step: where in its warm-up or decay the run is
        lr_text = f"lr={lr:.2e}" if lr is not None else ""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={train:.4f} val={val:.4f} {lr_text} {coefs} {hyper}".strip(), refresh=False)
            self.bar.update(done - self.bar.n)
        elif evaluated:
            self.progress.echo(
                f"{self.progress.position}seed {self.seed} {self.label} step {done}/{self.steps}: "
                f"train {train:.4f} val {val:.4f} {lr_text} {coefs} {hyper} "
                f"({done / max(records.train_elapsed, 1e-9):.1f} steps/s)".replace("   ", " ").replace("  ", " ")
            )

    def final_line(self, done: int, records: RunRecords) -> str:
        """The line a finished (or stopped) run prints: last and best validation loss, speed, coefficients."""
        last_val = records.val[max(records.val)]
        coefs = f"  {_fmt_coefs(records.last_coefs, self.learned)}" if self.learned else ""
        hyper = _fmt_hypergrad(records.last_hgrads, self.learned, records.last_skipped)
        return (
            f"{self.progress.position}seed {self.seed} {self.label}: val loss {last_val:.4f} "
            f"(best {min(records.val.values()):.4f}), {done / max(records.train_elapsed, 1e-9):.1f} steps/s{coefs}"
            + (f"  {hyper}" if hyper else "")
        )

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Run:
    """One optimizer trained from one seed, advanced a step at a time.

    The runs of a seed are interleaved step by step, so that machine load, and a Ctrl-C, fall on
    all alike. Its pieces: the model and optimizer (and schedule) it trains, its `RunBatches`,
    its `Evaluator`, its `RunRecords` and its `RunDisplay`; its checkpoint is a `RunState`.
    """

    def __init__(self, job: Job, oc: OptimizerConfig, seed: int, log: MetricsLog, progress: Progress, slot: int = 0) -> None:
        self.oc, self.seed = oc, seed
        cfg = self.cfg = job.cfg
        self.device, self.world = job.device, job.world
        self.model = build_model(cfg, job.data.vocab_size, seed, job.device)
        self.model.train()
        # what trains: the model, its DDP wrapper, or the model sharded in place (FSDP2)
        self.net = dp.wrap(self.world, self.model, self.device)
        # dropout draws from the global generator: give each run its own stream, as if it ran alone
        self.rng = _rng_state(self.device) if cfg.model.dropout > 0 else None
        self.opt = build_optimizer(oc, cfg, self.model)
        self.sched = build_scheduler(self.opt, oc.schedule, cfg.steps)
        self.evaluator = Evaluator(self.model, self.opt, job.val_batches, cfg.gradient_accumulation, self.world)
        self.meta = isinstance(self.opt, MetaOptimizer)
        hg = oc.hypergrad
        # the validation batches of an unrolled validation meta-objective: the run's own stream
        self.batches = RunBatches(job.data, cfg, seed, meta_val=self.meta and hg.mode == "unrolled" and hg.meta_objective == "val",
                                  rows=self.world.rows(cfg.batch_size))
        self.records = RunRecords(log, oc.label, seed, cfg.steps, self.opt, job.device)
        self.display = RunDisplay(progress, oc.label, seed, cfg.steps, list(self.opt.learned) if self.meta else [], slot)
        self.done = 0

    @property
    def finished(self) -> bool:
        """Whether it has taken every step of the job."""
        return self.done >= self.cfg.steps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _evaluate(self) -> float:
        """The validation loss, its time counted as the run's own."""
        t = time.perf_counter()
        v = self.evaluator()
        self.records.elapsed += time.perf_counter() - t
        return v

    def flush(self) -> list[float]:
        """Write the records of the steps done since the last flush (one read-back)."""
        return self.records.flush(self.done)

    def _step(self) -> int:
        """One plain step, or one unrolled hyper-step of K steps, recorded; returns how many steps."""
        hg = self.oc.hypergrad
        if self.meta and hg.mode == "unrolled" and self.done % hg.interval == 0 and self.done + hg.k <= self.cfg.steps:
            batches = [self.batches.next() for _ in range(hg.k)]
            if hg.meta_objective == "val":
                meta_batch = self.batches.meta_batch()
            else:  # the next training batch, which the next step then trains on
                meta_batch = self.batches.peek()
            inner: list[Tensor] = []

            def loss_fn(net, batch):
                loss = lm_loss(net, batch)
                inner.append(loss.detach())
                return loss

            # the K steps of a hyper-step run at the lr of its first one; the schedule then moves on K steps
            lr = self._lr()
            # second order needs attention that can be differentiated twice: the math kernel
            with contextlib.nullcontext() if hg.first_order else _math_attention():
                self.opt.unrolled_step(self.model, batches, loss_fn, meta_batch, meta_loss_fn=lm_loss)
            self._schedule(hg.k)
            self.records.record(self.done, hg.k, torch.stack(inner[: hg.k]), [lr] * hg.k)
            return hg.k
        x, y = self.batches.next()
        lr = self._lr()
        # torch's default for torch's optimizers; a MetaOptimizer keeps its flat gradient buffers
        # and zeroes them in place (set_to_none=True would make every step copy the gradients in)
        self.opt.zero_grad()
        parts = self.cfg.gradient_accumulation
        if parts == 1:
            _, loss = self.net(x, y)
            loss.backward()
            loss = loss.detach()
        else:  # the micro-batches' mean losses: their gradients add up to the batch's
            loss = torch.zeros((), device=self.device)
            for i, (xm, ym) in enumerate(zip(x.chunk(parts), y.chunk(parts))):
                with dp.gradient_sync(self.world, self.net, i == parts - 1):  # across processes once
                    _, part = self.net(xm, ym)
                    (part / parts).backward()
                loss += part.detach()
            loss /= parts
        if self.cfg.grad_clip is not None:  # on the averaged gradient (FSDP2: its shards' global norm)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self._schedule(1)
        self.records.record(self.done, 1, dp.mean_over_ranks(self.world, loss), [lr])
        return 1

    def _lr(self) -> float:
        """The lr the next step runs at (the first param group's; the schedule moves every group alike)."""
        return float(self.opt.param_groups[0]["lr"])

    def _schedule(self, k: int) -> None:
        """The schedule moved on ``k`` steps (nothing without one)."""
        if self.sched is not None:
            for _ in range(k):
                self.sched.step()

    def start(self, resumed: bool = False) -> None:
        """Step 0: the validation loss (and coefficients) before training.

        Nothing for a run continued from a checkpoint (its records up to the checkpoint are in
        the log).
        """
        if not resumed:
            self.records.start(self.evaluator())
        self.display.start(self.done)

    def state(self) -> RunState:
        """Everything a continued run needs to take the steps this one would have taken.

        Taken between steps, so between unrolled hyper-steps too. An optimizer with modes
        (Schedule-Free) is saved as it trains, in train mode, with the model at its training
        point: switching it to eval and back would round the parameters, and the records would
        then depend on ``checkpoint_every``. (Its authors' advice to save in eval mode is for a
        model to be used; this checkpoint is for continuing, and restores mode and point together.)
        """
        model, optimizer = dp.full_state(self.world, self.model, self.opt)  # FSDP2: gathered on rank 0
        return RunState(
            done=self.done,
            model=model,
            optimizer=optimizer,
            scheduler=None if self.sched is None else self.sched.state_dict(),
            rng=None if self.rng is None else list(self.rng),
            **self.batches.state(),
            **self.records.state(),
        )

    def load_state(self, state: RunState) -> None:
        """Continue from ``state()``'s output (a fresh run of the same config and seed)."""
        dp.load_full_state(self.world, self.model, self.opt, state.model, state.optimizer)
        if (self.sched is None) != (state.scheduler is None):
            raise ValueError("the learning-rate schedule does not match (one side has a scheduler, the other none)")
        if self.sched is not None:
            self.sched.load_state_dict(state.scheduler)
        self.batches.load(state, self.device)
        if (self.rng is None) != (state.rng is None):
            raise ValueError("the dropout generator state does not match")
        if self.rng is not None:
            cpu, cuda = state.rng
            self.rng = (cpu, cuda)
        self.records.load(state, self._lr())
        self.done = state.done

    def advance(self) -> None:
        """One step (K with an unrolled hyper-step), then evaluation, flush and report as due."""
        cfg = self.cfg
        if self.rng is not None:
            _set_rng_state(self.device, self.rng)
        t = time.perf_counter()
        k = self._step()
        self._sync()  # (CUDA) so that each optimizer is timed on its own work
        dt = time.perf_counter() - t
        if self.rng is not None:
            self.rng = _rng_state(self.device)
        self.records.clock(self.done, k, dt)
        prev, self.done = self.done, self.done + k
        evaluated = self.done // cfg.eval_interval > prev // cfg.eval_interval or self.done == cfg.steps
        if evaluated:
            self.records.val[self.done] = self._evaluate()
        if evaluated or self.done // cfg.log_interval > prev // cfg.log_interval:
            # under a schedule, the lr of the last step
            lr = self.records.lrs[self.done - 1] if self.sched is not None and self.done else None
            self.display.update(self.done, self.flush(), evaluated, self.records, lr)
        if step_hook is not None:
            step_hook({"step": self.done, "optimizer": self.oc.label, "seed": self.seed, "run": self})

    def close(self) -> None:
        """Flush what is left (also after Ctrl-C) and close the bar."""
        self.flush()
        self.display.close()

    def final_line(self) -> str:
        """The line the run prints when its seed is done."""
        return self.display.final_line(self.done, self.records)


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# -- the job -----------------------------------------------------------------------------------


@dataclass
class JobResult:
    """What ``Job.run`` returns: the run directory, its summary, whether it was interrupted, the table and plots."""

    run_dir: Path
    summary: dict[str, Any]
    interrupted: bool
    table: str = ""
    plots: list[Path] = field(default_factory=list)


class Job:
    """A validated config with its data loaded; ``run`` trains and reports.

    Everything that can fail because of the config (the text file, a split shorter than the
    context) fails in the constructor, before a run directory is made.

    Under torchrun (``world``, `metaopt.jobs.data_parallel`) every process makes the job and
    trains every run with the others, each on its share of every batch; rank 0 alone writes.
    """

    def __init__(self, cfg: JobConfig, world: World | None = None) -> None:
        self.cfg = cfg
        self.world = world or World()
        self.device = self.world.device(cfg.resolved_device())
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r}: CUDA is not available here")
        self.data = load_dataset(cfg.data, self.device, check=self.world.writes)
        self.val_batches = self.data.fixed_batches(
            "val", cfg.eval_batches, cfg.batch_size, cfg.model.block_size, cfg.data.eval_seed, self.world.rows(cfg.batch_size)
        )
        self.data.batch("train", 1, cfg.model.block_size, torch.Generator().manual_seed(0))  # long enough?
        self._preflight()

    def _preflight(self) -> None:
        """Each contender's optimizer and schedule made once, on the job's model, before any run starts.

        Making it holds a family to its contract (``metaopt.contract``) and checks what the
        optimizer checks (a path it cannot take, the forward mode's memory, a torch optimizer's
        setting the device does not support): a contender that fails is refused here with the
        engine's or the constructor's message, and no run directory is made.

        Raises:
            ValueError: naming the contender, with the engine's message.
        """
        model = build_model(self.cfg, self.data.vocab_size, self.cfg.seeds[0], self.device)
        for oc in self.cfg.optimizers:
            try:
                # a torch optimizer too: the config checked it on a CPU tensor, this is the job's device
                build_scheduler(build_optimizer(oc, self.cfg, model), oc.schedule, self.cfg.steps)
            except (ValueError, TypeError, RuntimeError, MemoryError) as e:  # FamilyContractError is a ValueError
                raise ValueError(f"optimizer {oc.label!r} (kind {oc.kind}): {e}") from None

    @property
    def recorded_device(self) -> str:
        """The device config.yaml and checkpoints record: this one, or its kind when each process has its own GPU."""
        return self.device.type if self.world.distributed else str(self.device)

    def sources(self) -> dict[str, Any]:
        """Each family contender's `metaopt.registry.FamilySource`, by label (its file and SHA-256)."""
        return {o.label: o.source() for o in self.cfg.optimizers if not o.is_torch}

    def num_parameters(self) -> int:
        """The job's GPT's number of parameters (built on the meta device: no memory)."""
        m = self.cfg.model
        with torch.device("meta"):
            gpt = GPT(GPTConfig(self.data.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd, m.dropout))
        return gpt.num_parameters()

    def plan_resume(self, run_dir: Path) -> ResumePlan:
        """How ``run`` would continue ``run_dir`` (whose config is this job's).

        Reads the checkpoints and ``metrics.jsonl``, changes nothing. Raises ``ResumeError``.
        """
        notes = _resume.check_families(run_dir, self.sources())  # first: the rule's code itself
        plan = _resume.plan(self.cfg.model_copy(update={"device": self.recorded_device}), run_dir)
        plan.notes = notes
        for sp in plan.seeds.values():  # load every checkpoint into a throwaway run now, not midway
            for rp in sp.runs.values():
                if rp.action == "checkpoint":
                    oc = next(o for o in self.cfg.optimizers if o.label == rp.label)
                    try:
                        Run(self, oc, sp.seed, None, Progress(bars=False)).load_state(rp.state)  # type: ignore[arg-type]
                    except Exception as e:
                        raise ResumeError(
                            f"checkpoint {sp.checkpoint}: the state of run {rp.label!r} does not fit its config: {type(e).__name__}: {e}"
                        ) from None
        return plan

    def run(self, run_dir: Path, *, progress: Progress | None = None, resume: ResumePlan | None = None,
            report: bool = True) -> JobResult:
        """Train every optimizer for every seed, then write the summary and plots.

        Ctrl-C stops the training; what was logged is summarised and plotted, and
        ``interrupted`` is set. ``report=False``: no summary or plots (a unit of a launched job,
        `metaopt.jobs.launch`, whose run directory reports all units together); the result's
        summary is then empty.

        With ``resume`` (``plan_resume`` of ``run_dir``): ``metrics.jsonl`` is cut back to what
        the plan keeps, finished runs are skipped and the others continue from their checkpoint
        (or from step 0 without one).
        """
        cfg = self.cfg
        progress = progress or Progress()
        writes = self.world.writes
        dp.barrier(self.world)  # every process has read what it resumes from before rank 0 writes
        if writes and resume is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            # "auto" resolved: the run directory records the device the job ran on
            write_config(cfg.model_copy(update={"device": self.recorded_device}), run_dir / "config.yaml")
            _resume.write_families(run_dir, self.sources())
        elif writes:
            if resume.run_dir != run_dir:
                raise ValueError(f"the resume plan is for {resume.run_dir}, not {run_dir}")
            metrics = run_dir / METRICS_FILE
            kept = resume.kept_text()
            if not metrics.exists() or kept != metrics.read_text(encoding="utf-8"):
                write_text_atomic(kept, metrics)
            for sp in resume.seeds.values():  # a seed that finished after its last checkpoint
                if sp.done:
                    self._drop_checkpoint(run_dir, sp.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        interrupted = False
        report = report and writes
        with MetricsLog(run_dir / METRICS_FILE) if writes else NullLog() as log:
            try:
                units = cfg.units()
                seeds = [s for s in cfg.seeds if any(u[1] == s for u in units)]  # a shard's
                for i, seed in enumerate(seeds):
                    progress.position = f"[{i + 1}/{len(seeds)}] " if len(seeds) > 1 else ""
                    sp = resume.seeds.get(seed) if resume is not None else None
                    if sp is not None and sp.done:
                        continue
                    self._run_seed(seed, log, progress, run_dir=run_dir, plan=sp)
            except KeyboardInterrupt:
                interrupted = True
            except BaseException:
                if report:
                    with contextlib.suppress(Exception):  # best effort: summarise what was logged
                        self._report(run_dir, interrupted=True)
                raise
        if not report:
            return JobResult(run_dir, {}, interrupted, "")
        return self._report(run_dir, interrupted=interrupted)

    def _run_seed(self, seed: int, log: MetricsLog, progress: Progress, *, run_dir: Path, plan: SeedPlan | None = None) -> None:
        """Every optimizer from this seed, interleaved step by step.

        One round: one step of each unfinished run, in the config's order. After the round in
        which the slowest unfinished run passes a multiple of ``checkpoint_every``, all of them
        are checkpointed together.
        """
        runs: list[Run] = []
        every = self.cfg.checkpoint_every
        try:
            for slot, oc in enumerate(self._planned(seed)):
                rp = plan.runs[oc.label] if plan is not None else None
                if rp is not None and rp.action == "skip":
                    continue
                run = Run(self, oc, seed, log, progress, slot)
                if rp is not None and rp.action == "checkpoint":
                    run.load_state(rp.state)
                runs.append(run)
            mark = 0
            if plan is not None and plan.checkpoint is not None:
                mark = plan.mark
                _set_rng_state(self.device, plan.global_rng)  # as it was after that round
            for run in runs:
                run.start(resumed=run.done > 0)
            while not all(r.finished for r in runs):
                for run in runs:
                    if not run.finished:
                        run.advance()
                unfinished = [r.done for r in runs if not r.finished]
                if every and unfinished and min(unfinished) // every > mark // every:
                    mark = min(unfinished)
                    self._checkpoint(run_dir, seed, runs, log, mark)
        finally:
            with deferred_interrupt():
                for run in runs:
                    run.close()  # the steps done so far, also on Ctrl-C
        log.sync()
        if self.world.writes:
            self._drop_checkpoint(run_dir, seed)  # every record of the seed is in metrics.jsonl
        for run in runs:
            progress.echo(run.final_line())

    def _checkpoint(self, run_dir: Path, seed: int, runs: list[Run], log: MetricsLog, mark: int) -> None:
        """One file for the seed's runs, written atomically; a signal waits until it is written.

        Every process takes its runs' states (under FSDP2 they are gathered); rank 0 writes.
        """
        with deferred_interrupt():
            by_label = {r.oc.label: r for r in runs}
            states = {
                o.label: by_label[o.label].state() if o.label in by_label and not by_label[o.label].finished else None
                for o in self._planned(seed)
            }
            if not self.world.writes:
                return
            SeedCheckpoint(
                seed=seed,
                config=self.cfg.model_copy(update={"device": self.recorded_device}).dump(),
                mark=mark,
                global_rng=list(_rng_state(self.device)),
                # the records written so far reach the disk before the checkpoint that counts them
                metrics_bytes=log.sync(),
                runs=states,  # a run absent here had finished before this round: None
            ).save(checkpoint_path(run_dir, seed))

    def _planned(self, seed: int) -> list[OptimizerConfig]:
        """The optimizers this job trains from ``seed``: all of them, or those of its shard."""
        units = set(self.cfg.units())
        return [o for o in self.cfg.optimizers if (o.label, seed) in units]

    @staticmethod
    def _drop_checkpoint(run_dir: Path, seed: int) -> None:
        path = checkpoint_path(run_dir, seed)
        for p in (path, path.with_name(path.name + ".tmp")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with contextlib.suppress(OSError):  # only when empty
            path.parent.rmdir()

    def _report(self, run_dir: Path, *, interrupted: bool) -> JobResult:
        """The summary and plots of what ``metrics.jsonl`` holds (`metaopt.jobs.report.write_report`)."""
        records = read_metrics(run_dir / METRICS_FILE)
        report = write_report(self.cfg, records, run_dir, interrupted=interrupted, device=str(self.device))
        return JobResult(run_dir, report.summary, interrupted, report.table, report.plots)


def write_config(cfg: JobConfig, path: Path) -> None:
    """Write the resolved config as YAML to ``path``, with a header saying how to re-run it."""
    header = (
        "# The resolved config of this run (defaults filled in, command-line overrides applied).\n"
        f"# Re-run it with:  metaopt run {path}\n"
    )
    path.write_text(header + yaml.safe_dump(cfg.dump(), sort_keys=False, default_flow_style=None), encoding="utf-8")
