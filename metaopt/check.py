"""Gradcheck for optimizer families: [`check_family`][metaopt.check_family], behind ``metaopt check``.

It runs the engine's own contract checks (``metaopt.contract``) and then what only a test can
tell: hyper-gradients against finite differences (one-step and forward mode), zero-gradient
coordinates, every path against the generic path, checkpoints, the box under a huge
hyper-learning rate, and named points against reference optimizers. Everything on small float64
problems on the CPU; the result is a [`FamilyReport`][metaopt.check.FamilyReport].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .family import Family
from .contract import FamilyContractError, _where_in_user_code, check_declaration, contract_probe, first_step

Tensor = torch.Tensor

__all__ = ["CheckResult", "FamilyReport", "check_family"]


@dataclass
class CheckResult:
    """One line of a [`FamilyReport`][metaopt.check.FamilyReport]."""

    name: str
    status: Literal["pass", "fail", "skip"]
    detail: str = ""
    fix: str = ""

    def __str__(self) -> str:
        head = f"{self.status.upper():<4}  {self.name}"
        text = f"{head}: {self.detail}" if self.detail else head
        return text + (f"\n      fix: {self.fix}" if self.fix and self.status == "fail" else "")


@dataclass
class FamilyReport:
    """What `check_family` found: one result per check, ``ok`` when none failed."""

    family: str
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not count against it)."""
        return not any(c.status == "fail" for c in self.checks)

    def __str__(self) -> str:
        lines = [str(c) for c in self.checks]
        passed = sum(c.status == "pass" for c in self.checks)
        failed = sum(c.status == "fail" for c in self.checks)
        skipped = sum(c.status == "skip" for c in self.checks)
        lines.append(f"{self.family}: {passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe)."""
        return {"family": self.family, "ok": self.ok,
                "checks": [{"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix} for c in self.checks]}


#: the tolerance of a hyper-gradient against its central finite difference (relative, float64)
FD_TOLERANCE = 1e-5
#: the tolerance of a fast path against the generic path over a few float64 steps (relative)
PATH_TOLERANCE = 1e-6
#: the tolerance of a named point against its reference optimizer (relative, float64)
POINT_TOLERANCE = 1e-6


def check_family(family: Family, *, paths: Sequence[str] | None = None, compile: bool = True, seed: int = 0,
                 progress: Callable[[CheckResult], None] | None = None, **hyperparameters: Any) -> FamilyReport:
    """Gradcheck for optimizer families: is this family right, and does the engine run it right?

    Everything runs on small float64 problems (a 5-7-3 MLP on random data), on the CPU:

    * ``contract``: the contract the engine holds every family to (``contract_probe`` in
      float64 and float32, and the first step at several shapes, a 0-d parameter among them);
    * ``hypergrad one-step``: each learned coefficient's hyper-gradient against a central finite
      difference of the next loss, at a random state and random coefficients inside the box;
    * ``hypergrad forward``: [`Forward`][metaopt.Forward] after several steps against a central
      finite difference of the loss after those steps replayed with the same gradients (the
      first-order hyper-gradient it computes);
    * ``zero gradients``: a network with a dead unit (coordinates whose gradient is always 0):
      the one-step hyper-gradient still equals its finite difference, and every path and mode
      keeps finite tangents and skips no hyper-step;
    * ``path <name>``: every path the family can take (``fused``, ``native``, ``compiled``)
      against the generic path, learning its coefficients (and in forward mode on ``compiled``);
    * ``state_dict``: a checkpoint, saved with ``torch.save`` and loaded with
      ``weights_only=True``, continues bit for bit;
    * ``box``: every coefficient stays in its box and finite under a hyper-learning rate of 1e6
      (SGD and Adam);
    * ``point <name>``: each named point in ``family.references`` equals its reference optimizer.

    Args:
        family: the family to check (a [`Family`][metaopt.Family] instance).
        paths: the fast paths to compare with the generic one; None: every path the family can
            take (the compiled one only with ``compile``).
        compile: include the compiled path (tens of seconds per graph on a CPU).
        seed: the seed of the problems.
        progress: called with each [`CheckResult`][metaopt.check.CheckResult] as it is done.
        **hyperparameters: the param group's hyperparameters (the family's defaults otherwise),
            e.g. ``weight_decay=0.1`` to check the decay terms too.

    Returns:
        The report: ``report.ok`` is True when no check failed; ``str(report)`` gives one line
        per check, with the fix under a failure.
    """
    report = FamilyReport(getattr(family, "name", type(family).__name__))

    def record(result: CheckResult) -> CheckResult:
        report.checks.append(result)
        if progress is not None:
            progress(result)
        return result

    ctx = _Context(family, hyperparameters, seed)
    contract = record(ctx.run("contract", _check_contract))
    if contract.status == "fail":
        for name in ("hypergrad one-step", "hypergrad forward", "zero gradients", "paths", "state_dict", "box",
                     "points"):
            record(CheckResult(name, "skip", "the contract failed; fix it first"))
        return report
    record(ctx.run("hypergrad one-step", _check_one_step))
    record(ctx.run("hypergrad forward", _check_forward))
    record(ctx.run("zero gradients", lambda c: _check_zero_gradients(c, compile)))
    for name in ("fused", "native", "compiled"):
        if paths is not None and name not in paths:
            continue
        if name == "compiled" and not compile:
            record(CheckResult("path compiled", "skip", "compile is off (metaopt check --no-compile)"))
            continue
        record(ctx.run(f"path {name}", lambda c, name=name: _check_path(c, name)))
    record(ctx.run("state_dict", _check_state_dict))
    record(ctx.run("box", _check_box))
    references = dict(getattr(family, "references", {}) or {})
    if not references:
        record(CheckResult("points", "skip", "the family names no reference optimizer (Family.references)"))
    for point, factory in references.items():
        record(ctx.run(f"point {point}", lambda c, p=point, f=factory: _check_point(c, p, f)))
    return report


class _Skip(Exception):
    """A check that does not apply; its message says why."""


@dataclass
class _Context:
    family: Any
    hyperparameters: dict
    seed: int

    def run(self, name: str, fn: Callable[[_Context], str]) -> CheckResult:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the report says what matters; a probe's warnings are noise
                detail = fn(self)
        except _Skip as err:
            return CheckResult(name, "skip", str(err))
        except _Failed as err:
            return CheckResult(name, "fail", err.found, err.fix)
        except FamilyContractError as err:
            return CheckResult(name, "fail", f"{err.rule}: {err.found}", err.fix)
        except Exception as err:  # noqa: BLE001 - a check that crashes is a failed check, said plainly
            where = _where_in_user_code(err, self.family)
            return CheckResult(name, "fail", f"raised {type(err).__name__}: {err}{where}",
                               "run the failing case by hand to see the traceback (the message says where)")
        return CheckResult(name, "pass", detail)

    def group(self) -> dict[str, Any]:
        return {**self.family.defaults(), **self.hyperparameters}

    def optimizer(self, params, hypergrad, path: str = "generic", family=None, **extra):
        from .optimizer import MetaOptimizer

        return MetaOptimizer(params, family or self.family, hypergrad=hypergrad, path=path,
                             compile=path == "compiled", **{**self.hyperparameters, **extra})

    def interior(self, gen: torch.Generator) -> dict[str, float]:
        """Random values well inside each learned coefficient's box."""
        out = {}
        for n in self.family.space.learned:
            c = self.family.space[n]
            out[n] = c.low + (c.high - c.low) * (0.15 + 0.7 * float(torch.rand((), generator=gen, dtype=torch.float64)))
        return out


class _Failed(Exception):
    def __init__(self, found: str, fix: str) -> None:
        super().__init__(found)
        self.found, self.fix = found, fix


def _mlp(seed: int, dead: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    act = torch.nn.ReLU() if dead else torch.nn.Tanh()
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), act, torch.nn.Linear(7, 3)).to(torch.float64)
    if dead:  # unit 0 never fires: its weights, bias and outgoing weights always get a zero gradient
        with torch.no_grad():
            model[0].weight[0] = 0.0
            model[0].bias[0] = -10.0
    return model


def _batches(n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randn(16, 3, generator=gen, dtype=torch.float64))
            for _ in range(n)]


def _loss(model, xy) -> Tensor:
    x, y = xy
    return ((model(x) - y) ** 2).mean()


def _step(model, opt, xy) -> None:
    opt.zero_grad()
    _loss(model, xy).backward()
    opt.step()


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if a.numel() else 0.0


def _params(model) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _fmt(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in values.items())


def _check_contract(ctx: _Context) -> str:
    family = ctx.family
    check_declaration(family)
    group = ctx.group()
    learned = family.space.learned
    for dtype in (torch.float64, torch.float32):
        contract_probe(family, group, dtype, "cpu", family.space.tensors(dtype)[0], learned)
    shapes = [(), (7,), (3, 4, 2)]
    for shape in shapes:
        first_step(family, group, torch.empty(shape, dtype=torch.float64), torch.float64)
    what = "form, shapes, dtypes, no input changed, no host read, every learned coefficient reaches delta"
    if family.elementwise:
        what += ", elementwise holds"
    return f"{what} (probes in float64 and float32; first steps at shapes {', '.join(map(str, shapes))})"


#: the finite differences' step, as a fraction of each coefficient's box
FD_STEP = 1e-5


def _fd_noise(loss: float) -> float:
    """The rounding noise of a central difference of a float64 loss of this size, with a margin.

    Each loss carries rounding of about 2^-52 of its size (and so does every parameter it is
    computed from); their difference is divided by 2·FD_STEP.
    """
    return 16 * 2.0**-52 * max(abs(loss), 1.0) / FD_STEP


def _compare(h: Mapping[str, float], fd: Mapping[str, float], what: str, fix: str, noise: float) -> str:
    """Each hyper-gradient against its finite difference: relative error, with the difference's noise as a floor."""
    scale = max((abs(v) for v in fd.values()), default=0.0)
    if scale <= 10 * noise:
        raise _Failed(f"every finite difference is ~0 ({_fmt(fd)}) and the hyper-gradient is {_fmt(h)}: the learned "
                      "coefficients do not change the loss on the test problem", "check that update uses them")
    worst, name, raw = 0.0, None, 0.0
    for k in fd:
        denominator = max(abs(fd[k]), 1e-3 * scale)
        raw = max(raw, abs(h[k] - fd[k]) / denominator)
        err = max(abs(h[k] - fd[k]) - noise, 0.0) / denominator
        if not err <= worst:
            worst, name = err, k
    if not worst <= FD_TOLERANCE:
        raise _Failed(f"{what}: {name}'s hyper-gradient is {h[name]:.6g}, the finite difference {fd[name]:.6g} "
                      f"(relative error {worst:.2g} > {FD_TOLERANCE:g}, beyond the difference's noise {noise:.0e})", fix)
    return (f"{_fmt(h)} against finite differences {_fmt(fd)} (worst relative error {raw:.1g}; the difference's "
            f"noise {noise:.0e})")


def _one_step_fd(ctx: _Context, dead: bool) -> tuple[dict[str, float], dict[str, float], float]:
    """(engine, central finite difference, its noise) of the one-step hyper-gradient at a random state."""
    import copy

    from .hyper.one_step import OneStep

    if not ctx.family.space.learned:
        raise _Skip("the family learns no coefficient")
    seed, warm = ctx.seed, 6
    gen = torch.Generator().manual_seed(seed)
    model = _mlp(seed, dead)
    opt = ctx.optimizer(model.parameters(), OneStep(lr=0.0))
    opt.set_coefficients(**ctx.interior(gen))
    data = _batches(warm + 2, seed + 1)
    for xy in data[:warm]:
        _step(model, opt, xy)
    opt.zero_grad()
    _loss(model, data[warm]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    c = {k: float(v) for k, v in opt.coefficients.items()}
    opt.step()
    _step(model, opt, data[warm + 1])
    h = {k: float(v) for k, v in opt.last_hypergrad.items()}

    def loss_after(**values):
        m = _mlp(seed, dead)
        o = ctx.optimizer(m.parameters(), OneStep(lr=0.0))
        m.load_state_dict(saved[0])
        o.load_state_dict(copy.deepcopy(saved[1]))
        o.set_coefficients(**values)
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
        o.step()
        with torch.no_grad():
            return float(_loss(m, data[warm + 1]))

    fd = {}
    for k in opt.learned:
        box = ctx.family.space[k]
        eps = FD_STEP * max(box.high - box.low, 1e-3)
        fd[k] = (loss_after(**{k: c[k] + eps}) - loss_after(**{k: c[k] - eps})) / (2 * eps)
    return h, fd, _fd_noise(loss_after(**c))


def _check_one_step(ctx: _Context) -> str:
    h, fd, noise = _one_step_fd(ctx, dead=False)
    return _compare(h, fd, "one-step", "if update is right, report it: the engine differentiates update itself", noise)


def _check_forward(ctx: _Context) -> str:
    from .hyper.forward import Forward

    if not ctx.family.space.learned:
        raise _Skip("the family learns no coefficient")
    seed, k = ctx.seed, 5
    gen = torch.Generator().manual_seed(seed)
    start = ctx.interior(gen)
    data = _batches(k + 1, seed + 2)
    model = _mlp(seed)
    opt = ctx.optimizer(model.parameters(), Forward(lr=0.0, decay=1.0))
    opt.set_coefficients(**start)
    recorded = []
    for xy in data[:k]:
        opt.zero_grad()
        _loss(model, xy).backward()
        recorded.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    _step(model, opt, data[k])
    h = {n: float(v) for n, v in opt.last_hypergrad.items()}

    def loss_after(**values):  # the same k steps, the same gradients, other coefficients
        m = _mlp(seed)
        o = ctx.optimizer(m.parameters(), None)
        o.set_coefficients(**{**start, **values})
        for grads in recorded:
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            o.step()
        with torch.no_grad():
            return float(_loss(m, data[k]))

    fd = {}
    for n in opt.learned:
        box = ctx.family.space[n]
        eps = FD_STEP * max(box.high - box.low, 1e-3)
        fd[n] = (loss_after(**{n: start[n] + eps}) - loss_after(**{n: start[n] - eps})) / (2 * eps)
    return f"after {k} steps: " + _compare(
        h, fd, "forward mode", "if update is right, report it: the engine differentiates update itself",
        _fd_noise(loss_after()))


def _paths(ctx: _Context, compile: bool) -> list[str]:
    """The fast paths this family can take here, besides the generic one."""
    from . import kernels
    from .paths import derived_unfit, native_unfit

    family = ctx.family
    out = []
    params = [torch.zeros(2, dtype=torch.float64)]
    if family.fused_update is not None and family.fused_scalars is not None:
        out.append("fused")
    if family.native_rule(family.space.learned) is not None:
        if native_unfit(family, family.space.learned, params, torch.float64) is None and kernels.load(
                family.native_rule(family.space.learned).source) is not None:
            out.append("native")
    elif derived_unfit(family, family.space.learned, params, torch.float64, [ctx.group()]) is None:
        out.append("native")  # no kernel of its own (for this configuration): one written from update
    if compile:
        out.append("compiled")
    return out


def _check_zero_gradients(ctx: _Context, compile: bool) -> str:
    from .hyper.forward import Forward
    from .hyper.one_step import OneStep
    from .hyper.unrolled import Unrolled

    if not ctx.family.space.learned:
        raise _Skip("the family learns no coefficient")
    h, fd, noise = _one_step_fd(ctx, dead=True)
    line = _compare(h, fd, "with a dead unit, one-step",
                    "the engine sets a tangent that is NaN where delta is finite to 0; if this fails, report it", noise)
    runs = [("one-step", "generic"), ("forward", "generic"), ("unrolled", "generic")]
    runs += [("one-step", p) for p in _paths(ctx, compile)]
    if compile:
        runs.append(("forward", "compiled"))
    data = _batches(6, ctx.seed + 3)
    done = []
    for mode, path in runs:
        model = _mlp(ctx.seed, dead=True)
        hg = {"one-step": OneStep(lr=0.0), "forward": Forward(lr=0.0), "unrolled": Unrolled(steps=2, lr=0.0)}[mode]
        opt = ctx.optimizer(model.parameters(), hg, path=path)
        if mode == "unrolled":
            for i in range(2):
                opt.unrolled_step(model, data[2 * i:2 * i + 2], _loss, data[2 * i + 2])
        else:
            for xy in data:
                _step(model, opt, xy)
        tangents_finite = all(bool(torch.isfinite(v).all()) for st in opt.state.values() for k, v in st.items()
                              if k.startswith("hypergrad_tangent"))
        skipped = int(opt.skipped_hypersteps)
        if not tangents_finite or skipped:
            raise _Failed(f"{mode} on the {path} path: " + ("a tangent is not finite" if not tangents_finite else
                          f"{skipped} hyper-steps skipped") + " with a dead unit (gradients always 0 there)",
                          "for a fused rule or a C kernel, give 0 where the value does not move with the coefficient "
                          "(e.g. 1/(2 sqrt v) taken as 0 at v = 0); for update alone, report it: the engine handles it")
        done.append(f"{mode} {path}")
    return f"{line}; finite tangents, nothing skipped: {', '.join(done)}"


def _hyper_for(ctx: _Context, forward: bool = False):
    from .hyper.forward import Forward
    from .hyper.one_step import OneStep

    default = ctx.family.default_hypergrad()
    if default is None or not default.keeps_tangents:  # the family's default learns elsewhere
        default = OneStep()
    fields = {k: v for k, v in default.model_dump().items() if k in _shared_fields()}
    fields["warmup"] = 0
    return Forward(**fields) if forward else OneStep(**fields)


def _shared_fields() -> set[str]:
    from .hyper.update import HyperOptimizer

    return set(HyperOptimizer.model_fields)


def _check_path(ctx: _Context, name: str) -> str:
    from .paths import derived_unfit, native_unfit

    family = ctx.family
    fused = family.fused_update is not None and family.fused_scalars is not None
    if name == "fused" and not fused:
        raise _Skip("the family has no fused rule (fused_scalars, fused_update)")
    if name == "native":
        params = [torch.zeros(2, dtype=torch.float64)]
        # the family's own kernel, or where it has none for this configuration one written from update
        own = family.native_rule(family.space.learned) is not None
        unfit = (native_unfit(family, family.space.learned, params, torch.float64) if own
                 else derived_unfit(family, family.space.learned, params, torch.float64, [ctx.group()]))
        if unfit:
            raise _Skip(f"not here: {unfit}")
    modes = [("one-step", False)] + ([("forward", True)] if name == "compiled" and family.space.learned else [])
    out = []
    data = _batches(8, ctx.seed + 4)
    for mode, forward in modes:
        hg = _hyper_for(ctx, forward) if family.space.learned else None
        runs = {}
        for path in ("generic", name):
            model = _mlp(ctx.seed)
            opt = ctx.optimizer(model.parameters(), hg, path=path)
            if opt.path != path:
                raise _Skip(f"the optimizer runs {opt.path!r} here: {opt.path_reason}")
            for xy in data:
                _step(model, opt, xy)
            coef = torch.stack(list(opt.coefficients.values()))
            runs[path] = (_params(model), coef)
        dp = _rel(runs[name][0], runs["generic"][0])
        dc = _rel(runs[name][1], runs["generic"][1])
        if not (dp <= PATH_TOLERANCE and dc <= PATH_TOLERANCE):
            raise _Failed(f"{mode}: after {len(data)} steps the {name} path's parameters differ from the generic "
                          f"path's by {dp:.2g} and its coefficients by {dc:.2g} (relative; > {PATH_TOLERANCE:g})",
                          "the fused rule or C kernel must compute what update does (and its tangents)"
                          if name != "compiled" else "report it: the compiled path derives everything from update")
        out.append(f"{mode} {max(dp, dc):.1g}")
    return f"equals the generic path over {len(data)} steps (max relative difference: {', '.join(out)})"


def _check_state_dict(ctx: _Context) -> str:
    import copy
    import io

    hg = _hyper_for(ctx) if ctx.family.space.learned else None
    data = _batches(6, ctx.seed + 5)
    model = _mlp(ctx.seed)
    opt = ctx.optimizer(model.parameters(), hg, path="auto")
    for xy in data[:3]:
        _step(model, opt, xy)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = copy.deepcopy(model)
    other = ctx.optimizer(twin.parameters(), hg, path="auto")
    other.load_state_dict(saved)
    for xy in data[3:]:
        _step(model, opt, xy)
        _step(twin, other, xy)
    same = torch.equal(_params(model), _params(twin)) and all(
        torch.equal(a, b) for a, b in zip(opt.coefficients.values(), other.coefficients.values()))
    if not same:
        raise _Failed("a run continued from its state_dict differs from the run itself",
                      "init must build every buffer update reads, and update must keep everything it needs in the "
                      "state (nothing on the family object between steps)")
    return f"saved after 3 steps (torch.save, weights_only load) and continued 3 more bit for bit on the {opt.path} path"


def _check_box(ctx: _Context) -> str:
    from .hyper.one_step import OneStep

    if not ctx.family.space.learned:
        raise _Skip("the family learns no coefficient")
    data = _batches(6, ctx.seed + 6)
    for setting in (OneStep(lr=1e6, momentum=0.0), OneStep(optimizer="adam", lr=1e6)):
        model = _mlp(ctx.seed)
        opt = ctx.optimizer(model.parameters(), setting)
        for xy in data:
            _step(model, opt, xy)
        for n, v in opt.coefficients.items():
            box = ctx.family.space[n]
            if not (bool(torch.isfinite(v)) and box.low <= float(v) <= box.high):
                raise _Failed(f"{n} = {float(v):g} left its box [{box.low:g}, {box.high:g}] under hyper-lr 1e6 "
                              f"({setting.optimizer})", "report it: the engine projects every hyper-step into the box")
    return "every coefficient stays finite and in its box under hyper-lr 1e6 (SGD and Adam), 6 steps each"


def _check_point(ctx: _Context, point: str, factory) -> str:
    import copy
    import inspect

    family = ctx.family
    if point not in family.points:
        raise _Failed(f"references names {point!r}, which is not among the family's points {sorted(family.points)}",
                      "name a reference only for a point in Family.points")
    group = ctx.group()
    try:
        sig = inspect.signature(factory)
        takes_all = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        kwargs = {k: v for k, v in group.items() if takes_all or k in sig.parameters}
    except (TypeError, ValueError):
        kwargs = dict(group)
    model = _mlp(ctx.seed)
    twin = copy.deepcopy(model)
    start = _params(model)
    try:
        reference = factory(twin.parameters(), **kwargs)
    except NotImplementedError as err:
        raise _Skip(f"the reference does not cover this setting: {err}") from None
    ours = ctx.optimizer(model.parameters(), None, path="generic", family=family.at(point, learned=False))
    steps = 50
    for xy in _batches(steps, ctx.seed + 7):
        _step(model, ours, xy)
        _step(twin, reference, xy)
    diff, moved = _rel(_params(model), _params(twin)), _rel(_params(twin), start)
    name = f"{type(reference).__module__.split('.')[0]}'s {type(reference).__name__}"
    if moved < 1e-3:
        raise _Failed(f"the reference {name} barely moved the parameters ({moved:.2g}): the comparison says nothing",
                      "give the reference a learning rate that trains (the group's lr reaches it by name)")
    if not diff <= POINT_TOLERANCE:
        raise _Failed(f"at {point} the family differs from its reference {name} by {diff:.2g} after {steps} steps "
                      f"(relative; > {POINT_TOLERANCE:g})", "check the point's coefficients and the conventions "
                      "(bias correction, where eps goes, weight decay) against the reference")
    return f"equals {name} over {steps} steps (max relative difference {diff:.1g})"
