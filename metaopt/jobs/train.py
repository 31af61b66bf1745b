"""Running a job: every optimizer of the config on the same model, data and seed.

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
after the same round; ``metaopt.jobs.resume``), and ``metaopt run --resume`` continues them
from there with the numbers an uninterrupted run has. Runs share no state to make that hold:
each has its own batch generator, its own validation generator for an unrolled validation
meta-objective, and (with dropout) its own stream of the global generator.
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
from metaopt.jobs.data import CharDataset
from metaopt.jobs.gpt import GPT, GPTConfig
from metaopt.jobs.metrics import METRICS_FILE, MetricsLog, read_metrics
from metaopt.jobs.resume import ResumeError, ResumePlan, SeedPlan
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
def evaluate(model: torch.nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Mean loss over ``batches`` in eval mode (one read-back)."""
    was_training = model.training
    model.eval()
    total = sum(lm_loss(model, b) for b in batches)
    model.train(was_training)
    return float(total / len(batches))


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


class _Run:
    """One optimizer trained from one seed, advanced a step at a time.

    The runs of a seed are interleaved step by step, so that machine load, and a Ctrl-C, fall on
    all alike.
    """

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
        self.sched = build_scheduler(self.opt, oc.schedule, cfg.steps)
        # Schedule-Free and its like: trained in train mode, evaluated in eval mode (`_evaluate`);
        # between steps, checkpoints included, they stay in train mode (see `state`)
        self.modes = has_modes(self.opt)
        if self.modes:
            self.opt.train()
        self.meta = isinstance(self.opt, MetaOptimizer)
        self.names = coefficient_names(self.opt) if self.meta else []
        self.learned = list(self.opt.learned) if self.meta else []
        self.hnames = hypergrad_names(self.opt) if self.learned else []
        self.gen = torch.Generator().manual_seed(seed)
        hg = oc.hypergrad
        # the validation batches of an unrolled validation meta-objective: the run's own stream
        self.meta_gen = (
            torch.Generator().manual_seed(10_000_019 + seed) if self.meta and hg.mode == "unrolled" and hg.meta_objective == "val" else None
        )
        self.queue: collections.deque = collections.deque()  # a training batch drawn ahead
        self.losses = torch.zeros(cfg.steps, device=job.device)
        self.coefs = torch.zeros(cfg.steps, len(self.names), device=job.device) if self.names else None
        self.hgrads = torch.zeros(cfg.steps, len(self.hnames), device=job.device) if self.hnames else None
        self.hgrads_from = 0  # the first step whose |h| the buffer holds (a checkpoint without them: later)
        self.times = [0.0] * cfg.steps
        self.train_times = [0.0] * cfg.steps
        self.lrs = [0.0] * cfg.steps  # the lr each step ran at (first param group), a Python float
        self.elapsed = 0.0  # this run's own seconds: its steps and its evaluations
        self.train_elapsed = 0.0  # its steps only
        self.val: dict[int, float] = {}
        self.done = 0
        self.flushed = 0
        self.last_coefs: dict[str, float] = {}
        self.last_hgrads: dict[str, float] = {}
        self.last_skipped: int | None = None
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
        v = self._evaluate_in_eval_mode()
        self.elapsed += time.perf_counter() - t
        return v

    def _evaluate_in_eval_mode(self) -> float:
        """The validation loss, the optimizer in its eval mode where it has one (Schedule-Free: at x, not y)."""
        if not self.modes:
            return evaluate(self.model, self.job.val_batches)
        self.opt.eval()
        try:
            return evaluate(self.model, self.job.val_batches)
        finally:
            self.opt.train()

    def _coef_values(self) -> dict[str, float]:
        return dict(zip(self.names, coefficient_vector(self.opt).tolist()))

    # records
    def flush(self) -> list[float]:
        """Write the records of the steps done since the last flush (one read-back)."""
        lo, hi = self.flushed, self.done
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
            if self.meta:
                records[-1]["skipped_hypersteps"] = self.last_skipped = int(self.opt.skipped_hypersteps)
                self.last_coefs = records[-1]["coefficients"]
                self.last_hgrads = records[-1].get("hypergrad", {})
            self.log.write(records)
            self.flushed = hi
        return losses

    def _step(self) -> int:
        """One plain step, or one unrolled hyper-step of K steps; returns how many steps."""
        hg = self.oc.hypergrad
        if self.meta and hg.mode == "unrolled" and self.done % hg.interval == 0 and self.done + hg.k <= self.cfg.steps:
            batches = [self._next_batch() for _ in range(hg.k)]
            if hg.meta_objective == "val":
                meta_batch = self.job.data.batch("val", self.cfg.batch_size, self.cfg.model.block_size, self.meta_gen)
            else:  # the next training batch, which the next step then trains on
                meta_batch = self._peek_batch()
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
            self.losses[self.done : self.done + hg.k] = torch.stack(inner[: hg.k])
            self.lrs[self.done : self.done + hg.k] = [lr] * hg.k
            self._schedule(hg.k)
            return hg.k
        x, y = self._next_batch()
        self.lrs[self.done] = self._lr()
        # torch's default for torch's optimizers; a MetaOptimizer keeps its flat gradient buffers
        # and zeroes them in place (set_to_none=True would make every step copy the gradients in)
        self.opt.zero_grad()
        _, loss = self.model(x, y)
        loss.backward()
        self.opt.step()
        self.losses[self.done] = loss.detach()
        self._schedule(1)
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
            self.val[0] = v0 = self._evaluate_in_eval_mode()
            rec0 = {"step": 0, **self.base, "train_loss": None, "val_loss": v0, "time": 0.0, "train_time": 0.0}
            if self.meta:
                rec0["coefficients"] = self.last_coefs = self._coef_values()
            self.log.write([rec0])
        if self.progress.bars:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.cfg.steps, initial=self.done, desc=f"{self.progress.position}seed {self.seed} {self.oc.label}",
                unit="step", position=self.slot, leave=True, dynamic_ncols=True, file=sys.stderr,
            )

    # checkpoints
    def state(self) -> dict[str, Any]:
        """Everything a continued run needs to take the steps this one would have taken.

        Saved between steps, so between unrolled hyper-steps too. An optimizer with modes
        (Schedule-Free) is saved as it trains, in train mode, with the model at its training
        point: switching it to eval and back would round the parameters, and the records would
        then depend on ``checkpoint_every``. (Its authors' advice to save in eval mode is for a
        model to be used; this checkpoint is for continuing, and restores mode and point together.)
        """
        return {
            "done": self.done,
            "flushed": self.flushed,  # its records in metrics.jsonl: steps 0..flushed
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": None if self.sched is None else self.sched.state_dict(),
            "generator": self.gen.get_state(),
            "meta_generator": None if self.meta_gen is None else self.meta_gen.get_state(),
            "rng": None if self.rng is None else list(self.rng),
            "queue": [list(b) for b in self.queue],
            # the steps not yet written (flushed..done) live in these buffers
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

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``'s output (a fresh run of the same config and seed)."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        saved_sched = state.get("scheduler")  # absent: a checkpoint from before schedules, constant
        if (self.sched is None) != (saved_sched is None):
            raise ValueError("the learning-rate schedule does not match (one side has a scheduler, the other none)")
        if self.sched is not None:
            self.sched.load_state_dict(saved_sched)
        self.gen.set_state(state["generator"])
        if (self.meta_gen is None) != (state["meta_generator"] is None):
            raise ValueError("the validation generator of an unrolled validation meta-objective does not match")
        if self.meta_gen is not None:
            self.meta_gen.set_state(state["meta_generator"])
        if (self.rng is None) != (state["rng"] is None):
            raise ValueError("the dropout generator state does not match")
        if self.rng is not None:
            cpu, cuda = state["rng"]
            self.rng = (cpu, cuda)
        self.queue = collections.deque(tuple(t.to(self.device) for t in b) for b in state["queue"])
        if state["losses"].shape != self.losses.shape:
            raise ValueError(f"loss buffer of {tuple(state['losses'].shape)}, this run has {tuple(self.losses.shape)}")
        self.losses.copy_(state["losses"])
        if (self.coefs is None) != (state["coefs"] is None):
            raise ValueError("coefficient buffer does not match")
        if self.coefs is not None:
            if state["coefs"].shape != self.coefs.shape:
                raise ValueError(f"coefficient buffer of {tuple(state['coefs'].shape)}, this run has {tuple(self.coefs.shape)}")
            self.coefs.copy_(state["coefs"])
        if "hgrads" in state:
            if (self.hgrads is None) != (state["hgrads"] is None):
                raise ValueError("hyper-gradient buffer does not match")
            if self.hgrads is not None:
                if state["hgrads"].shape != self.hgrads.shape:
                    raise ValueError(f"hyper-gradient buffer of {tuple(state['hgrads'].shape)}, this run has "
                                     f"{tuple(self.hgrads.shape)}")
                self.hgrads.copy_(state["hgrads"])
            self.hgrads_from = int(state.get("hgrads_from", 0))
        else:  # a checkpoint from before |h| was recorded: the steps it holds unwritten go without
            self.hgrads_from = int(state["done"])
        if len(state["times"]) != self.cfg.steps or len(state["train_times"]) != self.cfg.steps:
            raise ValueError("timing buffers of another length")
        self.times, self.train_times = list(state["times"]), list(state["train_times"])
        # a checkpoint from before the lr was recorded ran at a constant lr: the one it holds
        self.lrs = list(state["lrs"]) if "lrs" in state else [self._lr()] * self.cfg.steps
        if len(self.lrs) != self.cfg.steps:
            raise ValueError("lr buffer of another length")
        self.elapsed, self.train_elapsed = float(state["elapsed"]), float(state["train_elapsed"])
        self.val = {int(k): float(v) for k, v in state["val"].items()}
        self.last_coefs = dict(state["last_coefs"])
        self.done, self.flushed = int(state["done"]), int(state["flushed"])

    def advance(self) -> None:
        """One step (K with an unrolled hyper-step), then evaluation, flush and report as due."""
        cfg = self.cfg
        if self.rng is not None:
            _set_rng_state(self.device, self.rng)
        t = time.perf_counter()
        k = self._step()
        if self.coefs is not None:
            self.coefs[self.done : self.done + k] = coefficient_vector(self.opt)
        if self.hgrads is not None:
            self.hgrads[self.done : self.done + k] = hypergrad_vector(self.opt)
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
        hyper = _fmt_hypergrad(self.last_hgrads, self.learned, self.last_skipped)
        return (
            f"{self.progress.position}seed {self.seed} {self.oc.label}: val loss {last_val:.4f} "
            f"(best {min(self.val.values()):.4f}), {self.done / max(self.train_elapsed, 1e-9):.1f} steps/s{coefs}"
            + (f"  {hyper}" if hyper else "")
        )

    def _report(self, losses: list[float], evaluated: bool) -> None:
        train = sum(losses) / len(losses) if losses else math.nan
        val = self.val[max(self.val)]
        coefs = _fmt_coefs(self.last_coefs, self.learned)
        hyper = _fmt_hypergrad(self.last_hgrads, self.learned, self.last_skipped)
        # under a schedule, the lr of the last step: where in its warm-up or decay the run is
        lr = f"lr={self.lrs[self.done - 1]:.2e}" if self.sched is not None and self.done else ""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={train:.4f} val={val:.4f} {lr} {coefs} {hyper}".strip(), refresh=False)
            self.bar.update(self.done - self.bar.n)
        elif evaluated:
            self.progress.echo(
                f"{self.progress.position}seed {self.seed} {self.oc.label} step {self.done}/{self.cfg.steps}: "
                f"train {train:.4f} val {val:.4f} {lr} {coefs} {hyper} "
                f"({self.done / max(self.train_elapsed, 1e-9):.1f} steps/s)".replace("   ", " ").replace("  ", " ")
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
    """

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
        plan = _resume.plan(self.cfg.model_copy(update={"device": str(self.device)}), run_dir)
        plan.notes = notes
        for sp in plan.seeds.values():  # load every checkpoint into a throwaway run now, not midway
            for rp in sp.runs.values():
                if rp.action == "checkpoint":
                    oc = next(o for o in self.cfg.optimizers if o.label == rp.label)
                    try:
                        _Run(self, oc, sp.seed, None, Progress(bars=False)).load_state(rp.state)  # type: ignore[arg-type]
                    except Exception as e:
                        raise ResumeError(
                            f"checkpoint {sp.checkpoint}: the state of run {rp.label!r} does not fit its config: {type(e).__name__}: {e}"
                        ) from None
        return plan

    def run(self, run_dir: Path, *, progress: Progress | None = None, resume: ResumePlan | None = None) -> JobResult:
        """Train every optimizer for every seed, then write the summary and plots.

        Ctrl-C stops the training; what was logged is summarised and plotted, and
        ``interrupted`` is set.

        With ``resume`` (``plan_resume`` of ``run_dir``): ``metrics.jsonl`` is cut back to what
        the plan keeps, finished runs are skipped and the others continue from their checkpoint
        (or from step 0 without one).
        """
        cfg = self.cfg
        progress = progress or Progress()
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:
            # "auto" resolved: the run directory records the device the job ran on
            write_config(cfg.model_copy(update={"device": str(self.device)}), run_dir / "config.yaml")
            _resume.write_families(run_dir, self.sources())
        else:
            if resume.run_dir != run_dir:
                raise ValueError(f"the resume plan is for {resume.run_dir}, not {run_dir}")
            metrics = run_dir / METRICS_FILE
            kept = resume.kept_text()
            if not metrics.exists() or kept != metrics.read_text(encoding="utf-8"):
                _resume.write_text_atomic(kept, metrics)
            for sp in resume.seeds.values():  # a seed that finished after its last checkpoint
                if sp.done:
                    self._drop_checkpoint(run_dir, sp.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        interrupted = False
        with MetricsLog(run_dir / METRICS_FILE) as log:
            try:
                for i, seed in enumerate(cfg.seeds):
                    progress.position = f"[{i + 1}/{len(cfg.seeds)}] " if len(cfg.seeds) > 1 else ""
                    sp = resume.seeds.get(seed) if resume is not None else None
                    if sp is not None and sp.done:
                        continue
                    self._run_seed(seed, log, progress, run_dir=run_dir, plan=sp)
            except KeyboardInterrupt:
                interrupted = True
            except BaseException:
                with contextlib.suppress(Exception):  # best effort: summarise what was logged
                    self._report(run_dir, interrupted=True)
                raise
        return self._report(run_dir, interrupted=interrupted)

    def _run_seed(self, seed: int, log: MetricsLog, progress: Progress, *, run_dir: Path, plan: SeedPlan | None = None) -> None:
        """Every optimizer from this seed, interleaved step by step.

        One round: one step of each unfinished run, in the config's order. After the round in
        which the slowest unfinished run passes a multiple of ``checkpoint_every``, all of them
        are checkpointed together.
        """
        runs: list[_Run] = []
        every = self.cfg.checkpoint_every
        try:
            for slot, oc in enumerate(self.cfg.optimizers):
                rp = plan.runs[oc.label] if plan is not None else None
                if rp is not None and rp.action == "skip":
                    continue
                run = _Run(self, oc, seed, log, progress, slot)
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
        self._drop_checkpoint(run_dir, seed)  # every record of the seed is in metrics.jsonl
        for run in runs:
            progress.echo(run.final_line())

    def _checkpoint(self, run_dir: Path, seed: int, runs: list[_Run], log: MetricsLog, mark: int) -> None:
        """One file for the seed's runs, written atomically; a signal waits until it is written."""
        with deferred_interrupt():
            by_label = {r.oc.label: r for r in runs}
            state = {
                "kind": _resume.KIND,
                "format": _resume.FORMAT,
                "seed": seed,
                "config": self.cfg.model_copy(update={"device": str(self.device)}).dump(),
                "mark": mark,
                "global_rng": list(_rng_state(self.device)),
                # the records written so far reach the disk before the checkpoint that counts them
                "metrics_bytes": log.sync(),
                # a run absent here had finished before this round: None
                "runs": {
                    o.label: by_label[o.label].state() if o.label in by_label and not by_label[o.label].finished else None
                    for o in self.cfg.optimizers
                },
            }
            _resume.save_atomic(state, _resume.checkpoint_path(run_dir, seed))

    @staticmethod
    def _drop_checkpoint(run_dir: Path, seed: int) -> None:
        path = _resume.checkpoint_path(run_dir, seed)
        for p in (path, path.with_name(path.name + ".tmp")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with contextlib.suppress(OSError):  # only when empty
            path.parent.rmdir()

    def _report(self, run_dir: Path, *, interrupted: bool) -> JobResult:
        from metaopt.jobs.plots import make_plots
        from metaopt.jobs.summary import format_table, summarize, write_summary

        records = read_metrics(run_dir / METRICS_FILE)
        summary = summarize(self.cfg, records, interrupted=interrupted, device=str(self.device))
        write_summary(summary, run_dir)  # first: the numbers stand even if a plot fails
        plots = make_plots(self.cfg, records, run_dir, summary)
        write_summary(summary, run_dir)  # again, with each plot's caption
        return JobResult(run_dir, summary, interrupted, format_table(summary), plots)


def write_config(cfg: JobConfig, path: Path) -> None:
    """Write the resolved config as YAML to ``path``, with a header saying how to re-run it."""
    header = (
        "# The resolved config of this run (defaults filled in, command-line overrides applied).\n"
        f"# Re-run it with:  metaopt run {path}\n"
    )
    path.write_text(header + yaml.safe_dump(cfg.dump(), sort_keys=False, default_flow_style=None), encoding="utf-8")
