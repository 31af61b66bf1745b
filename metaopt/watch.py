"""Warn once when an optimizer's hyper-steps keep being skipped, without ever waiting for the device.

A hyper-step whose hyper-gradient is not finite is skipped and counted (``metaopt.hyper.update``);
the count lives on the device, where the step never reads it. ``SkipWatch`` copies it to the host
every ``every`` hyper-steps without waiting (pinned memory and an event on CUDA), reads a copy
only once it has arrived, and warns once when at least half of the hyper-steps between two
reads were skipped: how many, which coefficients' hyper-gradients were not finite, and the
likely cause.
"""

from __future__ import annotations

import ctypes
import warnings

import torch

Tensor = torch.Tensor


class SkippedHyperstepsWarning(RuntimeWarning):
    """Most hyper-steps of an optimizer were skipped: its coefficients are not learning."""


class SkipWatch:
    """Watches one optimizer's skip count (see the module docstring).

    Args:
        family: the family's name, for the message.
        learned: the learned coefficients' names, in the record's order.
        boxes: name -> (low, high) of each learned coefficient.
        every: hyper-steps between two copies to the host.
    """

    def __init__(self, family: str, learned: tuple[str, ...], boxes: dict[str, tuple[float, float]],
                 every: int = 50) -> None:
        self.family, self.learned, self.boxes, self.every = family, learned, boxes, every
        self.hypersteps = 0
        self.pending: tuple[Tensor, object, int] | None = None  # (host copy, event or None, hypersteps)
        self.last: tuple[float, int] | None = None  # (skip count, hypersteps) at the last read
        self.warned = False

    def __getstate__(self) -> dict:
        # pinned buffers and CUDA events do not pickle: a copy starts watching afresh
        return {**self.__dict__, "pending": None, "last": None, "host": None}

    def after(self, record) -> None:
        """Count one hyper-step on ``record`` (a ``HyperState``); every ``every``-th, copy and read."""
        self.hypersteps += 1
        if self.warned or self.hypersteps % self.every:
            return
        self._read_arrived()
        if self.pending is not None:  # the last copy is still on its way: wait for it, not for a new one
            return
        self._copy(record)
        if record.skipped.device.type == "cpu":  # nothing to wait for
            self._read_arrived()

    def _copy(self, record) -> None:
        snapshot = torch.cat([
            record.skipped.reshape(1).to(torch.float64),
            record.last_h.reshape(-1).to(torch.float64),
            record.learned().reshape(-1).to(torch.float64),
        ])
        device = snapshot.device
        if device.type == "cuda":
            host = self.__dict__.get("host")
            if host is None or host.shape != snapshot.shape:  # pinned once, then reused
                host = self.host = torch.empty(snapshot.shape, dtype=torch.float64, pin_memory=True)
            host.copy_(snapshot, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        else:
            host, event = snapshot, None
        self.pending = (host, event, self.hypersteps)

    def _read_arrived(self) -> None:
        if self.pending is None:
            return
        host, event, hypersteps = self.pending
        if event is not None and not event.query():  # still on its way: read it next time
            return
        self.pending = None
        # read the host memory directly: it has arrived, and nothing here may look like a read of a
        # device tensor (no item(), no tolist())
        values = list((ctypes.c_double * host.numel()).from_address(host.data_ptr()))
        skipped = values[0]
        k = len(self.learned)
        rows = (len(values) - 1) // (2 * k) if k else 0
        h = values[1:1 + rows * k]
        c = values[1 + rows * k:]
        if self.last is not None:
            before, then = self.last
            window = hypersteps - then
            count = skipped - before
            if window >= 20 and count >= window / 2:
                self._warn(int(count), window, h, c, rows)
        self.last = (skipped, hypersteps)

    def _warn(self, count: int, window: int, h: list[float], c: list[float], rows: int) -> None:
        self.warned = True
        k = len(self.learned)
        bad = sorted({self.learned[i % k] for i, v in enumerate(h) if v != v or v in (float("inf"), float("-inf"))})
        nan = any(v != v for v in h)
        edges = []
        for i, v in enumerate(c):
            name = self.learned[i % k]
            lo, hi = self.boxes[name]
            if v in (lo, hi):
                edges.append(f"{name}={v:g} at its box's {'lower' if v == lo else 'upper'} end")
        which = (f"the hyper-gradient of {', '.join(repr(b) for b in bad)} was "
                 f"{'NaN' if nan else 'infinite'} at the last look" if bad else
                 "the hyper-gradient was finite at the last look, so the steps overflowed (a huge hyper-learning "
                 "rate or hyper-gradient)")
        if bad and len(bad) == k:
            cause = ("every learned coefficient at once: most likely the gradients themselves are not finite (a "
                     "diverging loss, fp16 without a GradScaler), or the rule is not differentiable at this point "
                     "in all of them")
        elif bad:
            cause = (f"only {', '.join(repr(b) for b in bad)}: the rule's derivative with respect to it is not finite "
                     "here — a sqrt, log, power or division of something that reaches 0 or infinity through that "
                     "coefficient" + (f" ({'; '.join(edges)})" if edges else ""))
        else:
            cause = "lower the hyper-learning rate, or bound the steps (clip=...)"
        warnings.warn(
            f"metaopt: {count} of the last {window} hyper-steps of family {self.family!r} were skipped (not finite) "
            f"and its coefficients did not move in them: {which}; {cause}. `metaopt check` on the family tests its "
            f"derivatives; opt.skipped_hypersteps counts every skip. (Warned once.)",
            SkippedHyperstepsWarning, stacklevel=2,
        )
